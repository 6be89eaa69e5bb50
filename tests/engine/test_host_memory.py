"""Heap trimming after large CPU steps: the binding gives freed heap pages back, and the runner trims once the
weights are loaded, after a long prefill, and never after a decode step."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import pytest

from app.library.machine import process_rss
from engine import SamplingParams
from engine.host_memory import TRIM_AFTER_PREFILL_TOKENS, HeapTrimmer

glibc_only = pytest.mark.skipif(not HeapTrimmer().available, reason="malloc_trim is glibc's")


@glibc_only
def test_a_trim_gives_freed_heap_pages_back():
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    chunk = 64 * 1024  # under malloc's mmap threshold: served from the heap
    chunks = [libc.malloc(chunk) for _ in range(2048)]  # 128 MiB
    fence = libc.malloc(chunk)  # keeps the freed chunks from being the heap's top, which free() trims itself
    for address in chunks:
        ctypes.memset(address, 1, chunk)
    for address in chunks:
        libc.free(address)
    before = process_rss()
    HeapTrimmer(min_prefill_tokens=1).after_step(1)
    after = process_rss()
    libc.free(fence)
    assert before - after >= 64 * 2**20, (before, after)


@glibc_only
def test_the_runner_trims_after_a_long_prefill_and_not_while_decoding(tiny_llama):
    assert sys.platform.startswith("linux")
    engine = tiny_llama.llm(num_blocks=64, block_size=16, max_model_len=256).llm_engine
    heap = engine.runner.heap
    assert heap.min_prefill_tokens == TRIM_AFTER_PREFILL_TOKENS
    assert heap.trims == 1  # what loading the weights left freed
    heap.min_prefill_tokens = 100  # the tiny model's context is 256 tokens
    short, long = [5, 6, 7], list(range(2, 2 + 100))
    engine.add_request("short", {"prompt_token_ids": short}, SamplingParams(max_tokens=4, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    assert heap.trims == 1
    engine.add_request("long", {"prompt_token_ids": long}, SamplingParams(max_tokens=4, ignore_eos=True))
    engine.step()  # the long prefill
    assert heap.trims == 2
    while engine.has_unfinished_requests():
        engine.step()  # its decodes
    assert heap.trims == 2
