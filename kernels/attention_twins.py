"""The torch twins of the Triton attention kernels (kernels/triton_attention.py, kernels/triton_prefill.py), same
signatures: one sequence at a time, K/V gathered into a plain tensor, softmax in fp32."""

from __future__ import annotations

import torch


def _gather_kv(cache: torch.Tensor, blocks: torch.Tensor, n: int, scale: float) -> torch.Tensor:
    """The first n positions of one sequence -> [num_kv_heads, n, head_dim] float32, fp8 dequantized."""
    x = cache[blocks.long()].float()  # [blocks, kv_heads, block_size, head_dim]
    if cache.dtype == torch.float8_e4m3fn:
        x = x * scale
    return x.transpose(0, 1).flatten(1, 2)[:, :n]


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, scale: float, sliding_window: int | None
) -> torch.Tensor:
    """q: [L, heads, dim] at positions pos [L]; k, v: [kv_heads, n, dim] -> [L, heads, dim] float32."""
    group = q.shape[1] // k.shape[0]
    k = k.repeat_interleave(group, 0)  # [heads, n, dim]
    v = v.repeat_interleave(group, 0)
    scores = q.float().transpose(0, 1) @ k.transpose(1, 2) * scale  # [heads, L, n]
    keys = torch.arange(k.shape[1], device=q.device)
    visible = keys[None, :] <= pos[:, None]
    if sliding_window is not None:
        visible &= keys[None, :] > pos[:, None] - sliding_window
    p = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return (p @ v).transpose(0, 1)


def paged_decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Same result as paged_decode_attention; num_splits only divides the kernel's work, so it is unused."""
    block_size = k_cache.shape[2]
    out = torch.empty_like(q)
    for s in range(q.shape[0]):
        n = int(context_lens[s])
        blocks = block_tables[s, : -(-n // block_size)]
        k = _gather_kv(k_cache, blocks, n, k_scale)
        v = _gather_kv(v_cache, blocks, n, v_scale)
        out[s] = _attend(q[s : s + 1], k, v, torch.tensor([n - 1], device=q.device), scale, sliding_window)[0].to(
            q.dtype
        )
    return out


def prefill_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_query_lens: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    block_size = k_cache.shape[2]
    out = torch.empty_like(q)
    for s in range(context_lens.shape[0]):
        begin, end, n = int(cu_query_lens[s]), int(cu_query_lens[s + 1]), int(context_lens[s])
        blocks = block_tables[s, : -(-n // block_size)]
        k = _gather_kv(k_cache, blocks, n, k_scale)
        v = _gather_kv(v_cache, blocks, n, v_scale)
        pos = torch.arange(n - (end - begin), n, device=q.device)
        out[begin:end] = _attend(q[begin:end], k, v, pos, scale, sliding_window).to(q.dtype)
    return out
