"""Sizing and allocating the paged KV pool on the device and the swap space in host memory."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.attention import AttentionBackend
from engine.block_manager import blocks_for
from engine.config import DEFAULT_CPU_KV_CACHE_GIB, EngineConfig, ModelConfig
from engine.model_runner import ModelRunner
from engine.sampling_params import SamplingParams
from engine.scheduler import SchedulerOutput
from engine.sequence import Sequence


@dataclass
class KVCaches:
    device_cache: torch.Tensor  # [2, num_layers, *backend.kv_cache_shape(num_blocks, ...)]
    swap_cache: torch.Tensor  # the same layout with num_swap_blocks, on the CPU
    num_blocks: int
    num_swap_blocks: int


def kv_block_bytes(model_config: ModelConfig, block_size: int) -> int:
    """K and V of one block, every layer."""
    m = model_config
    elem = torch.empty((), dtype=m.kv_cache_dtype).element_size()
    return 2 * m.num_layers * block_size * m.num_kv_heads * m.head_dim * elem


def allocate_kv_caches(
    config: EngineConfig,
    model_config: ModelConfig,
    model: nn.Module,
    backend: AttentionBackend,
    max_num_batched_tokens: int,
) -> KVCaches:
    m, bs = model_config, config.block_size
    num_blocks = _num_kv_blocks(config, m, model, backend, max_num_batched_tokens)

    def shape(n: int) -> tuple[int, ...]:
        return (2, m.num_layers, *backend.kv_cache_shape(n, bs, m.num_kv_heads, m.head_dim))

    # Zeroed, not empty: attention reads whole blocks and masks the slots past a sequence's end, and a masked NaN
    # left in reused memory would still poison the weighted sum (0 * NaN).
    device_cache = torch.zeros(shape(num_blocks), dtype=m.kv_cache_dtype, device=config.torch_device)
    # The swap space only ever receives whole blocks copied from the pool, so it needs no zeroing, and pages never
    # written cost no physical memory.
    num_swap_blocks = 0
    if config.preemption_mode != "recompute":
        num_swap_blocks = min(
            int(config.swap_space * 2**30) // kv_block_bytes(m, bs),
            config.max_num_seqs * blocks_for(m.max_model_len, bs),
        )
    swap_cache = torch.empty(shape(num_swap_blocks), dtype=m.kv_cache_dtype, device="cpu")
    return KVCaches(device_cache, swap_cache, num_blocks, num_swap_blocks)


def _num_kv_blocks(
    config: EngineConfig, m: ModelConfig, model: nn.Module, backend: AttentionBackend, max_num_batched_tokens: int
) -> int:
    bs, block_bytes = config.block_size, kv_block_bytes(m, config.block_size)
    if config.torch_device.type == "cuda" and config.kv_cache_memory is None:
        budget = _cuda_kv_budget(config, m, model, backend, max_num_batched_tokens)
        what = f"gpu_memory_utilization={config.gpu_memory_utilization}"
    else:
        gib = config.kv_cache_memory or DEFAULT_CPU_KV_CACHE_GIB
        budget = int(gib * 2**30)
        what = f"kv_cache_memory={gib} GiB"
    max_len = m.max_model_len
    # More blocks than max_num_seqs full-length sequences can use would only cost memory and start-up time.
    useful = config.max_num_seqs * blocks_for(max_len, bs)
    num_blocks = min(budget // block_bytes, useful)
    if num_blocks * bs < max_len:
        need = blocks_for(max_len, bs) * block_bytes / 2**30
        raise ValueError(
            f"the KV cache ({what}) holds {max(num_blocks, 0) * bs} tokens, fewer than max_model_len={max_len}: "
            f"one sequence cannot fit. Give the KV cache at least {need:.3f} GiB or lower max_model_len"
        )
    return num_blocks


def _cuda_kv_budget(
    config: EngineConfig, m: ModelConfig, model: nn.Module, backend: AttentionBackend, max_num_batched_tokens: int
) -> int:
    """Bytes left for KV blocks after weights and the peak activations of a full-budget prefill."""
    device, bs = config.torch_device, config.block_size
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    n = min(max_num_batched_tokens, m.max_model_len)
    probe_blocks = blocks_for(n, bs)
    shape = backend.kv_cache_shape(probe_blocks, bs, m.num_kv_heads, m.head_dim)
    probe_cache = torch.empty((2, m.num_layers, *shape), dtype=m.kv_cache_dtype, device=device)
    seq = Sequence(-1, "profile", 0, [0] * n, SamplingParams(), None)
    seq.block_table = list(range(probe_blocks))
    ModelRunner(model, backend, probe_cache, bs, device).execute(SchedulerOutput(prefills=[(seq, n)]))
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - probe_cache.numel() * probe_cache.element_size()
    del probe_cache
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(device).total_memory
    return int(total * config.gpu_memory_utilization - peak)
