"""The Triton quantized matmul against its torch twin (kernels.quant.qmatmul_ref: dequantize, float32 matmul).

On the CPU it runs under Triton's interpreter at small sizes, in float32 only: the interpreter's bfloat16
arithmetic is wrong (on a GPU the same small cases run compiled). On a GPU the half-precision paths also run at
real sizes."""

from __future__ import annotations

import pytest
import torch

from kernels import quant
from kernels.triton_quant import triton_qmatmul

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make(seed, m, n, k, fmt, device):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02 * torch.logspace(-0.5, 0.5, n)[:, None]
    x = torch.randn(m, k, generator=g)
    bias = torch.randn(n, generator=g)
    return quant.quantize(w, fmt).to(device), x.to(device), bias.to(device)


@pytest.mark.parametrize("fmt", quant.FORMATS)
# Ragged M, N, K; a second M tile; K split among 3 programs, the last one's share ragged (288 = 9 blocks of 32).
@pytest.mark.parametrize("m,n,k", [(1, 1, 32), (5, 13, 100), (17, 40, 64), (1, 13, 288)])
def test_kernel_matches_twin(fmt, m, n, k):
    qw, x, bias = make(0, m, n, k, fmt, DEVICE)
    for b in (None, bias):
        y = triton_qmatmul(x, qw, b)
        assert y.shape == (m, n) and y.dtype == torch.float32
        # Exact codes times float32 x, scaled per block: only the summation order differs from the twin.
        torch.testing.assert_close(y, quant.qmatmul_ref(x, qw, b), rtol=1e-5, atol=1e-5)


def test_rows_of_a_wider_buffer():
    qw, x, _ = make(1, 3, 16, 64, "q4g32", DEVICE)
    wide = torch.randn(3, 160, device=DEVICE)
    wide[:, 32:96] = x
    torch.testing.assert_close(triton_qmatmul(wide[:, 32:96], qw), quant.qmatmul_ref(x, qw), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fmt", quant.FORMATS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, 4, 64, 300])
def test_kernel_matches_twin_on_gpu(fmt, dtype, m):
    qw, x, bias = make(2, m, 960, 576, fmt, "cuda")
    y = quant.qmatmul(x.to(dtype), qw, bias)  # the CUDA dispatch
    assert y.dtype == dtype
    ref = quant.qmatmul_ref(x.to(dtype).float(), qw, bias)
    # Only x's rounding to dtype (done for both) and the output's differ: codes and scales are exact.
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol)
