"""The compiled fused decode step (kernels/fused_decode.py) against a plain torch decoder on random weights, at
sizes the tiny models do not reach: hidden sizes off the kernels' tiles, partial rotary, every bias, q/k norms,
a sliding window, several rows of one sequence (speculative decoding's rows), long contexts split across threads,
16-bit caches; quantized projections of mixed formats. The engine's tests compare it with the eager model."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
import torch.nn.functional as F

from kernels import cpu_ops, quant
from kernels.fused_decode import DecoderLayer, DecoderShape, FusedDecode, Projection, argmax, available
from kernels.paged_attention import paged_decode_attention_ref

pytestmark = pytest.mark.skipif(not available(), reason="the fused decode kernels cannot be built here")

# hidden 44 (o and down end in a partial panel and a partial float tile), intermediate 72 (down's K ends inside a
# 32-block), head_dim 16 with a rotary dimension of 8 (partial rotary), GQA 4 heads over 2.
SHAPE = DecoderShape(
    hidden=44,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    intermediate=72,
    rms_norm_eps=1e-5,
    scale=0.25,
    sliding_window=None,
)
VOCAB, LAYERS, BLOCK, NUM_BLOCKS, ROT_DIM, MAX_POS = 50, 2, 4, 256, 8, 512


def rand(g, *shape, std=1.0):
    return torch.randn(*shape, generator=g) * std


# Mixed formats: q and v in q4g32, k in q8g32; the others alternating.
MIXED = {
    "qkv": ["q4g32", "q8g32", "q4g32"],
    "o": ["q8g32"],
    "gate_up": ["q4g32", "q4g32"],
    "down": ["q4g32"],
    "embed": "q4g32",
}


def make_weights(seed: int, quantized: bool, qk_norm: bool = True, shape: DecoderShape = SHAPE, formats=MIXED):
    """Random float weights [in, out] with biases, and (quantized) the projections kept quantized in `formats`."""
    g = torch.Generator().manual_seed(seed)
    s = shape
    q, kv = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim

    def proj(k: int, shards: list[int], formats: list[str]) -> Projection:
        w = rand(g, k, sum(shards), std=k**-0.5)
        bias = rand(g, sum(shards), std=0.1)
        if not quantized:
            return Projection([], weight=w, bias=bias)
        parts = [quant.quantize(part.t().contiguous(), f) for part, f in zip(w.split(shards, dim=1), formats)]
        return Projection(parts, bias=bias)

    layers = [
        DecoderLayer(
            input_norm=1 + rand(g, s.hidden, std=0.2),
            post_norm=1 + rand(g, s.hidden, std=0.2),
            qkv=proj(s.hidden, [q, kv, kv], formats["qkv"]),
            o=proj(q, [s.hidden], formats["o"]),
            gate_up=proj(s.hidden, [s.intermediate] * 2, formats["gate_up"]),
            down=proj(s.intermediate, [s.hidden], formats["down"]),
            q_norm=1 + rand(g, s.head_dim, std=0.2) if qk_norm else None,
            k_norm=1 + rand(g, s.head_dim, std=0.2) if qk_norm else None,
        )
        for _ in range(LAYERS)
    ]
    table = rand(g, VOCAB, s.hidden)
    embedding = quant.quantize(table, formats["embed"]) if quantized else table
    inv_freq = 1.0 / 10000 ** (torch.arange(0, ROT_DIM, 2).float() / ROT_DIM)
    freqs = torch.outer(torch.arange(MAX_POS).float(), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1), embedding, layers


def matmul(x: torch.Tensor, p: Projection) -> torch.Tensor:
    """Quantized parts through qmatmul, the eager path's kernel (int8 activations per 32)."""
    if p.qweights:
        return torch.cat([quant.qmatmul(x, qw) for qw in p.qweights], dim=-1) + p.bias
    return x @ p.weight + p.bias


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [rows, heads, dim], neox layout over the first ROT_DIM values; cos, sin [rows, 1, ROT_DIM / 2]."""
    half = ROT_DIM // 2
    x1, x2, rest = x[..., :half], x[..., half:ROT_DIM], x[..., ROT_DIM:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


def reference(shape, cos_sin, embedding, layers, ids, positions, slots, tables, lens, kv):
    """The decoder in plain torch; writes kv like the step."""
    s = shape
    n, (h_, kvh, d) = ids.shape[0], (s.num_heads, s.num_kv_heads, s.head_dim)
    table = quant.dequantize(embedding) if isinstance(embedding, quant.QuantizedWeight) else embedding
    h, res = table[ids], None
    cos, sin = cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)
    for i, layer in enumerate(layers):
        res = h if res is None else h + res
        qkv = matmul(rms(res, layer.input_norm, s.rms_norm_eps), layer.qkv)
        q, k, v = qkv.split([h_ * d, kvh * d, kvh * d], dim=-1)
        q, k, v = q.view(n, h_, d), k.view(n, kvh, d), v.reshape(n, kvh, d)
        if layer.q_norm is not None:
            q, k = rms(q, layer.q_norm, s.rms_norm_eps), rms(k, layer.k_norm, s.rms_norm_eps)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        k_cache, v_cache = kv[0, i], kv[1, i]  # [kv_heads, blocks, block_size, dim]
        k_cache.view(kvh, -1, d)[:, slots] = k.transpose(0, 1).to(kv.dtype)
        v_cache.view(kvh, -1, d)[:, slots] = v.transpose(0, 1).to(kv.dtype)
        o = paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, s.scale, s.sliding_window)
        res = matmul(o.reshape(n, -1), layer.o) + res
        gate, up = matmul(rms(res, layer.post_norm, s.rms_norm_eps), layer.gate_up).chunk(2, dim=-1)
        h = matmul(F.silu(gate) * up, layer.down)
    return h + res


def make_rows(seed: int, contexts: list[int], spec_rows: int = 0, shape: DecoderShape = SHAPE):
    """Rows of distinct sequences with these context lengths (the new token included), and spec_rows more rows
    continuing the last sequence (its next positions, as a speculative decode's drafts). Blocks drawn at random;
    every slot before a row's own written with random K/V, the rest NaN."""
    g = torch.Generator().manual_seed(seed)
    lens = contexts + [contexts[-1] + i + 1 for i in range(spec_rows)]
    seqs = list(range(len(contexts))) + [len(contexts) - 1] * spec_rows
    width = -(-max(lens) // BLOCK)
    blocks = torch.randperm(NUM_BLOCKS, generator=g)[: len(contexts) * width].view(len(contexts), width)
    tables = blocks[seqs].contiguous()
    positions = torch.tensor(lens) - 1
    slots = tables[torch.arange(len(lens)), positions // BLOCK] * BLOCK + positions % BLOCK
    s = shape
    kv = torch.full((2, LAYERS, s.num_kv_heads, NUM_BLOCKS, BLOCK, s.head_dim), float("nan"))
    for seq, n in enumerate(contexts):  # the keys before each sequence's first new token
        for t in range(n - 1):
            kv[:, :, :, blocks[seq, t // BLOCK], t % BLOCK] = rand(g, 2, LAYERS, s.num_kv_heads, s.head_dim)
    ids = torch.randint(0, VOCAB, (len(lens),), generator=g)
    return ids, positions, slots, tables, torch.tensor(lens), kv


def run_both(shape, weights, rows, kv_dtype=torch.float32):
    cos_sin, embedding, layers = weights
    ids, positions, slots, tables, lens, kv = rows
    kv = kv.to(kv_dtype)
    step = FusedDecode(shape, cos_sin, embedding, layers)
    fused_kv = kv.clone()
    fused = step(ids, positions, slots, tables, lens, fused_kv)
    ref = reference(shape, cos_sin, embedding, layers, ids, positions, slots, tables, lens, kv)
    return fused, ref, fused_kv, kv


@pytest.mark.parametrize(
    "contexts,spec_rows",
    [([7], 0), ([1, 5, 8, 9, 23], 0), ([6, 13], 3), ([300], 0), ([250], 2)],
    ids=["one", "ragged", "spec", "long", "long-spec"],
)
def test_float_weights_match_the_torch_decoder(contexts, spec_rows):
    fused, ref, fused_kv, ref_kv = run_both(SHAPE, make_weights(0, False), make_rows(1, contexts, spec_rows))
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    torch.testing.assert_close(fused_kv, ref_kv, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_a_sliding_window_and_no_qk_norm():
    shape = dataclasses.replace(SHAPE, sliding_window=6)
    fused, ref, _, _ = run_both(shape, make_weights(2, False, qk_norm=False), make_rows(3, [3, 9, 40], 2))
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    far, _, _, _ = run_both(SHAPE, make_weights(2, False, qk_norm=False), make_rows(3, [3, 9, 40], 2))
    assert not torch.allclose(far[2:], fused[2:])  # the window dropped keys that mattered


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16_bit_caches(dtype):
    fused, ref, fused_kv, ref_kv = run_both(SHAPE, make_weights(4, False), make_rows(5, [4, 17, 70], 1), dtype)
    torch.testing.assert_close(fused, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    torch.testing.assert_close(fused_kv.float(), ref_kv.float(), rtol=0, atol=0, equal_nan=True)


def test_quantized_weights_match_qmatmul():
    """The projections kept quantized, in mixed formats (several parts in one projection), the embedding too:
    the same int8-activation arithmetic as qmatmul, so only float rounding differs (which may, rarely, move an
    activation across an int8 rounding boundary: a step of 1/254 of its block's largest value)."""
    fused, ref, _, _ = run_both(SHAPE, make_weights(6, True), make_rows(7, [1, 5, 30, 200], 2))
    torch.testing.assert_close(fused, ref, rtol=1e-3, atol=1e-3 * ref.abs().max().item())


# K a multiple of 256 where q4k may go (o_proj's K, 128, is not).
SHAPE_256 = dataclasses.replace(SHAPE, hidden=256, head_dim=32, intermediate=512, scale=32**-0.5)
Q4K = {"qkv": ["q4k"] * 3, "o": ["q8g32"], "gate_up": ["q4k", "q4k"], "down": ["q4k"], "embed": "q4k"}


def test_q4_k_weights_match_qmatmul():
    """Q4_K kept as it is (q4k) beside q8g32, the embedding in q4k too; as above."""
    weights = make_weights(6, True, shape=SHAPE_256, formats=Q4K)
    assert weights[1].format == "q4k"
    fused, ref, _, _ = run_both(SHAPE_256, weights, make_rows(7, [1, 5, 30], 2, shape=SHAPE_256))
    torch.testing.assert_close(fused, ref, rtol=1e-3, atol=1e-3 * ref.abs().max().item())


@pytest.mark.parametrize("shape,formats", [(SHAPE, MIXED), (SHAPE_256, Q4K)], ids=["q4g32", "q4k"])
def test_the_embedding_rows_are_the_dequantized_rows(shape, formats):
    """Layers whose projections are all zero add nothing to the residual stream: the step returns the embedding
    rows themselves, dequantized exactly as qembedding does."""
    cos_sin, embedding, layers = make_weights(8, True, shape=shape, formats=formats)
    h, q = shape.hidden, shape.num_heads * shape.head_dim
    qkv, i = q + 2 * shape.num_kv_heads * shape.head_dim, shape.intermediate

    def zero(k: int, n: int) -> Projection:
        return Projection([], weight=torch.zeros(k, n), bias=torch.zeros(n))

    zeros = [
        dataclasses.replace(layer, qkv=zero(h, qkv), o=zero(q, h), gate_up=zero(h, 2 * i), down=zero(i, h))
        for layer in layers
    ]
    ids, positions, slots, tables, lens, kv = make_rows(9, [2, 5, 11], shape=shape)
    out = FusedDecode(shape, cos_sin, embedding, zeros)(ids, positions, slots, tables, lens, kv)
    torch.testing.assert_close(out, quant.qembedding(ids, embedding), rtol=0, atol=0)


def test_bad_inputs_are_refused_with_a_message():
    cos_sin, embedding, layers = make_weights(10, False)
    step = FusedDecode(SHAPE, cos_sin, embedding, layers)
    ids, positions, slots, tables, lens, kv = make_rows(11, [5, 9])
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        step(ids + VOCAB, positions, slots, tables, lens, kv)
    with pytest.raises(RuntimeError, match=r"slot \d+ is outside the cache"):
        step(ids, positions, slots + NUM_BLOCKS * BLOCK, tables, lens, kv)
    with pytest.raises(RuntimeError, match="block_tables name blocks outside the cache"):
        step(ids, positions, slots, tables + NUM_BLOCKS, lens, kv)
    with pytest.raises(RuntimeError, match="context_len"):
        step(ids, positions, slots, tables[:, :1].contiguous(), lens, kv)
    with pytest.raises(RuntimeError, match="kv_cache must be"):
        step(ids, positions, slots, tables, lens, kv[:, :1])
    with pytest.raises(RuntimeError, match="int64"):
        step(ids.int(), positions, slots, tables, lens, kv)
    assert step(ids[:0], positions[:0], slots[:0], tables[:0], lens[:0], kv).shape == (0, SHAPE.hidden)
    bad = [dataclasses.replace(layers[0], o=Projection([], weight=torch.zeros(3, 3)))]
    with pytest.raises(RuntimeError, match="o_proj weight must be"):
        FusedDecode(SHAPE, cos_sin, embedding, bad)


def test_each_extension_is_named_by_every_file_it_includes():
    """An edit to a shared header must rebuild every extension that includes it: each extension's source list
    (the digest its build is named by) holds the local headers its .cpp includes."""
    lists = [cpu_ops._ATTENTION_SOURCES, cpu_ops._QUANT_SOURCES, cpu_ops._FUSED_SOURCES]
    for sources in lists:
        text = sources[0].read_text()
        for header in re.findall(r'#include "([^"]+)"', text):
            assert sources[0].parent / header in sources, (sources[0].name, header)
    first = cpu_ops.build_name("kvstudio_fused_decode", cpu_ops._FUSED_SOURCES)
    assert first == cpu_ops.build_name("kvstudio_fused_decode", cpu_ops._FUSED_SOURCES)
    assert first != cpu_ops.build_name("kvstudio_fused_decode", cpu_ops._FUSED_SOURCES[:1])


def test_argmax_answers_as_torch():
    """The sampler's greedy pick: the first of equal largest values, the first NaN, -inf rows, strided rows."""
    g = torch.Generator().manual_seed(12)
    x = torch.randn(6, 1003, generator=g)
    x[1, 7] = x[1, 800] = 50.0  # a tie: the first
    x[2, 999] = float("nan")
    x[2, 5] = float("nan")  # NaN wins, the first of them
    x[3] = float("-inf")
    x[4, 1002] = 60.0  # in the tail past the last whole vector
    cases = [x, x[:, :1000], x[:, 3:], torch.randn(4, 49152, generator=g), x[:1]]
    for logits in cases:
        assert torch.equal(argmax(logits), logits.argmax(dim=-1))
    assert torch.equal(argmax(x.double()), x.double().argmax(dim=-1))  # other dtypes: torch's own
