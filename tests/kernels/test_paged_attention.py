"""The compiled CPU paged-decode kernel against its torch twin, on random caches and block tables."""

from __future__ import annotations

import pytest
import torch

from kernels.paged_attention import paged_decode_attention, paged_decode_attention_ref


def make_case(seed, num_seqs, num_heads, num_kv_heads, head_dim, block_size, context_lens, dtype, num_blocks=64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(num_seqs, num_heads, head_dim, generator=g)
    k = torch.randn(num_kv_heads, num_blocks, block_size, head_dim, generator=g).to(dtype)
    v = torch.randn(num_kv_heads, num_blocks, block_size, head_dim, generator=g).to(dtype)
    max_blocks = max(-(-n // block_size) for n in context_lens) + 1  # one spare column, as tables carry
    # Tables out of order, each sequence on distinct blocks drawn at random from the pool.
    tables = torch.stack([torch.randperm(num_blocks, generator=g)[:max_blocks] for _ in range(num_seqs)])
    return q, k, v, tables, torch.tensor(context_lens, dtype=torch.int64)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (6, 2), (8, 1)])  # GQA ratios 1, 3, 8
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_matches_reference_on_ragged_contexts(num_heads, num_kv_heads, dtype):
    block_size = 8
    # One key, exactly one block, one past a block boundary, several blocks, ragged.
    lens = [1, 8, 9, 16, 17, 31, 40, 3]
    q, k, v, tables, ctx = make_case(0, len(lens), num_heads, num_kv_heads, 32, block_size, lens, dtype)
    out = paged_decode_attention(q, k, v, tables, ctx, 32**-0.5)
    ref = paged_decode_attention_ref(q, k, v, tables, ctx, 32**-0.5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), float("-inf")], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kernel_and_twin_read_only_each_sequences_own_slots(garbage, dtype):
    """Slots no sequence has written hold whatever the pool held (the engine allocates it with torch.empty):
    they must be left out, not weighted 0 (0 * NaN and 0 * inf are NaN)."""
    q, k, v, tables, ctx = make_case(1, 4, 4, 2, 16, 4, [5, 12, 7, 2], dtype)
    before = paged_decode_attention(q, k, v, tables, ctx, 0.25)
    before_ref = paged_decode_attention_ref(q, k, v, tables, ctx, 0.25)
    used = {int(b) for s in range(4) for b in tables[s, : -(-int(ctx[s]) // 4)]}
    unused = [b for b in range(k.shape[1]) if b not in used]
    # Poison every block no sequence owns, and the slots past each context in owned blocks.
    k[:, unused] = garbage
    v[:, unused] = garbage
    for s in range(4):
        n = int(ctx[s])
        last = int(tables[s, (n - 1) // 4])
        k[:, last, (n - 1) % 4 + 1 :] = garbage
        v[:, last, (n - 1) % 4 + 1 :] = garbage
    assert ctx.remainder(4).ne(0).any()  # some sequence ends inside a block: its last block holds garbage
    after = paged_decode_attention(q, k, v, tables, ctx, 0.25)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    torch.testing.assert_close(paged_decode_attention_ref(q, k, v, tables, ctx, 0.25), before_ref, rtol=0, atol=0)


@pytest.mark.parametrize("window", [1, 5, 16])
def test_sliding_window_limits_the_keys(window):
    q, k, v, tables, ctx = make_case(2, 5, 6, 3, 16, 4, [3, 6, 17, 25, 40], torch.float32)
    out = paged_decode_attention(q, k, v, tables, ctx, 0.25, window)
    ref = paged_decode_attention_ref(q, k, v, tables, ctx, 0.25, window)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, paged_decode_attention(q, k, v, tables, ctx, 0.25))


def test_bad_shapes_are_refused_with_a_message():
    q, k, v, tables, ctx = make_case(3, 2, 4, 2, 16, 4, [5, 9], torch.float32)
    with pytest.raises(RuntimeError, match="block_tables are too short"):
        paged_decode_attention(q, k, v, tables[:, :1].contiguous(), ctx, 0.25)
    with pytest.raises(RuntimeError, match="q must be"):
        paged_decode_attention(q.double(), k, v, tables, ctx, 0.25)
    with pytest.raises(RuntimeError, match="outside the cache"):
        paged_decode_attention(q, k, v, tables + k.shape[1], ctx, 0.25)
    with pytest.raises(RuntimeError, match="context_len must be >= 1"):
        paged_decode_attention(q, k, v, tables, torch.tensor([0, 9]), 0.25)
    empty = paged_decode_attention(q[:0], k, v, tables[:0], ctx[:0], 0.25)
    assert empty.shape == (0, 4, 16)


def test_an_unsupported_head_dim_is_refused():
    q, k, v, tables, ctx = make_case(4, 2, 2, 2, 24, 4, [3, 5], torch.float32)
    with pytest.raises(RuntimeError, match="head_dim 24 is not supported"):
        paged_decode_attention(q, k, v, tables, ctx, 0.2)


def test_a_torch_without_its_cpp_headers_fails_the_build_at_once_in_words(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    from kernels import cpu_ops

    monkeypatch.setattr(cpp_extension, "include_paths", lambda *a, **k: [str(tmp_path)])
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: pytest.fail("the compiler ran"))
    cpu_ops.load.cache_clear()
    try:
        with pytest.raises(cpu_ops.KernelBuildError, match=r"torch's C\+\+ headers \(torch/extension.h\)"):
            cpu_ops.load()
    finally:
        cpu_ops.load.cache_clear()  # the next caller loads the real build again


def test_builds_are_named_by_what_they_are_built_from(tmp_path):
    """Two checkouts, or one before and after an edit or a torch upgrade, never share a build name."""
    from kernels import cpu_ops

    source = tmp_path / "k.cpp"
    source.write_text("int x;")
    first = cpu_ops.build_name("kvstudio_cpu_ops", [source])
    assert first == cpu_ops.build_name("kvstudio_cpu_ops", [source])  # the same code builds once
    assert first.startswith("kvstudio_cpu_ops_") and first.isidentifier()
    source.write_text("int y;")
    assert cpu_ops.build_name("kvstudio_cpu_ops", [source]) != first
