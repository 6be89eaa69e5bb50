"""Quantized-matmul kernels against the float paths, on the CPU, with the weights out of cache.

    python -m app.bench.quant_kernels [--shapes 576x960,...] [--batches 1,4,16,64] [--threads 2] [--rounds 7]

Prints the median microseconds per call of y = x @ W^T for each K->N shape and batch M:
  fp32 F.linear     W float32 [N, K] (what an unquantized Linear runs)
  fp32 x@W[K,N]     W float32 stored transposed (faster for wide outputs at M=1)
  fp16 fbgemm       quantized::linear_dynamic_fp16 (fp16 weights, fp32 x): the best stock weight-only path
  q8g32, q4g32, q4k kernels.quant.qmatmul (the C++ kernel, fp32 x), Python wrapper included

Cold weights: each method cycles through enough copies of its weight to exceed 128 MiB (4x a 32 MiB L3),
because a decode step streams the whole model from DRAM; one matrix reused from cache flatters every method.
Methods run interleaved in a random order per round, and the median over rounds is reported. On a two-core
machine anything else running turns OpenMP's barriers into milliseconds: run it on a quiet machine (`uptime`).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import torch

from kernels import quant

SMOLLM2 = ((576, 960), (576, 576), (576, 3072), (1536, 576), (576, 49152))  # fused QKV, o, gate+up, down, lm_head
LLAMA_1B = ((2048, 3072), (8192, 2048))
FOOTPRINT = 128 << 20
METHODS = ("fp32 F.linear", "fp32 x@W[K,N]", "fp16 fbgemm", *quant.FORMATS)


def _copies(nbytes: int) -> int:
    return max(1, min(4000, -(-FOOTPRINT // nbytes)))


def _cycle(weights: list, fn: Callable) -> Callable[[torch.Tensor], torch.Tensor]:
    state = [0]

    def call(x: torch.Tensor) -> torch.Tensor:
        i = state[0]
        state[0] = (i + 1) % len(weights)
        return fn(x, weights[i])

    return call


def _methods(k: int, n: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    w = torch.randn(n, k) * 0.02
    fp32 = [w.clone() for _ in range(_copies(4 * n * k))]
    fp32_t = [w.t().contiguous() for _ in range(_copies(4 * n * k))]
    fp16 = [torch.ops.quantized.linear_prepack_fp16(w, None) for _ in range(_copies(2 * n * k))]
    methods = {
        "fp32 F.linear": _cycle(fp32, torch.nn.functional.linear),
        "fp32 x@W[K,N]": _cycle(fp32_t, torch.matmul),
        "fp16 fbgemm": _cycle(fp16, torch.ops.quantized.linear_dynamic_fp16),
    }
    for fmt in quant.FORMATS:
        qw = quant.quantize(w, fmt)
        copies = [qw.map(torch.clone) for _ in range(_copies(qw.nbytes))]
        methods[fmt] = _cycle(copies, quant.qmatmul)
    return methods


def _time(fn: Callable, x: torch.Tensor, iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        fn(x)
    return (time.perf_counter() - start) / iters


def run(shapes, batches, rounds: int, seed: int = 0) -> dict[tuple[int, int, int], dict[str, float]]:
    """{(K, N, M): {method: median seconds per call}}, printing a row per (shape, M) as it goes."""
    rng = random.Random(seed)
    results = {}
    print(f"median us per call, cold weights, {torch.get_num_threads()} threads")
    print(f"| K->N | M | {' | '.join(METHODS)} |")
    print("|---|---|" + "---|" * len(METHODS))
    for k, n in shapes:
        methods = _methods(k, n)
        for m in batches:
            x = torch.randn(m, k)
            # Enough calls per sample for ~40 ms, so the timer's resolution and one-off stalls don't count.
            iters = {}
            for name, fn in methods.items():
                fn(x)
                iters[name] = max(2, min(3000, int(0.04 / max(_time(fn, x, 2), 1e-7))))
            samples = {name: [] for name in methods}
            for _ in range(rounds):
                for name in rng.sample(list(methods), len(methods)):
                    samples[name].append(_time(methods[name], x, iters[name]))
            results[(k, n, m)] = {name: statistics.median(s) for name, s in samples.items()}
            cells = " | ".join(f"{results[(k, n, m)][name] * 1e6:,.1f}" for name in METHODS)
            print(f"| {k}->{n} | {m} | {cells} |", flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", help="K->N shapes as KxN,KxN (default: SmolLM2's and a 1B Llama's)")
    parser.add_argument("--batches", default="1,4,16,64", help="batch sizes M (default 1,4,16,64)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--rounds", type=int, default=7, help="samples per method (default 7)")
    args = parser.parse_args(argv)
    shapes = (
        [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SMOLLM2 + LLAMA_1B
    )
    torch.set_num_threads(args.threads)
    run(shapes, [int(b) for b in args.batches.split(",")], args.rounds)


if __name__ == "__main__":
    main()
