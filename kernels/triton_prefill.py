"""Prefill attention in Triton: packed variable-length queries over cached prefixes (prefill, chunked prefill and
prefix-cache hits alike), K/V read in place through block tables; kernels/triton_attention.py says how the two
kernels read the cache and holds what they share."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_attention import (
    LOG2E,
    check_attention_args,
    dot_precision,
    kv_scales,
    kv_tile,
    load_kv_tile,
    online_softmax_step,
)


@triton.jit
def _prefill_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    cu_q_ptr,
    ctx_ptr,
    bt_ptr,
    qk_scale,
    v_scale,
    window,
    num_seqs,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_ot,
    stride_oh,
    stride_od,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_vd,
    stride_bt,
    GROUP: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # Program (t, head): query tile t of the packed batch for one query head. Sequence s owns the tile indices
    # [cu_q[s] // BLOCK_M + s, cu_q[s + 1] // BLOCK_M + s + 1), enough for its ceil(q_len / BLOCK_M) tiles, so
    # the grid is sized from shapes alone (no host sync) and a binary search finds a tile's sequence.
    tile = tl.program_id(0)
    head = tl.program_id(1)
    dtype = q_ptr.dtype.element_ty
    lo_seq = 0
    hi_seq = num_seqs - 1
    while lo_seq < hi_seq:  # the last sequence whose first tile index is <= tile
        mid = (lo_seq + hi_seq + 1) // 2
        if tl.load(cu_q_ptr + mid) // BLOCK_M + mid <= tile:
            lo_seq = mid
        else:
            hi_seq = mid - 1
    seq = lo_seq
    q_start = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_start
    m0 = (tile - q_start // BLOCK_M - seq) * BLOCK_M
    if m0 >= q_len:
        return
    ctx = tl.load(ctx_ptr + seq)

    rows = m0 + tl.arange(0, BLOCK_M)
    d = tl.arange(0, HEAD_DIM)
    pos = ctx - q_len + rows  # each query token's position in its sequence
    q = tl.load(
        q_ptr + (q_start + rows)[:, None] * stride_qt + head * stride_qh + d[None, :] * stride_qd,
        mask=(rows < q_len)[:, None],
        other=0.0,
    )  # q: [BLOCK_M, HEAD_DIM]
    q = q.to(tl.float32).to(dtype)
    # Keys from the lowest any row of the tile sees to the highest (the last real row's position): tiles wholly
    # above the causal diagonal, or below every row's window, are never visited.
    lo = tl.maximum(ctx - q_len + m0 - window + 1, 0) if USE_WINDOW else 0
    hi = tl.minimum(ctx - q_len + m0 + BLOCK_M, ctx)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    kv_head = head // GROUP
    bt_row_ptr = bt_ptr + seq * stride_bt
    for start in range((lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
        k, v, kpos = load_kv_tile(
            k_ptr,
            v_ptr,
            bt_row_ptr,
            kv_head,
            start,
            lo,
            hi,
            stride_kb,
            stride_kh,
            stride_kt,
            stride_kd,
            stride_vb,
            stride_vh,
            stride_vt,
            stride_vd,
            dtype,
            BLOCK_SIZE,
            BLOCK_N,
            HEAD_DIM,
        )
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # s: [BLOCK_M, BLOCK_N], base 2
        visible = kpos[None, :] <= pos[:, None]
        if USE_WINDOW:
            visible = visible & (kpos[None, :] > pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
        m_i, l_i, acc = online_softmax_step(s, m_i, l_i, acc, v, PRECISION)

    # Padding rows past q_len may have seen no key at all; they are not stored, the guard only avoids 0 / 0.
    l_i = tl.where(rows < q_len, l_i, 1.0)
    out = acc * (v_scale / l_i)[:, None]
    tl.store(
        out_ptr + (q_start + rows)[:, None] * stride_ot + head * stride_oh + d[None, :] * stride_od,
        out.to(out_ptr.dtype.element_ty),
        mask=(rows < q_len)[:, None],
    )


def prefill_attention(
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
    """q: [num_tokens, num_heads, head_dim], each sequence's new tokens packed in order; cu_query_lens:
    [num_seqs + 1] int32 prefix sums of the query lengths; context_lens: [num_seqs] int32, tokens cached after
    this step (prefix + new); block_tables: [num_seqs, max_blocks] int32. Query i of sequence s sits at position
    context_lens[s] - q_len + i and attends causally -> [num_tokens, num_heads, head_dim] in q.dtype."""
    num_seqs = cu_query_lens.shape[0] - 1 if cu_query_lens.dim() == 1 else -1
    if num_seqs < 0 or cu_query_lens.dtype != torch.int32 or cu_query_lens.device != q.device:
        raise ValueError(
            f"cu_query_lens must be an int32 [num_seqs + 1] tensor on {q.device}, "
            f"got {cu_query_lens.dtype} of shape {tuple(cu_query_lens.shape)} on {cu_query_lens.device}"
        )
    check_attention_args(q, k_cache, v_cache, block_tables, context_lens, num_seqs, sliding_window, k_scale, v_scale)
    num_tokens, num_heads, head_dim = q.shape
    _, num_kv_heads, block_size, _ = k_cache.shape
    out = torch.empty_like(q)
    if num_seqs == 0 or num_tokens == 0:
        return out
    k_scale, v_scale = kv_scales(k_cache, k_scale, v_scale)
    # Short queries (chunks, decode-like steps) waste less of a 16-row tile; long prompts want 64 rows (32 for
    # head_dim 256, to keep the Q tile and both K/V tiles in shared memory).
    block_m = 16 if num_tokens <= 32 * num_seqs else (64 if head_dim <= 128 else 32)
    grid = (num_tokens // block_m + num_seqs, num_heads)
    _prefill_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        cu_query_lens,
        context_lens,
        block_tables,
        scale * k_scale * LOG2E,
        v_scale,
        sliding_window or 0,
        num_seqs,
        *q.stride(),
        *out.stride(),
        *k_cache.stride(),
        *v_cache.stride(),
        block_tables.stride(0),
        GROUP=num_heads // num_kv_heads,
        BLOCK_SIZE=block_size,
        BLOCK_M=block_m,
        BLOCK_N=kv_tile(block_size),
        HEAD_DIM=head_dim,
        USE_WINDOW=sliding_window is not None,
        PRECISION=dot_precision(q),
    )
    return out
