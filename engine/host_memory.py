"""Giving the heap back to the system after a large step on the CPU.

A prefill of a few thousand tokens allocates activations of tens of MB each ([tokens, intermediate] MLP inputs,
attention scores). glibc's malloc serves many of them from its heaps (its mmap threshold rises after the first
large frees) and keeps the freed pages, so after one long prompt the process stays some 130 MiB larger
(SmolLM2, 2,000 tokens: 647 MiB resident, 516 after a trim) for as long as it runs, though decode steps need a
few MB. malloc_trim hands the free pages back; the next long prompt faults them in again, a cost of a few ms
beside the seconds its prefill takes. Elsewhere than glibc (macOS, Windows, musl) nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Callable

# Trim after steps that prefilled at least this many tokens: their activations are large enough to be worth it,
# and a chat's decode steps never trim.
TRIM_AFTER_PREFILL_TOKENS = 512


def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


class HeapTrimmer:
    """after_step(num_prefill_tokens): the free heap pages handed back after a large enough step."""

    def __init__(self, min_prefill_tokens: int = TRIM_AFTER_PREFILL_TOKENS) -> None:
        self.min_prefill_tokens = min_prefill_tokens
        self._trim = _malloc_trim()
        self.trims = 0

    @property
    def available(self) -> bool:
        return self._trim is not None

    def after_step(self, num_prefill_tokens: int) -> None:
        if num_prefill_tokens >= self.min_prefill_tokens:
            self.trim()

    def trim(self) -> None:
        if self._trim is not None:
            self._trim(0)
            self.trims += 1
