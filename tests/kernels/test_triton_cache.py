"""The KV-cache write and move kernels against their torch twins and against the values they must hold.

Caches start poisoned (NaN, or the fp8 NaN byte 0x7F) so a write outside the slots shows. Comparisons are on the
bytes (integer views), so NaN sentinels compare equal and fp8 needs no float kernels."""

from __future__ import annotations

import pytest
import torch

from kernels.triton_cache import (
    E4M3_MAX,
    MIN_KV_SCALE,
    copy_blocks,
    copy_blocks_ref,
    kv_scale,
    reshape_and_cache,
    reshape_and_cache_ref,
    swap_blocks,
    swap_blocks_ref,
)

FP8 = torch.float8_e4m3fn
BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def bits(t):
    return t.view(BITS[t.element_size()])


def poisoned(shape, dtype):
    return (
        torch.full(shape, 0x7F, dtype=torch.uint8).view(FP8)
        if dtype == FP8
        else torch.full(shape, float("nan"), dtype=dtype)
    )


def make_tokens(seed, num_tokens, num_kv_heads, head_dim, dtype, amplitude=1.0):
    """key, value: [num_tokens, num_kv_heads, head_dim], random, never 0; key is a strided slice of a fused
    qkv-like row, as the model produces it."""
    g = torch.Generator().manual_seed(seed)
    width = num_kv_heads * head_dim
    fused = (torch.rand(num_tokens, 3 * width, generator=g) + 0.05) * amplitude
    fused *= torch.randint(0, 2, fused.shape, generator=g) * 2 - 1
    fused = fused.to(dtype)
    key = fused[:, width : 2 * width].view(num_tokens, num_kv_heads, head_dim)
    value = fused[:, 2 * width :].contiguous().view(num_tokens, num_kv_heads, head_dim)
    return key, value


def scattered_slots(seed, num_tokens, num_blocks, block_size, num_skipped):
    """Distinct slots drawn out of order from all over the pool, with num_skipped padding entries (-1)."""
    g = torch.Generator().manual_seed(seed)
    slots = torch.randperm(num_blocks * block_size, generator=g)[: num_tokens - num_skipped]
    slots = torch.cat([slots, torch.full((num_skipped,), -1)])
    return slots[torch.randperm(num_tokens, generator=g)]


def run_both(key, value, shape, cache_dtype, slots, k_scale=1.0, v_scale=1.0):
    caches = [poisoned(shape, cache_dtype) for _ in range(4)]
    reshape_and_cache(key, value, caches[0], caches[1], slots, k_scale, v_scale)
    reshape_and_cache_ref(key, value, caches[2], caches[3], slots, k_scale, v_scale)
    return caches


def cached_rows(cache, slots):
    """The rows the slots point at: [tokens, num_kv_heads, head_dim]."""
    block_size = cache.shape[2]
    return cache[slots // block_size, :, slots % block_size]


@pytest.mark.parametrize(
    "key_dtype,cache_dtype",
    [
        (torch.float32, torch.float32),
        (torch.float16, torch.float16),
        (torch.float32, torch.float16),
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.bfloat16),
    ],
)
def test_reshape_and_cache_writes_each_token_into_its_slot_only(key_dtype, cache_dtype):
    num_blocks, num_kv_heads, block_size, head_dim = 6, 3, 4, 16  # 3 heads: a masked head row in the tile
    key, value = make_tokens(0, 11, num_kv_heads, head_dim, key_dtype)
    slots = scattered_slots(1, 11, num_blocks, block_size, num_skipped=3)
    k, v, k_ref, v_ref = run_both(key, value, (num_blocks, num_kv_heads, block_size, head_dim), cache_dtype, slots)
    assert torch.equal(bits(k), bits(k_ref)) and torch.equal(bits(v), bits(v_ref))
    kept = slots >= 0
    assert torch.equal(cached_rows(k, slots[kept]), key[kept].to(cache_dtype))
    assert torch.equal(cached_rows(v, slots[kept]), value[kept].to(cache_dtype))
    # Every other element is still poison: exactly the kept tokens' elements were written.
    written = int(kept.sum()) * num_kv_heads * head_dim
    assert int((~k.isnan()).sum()) == written and int((~v.isnan()).sum()) == written


