"""The Triton RMSNorm (plain and fused with the residual add) against its torch twin, and the twin against
transformers' LlamaRMSNorm. bf16 runs only through the twin: the interpreter rounds bf16 casts wrongly."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from kernels.triton_norm import rms_norm, rms_norm_ref

EPS = 1e-6
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-3, atol=1e-3)}


@pytest.fixture
def poisoned(monkeypatch):
    """Float tensors from torch.empty / empty_like start as NaN for the test, so an unwritten output shows."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: nan(empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: nan(empty_like(*a, **kw)))
    assert torch.empty(2).isnan().all()


def make(seed, num_tokens, hidden, dtype):
    g = torch.Generator().manual_seed(seed)
    # Rows of very different scales, so a wrong per-row normaliser shows; weights away from 1.
    x = torch.randn(num_tokens, hidden, generator=g) * torch.logspace(-2, 2, num_tokens)[:, None]
    residual = torch.randn(num_tokens, hidden, generator=g)
    weight = 1 + 0.5 * torch.randn(hidden, generator=g)
    return x.to(dtype), residual.to(dtype), weight.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hidden", [576, 96, 64])  # SmolLM2's width, and widths below one block
def test_kernel_matches_reference(poisoned, dtype, hidden):
    x, _, w = make(0, 5, hidden, dtype)
    out = rms_norm(x, w, EPS)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out, rms_norm_ref(x, w, EPS), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hidden", [576, 96])
def test_fused_residual_add_matches_reference(poisoned, dtype, hidden):
    x, r, w = make(1, 4, hidden, dtype)
    out, new_residual = rms_norm(x, w, EPS, r)
    ref_out, ref_residual = rms_norm_ref(x, w, EPS, r)
    # The sum is one rounding of x + r in both: bit-exact.
    torch.testing.assert_close(new_residual, ref_residual, rtol=0, atol=0)
    torch.testing.assert_close(out, ref_out, **TOL[dtype])
    assert not torch.allclose(out.float(), rms_norm_ref(x, w, EPS).float(), atol=1e-2)  # the residual mattered


def test_rows_of_a_wider_buffer(poisoned):
    # x and residual as column slices of wider tensors (row stride != hidden), as a fused projection hands them.
    x, r, w = make(2, 3, 96, torch.float32)
    wide_x, wide_r = torch.randn(3, 160), torch.randn(3, 200)
    wide_x[:, 32:128], wide_r[:, :96] = x, r
    out, new_residual = rms_norm(wide_x[:, 32:128], w, EPS, wide_r[:, :96])
    ref_out, ref_residual = rms_norm_ref(x, w, EPS, r)
    torch.testing.assert_close(out, ref_out, **TOL[torch.float32])
    torch.testing.assert_close(new_residual, ref_residual, rtol=0, atol=0)


def test_no_tokens(poisoned):
    x, r, w = make(3, 0, 64, torch.float32)
    assert rms_norm(x, w, EPS).shape == (0, 64)
    assert [t.shape for t in rms_norm(x, w, EPS, r)] == [(0, 64), (0, 64)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reference_is_transformers_llama_rms_norm(dtype):
    x, r, w = make(4, 3, 96, dtype)
    hf = LlamaRMSNorm(96, eps=EPS).to(dtype)
    with torch.no_grad():
        hf.weight.copy_(w)
        torch.testing.assert_close(rms_norm_ref(x, w, EPS), hf(x), rtol=0, atol=0)
        # HF's decoder layer: hidden = residual + hidden, then the next norm reads it.
        out, new_residual = rms_norm_ref(x, w, EPS, r)
        torch.testing.assert_close(new_residual, r + x, rtol=0, atol=0)
        torch.testing.assert_close(out, hf(r + x), rtol=0, atol=0)


@pytest.mark.parametrize(
    "case,message",
    [
        (lambda x, r, w: (x[None], w, None), "x must be"),
        (lambda x, r, w: (x.long(), w, None), "x has dtype"),
        (lambda x, r, w: (x[:, ::2], w[:48], None), "stride 1"),
        (lambda x, r, w: (x, w[:-1], None), "weight has shape"),
        (lambda x, r, w: (x, w.half(), None), "weight is"),
        (lambda x, r, w: (x, w, r[:-1]), "residual has shape"),
        (lambda x, r, w: (x, w, r.half()), "residual is"),
    ],
)
def test_bad_inputs_are_refused(case, message):
    x, r, w = make(5, 4, 96, torch.float32)
    args = case(x, r, w)
    for fn in (rms_norm, rms_norm_ref):
        with pytest.raises(ValueError, match=message):
            fn(args[0], args[1], EPS, args[2])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hidden", [576, 4096, 5120])
def test_kernel_matches_reference_on_gpu(dtype, hidden):
    # A different summation order may flip the rounding of the normalised value: allow two ulps of the dtype.
    tol = dict(rtol=2e-3, atol=1e-3) if dtype == torch.float16 else dict(rtol=2e-2, atol=1e-2)
    x, r, w = (t.cuda() for t in make(6, 64, hidden, dtype))
    torch.testing.assert_close(rms_norm(x, w, EPS), rms_norm_ref(x, w, EPS), **tol)
    out, new_residual = rms_norm(x, w, EPS, r)
    ref_out, ref_residual = rms_norm_ref(x, w, EPS, r)
    torch.testing.assert_close(new_residual, ref_residual, rtol=0, atol=0)
    torch.testing.assert_close(out, ref_out, **tol)
