"""Paged attention in Triton for the GPU path, and the torch reference twins (same signatures).

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
def _online_softmax_step(s, m_i, l_i, acc, v, PRECISION: tl.constexpr):
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
def _load_kv_tile(
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
        k, v, pos = _load_kv_tile(
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
        m_i, l_i, acc = _online_softmax_step(s, m_i, l_i, acc, v, PRECISION)

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
        k, v, kpos = _load_kv_tile(
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
        m_i, l_i, acc = _online_softmax_step(s, m_i, l_i, acc, v, PRECISION)

    # Padding rows past q_len may have seen no key at all; they are not stored, the guard only avoids 0 / 0.
    l_i = tl.where(rows < q_len, l_i, 1.0)
    out = acc * (v_scale / l_i)[:, None]
    tl.store(
        out_ptr + (q_start + rows)[:, None] * stride_ot + head * stride_oh + d[None, :] * stride_od,
        out.to(out_ptr.dtype.element_ty),
        mask=(rows < q_len)[:, None],
    )


# ---------------------------------------------------------------------------------------------------------------
# Validation and launch heuristics


def _check_attention_args(
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


def _kv_scales(k_cache, k_scale, v_scale) -> tuple[float, float]:
    """The scales apply to fp8 caches only; other caches hold the values themselves."""
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    return (float(k_scale), float(v_scale)) if fp8 else (1.0, 1.0)


def _dot_precision(q) -> str:
    # fp32 operands would otherwise go through TF32 (10-bit mantissa) on the GPU; half operands ignore this.
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _kv_tile(block_size: int) -> int:
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
    _check_attention_args(
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
    k_scale, v_scale = _kv_scales(k_cache, k_scale, v_scale)
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
        BLOCK_N=_kv_tile(block_size),
        HEAD_DIM=head_dim,
        USE_WINDOW=sliding_window is not None,
        SPLIT=split,
        PRECISION=_dot_precision(q),
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
    _check_attention_args(q, k_cache, v_cache, block_tables, context_lens, num_seqs, sliding_window, k_scale, v_scale)
    num_tokens, num_heads, head_dim = q.shape
    _, num_kv_heads, block_size, _ = k_cache.shape
    out = torch.empty_like(q)
    if num_seqs == 0 or num_tokens == 0:
        return out
    k_scale, v_scale = _kv_scales(k_cache, k_scale, v_scale)
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
        BLOCK_N=_kv_tile(block_size),
        HEAD_DIM=head_dim,
        USE_WINDOW=sliding_window is not None,
        PRECISION=_dot_precision(q),
    )
    return out


# ---------------------------------------------------------------------------------------------------------------
# Torch reference twins: one sequence at a time, K/V gathered into a plain tensor, softmax in fp32.


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
