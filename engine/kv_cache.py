"""Sizing the paged KV pool and the host swap space, and allocating them in the layout the backend chose.

Pure arithmetic and allocation: the model runner measures the memory budget (on CUDA, by profiling a forward
pass) and asks here how many blocks it buys.
"""

from __future__ import annotations

import torch

from engine.attention import AttentionBackend
from engine.block_manager import blocks_for
from engine.config import EngineConfig, ModelConfig


def kv_block_bytes(model_config: ModelConfig, block_size: int) -> int:
    """K and V of one block, every layer."""
    m = model_config
    elem = torch.empty((), dtype=m.kv_cache_dtype).element_size()
    return 2 * m.num_layers * block_size * m.num_kv_heads * m.head_dim * elem


def cache_shape(
    backend: AttentionBackend, model_config: ModelConfig, num_blocks: int, block_size: int
) -> tuple[int, ...]:
    """[2 (K, V), num_layers, *the backend's per-layer layout]."""
    m = model_config
    return (2, m.num_layers, *backend.kv_cache_shape(num_blocks, block_size, m.num_kv_heads, m.head_dim))


def num_kv_blocks(config: EngineConfig, model_config: ModelConfig, budget_bytes: int, what: str) -> int:
    """Blocks that budget_bytes hold, capped at what max_num_seqs full-length sequences can use. Raises
    ValueError, naming the budget (`what`), when one max_model_len sequence does not fit."""
    bs, block_bytes, max_len = (
        config.block_size,
        kv_block_bytes(model_config, config.block_size),
        model_config.max_model_len,
    )
    # More blocks than max_num_seqs full-length sequences can use would only cost memory and start-up time.
    useful = config.max_num_seqs * blocks_for(max_len, bs)
    num_blocks = min(budget_bytes // block_bytes, useful)
    if num_blocks * bs < max_len:
        need = blocks_for(max_len, bs) * block_bytes / 2**30
        raise ValueError(
            f"the KV cache ({what}) holds {max(num_blocks, 0) * bs} tokens, fewer than max_model_len={max_len}: "
            f"one sequence cannot fit. Give the KV cache at least {need:.3f} GiB or lower max_model_len"
        )
    return num_blocks


def num_swap_blocks(config: EngineConfig, model_config: ModelConfig) -> int:
    if config.preemption_mode == "recompute":
        return 0
    bs = config.block_size
    return min(
        int(config.swap_space * 2**30) // kv_block_bytes(model_config, bs),
        config.max_num_seqs * blocks_for(model_config.max_model_len, bs),
    )
