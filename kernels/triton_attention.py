"""Paged attention in Triton for the GPU path: the decode kernel, and what the prefill kernel
(kernels/triton_prefill.py) shares with it. The torch twins (same signatures) are in kernels/attention_twins.py.

Two kernels read K/V in place through block tables from caches laid out [num_blocks, num_kv_heads, block_size,
head_dim]: `paged_decode_attention` (one query token per sequence, optionally split along the context) and
`prefill_attention` (packed variable-length queries over cached prefixes: prefill, chunked prefill and prefix-cache
hits alike). Softmax runs online in base 2 and fp32; fp8 caches hold stored = x / scale and are read back as
stored * scale, with the scale folded into the scores (k_scale) and the output (v_scale) instead of every element.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

Q_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn)
LOG2E = 1.4426950408889634
# Streaming multiprocessors of the GPU the split heuristic assumes when the tensors live elsewhere (H100 SXM).
DEFAULT_SM_COUNT = 132


@triton.jit
def online_softmax_step(s, m_i, l_i, acc, v, PRECISION: tl.constexpr):
    """Fold one tile of base-2 scores s [M, N] and values v [N, D] into the running max, sum and accumulator."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row with every key masked so far keeps max -inf; subtracting 0 instead keeps exp2 at 0 rather than NaN.
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def load_kv_tile(
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
    DTYPE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """K, V [BLOCK_N, HEAD_DIM] of positions start.. of one kv head, gathered token by token through the block
    table so a tile may span several cache blocks (or part of one); positions outside [lo, hi) load as 0."""
    pos = start + tl.arange(0, BLOCK_N)
    inside = (pos >= lo) & (pos < hi)
    block = tl.load(bt_row_ptr + pos // BLOCK_SIZE, mask=inside, other=0).to(tl.int64)
    slot = pos % BLOCK_SIZE
    d = tl.arange(0, HEAD_DIM)
    k_off = block * stride_kb + kv_head * stride_kh + slot * stride_kt
    v_off = block * stride_vb + kv_head * stride_vh + slot * stride_vt
    # Upcast right after the load (the interpreter mishandles bf16 arithmetic), then to the dot's operand type.
    k = tl.load(k_ptr + k_off[:, None] + d[None, :] * stride_kd, mask=inside[:, None], other=0.0)
    v = tl.load(v_ptr + v_off[:, None] + d[None, :] * stride_vd, mask=inside[:, None], other=0.0)
    return k.to(tl.float32).to(DTYPE), v.to(tl.float32).to(DTYPE), pos


@triton.jit
def _decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    part_m_ptr,
    part_l_ptr,
    part_acc_ptr,
    bt_ptr,
    ctx_ptr,
    qk_scale,
    v_scale,
    window,
    num_splits,
    stride_qs,
    stride_qh,
    stride_qd,
    stride_os,
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
    GROUP_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # One program per (sequence, kv head, split): all GROUP query heads of the kv head share each K/V tile load.
    # The heads form the M side of a tl.dot padded to GROUP_PAD >= 16 rows (the GPU's minimum). Decode is bound
    # by reading the cache, so the padded rows cost tensor-core time that is free; the alternative, elementwise
    # products summed over head_dim, would hold a [group, BLOCK_N, head_dim] tile in registers.
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    dtype = q_ptr.dtype.element_ty
    ctx = tl.load(ctx_ptr + seq)
    first = tl.maximum(ctx - window, 0) if USE_WINDOW else 0
    # The tiles covering [first, ctx), divided into num_splits runs; a run may be empty for short contexts.
    tile_lo = first // BLOCK_N
    num_tiles = tl.cdiv(ctx, BLOCK_N) - tile_lo
    per_split = tl.cdiv(num_tiles, num_splits)
    tile_begin = tile_lo + split * per_split
    tile_end = tl.minimum(tile_begin + per_split, tile_lo + num_tiles)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + g
    q = tl.load(
        q_ptr + seq * stride_qs + heads[:, None] * stride_qh + d[None, :] * stride_qd,
        mask=(g < GROUP)[:, None],
        other=0.0,
    )  # q: [GROUP_PAD, HEAD_DIM]
    q = q.to(tl.float32).to(dtype)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    bt_row_ptr = bt_ptr + seq * stride_bt
    for tile in range(tile_begin, tile_end):
        k, v, pos = load_kv_tile(
            k_ptr,
            v_ptr,
            bt_row_ptr,
            kv_head,
            tile * BLOCK_N,
            first,
            ctx,
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
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # s: [GROUP_PAD, BLOCK_N], base 2
        s = tl.where(((pos >= first) & (pos < ctx))[None, :], s, float("-inf"))
        m_i, l_i, acc = online_softmax_step(s, m_i, l_i, acc, v, PRECISION)

    if SPLIT:
        # Partials [num_seqs, num_heads, num_splits(, HEAD_DIM)] in fp32; an empty run leaves max -inf, sum 0.
        row = (seq * GROUP * tl.num_programs(1) + heads) * num_splits + split
        tl.store(part_m_ptr + row, m_i, mask=g < GROUP)
        tl.store(part_l_ptr + row, l_i, mask=g < GROUP)
        tl.store(part_acc_ptr + row[:, None] * HEAD_DIM + d[None, :], acc * v_scale, mask=(g < GROUP)[:, None])
    else:
        out = acc * (v_scale / l_i)[:, None]
        tl.store(
            out_ptr + seq * stride_os + heads[:, None] * stride_oh + d[None, :] * stride_od,
            out.to(out_ptr.dtype.element_ty),
            mask=(g < GROUP)[:, None],
        )


@triton.jit
def _decode_reduce_kernel(
    out_ptr,
    part_m_ptr,
    part_l_ptr,
    part_acc_ptr,
    num_splits,
    stride_os,
    stride_oh,
    stride_od,
    SPLITS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    # One program per (sequence, query head): rescale each split's partial sums to the common max and add them.
    seq = tl.program_id(0)
    head = tl.program_id(1)
    sp = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, HEAD_DIM)
    row = (seq * tl.num_programs(1) + head) * num_splits + sp
    m = tl.load(part_m_ptr + row, mask=sp < num_splits, other=float("-inf"))
    denom = tl.load(part_l_ptr + row, mask=sp < num_splits, other=0.0)
    acc = tl.load(part_acc_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=(sp < num_splits)[:, None], other=0.0)
    # The first split always holds a key (context_len >= 1), so the max is finite and empty splits weigh 0.
    w = tl.exp2(m - tl.max(m, 0))
    out = tl.sum(acc * w[:, None], 0) / tl.sum(denom * w, 0)
    tl.store(out_ptr + seq * stride_os + head * stride_oh + d * stride_od, out.to(out_ptr.dtype.element_ty))


# ---------------------------------------------------------------------------------------------------------------
# Validation and launch heuristics


def check_attention_args(
    q, k_cache, v_cache, block_tables, context_lens, num_seqs, sliding_window, k_scale, v_scale
) -> None:
    if q.dim() != 3 or q.dtype not in Q_DTYPES:
        raise ValueError(f"q must be a 3-D float32/float16/bfloat16 tensor, got {q.dtype} of shape {tuple(q.shape)}")
    if k_cache.dim() != 4 or k_cache.dtype not in CACHE_DTYPES:
        raise ValueError(
            "k_cache must be a 4-D [num_blocks, num_kv_heads, block_size, head_dim] tensor of "
            f"float32/float16/bfloat16/float8_e4m3fn, got {k_cache.dtype} of shape {tuple(k_cache.shape)}"
        )
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError(
            f"v_cache ({v_cache.dtype}, {tuple(v_cache.shape)}) must match k_cache "
            f"({k_cache.dtype}, {tuple(k_cache.shape)})"
        )
    _, num_kv_heads, _, head_dim = k_cache.shape
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim (k_cache.shape[3]) must be a power of two >= 16, got {head_dim}")
    if q.shape[2] != head_dim:
        raise ValueError(f"q's head_dim {q.shape[2]} differs from the cache's {head_dim}")
    if q.shape[1] % num_kv_heads:
        raise ValueError(f"q's num_heads {q.shape[1]} is not a multiple of the cache's num_kv_heads {num_kv_heads}")
    if block_tables.dim() != 2 or block_tables.dtype != torch.int32 or block_tables.shape[0] != num_seqs:
        raise ValueError(
            f"block_tables must be int32 [num_seqs={num_seqs}, max_blocks], "
            f"got {block_tables.dtype} of shape {tuple(block_tables.shape)}"
        )
    if context_lens.shape != (num_seqs,) or context_lens.dtype != torch.int32:
        raise ValueError(
            f"context_lens must be int32 [num_seqs={num_seqs}], "
            f"got {context_lens.dtype} of shape {tuple(context_lens.shape)}"
        )
    for name, t in (
        ("k_cache", k_cache),
        ("v_cache", v_cache),
        ("block_tables", block_tables),
        ("context_lens", context_lens),
    ):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be None or >= 1, got {sliding_window}")
    if not (k_scale > 0 and v_scale > 0 and math.isfinite(k_scale) and math.isfinite(v_scale)):
        raise ValueError(f"k_scale and v_scale must be positive and finite, got {k_scale}, {v_scale}")


def kv_scales(k_cache, k_scale, v_scale) -> tuple[float, float]:
    """The scales apply to fp8 caches only; other caches hold the values themselves."""
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    return (float(k_scale), float(v_scale)) if fp8 else (1.0, 1.0)


def dot_precision(q) -> str:
    # fp32 operands would otherwise go through TF32 (10-bit mantissa) on the GPU; half operands ignore this.
    return "ieee" if q.dtype == torch.float32 else "tf32"


def kv_tile(block_size: int) -> int:
    # Tokens per K/V step: at least 16 (tl.dot's minimum N) and 32 for more loads in flight; a tile may cover
    # several small cache blocks or part of a large one, since tokens are gathered one by one.
    return max(32, min(block_size, 64))


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SM_COUNT


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_context: int, sm_count: int) -> int:
    """Split the context only when (sequence, kv head) programs leave most SMs idle and contexts are long: each
    split should still stream at least 512 tokens, and 16 splits are the most the reduction takes."""
    programs = num_seqs * num_kv_heads
    if programs >= sm_count:
        return 1
    return max(1, min(sm_count // programs, max_context // 512, 16))


# ---------------------------------------------------------------------------------------------------------------
# Public wrappers


def paged_decode_attention(
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
    """q: [num_seqs, num_heads, head_dim], the token at position context_lens[i] - 1 of each sequence (its K/V
    already cached); k_cache, v_cache: [num_blocks, num_kv_heads, block_size, head_dim]; block_tables:
    [num_seqs, max_blocks] int32; context_lens: [num_seqs] int32, each >= 1 -> [num_seqs, num_heads, head_dim]
    in q.dtype. num_splits > 1 divides each context into runs reduced by a second kernel; None picks it."""
    check_attention_args(
        q, k_cache, v_cache, block_tables, context_lens, q.shape[0] if q.dim() else 0, sliding_window, k_scale, v_scale
    )
    num_seqs, num_heads, head_dim = q.shape
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be None or >= 1, got {num_splits}")
    _, num_kv_heads, block_size, _ = k_cache.shape
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    if num_splits is None:
        # The table width bounds the longest context without reading context_lens back from the device.
        num_splits = choose_num_splits(num_seqs, num_kv_heads, block_tables.shape[1] * block_size, _sm_count(q.device))
    k_scale, v_scale = kv_scales(k_cache, k_scale, v_scale)
    split = num_splits > 1
    if split:
        part_m = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    else:  # unused by the kernel, which then writes out directly
        part_m = part_l = part_acc = out
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        out,
        part_m,
        part_l,
        part_acc,
        block_tables,
        context_lens,
        scale * k_scale * LOG2E,
        v_scale,
        sliding_window or 0,
        num_splits,
        *q.stride(),
        *out.stride(),
        *k_cache.stride(),
        *v_cache.stride(),
        block_tables.stride(0),
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        BLOCK_SIZE=block_size,
        BLOCK_N=kv_tile(block_size),
        HEAD_DIM=head_dim,
        USE_WINDOW=sliding_window is not None,
        SPLIT=split,
        PRECISION=dot_precision(q),
    )
    if split:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            out,
            part_m,
            part_l,
            part_acc,
            num_splits,
            *out.stride(),
            SPLITS_PAD=triton.next_power_of_2(num_splits),
            HEAD_DIM=head_dim,
        )
    return out
