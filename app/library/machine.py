"""What this machine can hold: the memory a model runs in (the GPU's on CUDA, RAM otherwise) and whether a model
of a given size fits there with room left for its KV cache.

The estimate is the engine's own arithmetic: weights in the dtype the engine picks on this device (float32 on the
CPU, 16-bit on a GPU, see EngineConfig.model_dtype) plus a reserve for the KV pool and activations. It is asked
before a download and before a load, so a model that cannot run is said in words instead of ending in the
kernel's out-of-memory killer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from math import prod
from pathlib import Path

import torch

from engine.config import DEFAULT_CPU_KV_CACHE_GIB

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
    needed: int  # bytes: weights in the engine's dtype plus the reserve
    available: int
    message: str  # one sentence for the UI and the CLI

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
        return ModelFit(
            "tight", needed, memory.available, f"Tight: {amounts}; close other programs or lower the KV cache size."
        )
    return ModelFit("too big", needed, memory.available, f"Too big for this machine: {amounts}.")


def local_num_params(path: str | Path) -> int | None:
    """The number of weights in a local model, read from headers only (milliseconds, no tensor data): the
    *.safetensors files of a Hugging Face model directory (the shards its index names, when it has one) or the
    tensor table of a .gguf file. None when `path` holds no weights in either form; ModelLoadError (a ValueError)
    naming the file when one is truncated or not what its name says."""
    # imported here: the loaders pull in transformers, which asking about memory alone does not need
    from safetensors import safe_open

    from engine.models.loader import SafetensorsCheckpoint

    path = Path(path)
    if path.is_dir():
        if not any(path.glob("*.safetensors")) and not (path / "model.safetensors.index.json").is_file():
            return None
        total = 0
        for file in SafetensorsCheckpoint(path).files:  # validated: headers readable, sizes cover the data
            with safe_open(file, framework="pt") as tensors:
                # a safe_open handle is not iterable: keys() is the way to its names
                total += sum(prod(tensors.get_slice(name).get_shape()) for name in tensors.keys())  # noqa: SIM118
        return total
    if path.is_file() and path.suffix.lower() == ".gguf":
        from engine.models.gguf import GGUFCheckpoint

        return sum(prod(tensor.shape) for tensor in GGUFCheckpoint(path).tensors)
    return None


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
    """check_fit for the model at `path` (a model directory or a .gguf file) loaded with `engine_options` (LLM
    keyword arguments: dtype, device and the CPU's kv_cache_memory count), against the memory free now. None when
    its size is unknown (a repo id rather than a path, no weights there); ModelLoadError naming the file when a
    weights file is corrupt."""
    num_params = local_num_params(path) if Path(path).exists() else None
    if num_params is None:
        return None
    memory = memory_for(engine_options)
    return check_fit(num_params, memory, engine_options.get("dtype", "auto"))
