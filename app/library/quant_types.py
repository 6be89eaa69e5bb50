"""GGUF quantization types as kvstudio meets them: the label a file's name carries (Q4_K_M, IQ4_XS, BF16...), the
ggml block type behind it, its bits a weight, and whether the engine keeps it quantized (kernels/quant.py's
GGUF_TYPES: Q4_K as 4.625-bit q4k, Q4_0/Q4_1 as 5-bit q4g32, Q5_x/Q6_K/Q8_0 as 8.5-bit q8g32) or dequantizes it
to floats."""

from __future__ import annotations

import re
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from kernels import quant

# A quantization label in a file name, bounded by anything but a letter or digit: Q4_K_M, Q8_0, IQ4_XS, Q4_0_4_4,
# TQ1_0, MXFP4, F16, BF16 (FP16 and FP32 as some converters write them). Matched case-insensitively.
_LABEL = re.compile(
    r"(?<![a-z0-9])("
    r"iq\d_(?:xxs|xs|nl|s|m)|q\d_k(?:_(?:xxs|xs|s|m|l|xl))?|q\d_\d(?:_\d_\d)?|tq\d_\d|mxfp4|bf16|fp?16|fp?32"
    r")(?![a-z0-9])",
    re.IGNORECASE,
)
FLOAT_TYPES = ("F32", "F16", "BF16")
_DTYPE_NAMES = {4: "float32", 2: "16-bit floats"}


def dtype_name(dtype_bytes: int) -> str:
    """The engine's floats in words: 4 -> 'float32'."""
    return _DTYPE_NAMES.get(dtype_bytes, f"{8 * dtype_bytes}-bit floats")


def label_from_name(filename: str) -> str | None:
    """The quantization a GGUF file's name says, upper-case: 'smollm2-135m-instruct-q4_k_m.gguf' -> 'Q4_K_M';
    None when it says none. The last label in the name counts (a model named 'Q2' is rarer than its suffix)."""
    stem = filename.rsplit("/", 1)[-1]
    found = _LABEL.findall(stem.removesuffix(".gguf"))
    if not found:
        return None
    label = found[-1].upper()
    return {"FP16": "F16", "FP32": "F32"}.get(label, label)


def kept_bits(fmt: str) -> float:
    """Bits a weight of kernels.quant's format `fmt` takes resident (4.625 for q4k, 5.0 for q4g32, 8.5 for
    q8g32)."""
    return quant.format_nbytes(fmt, (quant.PANEL, quant.SUPER)) * 8 / (quant.PANEL * quant.SUPER)


@dataclass(frozen=True)
class QuantType:
    """What a GGUF label means for the engine."""

    label: str  # as the file names it, e.g. "Q4_K_M"
    ggml: str | None  # the block type most of its weights are in, e.g. "Q4_K"; None: a type unknown here
    bits: float | None  # bits a weight takes in the file (that type's); None when unknown
    kept: str | None  # the kept format ("q4k", "q4g32", "q8g32") when the engine keeps this type quantized

    @property
    def is_float(self) -> bool:
        return self.ggml in FLOAT_TYPES

    def loads_as(self, dtype_bytes: int) -> str:
        """How its matrices sit in memory, in a few words: '4-bit (q4g32)', 'float32'."""
        if self.kept is not None:
            return f"{kept_bits(self.kept):g}-bit ({self.kept})"
        return dtype_name(dtype_bytes)

    def note(self, dtype_bytes: int) -> str:
        """One sentence on how the engine holds a file of this type."""
        if self.ggml is None:
            return f"{self.label} is a type kvstudio does not know; it may not load"
        if self.kept is not None:
            return f"{self.label} stays quantized: its {self.ggml} weights are kept as {self.loads_as(dtype_bytes)}"
        if self.is_float:
            return f"{self.label} weights load as {self.loads_as(dtype_bytes)}"
        kept = "/".join(sorted({name for name, *_ in quant.GGUF_TYPES.values()}))
        return (
            f"kvstudio cannot keep {self.ggml} quantized: this file loads in {self.loads_as(dtype_bytes)} "
            f"(it keeps {kept} quantized)"
        )


def quant_type(label: str) -> QuantType:
    """The ggml type behind a label: Q4_K_M and Q4_K_L -> Q4_K, IQ3_M -> IQ3_S (llama.cpp's mixes are named after
    their main type); a label that names no ggml type known here (Q4_0_4_4, a repacking llama.cpp dropped) has
    ggml None."""
    ggml = None
    for candidate in (label, re.sub(r"_K_\w+$", "_K", label), re.sub(r"_(XS|M|L|XL)$", "_S", label)):
        if candidate in GGMLQuantizationType.__members__:
            ggml = candidate
            break
    if ggml is None:
        return QuantType(label, None, None, None)
    kind = GGMLQuantizationType[ggml]
    block, size = GGML_QUANT_SIZES[kind]
    kept = quant.GGUF_TYPES.get(int(kind))
    return QuantType(label, ggml, size * 8 / block, None if kept is None else kept[3])


def kept_format(ggml: str) -> str | None:
    """The format the engine keeps a tensor of ggml type `ggml` in ("Q6_K" -> "q8g32"), or None: dequantized."""
    kind = GGMLQuantizationType.__members__.get(ggml)
    kept = None if kind is None else quant.GGUF_TYPES.get(int(kind))
    return None if kept is None else kept[3]
