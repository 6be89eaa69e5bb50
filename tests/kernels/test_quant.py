"""Quantized weights (kernels/quant.py, kernels/gguf_blocks.py): GGUF blocks mapped to the kept formats against
gguf-py's own dequantization, round-to-nearest quantization, and the compiled CPU matmul against the torch twin.

What "exact" means here:
  Q8_0, Q5_0 -> q8g32 and Q4_0, Q4_1 -> q4g32: dequantize(from_gguf_blocks(b)) == gguf's dequantize(b), bit for bit.
  Q4_K -> q4k: the codes, 6-bit scales and mins and float16 super-block scales copied; bit for bit too (d*sc and
    dmin*m are float32 products, as ggml computes them).
  Q5_1, Q5_K, Q6_K -> q8g32: requantized round-to-nearest; each weight within half a step (amax/127/2) of gguf's,
    a relative RMS error under 1% (measured: 0.6% on Q5_1 of Gaussian weights with outliers, a seventh of Q5_1's
    own 4%; 0.4-0.45% on random Q5_K/Q6_K blocks).
The CPU kernel quantizes each row of x to int8 per 32 (llama.cpp's way); it matches that arithmetic done in float64
to float32 rounding, and differs from the twin by at most
sum over blocks of (amax|x_block| / 254) * sum_k |w_k - c|, c = 0 for q8g32 and m + 8d for q4g32 (whose codes it
centres); the tests check that bound element by element, and a relative error under 1% on Gaussian inputs
(0.5% measured; 1.7-2.8% when two channels are 100x the rest, as in LLM activations).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants

from kernels import cpu_ops, quant

F16_ULP = 2.0**-11  # float16's relative rounding bound


def weights(seed, n, k, scale=0.02):
    """Rows of different scales with a few outliers, as trained weights have."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * scale * torch.logspace(-0.5, 0.5, n)[:, None]
    w[torch.rand(n, k, generator=g) < 0.002] *= 8
    return w


def gguf_dequantize(raw, ggml_type, shape):
    return torch.from_numpy(quants.dequantize(raw, ggml_type).astype(np.float32)).reshape(shape)


# ---- GGUF blocks -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ggml_type", [T.Q8_0, T.Q5_0, T.Q4_0, T.Q4_1])
@pytest.mark.parametrize("n,k", [(24, 576), (4100, 32)])  # more rows than one pass takes (4096), N % 8 != 0
def test_legacy_blocks_map_bit_exactly(ggml_type, n, k):
    w = weights(0, n, k).numpy()
    raw = quants.quantize(w, ggml_type)
    qw = quant.from_gguf_blocks(raw, ggml_type, (n, k))
    assert qw.format == ("q8g32" if ggml_type in (T.Q8_0, T.Q5_0) else "q4g32")
    torch.testing.assert_close(quant.dequantize(qw), gguf_dequantize(raw, ggml_type, (n, k)), rtol=0, atol=0)


def test_blocks_come_as_bytes_numpy_or_tensors():
    w = weights(1, 8, 64).numpy()
    raw = quants.quantize(w, T.Q8_0)
    ref = quant.dequantize(quant.from_gguf_blocks(raw, T.Q8_0, (8, 64)))
    for form in (raw.tobytes(), torch.from_numpy(raw.copy()), raw.reshape(-1)):
        torch.testing.assert_close(quant.dequantize(quant.from_gguf_blocks(form, T.Q8_0, (8, 64))), ref, rtol=0, atol=0)


def q4_k_blocks(seed, count):
    """Q4_K super-blocks written by hand -> raw [count, 144] bytes, d, dmin [count], sc, m [count, 8], q."""
    rng = np.random.default_rng(seed)
    d = (rng.uniform(0.5, 2, count) * 1e-3).astype(np.float16)
    dmin = (rng.uniform(0.5, 2, count) * 1e-3).astype(np.float16)
    sc, m = rng.integers(0, 64, (count, 8)), rng.integers(0, 64, (count, 8))
    q = rng.integers(0, 16, (count, 256))
    scales = np.zeros((count, 12), np.int64)  # ggml's 6-bit packing (the inverse of get_scale_min_k4)
    scales[:, 0:4] = (sc[:, 0:4] & 63) | ((sc[:, 4:8] >> 4) << 6)
    scales[:, 4:8] = (m[:, 0:4] & 63) | ((m[:, 4:8] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:8] & 15) | ((m[:, 4:8] & 15) << 4)
    chunks = q.reshape(count, 4, 2, 32)  # 64 weights per 32 bytes: low nibbles first, then high
    qs = (chunks[:, :, 0] | (chunks[:, :, 1] << 4)).reshape(count, 128)
    raw = np.concatenate(
        [d.view(np.uint8).reshape(count, 2), dmin.view(np.uint8).reshape(count, 2), scales, qs], axis=1
    ).astype(np.uint8)
    return raw, d, dmin, sc, m, q