@pytest.mark.parametrize("key_dtype", [torch.float32, torch.float16])
def test_reshape_and_cache_fp8_matches_twin_bytes_and_input_to_e4m3_precision(key_dtype):
    num_blocks, num_kv_heads, block_size, head_dim = 5, 2, 4, 32
    k_scale, v_scale = 0.02, 0.0037
    # Magnitudes up to 10: a tail saturates under v_scale (10 / 0.0037 > 448); x * 1e-3 reaches the subnormals.
    key, value = make_tokens(2, 13, num_kv_heads, head_dim, key_dtype, amplitude=10.0)
    key[::3] *= 1e-4
    slots = scattered_slots(3, 13, num_blocks, block_size, num_skipped=2)
    k, v, k_ref, v_ref = run_both(
        key, value, (num_blocks, num_kv_heads, block_size, head_dim), FP8, slots, k_scale, v_scale
    )
    assert torch.equal(bits(k), bits(k_ref)) and torch.equal(bits(v), bits(v_ref))
    kept = slots >= 0
    assert int((bits(k) != 0x7F).sum()) == int(kept.sum()) * num_kv_heads * head_dim  # nothing else written
    seen = torch.zeros(3, dtype=torch.int64)
    for cache, x, scale in ((k, key, k_scale), (v, value, v_scale)):
        x = x[kept].float() / scale
        stored = cached_rows(cache, slots[kept]).float()
        normal = (x.abs() >= 2**-6) & (x.abs() <= E4M3_MAX)
        saturated = x.abs() > E4M3_MAX
        subnormal = x.abs() < 2**-6
        seen += torch.stack([normal.sum(), saturated.sum(), subnormal.sum()])
        # Rounding to nearest with 3 mantissa bits: within half a step, 2^-4 relative.
        assert ((stored[normal] - x[normal]).abs() <= x[normal].abs() * 2**-4).all()
        assert torch.equal(stored[saturated], x[saturated].sign() * E4M3_MAX)
        assert ((stored[subnormal] - x[subnormal]).abs() <= 2**-10).all()  # half of the 2^-9 step
    assert (seen > 0).all()  # every range was exercised


