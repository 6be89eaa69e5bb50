"""The Triton decode and prefill attention kernels against their torch twins, on the interpreter (and a GPU when
one is at hand), over random caches read through shuffled block tables."""

from __future__ import annotations

import pytest
import torch

from kernels.attention_twins import paged_decode_attention_ref, prefill_attention_ref
from kernels.triton_attention import choose_num_splits, paged_decode_attention
from kernels.triton_prefill import prefill_attention

TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=1e-2, atol=3e-3),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every float tensor the wrappers allocate (outputs, split partials) starts as NaN, so an element a kernel
    forgets to write shows up in the comparison."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(empty_like(*a, **kw)))


def quantize_fp8(x: torch.Tensor, scale: float) -> torch.Tensor:
    """The fp8 cache rule: stored = x / scale, saturated to e4m3's +-448."""
    return (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn)


def make_cache(g, context_lens, num_kv_heads, head_dim, block_size, dtype):
    num_blocks = sum(-(-n // block_size) for n in context_lens) + 4  # a few blocks no sequence owns
    k = torch.randn(num_blocks, num_kv_heads, block_size, head_dim, generator=g)
    v = torch.randn(num_blocks, num_kv_heads, block_size, head_dim, generator=g)
    # Each sequence on its own blocks, drawn out of order from the pool; the spare column is padding (block 0).
    perm = torch.randperm(num_blocks, generator=g).tolist()
    max_blocks = max(-(-n // block_size) for n in context_lens) + 1
    tables = torch.zeros(len(context_lens), max_blocks, dtype=torch.int32)
    for s, n in enumerate(context_lens):
        used = -(-n // block_size)
        tables[s, :used] = torch.tensor(perm[:used])
        del perm[:used]
    return k.to(dtype), v.to(dtype), tables, torch.tensor(context_lens, dtype=torch.int32)


def decode_case(seed, context_lens, num_heads, num_kv_heads, head_dim, block_size, dtype):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(len(context_lens), num_heads, head_dim, generator=g).to(dtype)
    return (q, *make_cache(g, context_lens, num_kv_heads, head_dim, block_size, dtype))


def prefill_case(seed, query_lens, context_lens, num_heads, num_kv_heads, head_dim, block_size, dtype):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(query_lens), num_heads, head_dim, generator=g).to(dtype)
    cu = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    k, v, tables, ctx = make_cache(g, context_lens, num_kv_heads, head_dim, block_size, dtype)
    return q, k, v, cu, ctx, tables


def fill_unused_slots(k, v, tables, ctx, garbage):
    """Poison every cache slot no sequence owns: blocks outside the tables and slots past each context."""
    block_size = k.shape[2]
    owned = torch.zeros(k.shape[0], block_size, dtype=torch.bool)
    for s, n in enumerate(ctx.tolist()):
        for p in range(n):
            owned[int(tables[s, p // block_size]), p % block_size] = True
    for cache in (k, v):
        cache.transpose(1, 2)[~owned] = garbage  # a [num_blocks, block_size, kv_heads, dim] view


# ---------------------------------------------------------------------------------------------------------------
# Decode


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (6, 2), (8, 1)])  # GQA ratios 1, 3, 8
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("block_size", [8, 16])
def test_decode_matches_reference_on_ragged_contexts(num_heads, num_kv_heads, dtype, block_size):
    # One key; exactly one block and one past it; two blocks and one past; a 32-token tile boundary and past it.
    lens = [1, block_size, block_size + 1, 2 * block_size, 2 * block_size + 1, 32, 33, 45]
    q, k, v, tables, ctx = decode_case(0, lens, num_heads, num_kv_heads, 32, block_size, dtype)
    out = paged_decode_attention(q, k, v, tables, ctx, 32**-0.5, num_splits=1)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out, paged_decode_attention_ref(q, k, v, tables, ctx, 32**-0.5), **TOL[dtype])


@pytest.mark.parametrize("window", [None, 6])
def test_decode_splits_agree_with_one_pass(window):
    # Splits beyond a short context's tiles stay empty; the reduction must weigh them 0.
    q, k, v, tables, ctx = decode_case(1, [3, 40, 64, 97], 6, 2, 16, 16, torch.float32)
    whole = paged_decode_attention(q, k, v, tables, ctx, 0.25, window, num_splits=1)
    ref = paged_decode_attention_ref(q, k, v, tables, ctx, 0.25, window)
    torch.testing.assert_close(whole, ref, **TOL[torch.float32])
    for splits in (2, 3, 5):
        torch.testing.assert_close(
            paged_decode_attention(q, k, v, tables, ctx, 0.25, window, num_splits=splits), whole, rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_sliding_window_keeps_the_last_keys(num_splits):
    lens = [2, 5, 16, 17, 40]
    q, k, v, tables, ctx = decode_case(2, lens, 4, 2, 32, 8, torch.float16)
    for window in (1, 5, 20):  # 20 exceeds some contexts: those see every key
        out = paged_decode_attention(q, k, v, tables, ctx, 0.2, window, num_splits=num_splits)
        torch.testing.assert_close(
            out, paged_decode_attention_ref(q, k, v, tables, ctx, 0.2, window), **TOL[torch.float16]
        )
    full = paged_decode_attention(q, k, v, tables, ctx, 0.2, num_splits=num_splits)
    assert not torch.allclose(out[-1], full[-1], atol=1e-2)  # the window really dropped keys


@pytest.mark.parametrize("q_dtype", [torch.float32, torch.float16])
def test_decode_reads_fp8_caches_with_their_scales(q_dtype):
    q, k, v, tables, ctx = decode_case(3, [7, 16, 29], 6, 2, 32, 8, torch.float32)
    k8, v8 = quantize_fp8(k, 0.02), quantize_fp8(v, 0.05)
    q = q.to(q_dtype)
    for splits in (1, 2):
        out = paged_decode_attention(q, k8, v8, tables, ctx, 0.2, k_scale=0.02, v_scale=0.05, num_splits=splits)
        ref = paged_decode_attention_ref(q, k8, v8, tables, ctx, 0.2, k_scale=0.02, v_scale=0.05)
        torch.testing.assert_close(out, ref, **TOL[q_dtype])
    # Close to attention over the unquantized cache: the scales are applied, not merely shared with the twin.
    exact = paged_decode_attention_ref(q, k, v, tables, ctx, 0.2)
    torch.testing.assert_close(out, exact, rtol=0.1, atol=0.1)


GARBAGE = [float("nan"), float("inf"), float("-inf")]


@pytest.mark.parametrize("garbage", GARBAGE, ids=str)
@pytest.mark.parametrize("num_splits", [1, 2])
def test_decode_and_twin_read_only_each_sequences_own_slots(garbage, num_splits):
    """Slots no sequence has written hold whatever the pool held (the engine allocates it with torch.empty):
    they must be left out, not weighted 0 (0 * NaN and 0 * inf are NaN)."""
    q, k, v, tables, ctx = decode_case(4, [5, 12, 7, 33], 4, 2, 16, 8, torch.float32)
    before = paged_decode_attention(q, k, v, tables, ctx, 0.25, num_splits=num_splits)
    before_ref = paged_decode_attention_ref(q, k, v, tables, ctx, 0.25)
    fill_unused_slots(k, v, tables, ctx, garbage)
    after = paged_decode_attention(q, k, v, tables, ctx, 0.25, num_splits=num_splits)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    torch.testing.assert_close(paged_decode_attention_ref(q, k, v, tables, ctx, 0.25), before_ref, rtol=0, atol=0)


def test_split_heuristic_fills_idle_sms_only_for_long_contexts():
    assert choose_num_splits(1, 8, 32768, 132) == 16  # 8 programs: as many splits as the reduction takes
    assert choose_num_splits(2, 8, 4096, 132) == 8  # 4096 tokens: 8 runs of 512
    assert choose_num_splits(4, 8, 2048, 132) == 4
    assert choose_num_splits(17, 8, 32768, 132) == 1  # 136 programs already cover the SMs
    assert choose_num_splits(1, 8, 500, 132) == 1  # too short to be worth a second kernel


# ---------------------------------------------------------------------------------------------------------------
# Prefill


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (6, 2), (8, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prefill_matches_reference_packed(num_heads, num_kv_heads, dtype):
    # Pure prefills (context == query), cached prefixes of whole blocks and of part of one, a one-token chunk,
    # queries crossing the 16-row tile boundary.
    query_lens = [5, 17, 16, 1, 9]
    context_lens = [5, 17, 32, 24, 26]
    q, k, v, cu, ctx, tables = prefill_case(5, query_lens, context_lens, num_heads, num_kv_heads, 32, 16, dtype)
    out = prefill_attention(q, k, v, cu, ctx, tables, 32**-0.5)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out, prefill_attention_ref(q, k, v, cu, ctx, tables, 32**-0.5), **TOL[dtype])


def test_prefill_long_queries_in_64_row_tiles():
    # Long enough on average for 64-row tiles; block_size 8 puts four cache blocks in each 32-key step.
    q, k, v, cu, ctx, tables = prefill_case(6, [70, 40], [70, 61], 4, 2, 16, 8, torch.float16)
    out = prefill_attention(q, k, v, cu, ctx, tables, 0.25)
    torch.testing.assert_close(out, prefill_attention_ref(q, k, v, cu, ctx, tables, 0.25), **TOL[torch.float16])


@pytest.mark.parametrize("window", [1, 7])
def test_prefill_sliding_window(window):
    q, k, v, cu, ctx, tables = prefill_case(7, [20, 3, 12], [20, 30, 40], 4, 2, 16, 8, torch.float32)
    out = prefill_attention(q, k, v, cu, ctx, tables, 0.25, window)
    torch.testing.assert_close(out, prefill_attention_ref(q, k, v, cu, ctx, tables, 0.25, window), **TOL[torch.float32])
    assert not torch.allclose(out, prefill_attention(q, k, v, cu, ctx, tables, 0.25))


def test_prefill_reads_fp8_caches_with_their_scales():
    q, k, v, cu, ctx, tables = prefill_case(8, [12, 4], [12, 21], 6, 2, 32, 8, torch.float32)
    k8, v8 = quantize_fp8(k, 0.03), quantize_fp8(v, 0.04)
    q = q.half()
    out = prefill_attention(q, k8, v8, cu, ctx, tables, 0.2, k_scale=0.03, v_scale=0.04)
    ref = prefill_attention_ref(q, k8, v8, cu, ctx, tables, 0.2, k_scale=0.03, v_scale=0.04)
    torch.testing.assert_close(out, ref, **TOL[torch.float16])
    torch.testing.assert_close(out, prefill_attention_ref(q, k, v, cu, ctx, tables, 0.2), rtol=0.1, atol=0.1)


@pytest.mark.parametrize("garbage", GARBAGE, ids=str)
@pytest.mark.parametrize("window", [None, 5])
def test_prefill_and_twin_read_only_each_sequences_own_slots(garbage, window):
    # A chunk over a cached prefix that ends inside a block, and a whole prompt ending inside one.
    q, k, v, cu, ctx, tables = prefill_case(9, [6, 10], [14, 10], 4, 2, 16, 8, torch.float32)
    before = prefill_attention(q, k, v, cu, ctx, tables, 0.25, window)
    before_ref = prefill_attention_ref(q, k, v, cu, ctx, tables, 0.25, window)
    fill_unused_slots(k, v, tables, ctx, garbage)
    torch.testing.assert_close(prefill_attention(q, k, v, cu, ctx, tables, 0.25, window), before, rtol=0, atol=0)
    torch.testing.assert_close(
        prefill_attention_ref(q, k, v, cu, ctx, tables, 0.25, window), before_ref, rtol=0, atol=0
    )


def test_one_token_prefill_equals_decode():
    q, k, v, tables, ctx = decode_case(10, [4, 19, 33], 6, 3, 16, 8, torch.float32)
    cu = torch.arange(4, dtype=torch.int32)
    torch.testing.assert_close(
        prefill_attention(q, k, v, cu, ctx, tables, 0.25, 9),
        paged_decode_attention(q, k, v, tables, ctx, 0.25, 9),
        rtol=1e-6,
        atol=1e-6,
    )


# ---------------------------------------------------------------------------------------------------------------
# Validation


def decode_args():
    q, k, v, tables, ctx = decode_case(11, [5, 9], 4, 2, 16, 8, torch.float32)
    return dict(q=q, k_cache=k, v_cache=v, block_tables=tables, context_lens=ctx, scale=0.25)


BAD_DECODE_ARGS = {
    "q dtype": (lambda a: a.update(q=a["q"].double()), "q must be"),
    "q rank": (lambda a: a.update(q=a["q"][0]), "q must be"),
    "cache dtype": (lambda a: a.update(k_cache=a["k_cache"].int(), v_cache=a["v_cache"].int()), "k_cache must be"),
    "cache shapes": (lambda a: a.update(v_cache=a["v_cache"][:-1]), "v_cache .* must match k_cache"),
    "cache dtypes": (lambda a: a.update(v_cache=a["v_cache"].half()), "v_cache .* must match k_cache"),
    "head_dim": (
        lambda a: a.update(q=a["q"][..., :12], k_cache=a["k_cache"][..., :12], v_cache=a["v_cache"][..., :12]),
        "head_dim .* power of two",
    ),
    "q head_dim": (lambda a: a.update(q=torch.cat([a["q"], a["q"]], -1)), "q's head_dim 32 differs"),
    "num_heads": (lambda a: a.update(q=a["q"][:, :3]), "num_heads 3 is not a multiple"),
    "block_tables rank": (lambda a: a.update(block_tables=a["block_tables"][0]), "block_tables must be"),
    "block_tables dtype": (lambda a: a.update(block_tables=a["block_tables"].long()), "block_tables must be int32"),
    "block_tables rows": (lambda a: a.update(block_tables=a["block_tables"][:1]), "block_tables must be"),
    "context_lens": (lambda a: a.update(context_lens=a["context_lens"].long()), "context_lens must be int32"),
    "device": (lambda a: a.update(context_lens=a["context_lens"].to("meta")), "context_lens is on meta"),
    "sliding_window": (lambda a: a.update(sliding_window=0), "sliding_window must be"),
    "k_scale": (lambda a: a.update(k_scale=0.0), "k_scale and v_scale must be positive"),
    "num_splits": (lambda a: a.update(num_splits=0), "num_splits must be"),
}


@pytest.mark.parametrize("change,message", BAD_DECODE_ARGS.values(), ids=BAD_DECODE_ARGS.keys())
def test_decode_refuses_bad_arguments(change, message):
    args = decode_args()
    change(args)
    with pytest.raises(ValueError, match=message):
        paged_decode_attention(**args)


@pytest.mark.parametrize(
    "cu_query_lens", [torch.tensor([0, 5, 9]), torch.tensor([[0, 5, 9]], dtype=torch.int32)], ids=["int64", "2-D"]
)
def test_prefill_refuses_bad_cu_query_lens(cu_query_lens):
    a = decode_args()
    with pytest.raises(ValueError, match="cu_query_lens must be"):
        prefill_attention(a["q"], a["k_cache"], a["v_cache"], cu_query_lens, a["context_lens"], a["block_tables"], 0.25)


def test_prefill_refuses_a_table_per_sequence_mismatch():
    a = decode_args()
    cu = torch.tensor([0, 1, 2], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"block_tables must be int32 \[num_seqs=2"):
        prefill_attention(a["q"], a["k_cache"], a["v_cache"], cu, a["context_lens"], a["block_tables"][:1], 0.25)


# ---------------------------------------------------------------------------------------------------------------
# On a GPU: the compiled kernels (bf16 included, which the interpreter cannot multiply) at serving sizes.

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize(
    "dtype,cache_dtype",
    [
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float8_e4m3fn),
        (torch.float32, torch.float32),
    ],
)
def test_gpu_kernels_match_reference(dtype, cache_dtype):
    lens = [1, 16, 17, 300, 1000, 2049]
    q, k, v, tables, ctx = decode_case(12, lens, 32, 8, 128, 16, torch.float32)
    k_scale = v_scale = 1.0
    if cache_dtype == torch.float8_e4m3fn:
        k_scale, v_scale = 0.02, 0.03
        k, v = quantize_fp8(k, k_scale), quantize_fp8(v, v_scale)
    else:
        k, v = k.to(cache_dtype), v.to(cache_dtype)
    q = q.to(dtype)
    args = (k, v, tables, ctx, 128**-0.5)
    ref = paged_decode_attention_ref(q, *args, k_scale=k_scale, v_scale=v_scale)
    cuda = [t.cuda() for t in (q, *args[:4])]
    for splits in (1, 4, None):
        out = paged_decode_attention(*cuda, 128**-0.5, k_scale=k_scale, v_scale=v_scale, num_splits=splits)
        torch.testing.assert_close(out.cpu(), ref, **TOL[dtype])
    query_lens = [1, 16, 17, 300, 1000, 100]
    g = torch.Generator().manual_seed(13)
    qp = torch.randn(sum(query_lens), 32, 128, generator=g).to(dtype)
    cu = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    ref = prefill_attention_ref(qp, k, v, cu, ctx, tables, 128**-0.5, 256, k_scale, v_scale)
    out = prefill_attention(
        qp.cuda(), k.cuda(), v.cuda(), cu.cuda(), ctx.cuda(), tables.cuda(), 128**-0.5, 256, k_scale, v_scale
    )
    torch.testing.assert_close(out.cpu(), ref, **TOL[dtype])
