"""Writes and moves of the paged KV cache: Triton kernels, and their torch twins (same signature, name + `_ref`).

reshape_and_cache  scatter one step's new keys and values into their slots (one launch for K and V)
copy_blocks        copy whole blocks inside the device pool, every layer, K and V (copy-on-write)
swap_blocks        move whole blocks between the device pool and the host swap pool (torch copies, no kernel)
kv_scale           the per-tensor fp8 scale that calibrates k_scale / v_scale from a first batch

Layouts. One layer's caches: k_cache, v_cache: [num_blocks, num_kv_heads, block_size, head_dim]. The engine's
pool stacks them: kv_cache: [2, num_layers, num_blocks, num_kv_heads, block_size, head_dim] (index 0 = K, 1 = V).
A token's slot is block_id * block_size + offset; a negative slot (vLLM pads with -1) means "write nothing".

fp8 caches (torch.float8_e4m3fn) store x * (1 / scale), saturated to +-448, rounded to nearest with ties to
even: what `.clamp(-448, 448).to(torch.float8_e4m3fn)` does in torch. Two choices keep the kernel's bytes equal
to the twin's:
- The kernel multiplies by the float32 reciprocal of the scale (computed once on the host) instead of dividing:
  Triton's float32 `/` is not correctly rounded by default on the GPU, a multiplication is, everywhere.
- The kernel encodes e4m3 itself with integer operations on the float32 bits instead of `.to(tl.float8e4nv)`:
  Triton's interpreter rounds that cast wrongly (a mantissa carry halves the value: 31.7 -> 16, about 2% of
  random inputs), and Triton has no fp8e4nv conversion on GPUs older than sm89. The encoding is exact on any of
  them and the cache write is memory-bound, so its few integer operations cost nothing.
NaN inputs are outside the contract (they would mean the model already failed); +-inf saturates to +-448.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

E4M3_MAX = 448.0
# kv_scale's floor: any positive value keeps an all-zero batch from giving scale 0 (a division by zero later);
# this one keeps 1 / scale far inside float32.
MIN_KV_SCALE = 1e-12
# Elements one program handles: enough to keep a GPU's loads wide, few enough for registers.
_TILE = 2048

# Same-size integer views: copies move bits (fp8 has few torch kernels, and NaN payloads must survive).
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_BITS[t.element_size()])


# ---------------------------------------------------------------------------------------------- reshape_and_cache


@triton.jit
def _e4m3_bits(y):
    """y: float32 within [-448, 448] -> its float8_e4m3fn byte, rounded to nearest, ties to even."""
    bits = y.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    mag = bits & 0x7FFFFFFF
    # Normal results (|y| >= 2^-6): keep 3 of the 23 mantissa bits, adding just under half of the dropped range
    # plus the lowest kept bit (so an exact half rounds to even), then move the exponent bias from 127 to 7.
    # A mantissa carry rolls into the exponent by itself.
    normal = ((mag + 0x7FFFF + ((mag >> 20) & 1)) >> 20) - (120 << 3)
    # Subnormal results: e4m3's step there is 2^-9, and |y| / 2^-9 = mant >> (141 - exponent), with the implicit
    # bit in mant. Shifts are clamped to [1, 25]: past 25 everything rounds to 0 anyway (|y| < 2^-10), and the
    # normal range, where this result is discarded, must not shift by a negative amount.
    exponent = mag >> 23
    mant = (mag & 0x7FFFFF) | 0x800000
    shift = tl.minimum(tl.maximum(141 - exponent, 1), 25)
    q = mant >> shift
    rem = mant - (q << shift)
    half = 1 << (shift - 1)
    up = (rem > half) | ((rem == half) & ((q & 1) == 1))
    subnormal = q + up.to(tl.int32)  # q + 1 == 8 is the smallest normal, 2^-6: the encodings line up
    code = tl.where(mag >= 0x3C800000, normal, subnormal)  # 0x3C800000 = 2^-6
    return (sign | code).to(tl.uint8)


@triton.jit
def _reshape_and_cache_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    k_inv_scale,
    v_inv_scale,
    num_kv_heads,
    head_dim,
    block_size,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_vt,
    stride_vh,
    stride_vd,
    stride_cb,
    stride_ch,
    stride_cs,
    FP8: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program: one token, BLOCK_H of its kv heads, K and V both.
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token)
    block = slot // block_size
    offset = slot % block_size
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads[:, None] < num_kv_heads) & (dims[None, :] < head_dim) & (slot >= 0)
    # [BLOCK_H, BLOCK_D] tiles of the token's rows and of its slot's rows in the caches.
    k_src = token * stride_kt + heads[:, None] * stride_kh + dims[None, :] * stride_kd
    v_src = token * stride_vt + heads[:, None] * stride_vh + dims[None, :] * stride_vd
    dst = block * stride_cb + heads[:, None] * stride_ch + offset * stride_cs + dims[None, :]
    k = tl.load(key_ptr + k_src, mask=mask)
    v = tl.load(value_ptr + v_src, mask=mask)
    if FP8:  # the caches arrive as uint8 views
        k = _e4m3_bits(tl.minimum(tl.maximum(k.to(tl.float32) * k_inv_scale, -448.0), 448.0))
        v = _e4m3_bits(tl.minimum(tl.maximum(v.to(tl.float32) * v_inv_scale, -448.0), 448.0))
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """key, value: [num_tokens, num_kv_heads, head_dim] (any strides); k_cache, v_cache: [num_blocks,
    num_kv_heads, block_size, head_dim], contiguous, written in place; slot_mapping: [num_tokens] int64.
    k_scale, v_scale: the fp8 scales (ignored for other cache dtypes)."""
    _check_reshape_and_cache(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    k_inv_scale, v_inv_scale = (1.0 / k_scale, 1.0 / v_scale) if fp8 else (1.0, 1.0)  # float32 in the kernel
    if fp8:  # the kernel writes the bytes it encodes
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    block_d = triton.next_power_of_2(head_dim)
    block_h = min(triton.next_power_of_2(num_kv_heads), max(1, _TILE // block_d))
    grid = (num_tokens, triton.cdiv(num_kv_heads, block_h))
    _reshape_and_cache_kernel[grid](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping.contiguous(),
        k_inv_scale,
        v_inv_scale,
        num_kv_heads,
        head_dim,
        k_cache.shape[2],
        *key.stride(),
        *value.stride(),
        *k_cache.stride()[:3],
        FP8=fp8,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
    )


def reshape_and_cache_ref(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    block_size = k_cache.shape[2]
    blocks, offsets = slots // block_size, slots % block_size
    for x, cache, scale in ((key[keep], k_cache, k_scale), (value[keep], v_cache, v_scale)):
        if cache.dtype == torch.float8_e4m3fn:
            inv = torch.tensor(1.0 / scale, dtype=torch.float32)  # the kernel's float32 reciprocal
            x = (x.float() * inv).clamp(-E4M3_MAX, E4M3_MAX)
        # cache[blocks, :, offsets]: [tokens kept, num_kv_heads, head_dim], like x
        _bits(cache)[blocks, :, offsets] = _bits(x.to(cache.dtype))


def _check_reshape_and_cache(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale) -> None:
    if key.dim() != 3:
        raise ValueError(f"key must be [num_tokens, num_kv_heads, head_dim], got shape {tuple(key.shape)}")
    if value.shape != key.shape or value.dtype != key.dtype:
        raise ValueError(
            f"value ({tuple(value.shape)}, {value.dtype}) must match key ({tuple(key.shape)}, {key.dtype})"
        )
    if k_cache.dim() != 4:
        raise ValueError(
            f"k_cache must be [num_blocks, num_kv_heads, block_size, head_dim], got shape {tuple(k_cache.shape)}"
        )
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError(
            f"v_cache ({tuple(v_cache.shape)}, {v_cache.dtype}) must match k_cache "
            f"({tuple(k_cache.shape)}, {k_cache.dtype})"
        )
    if (k_cache.shape[1], k_cache.shape[3]) != key.shape[1:]:
        raise ValueError(
            f"k_cache {tuple(k_cache.shape)} does not hold key's num_kv_heads and head_dim {tuple(key.shape[1:])}"
        )
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")
    if slot_mapping.dtype != torch.int64:
        raise ValueError(f"slot_mapping must be int64, got {slot_mapping.dtype}")
    if slot_mapping.shape != key.shape[:1]:
        raise ValueError(f"slot_mapping must be [num_tokens] = [{key.shape[0]}], got {tuple(slot_mapping.shape)}")
    for name, t in (("value", value), ("k_cache", k_cache), ("v_cache", v_cache), ("slot_mapping", slot_mapping)):
        if t.device != key.device:
            raise ValueError(f"{name} is on {t.device}, key on {key.device}")
    if k_cache.dtype == torch.float8_e4m3fn:
        for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
            if not (math.isfinite(scale) and scale > 0 and 1.0 / scale <= torch.finfo(torch.float32).max):
                raise ValueError(f"{name} must be a positive finite scale, got {scale}")
    # The range check reads the slots: free on the host, a device sync on the GPU, where it is skipped.
    if slot_mapping.device.type == "cpu" and slot_mapping.numel():
        num_slots = k_cache.shape[0] * k_cache.shape[2]
        last = int(slot_mapping.max())
        if last >= num_slots:
            raise ValueError(f"slot_mapping has slot {last}, past the cache's {num_slots} slots")


# ---------------------------------------------------------------------------------------------- copy_blocks


@triton.jit
def _copy_blocks_kernel(
    src_pool_ptr,
    dst_pool_ptr,
    src_ids_ptr,
    dst_ids_ptr,
    src_layer_stride,
    dst_layer_stride,
    block_numel,
    BLOCK: tl.constexpr,
):
    # Pools: [2 * num_layers, blocks, block_numel]. One program: one pair, one layer's K or V, one chunk.
    pair = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < block_numel
    src = tl.load(src_ids_ptr + pair)
    dst = tl.load(dst_ids_ptr + pair)
    x = tl.load(src_pool_ptr + layer * src_layer_stride + src * block_numel + offs, mask=mask)
    tl.store(dst_pool_ptr + layer * dst_layer_stride + dst * block_numel + offs, x, mask=mask)


def copy_blocks(kv_cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """kv_cache: the pool [2, num_layers, num_blocks, num_kv_heads, block_size, head_dim], contiguous;
    src, dst: [num_pairs] int64 block ids. Copies block src[i] to dst[i], K and V of every layer, as if every
    source were read before any destination is written.

    Disjoint sources and destinations (copy-on-write's case: a fresh block takes a shared one's contents) take
    one launch. Programs of one launch run in no fixed order, so when a destination is also a source a single
    launch could read an already overwritten block: then the sources are gathered into a staging buffer first
    and scattered from it in a second launch."""
    src_ids, dst_ids = _check_copy_blocks(kv_cache, src, dst)
    if not src_ids:
        return
    pool = _bits(kv_cache).view(2 * kv_cache.shape[1], kv_cache.shape[2], -1)  # [2 * layers, blocks, numel]
    device = kv_cache.device
    # The kernel indexes the ids as contiguous arrays: a strided view (a column of a pairs tensor) must not
    # reach it as such.
    src, dst = src.to(device).contiguous(), dst.to(device).contiguous()
    if set(src_ids).isdisjoint(dst_ids):
        _launch_copy(pool, pool, src, dst)
        return
    stage = pool.new_empty(pool.shape[0], len(src_ids), pool.shape[2])  # [2 * layers, pairs, numel]
    in_order = torch.arange(len(src_ids), device=device)
    _launch_copy(pool, stage, src, in_order)
    _launch_copy(stage, pool, in_order, dst)


def _launch_copy(src_pool: torch.Tensor, dst_pool: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    block_numel = src_pool.shape[2]
    block = min(triton.next_power_of_2(block_numel), _TILE)
    grid = (src.numel(), src_pool.shape[0], triton.cdiv(block_numel, block))
    _copy_blocks_kernel[grid](
        src_pool, dst_pool, src, dst, src_pool.stride(0), dst_pool.stride(0), block_numel, BLOCK=block
    )


def copy_blocks_ref(kv_cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    pool = _bits(kv_cache)
    pool[:, :, dst] = pool[:, :, src].clone()


def _check_copy_blocks(kv_cache, src, dst) -> tuple[list[int], list[int]]:
    """Validates and returns the ids as host lists (the block manager's ids live on the host: reading them
    there is free; ids on the GPU cost one small sync)."""
    if kv_cache.dim() != 6 or kv_cache.shape[0] != 2:
        raise ValueError(
            "kv_cache must be [2, num_layers, num_blocks, num_kv_heads, block_size, head_dim], "
            f"got shape {tuple(kv_cache.shape)}"
        )
    if not kv_cache.is_contiguous():
        raise ValueError("kv_cache must be contiguous")
    return _check_block_ids(src, dst, "src", "dst", kv_cache.shape[2], kv_cache.shape[2])


def _check_block_ids(src, dst, src_name, dst_name, src_blocks, dst_blocks) -> tuple[list[int], list[int]]:
    for name, ids in ((src_name, src), (dst_name, dst)):
        if ids.dim() != 1 or ids.dtype != torch.int64:
            raise ValueError(f"{name} must be a 1-D int64 tensor, got {ids.dtype} of shape {tuple(ids.shape)}")
    if src.numel() != dst.numel():
        raise ValueError(f"{src_name} has {src.numel()} block ids, {dst_name} {dst.numel()}: they pair up")
    src_ids, dst_ids = src.tolist(), dst.tolist()
    for name, ids, num_blocks in ((src_name, src_ids, src_blocks), (dst_name, dst_ids, dst_blocks)):
        bad = [i for i in ids if not 0 <= i < num_blocks]
        if bad:
            raise ValueError(f"{name} has block id {bad[0]}, outside [0, {num_blocks})")
    if len(set(dst_ids)) != len(dst_ids):
        raise ValueError(f"{dst_name} names a block twice: {dst_ids}")
    return src_ids, dst_ids


# ---------------------------------------------------------------------------------------------- swap_blocks


def swap_blocks(src_cache: torch.Tensor, dst_cache: torch.Tensor, src_ids: torch.Tensor, dst_ids: torch.Tensor) -> None:
    """src_cache, dst_cache: pools [2, num_layers, num_blocks, num_kv_heads, block_size, head_dim] that may differ
    in num_blocks and device (the GPU pool and the host swap pool, either way round); src_ids, dst_ids:
    [num_pairs] int64. Copies block src_ids[i] of src_cache to dst_ids[i] of dst_cache, K and V of every layer.

    Torch copies, not a kernel: Triton cannot address host memory. The blocks are gathered into one contiguous
    tensor so that the transfer is a single copy, and between a GPU and the host that copy goes through pinned
    (page-locked) memory: the GPU's DMA engine reads and writes pinned pages directly at PCIe speed, while a
    copy from pageable memory is bounced through a driver buffer, slower and synchronous."""
    _check_swap_blocks(src_cache, dst_cache, src_ids, dst_ids)
    src_pool, dst_pool = _bits(src_cache), _bits(dst_cache)
    src_ids, dst_ids = src_ids.to(src_cache.device), dst_ids.to(dst_cache.device)
    shape = (*src_pool.shape[:2], src_ids.numel(), *src_pool.shape[3:])  # [2, layers, pairs, heads, size, dim]
    if src_pool.is_cuda and not dst_pool.is_cuda:  # swap out
        staged = torch.empty(shape, dtype=src_pool.dtype, pin_memory=True)
        staged.copy_(src_pool.index_select(2, src_ids), non_blocking=True)
        # The scatter below runs on the CPU and reads the staged blocks: wait for the transfer.
        torch.cuda.current_stream(src_pool.device).synchronize()
        blocks = staged
    elif dst_pool.is_cuda and not src_pool.is_cuda:  # swap in
        staged = torch.empty(shape, dtype=src_pool.dtype, pin_memory=True)
        torch.index_select(src_pool, 2, src_ids, out=staged)
        # Ordered on the current stream before the scatter; torch's pinned allocator keeps `staged` from reuse
        # until the transfer has finished, so nothing here waits for it.
        blocks = staged.to(dst_pool.device, non_blocking=True)
    else:
        blocks = src_pool.index_select(2, src_ids).to(dst_pool.device)
    dst_pool.index_copy_(2, dst_ids, blocks)


def swap_blocks_ref(
    src_cache: torch.Tensor, dst_cache: torch.Tensor, src_ids: torch.Tensor, dst_ids: torch.Tensor
) -> None:
    _bits(dst_cache)[:, :, dst_ids] = _bits(src_cache)[:, :, src_ids].to(dst_cache.device)


def _check_swap_blocks(src_cache, dst_cache, src_ids, dst_ids) -> None:
    if src_cache.dim() != 6 or src_cache.shape[0] != 2:
        raise ValueError(
            "src_cache must be [2, num_layers, num_blocks, num_kv_heads, block_size, head_dim], "
            f"got shape {tuple(src_cache.shape)}"
        )
    if (
        dst_cache.dim() != 6
        or dst_cache.shape[:2] != src_cache.shape[:2]
        or dst_cache.shape[3:] != src_cache.shape[3:]
        or dst_cache.dtype != src_cache.dtype
    ):
        raise ValueError(
            f"dst_cache ({tuple(dst_cache.shape)}, {dst_cache.dtype}) must match src_cache "
            f"({tuple(src_cache.shape)}, {src_cache.dtype}) but for num_blocks"
        )
    _check_block_ids(src_ids, dst_ids, "src_ids", "dst_ids", src_cache.shape[2], dst_cache.shape[2])


# ---------------------------------------------------------------------------------------------- kv_scale


def kv_scale(x: torch.Tensor) -> float:
    """The per-tensor fp8 e4m3 scale for x: amax / 448, so that x's largest magnitude maps to e4m3's largest
    finite value. Never below MIN_KV_SCALE (an all-zero x would give 0)."""
    if x.numel() == 0:
        raise ValueError("x is empty: a scale needs values to calibrate on")
    amax = float(x.detach().abs().amax())
    if not math.isfinite(amax):
        raise ValueError(f"x holds non-finite values (amax {amax})")
    return max(amax / E4M3_MAX, MIN_KV_SCALE)