def test_fp8_encoding_rounds_ties_to_even_and_saturates():
    """Every e4m3 value and every midpoint between neighbours, one float32 ulp either side too, both signs:
    torch's cast (round to nearest, ties to even) is the independent judge. Triton's interpreter's own fp8 cast
    fails this (31.7 -> 16)."""
    grid = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    grid = grid[grid.isfinite() & (grid >= 0)].unique()
    points = torch.cat([grid, (grid[1:] + grid[:-1]) / 2, torch.tensor([460.0, 464.0, 1e4, float("inf")])])
    near = torch.cat([(points.view(torch.int32) + d).view(torch.float32) for d in (-1, 0, 1)])
    x = torch.cat([near, -near])
    x = x[~x.isnan()]
    num_tokens = -(-x.numel() // 256)
    flat = torch.cat([x, torch.ones(num_tokens * 256 - x.numel())])
    key = flat.view(num_tokens, 8, 32)  # [tokens, kv heads, head_dim]
    slots = torch.arange(num_tokens)
    k, _, k_ref, _ = run_both(key, -key, (num_tokens, 8, 1, 32), FP8, slots)
    assert torch.equal(bits(k), bits(k_ref))
    stored = k.view(-1)[: x.numel()].float()  # block_size 1: slot order = x order
    assert torch.equal(stored, x.clamp(-E4M3_MAX, E4M3_MAX).to(FP8).float())
    by_value = dict(zip(x.tolist(), stored.tolist()))
    # Ties to even: 1.0625 sits between 1.0 (mantissa 000) and 1.125 (001); 1.9375 carries into the exponent.
    assert by_value[1.0625] == 1.0 and by_value[1.1875] == 1.25 and by_value[1.9375] == 2.0
    assert by_value[2**-10] == 0.0 and by_value[3 * 2**-10] == 2**-8  # subnormal ties
    assert by_value[464.0] == 448.0 and by_value[-1e4] == -448.0 and by_value[float("inf")] == 448.0


def test_reshape_and_cache_with_no_tokens_is_a_no_op():
    k = poisoned((2, 1, 4, 16), torch.float32)
    v = poisoned((2, 1, 4, 16), torch.float32)
    reshape_and_cache(torch.ones(0, 1, 16), torch.ones(0, 1, 16), k, v, torch.zeros(0, dtype=torch.int64))
    assert k.isnan().all() and v.isnan().all()


# Bit patterns no write ever produces, for the slots of a block nobody has written: blocks are copied and swapped
# whole, and what those slots held must arrive bit for bit, not trip anything. NaN with a payload, and +inf
# (e4m3fn has no inf: its two NaN bytes).
GARBAGE_BITS = {torch.float32: (0x7FC0_1234, 0x7F80_0000), torch.float16: (0x7E05, 0x7C00), FP8: (0x7F, 0xFF)}


def random_pool(seed, shape, dtype):
    """[2, layers, blocks, heads, block_size, dim], random, the last two slots of every block garbage."""
    g = torch.Generator().manual_seed(seed)
    pool = (torch.rand(shape, generator=g) + 0.5).to(dtype)
    nan, inf = GARBAGE_BITS[dtype]
    bits(pool)[..., -1, :] = nan
    bits(pool)[..., -2, :] = inf
    assert bits(pool)[..., -2:, :].eq(torch.tensor([inf, nan], dtype=bits(pool).dtype)[:, None]).all()
    return pool


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, FP8])
@pytest.mark.parametrize(
    "src,dst",
    [
        ([5, 1, 6], [2, 7, 0]),  # disjoint: one launch
        ([1, 2, 3, 4], [2, 3, 4, 5]),  # chained: 2 is written and read
        ([0, 6], [6, 0]),
    ],
)  # two blocks trade places
def test_copy_blocks_copies_every_layer_as_if_all_sources_were_read_first(dtype, src, dst):
    pool = random_pool(4, (2, 3, 8, 2, 4, 16), dtype)  # [2, layers, blocks, heads, size, dim]
    before = bits(pool).clone()
    ref = pool.clone()
    copy_blocks(pool, torch.tensor(src), torch.tensor(dst))
    copy_blocks_ref(ref, torch.tensor(src), torch.tensor(dst))
    assert torch.equal(bits(pool), bits(ref))
    for s, d in zip(src, dst):
        assert torch.equal(bits(pool)[:, :, d], before[:, :, s])
    untouched = [b for b in range(8) if b not in dst]
    assert torch.equal(bits(pool)[:, :, untouched], before[:, :, untouched])


def test_copy_blocks_takes_ids_from_the_columns_of_a_pairs_tensor():
    """The engine hands over (src, dst) pairs as one [pairs, 2] tensor: its columns are strided views."""
    pool = random_pool(4, (2, 2, 8, 2, 4, 16), torch.float32)
    ref = pool.clone()
    pairs = torch.tensor([[2, 3], [2, 4], [5, 6]])
    copy_blocks(pool, pairs[:, 0], pairs[:, 1])
    copy_blocks_ref(ref, pairs[:, 0], pairs[:, 1])
    assert torch.equal(bits(pool), bits(ref))


