"""Paged decode attention: the compiled CPU kernel and its torch reference twin (same signature)."""

from __future__ import annotations

import torch

from kernels import cpu_ops

# The head sizes the compiled kernel is instantiated for (a compile-time constant there).
CPU_HEAD_DIMS = (16, 32, 64, 128)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """q: [seqs, heads, dim] float32; k_cache, v_cache: [kv_heads, num_blocks, block_size, dim];
    block_tables: [seqs, max_blocks] int64; context_lens: [seqs] int64 -> [seqs, heads, dim] float32."""
    return cpu_ops.load().paged_decode_attention(
        q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window or 0
    )


def paged_decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """One sequence at a time, gathering its keys: slow and plain, for tests."""
    kv_heads, _, block_size, dim = k_cache.shape
    out = torch.empty_like(q)
    for s in range(q.shape[0]):
        n = int(context_lens[s])
        first = max(0, n - sliding_window) if sliding_window else 0
        blocks = block_tables[s, : -(-n // block_size)]
        k = k_cache[:, blocks].reshape(kv_heads, -1, dim)[:, first:n].float()  # [kv_heads, keys, dim]
        v = v_cache[:, blocks].reshape(kv_heads, -1, dim)[:, first:n].float()
        qs = q[s].view(kv_heads, -1, dim)  # [kv_heads, group, dim]
        p = (qs @ k.transpose(1, 2) * scale).softmax(dim=-1)  # [kv_heads, group, keys]
        out[s] = (p @ v).reshape(-1, dim)
    return out
