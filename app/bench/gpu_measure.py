"""What `make gpu-check` (app/bench/gpu_check.py) measures with: the sizes of a run (REAL on a GPU, SMOKE on the
CPU under Triton's interpreter), the report each check writes a row to, and timing and error helpers."""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Scale:
    """Sizes and precision of a run: `REAL` on a GPU; `SMOKE` runs the same code on the CPU under Triton's
    interpreter with tiny shapes and float32 (the interpreter's bfloat16 is wrong), so the script itself is
    tested before a GPU is at hand."""

    device: str
    dtype: torch.dtype
    tol: float
    heads: int
    kv_heads: int
    head_dim: int
    decode_seqs: int
    decode_context: int
    prefill_seqs: int
    prefill_context: int
    norm_tokens: int
    hidden: int
    model: dict  # LlamaConfig sizes of the end-to-end model
    num_prompts: int
    max_prompt: int
    engine: dict  # extra LLM options


REAL = Scale(
    "cuda",
    torch.bfloat16,
    3e-2,
    32,
    8,
    128,
    64,
    4096,
    8,
    2048,
    4096,
    4096,
    dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8),
    64,
    896,
    dict(gpu_memory_utilization=0.45),
)
SMOKE = Scale(
    "cpu",
    torch.float32,
    1e-3,
    4,
    2,
    16,
    3,
    40,
    2,
    24,
    8,
    96,
    dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    3,
    24,
    dict(kv_cache_memory=0.01, attention_backend="triton"),
)


@dataclass
class Report:
    rows: list[tuple[str, str, str]] = field(default_factory=list)  # (check, verdict, detail)

    def add(self, check: str, ok: bool | None, detail: str) -> None:
        verdict = "n/a" if ok is None else ("PASS" if ok else "FAIL")
        self.rows.append((check, verdict, detail))
        print(f"[{verdict}] {check}: {detail}", flush=True)

    def run(self, check: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as e:  # one failing check must not hide the others' results
            traceback.print_exc()
            self.add(check, False, f"{type(e).__name__}: {e}"[:200])

    def table(self) -> str:
        width = max(len(c) for c, _, _ in self.rows)
        lines = [f"{'check':<{width}}  result  detail", "-" * (width + 40)]
        lines += [f"{c:<{width}}  {v:<6}  {d}" for c, v, d in self.rows]
        return "\n".join(lines)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str, repeat: int = 20) -> float:
    """Median seconds of fn, after one warm-up call."""
    fn()
    sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest error relative to the reference's magnitude (at least 1): outputs that are not bounded (a norm's,
    a rotation's) differ by one 16-bit rounding step, which is 0.03 in absolute terms at values of 4 to 8."""
    return ((a.float() - b.float()).abs() / b.float().abs().clamp_min(1.0)).max().item()
