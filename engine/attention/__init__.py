"""Attention backends: how new K/V are written into the paged cache and how attention reads it back."""
from engine.attention.backend import AttentionBackend, AttentionInputs
from engine.attention.torch_backend import TorchAttentionBackend

__all__ = ["AttentionBackend", "AttentionInputs", "TorchAttentionBackend"]
