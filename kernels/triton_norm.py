"""RMSNorm (optionally fused with the residual add) as a Triton kernel, and its torch reference twin.

Order of operations, as transformers' LlamaRMSNorm does it: upcast x to float32, x * rsqrt(mean(x^2) + eps),
round the result back to x's dtype, and only then multiply by the weight (a product in x's dtype). Rounding
before the weight multiply (rather than once at the end) is what makes a half-precision run match HF's.
With a residual the add comes first, in x's dtype as HF's `hidden_states = residual + hidden_states` does,
and the rounded sum is both what is normalised and the new residual stream.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    x_stride,
    res_stride,
    out_stride,
    res_out_stride,
    hidden,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One program per row; the whole row fits in one block.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0).to(tl.float32)
        # The sum is rounded to the activation dtype before it is normalised, as the unfused add would be.
        s = (x + r).to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * res_out_stride + cols, s, mask=mask)
        x = s.to(tl.float32)
    # Masked columns load as 0, so they add nothing to the sum of squares.
    var = tl.sum(x * x, axis=0) / hidden
    rstd = 1.0 / tl.sqrt(var + eps)
    normed = (x * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * out_stride + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be [num_tokens, hidden], got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"x has dtype {x.dtype}, expected one of {_DTYPES}")
    if x.stride(1) != 1:
        raise ValueError("x must be contiguous along hidden (stride 1)")
    if weight.shape != (x.shape[1],):
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected ({x.shape[1]},)")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"weight is {weight.dtype} on {weight.device}, expected {x.dtype} on {x.device} like x")
    if not weight.is_contiguous():
        raise ValueError("weight must be contiguous")
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"residual has shape {tuple(residual.shape)}, expected {tuple(x.shape)} like x")
        if residual.dtype != x.dtype or residual.device != x.device:
            raise ValueError(f"residual is {residual.dtype} on {residual.device}, expected {x.dtype} on {x.device}")
        if residual.stride(1) != 1:
            raise ValueError("residual must be contiguous along hidden (stride 1)")


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [num_tokens, hidden]; weight: [hidden], all one dtype.
    Returns out, or (out, new_residual) with new_residual = x + residual and out = rms_norm(new_residual)."""
    _check(x, weight, residual)
    num_tokens, hidden = x.shape
    out = torch.empty((num_tokens, hidden), dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(out) if residual is not None else out
    if num_tokens == 0:
        return out if residual is None else (out, res_out)
    block = triton.next_power_of_2(hidden)
    # Enough warps that each thread holds a few dozen elements of the row, at most 8 warps.
    num_warps = min(max(block // 256, 1), 8)
    _rms_norm_kernel[(num_tokens,)](
        x,
        residual if residual is not None else x,
        weight,
        out,
        res_out,
        x.stride(0),
        residual.stride(0) if residual is not None else 0,
        out.stride(0),
        res_out.stride(0),
        hidden,
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        num_warps=num_warps,
    )
    return out if residual is None else (out, res_out)


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The same computation in plain torch, step for step as transformers' LlamaRMSNorm."""
    _check(x, weight, residual)
    if residual is not None:
        x = x + residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * h.to(x.dtype)
    return out if residual is None else (out, x)
