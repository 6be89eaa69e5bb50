"""Compute kernels and their torch reference twins. Imports torch (and triton for the GPU kernels) only."""
