"""Attention backends: how new K/V are written into the paged cache and how attention reads it back."""

from __future__ import annotations

import importlib.util
import logging

import torch

from engine.attention.backend import AttentionBackend, AttentionInputs
from engine.attention.torch_backend import TorchAttentionBackend

__all__ = ["AttentionBackend", "AttentionInputs", "TorchAttentionBackend", "select_backend"]

logger = logging.getLogger(__name__)
TRITON_HEAD_DIMS = (16, 32, 64, 128, 256)


def _has_triton() -> bool:
    if importlib.util.find_spec("triton") is not None:
        return True
    logger.warning("triton is not installed: attention runs on torch ops, without the Triton kernels")
    return False


def select_backend(
    name: str,
    device: torch.device,
    block_size: int,
    head_dim: int,
    sliding_window: int | None,
    kv_cache_dtype: torch.dtype,
) -> AttentionBackend:
    """auto: the Triton kernels on CUDA; on the CPU the compiled CPU kernels when they build here and fit the
    model, else plain torch ops. triton on the CPU runs only under Triton's interpreter (the tests)."""
    from engine.attention.cpu_backend import CpuAttentionBackend
    from kernels import cpu_ops
    from kernels.paged_attention import CPU_HEAD_DIMS

    scale = head_dim**-0.5
    if name == "auto" and device.type == "cuda":
        # The Triton kernels tile head_dim as a power of two; other sizes run on torch ops, as does a CUDA torch
        # without triton (Windows wheels have none).
        name = "triton" if head_dim in TRITON_HEAD_DIMS and _has_triton() else "torch"
    if kv_cache_dtype == torch.float8_e4m3fn and name != "triton":
        raise ValueError("kv_cache_dtype fp8 needs the triton attention backend (a CUDA device)")
    if name == "triton":
        # Imported here: triton is needed on the GPU path only, and the CPU app bundle leaves it out.
        from engine.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend(block_size, scale, sliding_window)
    if name == "torch" or (name == "auto" and head_dim not in CPU_HEAD_DIMS):
        return TorchAttentionBackend(block_size, scale, sliding_window)
    if device.type != "cpu":
        raise ValueError(f"attention backend {name!r} runs on the CPU only, not on {device.type}")
    if head_dim not in CPU_HEAD_DIMS:
        raise ValueError(f"the cpu attention backend supports head_dim {CPU_HEAD_DIMS}, not {head_dim}")

    try:
        cpu_ops.load()
    except cpu_ops.KernelBuildError as e:
        if name == "cpu":
            raise
        logger.warning("%s; falling back to the slower torch attention", e)
        return TorchAttentionBackend(block_size, scale, sliding_window)
    return CpuAttentionBackend(block_size, scale, sliding_window)
