"""What this machine can hold: the memory a model runs in (the GPU's on CUDA, RAM otherwise) and whether a model
of a given size fits there with room left for its KV cache.

The estimate is the engine's own arithmetic: weights in the dtype the engine picks on this device (float32 on the
CPU, 16-bit on a GPU, see EngineConfig.model_dtype) plus a reserve for the KV pool and activations. It is asked
before a download and before a load, so a model that cannot run is said in words instead of ending in the
kernel's out-of-memory killer.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.config import DEFAULT_CPU_KV_CACHE_GIB

GIB = 2**30
# What a load needs beyond the weights: the KV pool (the engine's CPU default) and activations for a prefill.
CPU_RESERVE = int(DEFAULT_CPU_KV_CACHE_GIB * GIB) + GIB // 2
GPU_RESERVE = GIB            # KV blocks take what is left on a GPU; one GiB keeps a useful pool
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class MachineMemory:
    device: str                # "cpu", or "cuda (NVIDIA H100 80GB HBM3)"
    total: int                 # bytes: the GPU's memory on CUDA, RAM otherwise
    available: int             # bytes free now
    bytes_per_param: int       # what the engine stores a weight in here, with dtype "auto"
    reserve: int               # bytes a load needs beyond its weights

    @property
    def is_gpu(self) -> bool:
        return self.device.startswith("cuda")


@dataclass(frozen=True)
class ModelFit:
    verdict: str               # "fits" | "tight" | "too big"
    needed: int                # bytes: weights in the engine's dtype plus the reserve
    available: int
    message: str               # one sentence for the UI and the CLI

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


def check_fit(num_params: int, memory: MachineMemory, dtype: str = "auto") -> ModelFit:
    """Whether a model of `num_params` weights loads here in `dtype` (an EngineConfig dtype): "fits" with a
    quarter of the free memory to spare, "tight" within it, "too big" past it."""
    if num_params < 0:
        raise ValueError(f"num_params must be >= 0, got {num_params}")
    if dtype != "auto" and dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPE_BYTES)}; got {dtype!r}")
    per_param = memory.bytes_per_param if dtype == "auto" else DTYPE_BYTES[dtype]
    needed = num_params * per_param + memory.reserve
    where = "GPU memory" if memory.is_gpu else "RAM"
    amounts = f"needs about {needed / GIB:.1f} GiB, {memory.available / GIB:.1f} GiB of {where} is free"
    if needed <= memory.available * 0.75:
        return ModelFit("fits", needed, memory.available, f"Fits: {amounts}.")
    if needed <= memory.available:
        return ModelFit("tight", needed, memory.available,
                        f"Tight: {amounts}; close other programs or lower the KV cache size.")
    return ModelFit("too big", needed, memory.available, f"Too big for this machine: {amounts}.")
