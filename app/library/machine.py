"""What this machine can hold: the memory a model runs in (the GPU's on CUDA, RAM otherwise) and whether a model
of a given size fits there with room left for its KV cache.

The estimate is the engine's own arithmetic: the weights as they will sit resident (app/library/footprint.py: a
GGUF's quantized matrices at their kept size, floats in the dtype the engine picks on this device, float32 on the
CPU and 16-bit on a GPU, see EngineConfig.model_dtype, or int8/int4 with --quantization) plus a reserve for the
KV pool and activations. It is asked before a download and before a load, so a model that cannot run is said in
words instead of ending in the kernel's out-of-memory killer.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from app.library.footprint import Resident, Weights, estimate_gguf_file, params_resident, read_weights
from app.units import byte_size
from engine.config import DEFAULT_CPU_KV_CACHE_GIB, QUANTIZATION_MODES

if TYPE_CHECKING:
    from engine import LLMEngine

GIB = 2**30
# What a load needs beyond the weights: the KV pool (the engine's CPU default) and activations for a prefill.
CPU_RESERVE = int(DEFAULT_CPU_KV_CACHE_GIB * GIB) + GIB // 2
GPU_RESERVE = GIB  # KV blocks take what is left on a GPU; one GiB keeps a useful pool
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class MachineMemory:
    device: str  # "cpu", or "cuda (NVIDIA H100 80GB HBM3)"
    total: int  # bytes: the GPU's memory on CUDA, RAM otherwise
    available: int  # bytes free now
    bytes_per_param: int  # what the engine stores a weight in here, with dtype "auto"
    reserve: int  # bytes a load needs beyond its weights

    @property
    def is_gpu(self) -> bool:
        return self.device.startswith("cuda")


@dataclass(frozen=True)
class ModelFit:
    verdict: str  # "fits" | "tight" | "too big"
    needed: int  # bytes: the weights as they will sit resident plus the reserve
    available: int
    message: str  # a sentence or two for the UI and the CLI: the verdict, the amounts, what the weights are
    weights: int  # bytes of the weights alone

    @property
    def fits(self) -> bool:
        return self.verdict != "too big"


def _ram() -> tuple[int, int]:
    """(total, available) bytes of RAM. /proc/meminfo's MemAvailable counts reclaimable page cache, which is what
    a new allocation can really get; elsewhere the total stands in for both."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        return int(fields["MemTotal"].split()[0]) * 1024, int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return total, total


def machine_memory() -> MachineMemory:
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        return MachineMemory(f"cuda ({torch.cuda.get_device_name()})", total, free, 2, GPU_RESERVE)
    total, available = _ram()
    return MachineMemory("cpu", total, available, 4, CPU_RESERVE)


def process_rss() -> int:
    """Bytes of RAM this process holds now (its resident set), from /proc/self/statm on Linux. Elsewhere the most
    it ever held (getrusage's peak: kilobytes on Linux, bytes on macOS) stands in; 0 where neither is there
    (Windows)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError, AttributeError):
        pass
    try:
        import resource  # Unix only
    except ImportError:
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@dataclass(frozen=True)
class MemoryUse:
    """What a loaded model takes: the process's resident RAM, and within the engine's memory its weights (as held:
    quantized matrices at their kept size) and its KV pool (allocated; on the CPU its pages count in RAM only as
    far as blocks were written)."""

    rss: int
    weights: int
    kv_pool: int

    def __str__(self) -> str:
        engine = f"weights {byte_size(self.weights)}, KV {byte_size(self.kv_pool)}"
        return f"Memory {byte_size(self.rss)} ({engine})" if self.rss else f"Memory: {engine}"


def engine_memory(engine: LLMEngine) -> MemoryUse:
    kv_cache = engine.runner.kv_cache
    return MemoryUse(process_rss(), engine.weight_bytes, 0 if kv_cache is None else kv_cache.nbytes)


def load_format(memory: MachineMemory, options: dict | None) -> tuple[int, str]:
    """(bytes a float weight takes, the quantization mode) for a load with `options` (LLM keyword arguments:
    dtype, quantization) on `memory`'s device."""
    options = options or {}
    dtype, quantization = options.get("dtype", "auto"), options.get("quantization", "auto")
    if dtype != "auto" and dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPE_BYTES)}; got {dtype!r}")
    if quantization not in QUANTIZATION_MODES:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_MODES)}; got {quantization!r}")
    return (memory.bytes_per_param if dtype == "auto" else DTYPE_BYTES[dtype]), quantization


