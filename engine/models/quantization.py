"""Which weights a model keeps quantized, and the stream of weights that delivers them so.

Decode speed on a CPU, and for one stream on a GPU, is bytes of weights read per token, so quantized weights
stay quantized (kernels/quant.py: q8g32, int8 per 32 weights; q4g32, 4 bits per 32 with a min; q4k, Q4_K's own):
- auto (the default): a GGUF file's quantized matrices keep their quantization, mapped to the nearest kept format
  (Q4_K -> q4k and Q4_0, Q4_1 -> q4g32, their codes copied; Q8_0, Q5_x, Q6_K -> q8g32); float files stay float;
- int8 / int4: every linear layer and the embedding quantized at load to q8g32 / q4g32, from any checkpoint;
- none: everything in --dtype, as the float model (GGUF files dequantized).
A model module keeps a weight quantized only when every tensor it is made of can be (a q/k/v projection whose
v arrives in F16 stays float as a whole); LlamaForCausalLM.keep_quantized decides and says which it kept.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch

from engine.models.loader import ModelSource
from kernels import quant

_FORMAT = {"int8": "q8g32", "int4": "q4g32"}
logger = logging.getLogger(__name__)


def candidates(source: ModelSource, mode: str, device: torch.device) -> set[str] | None:
    """HF names of the tensors that may stay quantized: a set (empty: none), or None for every weight the model
    can hold quantized (int8 / int4). On a CPU where the quantized kernels cannot be built (no compiler), a GGUF
    loads in floats (a quantized matmul in torch ops would dequantize its weight at every call)."""
    if mode != "none" and device.type == "cpu" and not quant.cpu_kernels_available():
        if mode in _FORMAT:
            raise ValueError(f"quantization {mode} needs kvstudio's compiled CPU kernels, which cannot be built here")
        logger.warning("the quantized CPU kernels cannot be built here: the model loads in floats")
        return set()
    if mode in _FORMAT:
        return None
    if mode == "none" or source.format != "gguf":
        return set()
    from gguf import GGMLQuantizationType

    kept = set(quant.GGUF_TYPES)
    return {
        name
        for name, type_name in source.checkpoint.tensor_types().items()
        if GGMLQuantizationType[type_name].value in kept
    }


def weight_stream(
    source: ModelSource, dtype: torch.dtype, mode: str, quantized: set[str]
) -> Iterator[tuple[str, torch.Tensor | quant.QuantizedWeight]]:
    """(HF name, a tensor in dtype, or a QuantizedWeight for the names in `quantized`), one weight at a time."""
    if mode == "auto" and source.format == "gguf":
        for name, raw in source.checkpoint.raw_tensors():
            if name in quantized:
                yield name, quant.from_gguf_blocks(raw.data, int(raw.ggml_type), raw.shape)
            else:
                yield name, raw.dequantize().to(dtype)
        return
    fmt = _FORMAT.get(mode)
    for name, tensor in source.weights(dtype):
        if fmt is not None and name in quantized:
            yield name, quant.quantize(tensor.float(), fmt)
        else:
            yield name, tensor
