"""What a model's weights will occupy resident once the engine has loaded them, the engine's own arithmetic:

- a GGUF file, loaded as it comes (quantization auto): every matrix of a type the engine keeps quantized
  (kernels.quant.GGUF_TYPES) at its kept format's size (kernels.quant.format_nbytes: Q4_K as 4.625-bit q4k,
  Q4_0/Q4_1 as 5-bit q4g32, Q5_x/Q6_K/Q8_0 as 8.5-bit q8g32), the rest (norms, floats, types it cannot keep such
  as IQ4_XS) in the engine's dtype. A fused module (q/k/v, gate/up) stays quantized only when each of its parts can, as
  LlamaForCausalLM.keep_quantized decides;
- a safetensors model: its parameters in the engine's dtype;
- --quantization int8 / int4, either kind: every matrix as q8g32 / q4g32, the rest in the dtype; none: all in
  the dtype.

After a download the tensor table in the headers gives it exactly (Weights); before one, only the Hub's file
size and the quantization the file's name says are known, so the parameter count is inferred from the size at
that type's bits a weight (estimate_gguf_file). This assumes the compiled quantized kernels (make setup builds
them); without them a GGUF loads in floats.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import TYPE_CHECKING

from app.library.quant_types import dtype_name, kept_bits, kept_format, quant_type
from kernels import quant

if TYPE_CHECKING:
    from engine.models.gguf import GGUFCheckpoint

QUANTIZED_AT_LOAD = {"int8": "q8g32", "int4": "q4g32"}  # --quantization -> the format every matrix takes
# the checkpoint names that one fused module of the engine holds: q/k/v projections, gate/up projections
_FUSED = re.compile(r"\.(?:(?:q|k|v)_proj|(?:gate|up)_proj)\.weight$")


@dataclass(frozen=True)
class Resident:
    """Bytes a model's weights will hold in memory, and how they were counted, in a few words."""

    bytes: int
    how: str  # e.g. "Q4_1 kept quantized", "in float32", "Q8_0 kept quantized, estimated from the file size"


@dataclass(frozen=True)
class Tensor:
    name: str  # the Hugging Face name (a GGUF tensor's too)
    shape: tuple[int, ...]
    stored: str  # as the file holds it: a ggml type name ("Q4_K", "F32") or a safetensors dtype ("BF16")


@dataclass(frozen=True)
class Weights:
    """A local model's tensors as its headers describe them (no tensor data read)."""

    format: str  # "gguf" | "safetensors"
    tensors: tuple[Tensor, ...]
    label: str  # a GGUF's file type ("Q4_K_M"), else the type most weights are stored in ("BF16")

    @property
    def num_params(self) -> int:
        return sum(prod(t.shape) for t in self.tensors)

    def resident(self, dtype_bytes: int, quantization: str) -> Resident:
        """What the weights will occupy loaded with `quantization` (an EngineConfig mode) in floats of
        `dtype_bytes`."""
        at_load = QUANTIZED_AT_LOAD.get(quantization)
        if at_load is not None:
            kept = {t.name: at_load for t in self.tensors if len(t.shape) == 2}
            how = f"quantized to {quantization} ({at_load}) at load"
        elif quantization == "auto" and self.format == "gguf":
            kept = self._kept_as_stored()
            matrices = sum(len(t.shape) == 2 for t in self.tensors)
            if len(kept) == matrices:
                how = f"{self.label} kept quantized"
            elif kept:
                how = f"{self.label} kept quantized where it can be, the rest in {dtype_name(dtype_bytes)}"
            else:
                how = f"{self.label} loaded in {dtype_name(dtype_bytes)}"
        else:
            kept = {}
            how = f"in {dtype_name(dtype_bytes)}"
        total = sum(
            quant.format_nbytes(kept[t.name], t.shape) if t.name in kept else prod(t.shape) * dtype_bytes
            for t in self.tensors
        )
        return Resident(total, how)

    def _kept_as_stored(self) -> dict[str, str]:
        """{name: kept format} of the matrices a GGUF keeps quantized: those of a type the engine keeps, whose
        fused module's other parts are too."""
        modules: dict[str, list[Tensor]] = defaultdict(list)
        for t in self.tensors:
            if len(t.shape) == 2:
                modules[_FUSED.sub(".fused", t.name)].append(t)
        kept = {}
        for parts in modules.values():
            formats = [kept_format(t.stored) for t in parts]
            if all(formats):
                kept.update({t.name: f for t, f in zip(parts, formats, strict=True)})
        return kept