def fit(resident: Resident, memory: MachineMemory) -> ModelFit:
    """Whether weights occupying `resident` load on `memory` with its reserve beside them: "fits" with a quarter
    of the free memory to spare, "tight" within it, "too big" past it."""
    needed = resident.bytes + memory.reserve
    where = "GPU memory" if memory.is_gpu else "RAM"
    amounts = f"needs about {byte_size(needed, 'GiB')}, {byte_size(memory.available, 'GiB')} of {where} is free"
    parts = (
        f"weights {byte_size(resident.bytes)} ({resident.how}) + {byte_size(memory.reserve)} for the KV cache "
        "and activations"
    )
    if needed <= memory.available * 0.75:
        verdict, message = "fits", f"Fits: {amounts}; {parts}."
    elif needed <= memory.available:
        verdict = "tight"
        message = f"Tight: {amounts}; {parts}. Close other programs or lower the KV cache size."
    else:
        verdict, message = "too big", f"Too big for this machine: {amounts}; {parts}."
    return ModelFit(verdict, needed, memory.available, message, resident.bytes)


def check_fit(num_params: int, memory: MachineMemory, options: dict | None = None) -> ModelFit:
    """fit() for a float model known by its parameter count (a Hub search result) loaded with `options`."""
    if num_params < 0:
        raise ValueError(f"num_params must be >= 0, got {num_params}")
    return fit(params_resident(num_params, *load_format(memory, options)), memory)


def check_weights(weights: Weights, memory: MachineMemory, options: dict | None = None) -> ModelFit:
    """fit() for a local model, from its headers, loaded with `options`."""
    return fit(weights.resident(*load_format(memory, options)), memory)


def check_gguf_file(size: int, label: str | None, memory: MachineMemory, options: dict | None = None) -> ModelFit:
    """fit() for a GGUF file not downloaded yet, from its size and the quantization its name says."""
    return fit(estimate_gguf_file(size, label, *load_format(memory, options)), memory)


def memory_for(engine_options: dict) -> MachineMemory:
    """The memory a model loaded with `engine_options` (LLM keyword arguments) runs in, free now: RAM when a GPU
    machine is told device="cpu", and the CPU's reserve with the KV pool asked for (kv_cache_memory, GiB)."""
    memory = machine_memory()
    if engine_options.get("device") == "cpu" and memory.is_gpu:  # a GPU machine told to run on its CPU
        total, available = _ram()
        memory = MachineMemory("cpu", total, available, 4, CPU_RESERVE)
    if not memory.is_gpu and engine_options.get("kv_cache_memory") is not None:
        # the reserve's default KV pool swapped for the one asked for (GiB)
        kv_pool = int(engine_options["kv_cache_memory"] * GIB)
        memory = replace(memory, reserve=CPU_RESERVE - int(DEFAULT_CPU_KV_CACHE_GIB * GIB) + kv_pool)
    return memory


def check_model_fits(path: str | Path, engine_options: dict) -> ModelFit | None:
    """fit() for the model at `path` (a model directory or a .gguf file) loaded with `engine_options` (LLM
    keyword arguments: dtype, quantization, device and the CPU's kv_cache_memory count), against the memory free
    now. None when its size is unknown (a repo id rather than a path, no weights there); ModelLoadError naming the
    file when a weights file is corrupt."""
    weights = read_weights(path) if Path(path).exists() else None
    if weights is None:
        return None
    return check_weights(weights, memory_for(engine_options), engine_options)
