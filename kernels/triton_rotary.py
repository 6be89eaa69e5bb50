"""Rotary position embedding applied in place to q and k, as a Triton kernel, and its torch reference twin.

cos_sin_cache: [max_positions, rot_dim] float32, row p = cos(p * inv_freq) | sin(p * inv_freq), each rot_dim / 2
wide. Only the first rot_dim dims of each head rotate (partial rotary); the rest are left as they are.
Pair i of a head is (x[i], x[i + rot_dim / 2]) in the neox layout (HF's rotate_half, Llama/Mistral/Qwen) and
(x[2i], x[2i + 1]) in the GPT-J layout; either way pair i turns by angle p * inv_freq[i]:
    x1' = x1 * cos - x2 * sin,   x2' = x2 * cos + x1 * sin
computed in float32 and stored in q's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _rotate_heads(base_ptr, head_stride, num_heads, first, second, pair_mask, cos, sin, BLOCK_H: tl.constexpr):
    # One token's heads at once: a [BLOCK_H, BLOCK_PAIRS] tile of pairs.
    heads = tl.arange(0, BLOCK_H)
    mask = (heads[:, None] < num_heads) & pair_mask[None, :]
    row = base_ptr + heads[:, None] * head_stride
    x1 = tl.load(row + first[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(row + second[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(row + first[None, :], (x1 * cos[None, :] - x2 * sin[None, :]).to(base_ptr.dtype.element_ty), mask=mask)
    tl.store(row + second[None, :], (x2 * cos[None, :] + x1 * sin[None, :]).to(base_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    pos_ptr,
    q_ptr,
    k_ptr,
    cache_ptr,
    q_token_stride,
    q_head_stride,
    k_token_stride,
    k_head_stride,
    num_heads,
    num_kv_heads,
    cache_stride,
    HALF: tl.constexpr,
    BLOCK_PAIRS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_KVH: tl.constexpr,
    IS_NEOX: tl.constexpr,
):
    # One program per token: its cos/sin row is loaded once and shared by every q and k head.
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + token)
    pairs = tl.arange(0, BLOCK_PAIRS)
    pair_mask = pairs < HALF
    cos = tl.load(cache_ptr + pos * cache_stride + pairs, mask=pair_mask, other=0.0)
    sin = tl.load(cache_ptr + pos * cache_stride + HALF + pairs, mask=pair_mask, other=0.0)
    if IS_NEOX:
        first = pairs
        second = pairs + HALF
    else:
        first = 2 * pairs
        second = 2 * pairs + 1
    _rotate_heads(q_ptr + token * q_token_stride, q_head_stride, num_heads, first, second, pair_mask, cos, sin, BLOCK_H)
    _rotate_heads(
        k_ptr + token * k_token_stride, k_head_stride, num_kv_heads, first, second, pair_mask, cos, sin, BLOCK_KVH
    )


def _check(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
    if positions.dim() != 1 or positions.dtype != torch.int64:
        raise ValueError(f"positions must be [num_tokens] int64, got {positions.dtype} {tuple(positions.shape)}")
    num_tokens = positions.shape[0]
    for name, t in (("q", q), ("k", k)):
        if t.dim() != 3 or t.shape[0] != num_tokens:
            raise ValueError(f"{name} must be [num_tokens={num_tokens}, heads, head_dim], got {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}, expected one of {_DTYPES}")
        if t.stride(2) != 1:
            raise ValueError(f"{name} must be contiguous along head_dim (stride 1)")
        if t.device != positions.device:
            raise ValueError(f"{name} is on {t.device}, positions on {positions.device}")
    if k.dtype != q.dtype or k.shape[2] != q.shape[2]:
        raise ValueError(f"k is {k.dtype} with head_dim {k.shape[2]}, q is {q.dtype} with head_dim {q.shape[2]}")
    if cos_sin_cache.dim() != 2 or cos_sin_cache.dtype != torch.float32 or not cos_sin_cache.is_contiguous():
        raise ValueError(
            f"cos_sin_cache must be a contiguous [max_positions, rot_dim] float32 tensor, got "
            f"{cos_sin_cache.dtype} {tuple(cos_sin_cache.shape)}"
        )
    if cos_sin_cache.device != q.device:
        raise ValueError(f"cos_sin_cache is on {cos_sin_cache.device}, q on {q.device}")
    rot_dim = cos_sin_cache.shape[1]
    if rot_dim % 2 or not 0 < rot_dim <= q.shape[2]:
        raise ValueError(f"cos_sin_cache's rot_dim {rot_dim} must be even and in (0, head_dim={q.shape[2]}]")


def rotary_embedding(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor, is_neox: bool
) -> None:
    """Rotate q [num_tokens, num_heads, head_dim] and k [num_tokens, num_kv_heads, head_dim] in place by the
    positions [num_tokens] int64 (each < max_positions: not checked, that would cost a device sync)."""
    _check(positions, q, k, cos_sin_cache)
    if positions.shape[0] == 0:
        return
    half = cos_sin_cache.shape[1] // 2
    _rotary_kernel[(positions.shape[0],)](
        positions,
        q,
        k,
        cos_sin_cache,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        q.shape[1],
        k.shape[1],
        cos_sin_cache.stride(0),
        HALF=half,
        BLOCK_PAIRS=triton.next_power_of_2(half),
        BLOCK_H=triton.next_power_of_2(q.shape[1]),
        BLOCK_KVH=triton.next_power_of_2(k.shape[1]),
        IS_NEOX=is_neox,
        num_warps=4,
    )


def rotary_embedding_ref(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor, is_neox: bool
) -> None:
    """The same rotation in plain torch, in place."""
    _check(positions, q, k, cos_sin_cache)
    rot_dim = cos_sin_cache.shape[1]
    cos, sin = cos_sin_cache[positions].unsqueeze(1).chunk(2, dim=-1)  # each [num_tokens, 1, rot_dim / 2]
    for x in (q, k):
        rot = x[..., :rot_dim].float()  # [num_tokens, heads, rot_dim]
        x1, x2 = (rot[..., : rot_dim // 2], rot[..., rot_dim // 2 :]) if is_neox else (rot[..., 0::2], rot[..., 1::2])
        y1, y2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
        y = torch.cat((y1, y2), dim=-1) if is_neox else torch.stack((y1, y2), dim=-1).flatten(-2)
        x[..., :rot_dim] = y.to(x.dtype)