@pytest.mark.parametrize("dtype", [torch.float16, FP8])
def test_swap_blocks_moves_blocks_out_and_back_in(dtype):
    device_pool = random_pool(5, (2, 2, 8, 2, 4, 16), dtype)
    host_pool = random_pool(6, (2, 2, 5, 2, 4, 16), dtype)  # the swap space: fewer blocks
    for src_cache, dst_cache, src_ids, dst_ids in (
        (device_pool, host_pool, [6, 1, 3], [4, 0, 2]),  # out
        (host_pool, device_pool, [2, 4], [7, 1]),
    ):  # in
        ref = dst_cache.clone()
        before = bits(dst_cache).clone()
        swap_blocks(src_cache, dst_cache, torch.tensor(src_ids), torch.tensor(dst_ids))
        swap_blocks_ref(src_cache, ref, torch.tensor(src_ids), torch.tensor(dst_ids))
        assert torch.equal(bits(dst_cache), bits(ref))
        for s, d in zip(src_ids, dst_ids):
            assert torch.equal(bits(dst_cache)[:, :, d], bits(src_cache)[:, :, s])
        untouched = [b for b in range(dst_cache.shape[2]) if b not in dst_ids]
        assert torch.equal(bits(dst_cache)[:, :, untouched], before[:, :, untouched])


def test_kv_scale_maps_the_largest_magnitude_to_448():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 2, 16, generator=g)
    x[1, 1, 3] = -9.5
    assert kv_scale(x) == 9.5 / 448
    k = poisoned((4, 2, 1, 16), FP8)  # block_size 1: token t in block t
    reshape_and_cache(x, x, k, poisoned((4, 2, 1, 16), FP8), torch.arange(4), kv_scale(x), 1.0)
    assert k.float().abs().max() == 448.0 and k[1, 1, 0, 3].float() == -448.0
    assert kv_scale(torch.zeros(3, 3)) == MIN_KV_SCALE > 0
    assert kv_scale(torch.full((2,), -1e-20)) == MIN_KV_SCALE


def test_kv_scale_refuses_empty_and_non_finite_tensors():
    with pytest.raises(ValueError, match="x is empty"):
        kv_scale(torch.ones(0))
    with pytest.raises(ValueError, match="non-finite"):
        kv_scale(torch.tensor([1.0, float("inf")]))
    with pytest.raises(ValueError, match="non-finite"):
        kv_scale(torch.tensor([1.0, float("nan")]))


