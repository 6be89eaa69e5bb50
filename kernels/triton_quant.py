"""Quantized-weight matmul on CUDA: y = x @ W^T (+ bias) with W in kernels/quant.py's q8g32, q4g32 or q4k panels.

The twin is kernels.quant.qmatmul_ref (dequantize, then a float32 matmul). The kernel never forms the float
weight: per 32-weight block it multiplies x by the integer codes (exact in fp16/bf16, so tensor cores see no
rounding of the weights) and applies the block's scale to the [BLOCK_M, BLOCK_N] partial sum in float32:
    q8g32: sum_k x_k d q_k          = d * dot(x, q)
    q4g32: sum_k x_k (d q_k + m)    = d * dot(x, q) + m * sum_k x_k
    q4k:   as q4g32, with d = D * s and m = -(Dm * t) computed from the block's and its super-block's scales
x may be float16, bfloat16 or float32; accumulation is float32, the result has x's dtype. Decode-sized calls
split K among programs (float32 partial sums, added up in a fixed order: deterministic) to occupy the GPU.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

if TYPE_CHECKING:
    from kernels.quant import QuantizedWeight

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _qmatmul_kernel(
    x_ptr,
    codes_ptr,
    scales_ptr,
    mins_ptr,
    supers_ptr,
    bias_ptr,
    y_ptr,
    M,
    N,
    K,
    num_blocks,
    chunks_per_split,
    x_stride,
    y_stride,
    split_stride,
    IS_Q4: tl.constexpr,
    IS_Q4K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(2)
    rk = tl.arange(0, 32)
    m_mask = rm < M
    n_mask = rn < N
    panel = (rn // 8).to(tl.int64)
    col = rn % 8
    # Where weight (n, k) of a block sits among the panel's block bytes (kernels/quant.py's layout).
    if IS_Q4:
        code_off = panel[:, None] * (num_blocks * 128) + (rk[None, :] // 8) * 32 + col[:, None] * 4 + rk[None, :] % 4
        shift = ((rk // 4) % 2) * 4  # low nibble for k % 8 < 4, high nibble after
        block_bytes = 128
    else:
        code_off = panel[:, None] * (num_blocks * 256) + (rk[None, :] // 4) * 32 + col[:, None] * 4 + rk[None, :] % 4
        block_bytes = 256
    scale_off = panel * (num_blocks * 8) + col
    super_off = panel * (num_blocks // 8 * 16) + col  # q4k: D at b // 8 * 16 + col, Dm 8 further
    x_rows = x_ptr + rm[:, None].to(tl.int64) * x_stride
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # This program's share of K: chunks of 4 blocks (128 weights), unrolled so that 4 blocks' loads are in flight.
    first = split * chunks_per_split * 4
    last = tl.minimum(first + chunks_per_split * 4, num_blocks)
    for b0 in range(first, last, 4):
        for i in tl.static_range(4):
            b = b0 + i
            k = b * 32 + rk
            x = tl.load(x_rows + k[None, :], mask=m_mask[:, None] & (k[None, :] < K), other=0.0)  # [BLOCK_M, 32]
            present = b < last
            raw = tl.load(codes_ptr + code_off + b * block_bytes, mask=n_mask[:, None] & present, other=0)
            q = (raw >> shift[None, :]) & 15 if IS_Q4 else raw  # [BLOCK_N, 32]
            # Integer codes are exact in x's dtype; float32 x multiplies them in full precision.
            if x_ptr.dtype.element_ty == tl.float32:
                part = tl.dot(x, tl.trans(q.to(tl.float32)), input_precision="ieee")
            else:
                part = tl.dot(x, tl.trans(q.to(x_ptr.dtype.element_ty)))
            d = tl.load(scales_ptr + scale_off + b * 8, mask=n_mask & present, other=0).to(tl.float32)
            sup = supers_ptr + super_off + (b // 8) * 16
            if IS_Q4K:
                d = tl.load(sup, mask=n_mask & present, other=0.0).to(tl.float32) * d
            acc += part * d[None, :]
            if IS_Q4:
                m = tl.load(mins_ptr + scale_off + b * 8, mask=n_mask & present, other=0).to(tl.float32)
                if IS_Q4K:
                    m = -(tl.load(sup + 8, mask=n_mask & present, other=0.0).to(tl.float32) * m)
                acc += tl.sum(x.to(tl.float32), axis=1)[:, None] * m[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + split * split_stride + rm[:, None].to(tl.int64) * y_stride + rn[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    # Under the interpreter (CPU tensors) a nominal 4, so that tests there take the split-K path too.
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def triton_qmatmul(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [M, K] float16/bfloat16/float32 on qw's device -> [M, N] in x's dtype (kernels.quant.qmatmul's CUDA
    path; it checks the shapes)."""
    if x.dtype not in _DTYPES:
        raise ValueError(f"x has dtype {x.dtype}, expected one of {_DTYPES}")
    if x.stride(1) != 1:
        x = x.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    m, k = x.shape
    n = qw.shape[0]
    if m == 0 or n == 0:
        return torch.empty((m, n), dtype=x.dtype, device=x.device)
    num_blocks = qw.codes.shape[1]
    # tl.dot needs at least 16 rows; decode batches (M <= 16) waste some of them, which the memory-bound
    # weight reads hide.
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    block_n = 64
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    # Decode has too few output tiles to keep every multiprocessor reading weights: split K among programs
    # (each writes float32 partial sums, added up after) until there are about two programs per multiprocessor.
    chunks = triton.cdiv(num_blocks, 4)
    splits = min(chunks, max(1, triton.cdiv(2 * _multiprocessors(x.device), tiles)))
    chunks_per_split = triton.cdiv(chunks, splits)
    splits = triton.cdiv(chunks, chunks_per_split)
    if splits == 1:
        y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    else:
        y = torch.empty((splits, m, n), dtype=torch.float32, device=x.device)  # y: [splits, M, N] partial sums
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), splits)
    _qmatmul_kernel[grid](
        x,
        qw.codes,
        qw.scales,
        qw.mins if qw.mins is not None else qw.scales,
        qw.supers if qw.supers is not None else qw.scales,
        bias if bias is not None else qw.scales,
        y,
        m,
        n,
        k,
        num_blocks,
        chunks_per_split,
        x.stride(0),
        n,
        m * n,
        IS_Q4=qw.mins is not None,
        IS_Q4K=qw.supers is not None,
        HAS_BIAS=bias is not None and splits == 1,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=4,
    )
    if splits == 1:
        return y
    y = y.sum(0)
    if bias is not None:
        y += bias
    return y.to(x.dtype)