@pytest.mark.parametrize("n", [16, 4100])  # more rows than one pass takes (4096), N % 8 != 0
def test_q4_k_is_kept_as_it_is(n):
    k = 512
    raw, d, dmin, sc, m, q = q4_k_blocks(2, n * k // 256)
    d_sc = d.astype(np.float32)[:, None] * sc  # [blocks, 8]: what ggml multiplies in float32
    dmin_m = dmin.astype(np.float32)[:, None] * m
    expected = d_sc[..., None] * q.reshape(-1, 8, 32) - dmin_m[..., None]
    ref = gguf_dequantize(raw, T.Q4_K, (n, k))
    # The hand-written blocks are what they claim (gguf-py decodes them to the same floats).
    torch.testing.assert_close(ref, torch.from_numpy(expected.astype(np.float32)).reshape(n, k), rtol=0, atol=0)

    qw = quant.from_gguf_blocks(raw, T.Q4_K, (n, k))
    assert qw.format == "q4k"
    torch.testing.assert_close(quant.dequantize(qw), ref, rtol=0, atol=0)
    # In the file's 4.5 bits a weight and 1/8 bit more: the 6-bit scales and mins take a byte each.
    assert qw.nbytes == quant.format_nbytes("q4k", (n, k)) == -(-n // 8) * 8 * k * 4.625 / 8
    rows = torch.tensor([0, 9, n - 1])
    torch.testing.assert_close(quant.qembedding(rows, qw), ref[rows], rtol=0, atol=0)


def random_k_blocks(seed, count, ggml_type):
    """Any bytes are a valid K-quant block once its float16 scale fields hold finite numbers."""
    rng = np.random.default_rng(seed)
    size = {T.Q5_K: 176, T.Q6_K: 210}[ggml_type]
    raw = rng.integers(0, 256, (count, size), dtype=np.uint8)
    d = (rng.uniform(0.5, 2, (count, 2)) * 1e-3).astype(np.float16).view(np.uint8).reshape(count, 4)
    if ggml_type == T.Q5_K:
        raw[:, 0:4] = d  # d, dmin
    else:
        raw[:, 208:210] = d[:, :2]  # d
    return raw


@pytest.mark.parametrize("ggml_type", [T.Q5_1, T.Q5_K, T.Q6_K])
def test_requantized_types_stay_within_half_a_step(ggml_type):
    n, k = 16, 512
    if ggml_type == T.Q5_1:
        raw = quants.quantize(weights(3, n, k).numpy(), ggml_type)
    else:
        raw = random_k_blocks(3, n * k // 256, ggml_type)
    ref = gguf_dequantize(raw, ggml_type, (n, k))
    qw = quant.from_gguf_blocks(raw, ggml_type, (n, k))
    assert qw.format == "q8g32"
    err = (quant.dequantize(qw) - ref).view(n, -1, 32)
    step = ref.view(n, -1, 32).abs().amax(-1, keepdim=True) / 127
    assert err.abs().le(step * (0.5 + F16_ULP) + 1e-12).all()
    assert err.norm() / ref.norm() < 1e-2


def test_gguf_refusals_are_in_words():
    raw = quants.quantize(weights(4, 8, 64).numpy(), T.Q8_0)
    with pytest.raises(ValueError, match=r"GGUF type 10 cannot be kept quantized \(supported: Q4_0"):
        quant.from_gguf_blocks(raw, T.Q2_K, (8, 64))
    with pytest.raises(ValueError, match=r"Q8_0 \[8, 128\] takes 1088 bytes, got 544"):
        quant.from_gguf_blocks(raw, T.Q8_0, (8, 128))
    with pytest.raises(ValueError, match="Q4_K needs rows of a multiple of 256 weights, got 64"):
        quant.from_gguf_blocks(raw, T.Q4_K, (8, 64))


# ---- quantize ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", quant.FORMATS)
# K not a multiple of 32; N not of 8; more rows than one pass takes (4096)
@pytest.mark.parametrize("n,k", [(960, 576), (7, 100), (1, 32), (4100, 64)])
def test_quantize_rounds_to_nearest_within_half_a_step(fmt, n, k):
    w = weights(5, n, k)
    qw = quant.quantize(w, fmt)
    assert qw.shape == (n, k)
    deq = quant.dequantize(qw)
    assert deq.shape == (n, k) and deq.dtype == torch.float32
    padded = torch.nn.functional.pad(w, (0, -k % 32)).view(n, -1, 32)
    err = torch.nn.functional.pad(deq - w, (0, -k % 32)).view(n, -1, 32).abs()
    rel = (deq - w).norm() / w.norm()
    if fmt == "q4k":
        # Its step is d = D * s, in 63 steps of D per super-block: at least the block's range (0 taken in) over
        # 15, at most that and one D more.
        d = quant.block_scales(qw)[0][:n, : padded.shape[1]]
        lo, hi = padded.amin(-1).clamp(max=0), padded.amax(-1).clamp(min=0)
        assert d.ge((hi - lo) / 15 * (1 - 1e-6)).all()
        assert err.le(0.5 * d[..., None] * (1 + 1e-6) + 1e-9).all()
        assert rel < 0.1  # measured 8.6%
        return
    step = padded.abs().amax(-1) / 127 if fmt == "q8g32" else (padded.amax(-1) - padded.amin(-1)) / 15
    # Half a step, plus float16's rounding of d (and of m, which shifts every weight of the block alike).
    slack = F16_ULP * (padded.abs().amax(-1) + 16 * step)
    assert err.le((0.5 * step + slack)[..., None]).all()
    assert rel < (1e-2 if fmt == "q8g32" else 0.1)  # measured 0.65% and 8% on these weights


def test_memory_is_near_the_gguf_sizes():
    assert quant.format_nbytes("q8g32", (960, 576)) == 960 * 576 * 8.5 / 8  # GGUF Q8_0: 8.5 bits/weight
    assert quant.format_nbytes("q4g32", (960, 576)) == 960 * 576 * 5 / 8  # GGUF Q4_1: 5.0 bits/weight
    assert quant.format_nbytes("q4k", (960, 512)) == 960 * 512 * 4.625 / 8  # GGUF Q4_K: 4.5 bits/weight
    for fmt in quant.FORMATS:
        qw = quant.quantize(weights(6, 7, 100), fmt)
        assert qw.nbytes == quant.format_nbytes(fmt, (7, 100))  # padding to 8 columns and 128 weights included


def test_quantize_refusals_are_in_words():
    with pytest.raises(ValueError, match="unknown quantized format 'q3'"):
        quant.quantize(torch.randn(8, 32), "q3")
    with pytest.raises(ValueError, match="inf or NaN"):
        quant.quantize(torch.tensor([[float("nan")] * 32]), "q8g32")
    with pytest.raises(ValueError, match="out_features, in_features"):
        quant.quantize(torch.randn(32), "q8g32")
    with pytest.raises(ValueError, match="too large for float16"):
        quant.quantize(torch.full((1, 32), 1e7), "q8g32")


# ---- the CPU matmul --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built():
    """The compiled kernels, built once for the module (about a minute on first use on a machine)."""
    return cpu_ops.load_quant()


def blocks_of(t, k, fmt="q8g32"):
    """[..., K] -> [..., blocks of a weight of format fmt with that K, 32], zero-padded."""
    blocks = quant.padded_k(fmt, k) // 32
    return torch.nn.functional.pad(t, (0, blocks * 32 - k)).view(*t.shape[:-1], blocks, 32)


def centres(qw):
    """c per row and block: [N, padded K/32] (the 4-bit kernels compute with w - c, c = m + 8d; q8g32 with w)."""
    n = qw.shape[0]
    d, m = quant.block_scales(qw)
    if m is None:
        return torch.zeros(n, d.shape[1], dtype=torch.float64)
    return m[:n].double() + 8 * d[:n].double()


def activation_bound(x, qw):
    """The largest |kernel - twin| that int8 activations per 32 allow, element by element: [M, N]."""
    k, fmt = qw.shape[1], qw.format
    half_step = blocks_of(x.double(), k, fmt).abs().amax(-1) / 254  # [M, blocks]
    w = blocks_of(quant.dequantize(qw).double(), k, fmt)
    spread = (w - centres(qw)[..., None]).abs().sum(-1)  # [N, blocks]
    rounding = 1e-5 * (x.double().abs() @ quant.dequantize(qw).double().abs().t()) + 1e-6  # float32 sums
    return half_step @ spread.t() + rounding


def kernel_arithmetic(x, qw):
    """What the kernel computes, in float64: x rounded to int8 per 32 (amax/127, ties to even), then
    sum_b [ sum_k (w_k - c_b) x^_k + c_b sum_k x_k ] -> ([M, N], a bound on float32's rounding of it)."""
    k, fmt = qw.shape[1], qw.format
    xb = blocks_of(x.float(), k, fmt)
    amax = xb.abs().amax(-1, keepdim=True)
    # 127 / amax in float32, as the kernel divides (torch's `127 / t` multiplies by 1 / t: ties would round apart)
    inv = torch.where(amax > 0, torch.full_like(amax, 127).div(amax), torch.zeros_like(amax))
    x_hat = (torch.round(xb * inv).double() * (amax.double() / 127)).flatten(-2)
    c = centres(qw).repeat_interleave(32, dim=1)  # [N, K padded]
    w = blocks_of(quant.dequantize(qw).double(), k, fmt).flatten(-2) - c
    x_pad = blocks_of(x.double(), k, fmt).flatten(-2)
    y = x_hat @ w.t() + x_pad @ c.t()
    return y, 1e-5 * (x_hat.abs() @ w.abs().t() + x_pad.abs() @ c.abs().t()) + 1e-7


@pytest.mark.parametrize("fmt", quant.FORMATS)
@pytest.mark.parametrize("k", [32, 576, 1536])
@pytest.mark.parametrize("n", [1, 7, 960])
def test_kernel_matches_twin_within_the_activation_rounding(built, fmt, k, n):
    """Against its own arithmetic in float64 to float32's rounding (which pins every index and scale), and
    against the twin within the bound the int8 activations allow."""
    qw = quant.quantize(weights(7, n, k), fmt)
    g = torch.Generator().manual_seed(8)
    for m in (1, 3, 4, 5, 17, 64):
        x = torch.randn(m, k, generator=g)
        y, ref = quant.qmatmul(x, qw), quant.qmatmul_ref(x, qw)
        assert y.shape == (m, n) and y.dtype == torch.float32
        exact, tol = kernel_arithmetic(x, qw)
        assert (y.double() - exact).abs().le(tol).all(), (m, k, n)
        assert (y.double() - ref.double()).abs().le(activation_bound(x, qw)).all(), (m, k, n)
        if n * m > 100:  # a statistic: meaningless for a handful of outputs
            assert (y - ref).norm() / ref.norm() < 1e-2


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_kernel_with_massive_activation_channels(built, fmt):
    # LLM activations have a few channels ~100x the rest: they set their block's int8 step, and only that block's.
    qw = quant.quantize(weights(9, 64, 576), fmt)
    x = torch.randn(9, 576, generator=torch.Generator().manual_seed(10))
    x[:, [5, 300]] *= 100
    y, ref = quant.qmatmul(x, qw), quant.qmatmul_ref(x, qw)
    exact, tol = kernel_arithmetic(x, qw)
    assert (y.double() - exact).abs().le(tol).all()
    assert (y.double() - ref.double()).abs().le(activation_bound(x, qw)).all()
    # The two blocks holding those channels lose their small values: 1.7-2.8% over 300 draws of x.
    assert (y - ref).norm() / ref.norm() < 4e-2


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_any_input_layout_dtype_and_bias(built, fmt):
    n, k = 13, 100  # K not a multiple of 32, N not of 8
    qw = quant.quantize(weights(10, n, k), fmt)
    g = torch.Generator().manual_seed(11)
    bias = torch.randn(n, generator=g)
    wide = torch.randn(5, 3 * k, generator=g)
    cases = {
        "column slice": wide[:, k : 2 * k],  # non-contiguous rows
        "misaligned": torch.randn(5 * k + 1, generator=g)[1:].view(5, k),  # contiguous, data pointer 4 bytes off
        "transposed": torch.randn(k, 5, generator=g).t(),
        "3d": torch.randn(2, 3, k, generator=g),
    }
    for name, x in cases.items():
        y, ref = quant.qmatmul(x, qw, bias), quant.qmatmul_ref(x, qw, bias)
        assert y.shape == (*x.shape[:-1], n), name
        bound = activation_bound(x.reshape(-1, k), qw).view(*x.shape[:-1], n)
        assert (y.double() - ref.double()).abs().le(bound).all(), name
    x = torch.randn(4, k, generator=g).bfloat16()
    y = quant.qmatmul(x, qw, bias)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), quant.qmatmul_ref(x.float(), qw, bias), rtol=2e-2, atol=2e-2)
    assert quant.qmatmul(torch.randn(0, k), qw).shape == (0, n)


def test_matmul_refusals_are_in_words(built):
    qw = quant.quantize(weights(11, 8, 64), "q8g32")
    with pytest.raises(ValueError, match=r"x has 32 features, the weight \[8, 64\] takes 64"):
        quant.qmatmul(torch.randn(2, 32), qw)
    with pytest.raises(ValueError, match="bias has shape"):
        quant.qmatmul(torch.randn(2, 64), qw, torch.randn(7))
    with pytest.raises(ValueError, match="floating point"):
        quant.qmatmul(torch.ones(2, 64, dtype=torch.int64), qw)


def test_without_a_compiler_the_twin_runs_with_a_warning(monkeypatch, caplog):
    def fail():
        raise cpu_ops.KernelBuildError("could not build kvstudio's CPU kernels (needs g++ and ninja): no g++")

    monkeypatch.setattr(cpu_ops, "load_quant", fail)
    quant._cpu_kernels.cache_clear()
    try:
        qw = quant.quantize(weights(12, 8, 64), "q4g32")
        x = torch.randn(3, 64, generator=torch.Generator().manual_seed(12))
        with caplog.at_level(logging.WARNING, logger="kernels.quant"):
            y = quant.qmatmul(x, qw)
            quant.qmatmul(x, qw)
        torch.testing.assert_close(y, quant.qmatmul_ref(x, qw), rtol=0, atol=0)
        warnings = [r.getMessage() for r in caplog.records if r.name == "kernels.quant"]
        assert warnings == [
            "could not build kvstudio's CPU kernels (needs g++ and ninja): no g++; quantized "
            "matmuls fall back to the slower torch ops"
        ]  # once, not per call
    finally:
        quant._cpu_kernels.cache_clear()  # the next caller loads the real build again


# ---- embeddings ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_embedding_rows_are_the_dequantized_rows(fmt):
    qw = quant.quantize(weights(13, 49, 100), fmt)
    ids = torch.tensor([[0, 48, 7], [8, 8, 15]])
    rows = quant.qembedding(ids, qw)
    assert rows.shape == (2, 3, 100)
    torch.testing.assert_close(rows, quant.dequantize(qw)[ids], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"ids must be in \[0, 49\)"):
        quant.qembedding(torch.tensor([49]), qw)


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_concat_stacks_weights_along_out_features(fmt):
    g = torch.Generator().manual_seed(11)
    parts = [torch.randn(n, 64, generator=g) for n in (16, 8, 5)]
    stacked = quant.concat([quant.quantize(w, fmt) for w in parts])
    assert stacked.shape == (29, 64)
    assert torch.equal(quant.dequantize(stacked), torch.cat([quant.dequantize(quant.quantize(w, fmt)) for w in parts]))
    with pytest.raises(ValueError, match="a multiple of 8"):
        quant.concat([quant.quantize(parts[2], fmt), quant.quantize(parts[0], fmt)])
    with pytest.raises(ValueError, match="one format"):
        quant.concat([quant.quantize(parts[0], "q8g32"), quant.quantize(parts[1], "q4g32")])


def test_the_avx2_build_computes_the_same_floats(built):
    """On a CPU with AVX512-VNNI (as CI's) the kernel's integer dot products take vpdpbusd; the build without it
    (-DKVQ_NO_VNNI, what an AVX2-only CPU compiles) must give the same floats, bit for bit."""
    from torch.utils import cpp_extension

    source = cpu_ops._QUANT_SOURCES[0]
    avx2 = cpp_extension.load(
        name=cpu_ops.build_name("kvstudio_quant_ops_no_vnni", cpu_ops._QUANT_SOURCES),
        sources=[str(source)],
        extra_cflags=[*cpu_ops._CFLAGS, "-DKVQ_NO_VNNI"],
        extra_ldflags=["-fopenmp"],
    )
    g = torch.Generator().manual_seed(14)
    for fmt in quant.FORMATS:
        qw = quant.quantize(weights(15, 40, 512), fmt)
        for m in (1, 4, 5, 17):
            x = torch.randn(m, 512, generator=g)
            assert torch.equal(avx2.qlinear(x, *qw.tensors(), 40, None), built.qlinear(x, *qw.tensors(), 40, None))