def test_reshape_and_cache_refuses_bad_arguments_by_name():
    key, value = make_tokens(8, 3, 2, 16, torch.float32)
    k, v = poisoned((4, 2, 4, 16), torch.float32), poisoned((4, 2, 4, 16), torch.float32)
    slots = torch.tensor([0, 5, -1])
    cases = [
        ((key[0], value, k, v, slots), "key must be"),
        ((key, value[:, :1], k, v, slots), "value"),
        ((key, value.half(), k, v, slots), "value"),
        ((key, value, k[0], v, slots), "k_cache must be"),
        ((key, value, k, v[:3], slots), "v_cache"),
        ((key, value, k, v.half(), slots), "v_cache"),
        ((key, value, k[:, :1].contiguous(), v[:, :1].contiguous(), slots), "k_cache .* num_kv_heads"),
        ((key, value, k.transpose(1, 2), v.transpose(1, 2), slots), "k_cache .* num_kv_heads"),
        ((key, value, k[:, :, :2], v[:, :, :2], slots), "contiguous"),
        ((key, value, k, v, slots.int()), "slot_mapping must be int64"),
        ((key, value, k, v, slots[:2]), r"slot_mapping must be \[num_tokens\]"),
        ((key, value, k, v, torch.tensor([0, 16, 1])), "slot 16, past the cache's 16 slots"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            reshape_and_cache(*args)
    k8, v8 = poisoned((4, 2, 4, 16), FP8), poisoned((4, 2, 4, 16), FP8)
    for scales, name in (
        ((0.0, 1.0), "k_scale"),
        ((1.0, float("nan")), "v_scale"),
        ((-1.0, 1.0), "k_scale"),
        ((1e-40, 1.0), "k_scale"),
    ):
        with pytest.raises(ValueError, match=name):
            reshape_and_cache(key, value, k8, v8, slots, *scales)
    assert (bits(k8) == 0x7F).all() and k.isnan().all()  # nothing was written


def test_copy_and_swap_blocks_refuse_bad_arguments_by_name():
    pool = random_pool(9, (2, 2, 4, 1, 2, 16), torch.float32)
    host = random_pool(10, (2, 2, 3, 1, 2, 16), torch.float32)
    ids = torch.tensor([0, 1])
    copy_cases = [
        ((pool[0], ids, ids + 2), "kv_cache must be"),
        ((pool[:, :, :, :, :, :8], ids, ids + 2), "kv_cache must be contiguous"),
        ((pool, ids.int(), ids + 2), "src must be a 1-D int64"),
        ((pool, ids, (ids + 2)[None]), "dst must be a 1-D int64"),
        ((pool, ids, torch.tensor([2])), "src has 2 block ids, dst 1"),
        ((pool, ids, torch.tensor([2, 4])), r"dst has block id 4, outside \[0, 4\)"),
        ((pool, torch.tensor([-1, 0]), torch.tensor([2, 3])), "src has block id -1"),
        ((pool, ids, torch.tensor([3, 3])), "dst names a block twice"),
    ]
    for args, message in copy_cases:
        with pytest.raises(ValueError, match=message):
            copy_blocks(*args)
    swap_cases = [
        ((pool[0], host, ids, ids), "src_cache must be"),
        ((pool, host[:, :1], ids, ids), "dst_cache"),
        ((pool, host.half(), ids, ids), "dst_cache"),
        ((pool, host, ids, torch.tensor([0, 3])), r"dst_ids has block id 3, outside \[0, 3\)"),
        ((host, pool, torch.tensor([3, 0]), ids), r"src_ids has block id 3, outside \[0, 3\)"),
        ((pool, host, ids.float(), ids), "src_ids must be a 1-D int64"),
    ]
    for args, message in swap_cases:
        with pytest.raises(ValueError, match=message):
            swap_blocks(*args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_kernels_match_twins_and_swaps_go_through_pinned_memory():
    key, value = make_tokens(11, 37, 4, 128, torch.float16, amplitude=4.0)
    key, value = key.cuda(), value.cuda()
    slots = scattered_slots(12, 37, 16, 16, num_skipped=5).cuda()
    for cache_dtype, scales in ((torch.float16, (1.0, 1.0)), (FP8, (0.01, 0.003))):
        k, v, k_ref, v_ref = (poisoned((16, 4, 16, 128), cache_dtype).cuda() for _ in range(4))
        reshape_and_cache(key, value, k, v, slots, *scales)
        reshape_and_cache_ref(key, value, k_ref, v_ref, slots, *scales)
        assert torch.equal(bits(k), bits(k_ref)) and torch.equal(bits(v), bits(v_ref))
    pool = random_pool(13, (2, 3, 16, 4, 16, 128), torch.float16).cuda()
    ref = pool.clone()
    copy_blocks(pool, torch.tensor([1, 2, 9]), torch.tensor([2, 3, 1]))
    copy_blocks_ref(ref, torch.tensor([1, 2, 9]), torch.tensor([2, 3, 1]))
    assert torch.equal(pool, ref)
    host = random_pool(14, (2, 3, 6, 4, 16, 128), torch.float16)
    swap_blocks(pool, host, torch.tensor([9, 4]), torch.tensor([5, 0]))
    assert torch.equal(host[:, :, [5, 0]], pool[:, :, [9, 4]].cpu())
    swap_blocks(host, pool, torch.tensor([1, 5]), torch.tensor([15, 14]))
    assert torch.equal(pool[:, :, [15, 14]].cpu(), host[:, :, [1, 5]])