def gguf_weights(checkpoint: GGUFCheckpoint) -> Weights:
    """The tensors the engine loads from an opened GGUF file (rope_freqs, which the config holds, left out)."""
    from engine.models.gguf import hf_name

    tensors = tuple(
        Tensor(name, tensor.shape, tensor.type.name)
        for tensor in checkpoint.tensors
        if (name := hf_name(tensor.name)) is not None
    )
    return Weights("gguf", tensors, checkpoint.file_type)


def read_weights(path: str | Path) -> Weights | None:
    """The tensors of a local model, read from headers only (milliseconds, no tensor data): the *.safetensors
    files of a Hugging Face model directory (the shards its index names, when it has one) or the tensor table of
    a .gguf file. None when `path` holds no weights in either form; ModelLoadError (a ValueError) naming the file
    when one is truncated or not what its name says."""
    # imported here: the loaders pull in transformers, which asking about memory alone does not need
    from safetensors import safe_open

    from engine.models.loader import SafetensorsCheckpoint

    path = Path(path)
    if path.is_dir():
        if not any(path.glob("*.safetensors")) and not (path / "model.safetensors.index.json").is_file():
            return None
        tensors = []
        for file in SafetensorsCheckpoint(path).files:  # validated: headers readable, sizes cover the data
            with safe_open(file, framework="pt") as handle:
                # a safe_open handle is not iterable: keys() is the way to its names
                for name in handle.keys():  # noqa: SIM118
                    piece = handle.get_slice(name)
                    tensors.append(Tensor(name, tuple(piece.get_shape()), piece.get_dtype()))
        counts = Counter()
        for t in tensors:
            counts[t.stored] += prod(t.shape)
        return Weights("safetensors", tuple(tensors), counts.most_common(1)[0][0] if counts else "?")
    if path.is_file() and path.suffix.lower() == ".gguf":
        from engine.models.gguf import GGUFCheckpoint

        return gguf_weights(GGUFCheckpoint(path))
    return None


def params_resident(num_params: int, dtype_bytes: int, quantization: str) -> Resident:
    """A float model known by its parameter count alone (a Hub search result), every weight alike."""
    at_load = QUANTIZED_AT_LOAD.get(quantization)
    if at_load is not None:
        return Resident(round(num_params * kept_bits(at_load) / 8), f"quantized to {quantization} ({at_load}) at load")
    return Resident(num_params * dtype_bytes, f"in {dtype_name(dtype_bytes)}")


def estimate_gguf_file(size: int, label: str | None, dtype_bytes: int, quantization: str) -> Resident:
    """A GGUF file known by its size and the quantization its name says (a Hub file not downloaded yet): its
    parameters are about size / that type's bits a weight, each then at the bits it loads in. A K-quant mix
    (Q4_K_M) holds some tensors in a larger type, so it comes out a few percent low; a file whose type is unknown
    counts as its size."""
    kind = None if label is None else quant_type(label)
    if kind is None or kind.bits is None:
        return Resident(size, "about the file's size: its quantization type is unknown")
    params = size * 8 / kind.bits
    at_load = QUANTIZED_AT_LOAD.get(quantization)
    if at_load is not None:
        bits, how = kept_bits(at_load), f"quantized to {quantization} ({at_load}) at load"
    elif quantization == "auto" and kind.kept is not None:
        bits, how = kept_bits(kind.kept), f"{label} kept quantized"
    else:
        bits, how = 8 * dtype_bytes, f"{label} loaded in {dtype_name(dtype_bytes)}"
    return Resident(round(params * bits / 8), f"{how}, estimated from the file size")
