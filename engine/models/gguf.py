"""GGUF files (llama architecture): config, tokenizer and lazily dequantized weights under HF names.

llama.cpp's converter renames every tensor and permutes the rows of the q/k projections so that each
head's rotary pairs sit next to each other; both are undone here, so a GGUF model loads through the same
Hugging Face parameter names as a safetensors one.

The header is parsed here rather than with gguf.GGUFReader: the reader turns each of the ~100k tokenizer
strings into numpy memmap slices, which takes 3-5 s for SmolLM2 on two cores, longer than dequantizing
every weight. Only scalars and strings are kept; transformers reads the tokenizer arrays itself.
Dequantization is gguf's (gguf.quants.dequantize).
"""

from __future__ import annotations

import functools
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType
from gguf.quants import dequantize

from engine.models.hub import ModelLoadError

if TYPE_CHECKING:
    from transformers import LlamaConfig, PreTrainedTokenizerFast

# GGUF name -> HF name, for the tensors outside the layers
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# blk.N.<GGUF part>.weight -> model.layers.N.<HF part>.weight
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LAYER_TENSOR = re.compile(r"blk\.(?P<layer>\d+)\.(?P<part>\w+)\.weight")
_REQUIRED = object()  # GGUFCheckpoint._field's default: the key must be present

_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a llama GGUF tensor, or None for one a Llama model has no place for."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match is None or match["part"] not in _LAYER_NAMES:
        return None
    return f"model.layers.{match['layer']}.{_LAYER_NAMES[match['part']]}.weight"


def unpermute_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: per head, rows (0, d/2, 1, d/2+1, ...) back to (0, 1, ..., d-1)."""
    # weight: [num_heads * head_dim, hidden] -> [num_heads, head_dim/2, 2, hidden], swap the middle axes
    rows, cols = weight.shape
    return weight.reshape(num_heads, rows // num_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # torch order, e.g. [out_features, in_features]
    type: GGMLQuantizationType
    start: int  # byte offset of the data in the file
    nbytes: int


class GGUFCheckpoint:
    """An opened, validated llama GGUF file: its config, and its weights read on demand."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file, self._metadata, self.tensors = _read_header(path)
        architecture = self._field("general.architecture")
        if architecture != "llama":
            raise ModelLoadError(
                f"{path}: GGUF architecture '{architecture}' is not supported; kvstudio reads only 'llama' GGUF files"
            )
        self._check_tensors()
        # Read and checked now; the LlamaConfig itself is made on first use (`config`), since importing it costs
        # transformers' model machinery (seconds) and a library listing needs only these fields.
        self.config_fields = self._config_fields()

    @functools.cached_property
    def config(self) -> LlamaConfig:
        from transformers import LlamaConfig

        return LlamaConfig(**self.config_fields)

    def weights(self, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, CPU tensor in dtype), dequantizing one tensor at a time."""
        for tensor in self.tensors:
            name = hf_name(tensor.name)
            assert name is not None  # _check_tensors rejected unmapped tensors
            array = dequantize(self._data(tensor), tensor.type)
            # F32 tensors come back as read-only views of the memory map; torch wants memory it may own
            weight = torch.from_numpy(array if array.flags.writeable else array.copy()).reshape(tensor.shape)
            if name.endswith("q_proj.weight"):
                weight = unpermute_rows(weight, self.config.num_attention_heads)
            elif name.endswith("k_proj.weight"):
                weight = unpermute_rows(weight, self.config.num_key_value_heads)
            yield name, weight.to(dtype)

    def tokenizer(self) -> PreTrainedTokenizerFast:
        """The tokenizer (and chat template) stored in the file's metadata; reads no tensor data."""
        try:
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast(name_or_path=str(self.path.parent), gguf_file=self.path.name)
        except (ValueError, KeyError, OSError) as error:
            raise ModelLoadError(f"{self.path}: cannot build the tokenizer from its metadata: {error}") from error

    def end_of_generation_ids(self) -> list[int]:
        """EOS plus the end-of-turn / end-of-message ids, which llama.cpp also treats as ending generation."""
        keys = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
        return [int(self._metadata[key]) for key in keys if key in self._metadata]

    def _data(self, tensor: GGUFTensor) -> np.ndarray:
        # the raw bytes of a tensor, rows as the quantizer stored them: [..., bytes per row]
        data = self._file[tensor.start : tensor.start + tensor.nbytes]
        block_size, type_size = GGML_QUANT_SIZES[tensor.type]
        return data.reshape(*tensor.shape[:-1], tensor.shape[-1] // block_size * type_size)

    def _field(self, key: str, default: Any = _REQUIRED) -> Any:
        if key in self._metadata:
            if self._metadata[key] is None:  # an array, which the header parser skips
                raise ModelLoadError(f"{self.path}: GGUF metadata '{key}' is an array where one value was expected")
            return self._metadata[key]
        if default is _REQUIRED:
            raise ModelLoadError(f"{self.path}: GGUF metadata lacks '{key}'")
        return default

    def _check_tensors(self) -> None:
        """Every tensor maps to a Llama parameter, lies inside the file, and is of a type gguf can dequantize."""
        unknown = [tensor.name for tensor in self.tensors if hf_name(tensor.name) is None]
        if unknown:
            raise ModelLoadError(f"{self.path}: tensors with no place in a Llama model: {', '.join(unknown)}")
        file_size = len(self._file)
        checked_types = set()
        for tensor in self.tensors:
            if tensor.start + tensor.nbytes > file_size:
                raise ModelLoadError(
                    f"{self.path} is truncated: tensor {tensor.name} needs bytes up to "
                    f"{tensor.start + tensor.nbytes}, the file has {file_size}"
                )
            if tensor.type not in checked_types:
                # one row is enough to learn whether gguf can dequantize this type
                data = self._data(tensor)
                try:
                    dequantize(data.reshape(-1, data.shape[-1])[:1], tensor.type)
                except NotImplementedError as error:
                    raise ModelLoadError(
                        f"{self.path}: tensor {tensor.name} is of type {tensor.type.name}, which gguf cannot dequantize"
                    ) from error
                checked_types.add(tensor.type)

    def _config_fields(self) -> dict[str, Any]:
        """LlamaConfig's keyword arguments, from the header."""
        shapes = {tensor.name: tensor.shape for tensor in self.tensors}
        num_layers = int(self._field("llama.block_count"))
        expected = {"token_embd.weight", "output_norm.weight"} | {
            f"blk.{layer}.{part}.weight" for layer in range(num_layers) for part in _LAYER_NAMES
        }
        missing = sorted(expected - shapes.keys())
        if missing:
            raise ModelLoadError(f"{self.path}: GGUF lacks tensors {', '.join(missing[:5])}")
        rope_scaling = self._field("llama.rope.scaling.type", "none")
        if rope_scaling != "none":
            raise ModelLoadError(f"{self.path}: rope scaling '{rope_scaling}' is not supported")

        num_heads = int(self._field("llama.attention.head_count"))
        hidden_size = int(self._field("llama.embedding_length"))
        return dict(
            architectures=["LlamaForCausalLM"],
            vocab_size=shapes["token_embd.weight"][0],
            hidden_size=hidden_size,
            intermediate_size=int(self._field("llama.feed_forward_length")),
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=int(self._field("llama.attention.head_count_kv", num_heads)),
            head_dim=int(self._field("llama.attention.key_length", hidden_size // num_heads)),
            rms_norm_eps=float(self._field("llama.attention.layer_norm_rms_epsilon")),
            rope_theta=float(self._field("llama.rope.freq_base", 10000.0)),
            max_position_embeddings=int(self._field("llama.context_length")),
            bos_token_id=self._field("tokenizer.ggml.bos_token_id", None),
            eos_token_id=self._field("tokenizer.ggml.eos_token_id", None),
            # llama.cpp omits output.weight when the LM head shares the embedding matrix
            tie_word_embeddings="output.weight" not in shapes,
        )


def _read_header(path: Path) -> tuple[np.ndarray, dict[str, Any], list[GGUFTensor]]:
    """(the file as uint8, metadata scalars and strings, tensor table), reading no tensor data."""
    try:
        # a plain ndarray view: slicing a np.memmap runs Python code per slice
        file = np.memmap(path, dtype=np.uint8, mode="r").view(np.ndarray)
        return file, *_parse_header(path, file)
    except ModelLoadError:
        raise
    except (struct.error, ValueError, OSError) as error:
        # struct.error: the header runs past the end of the file; ValueError: garbage (bad utf-8, enum values)
        raise ModelLoadError(f"{path} is truncated or not a valid GGUF file: {error}") from error


def _parse_header(path: Path, file: np.ndarray) -> tuple[dict[str, Any], list[GGUFTensor]]:
    # layout: magic, version u32, tensor count u64, metadata count u64, metadata, tensor table, padding, data
    if bytes(file[:4]) != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
    version, tensor_count, metadata_count = struct.unpack_from("<IQQ", file, 4)
    if version not in (2, 3):  # v1 had 32-bit counts; a big-endian file reads as a huge version
        raise ModelLoadError(f"{path}: GGUF version {version} is not supported (only 2 and 3, little-endian)")
    position = 24
    metadata: dict[str, Any] = {}
    for _ in range(metadata_count):
        key, position = _read_string(file, position)
        (value_type,) = struct.unpack_from("<I", file, position)
        metadata[key], position = _read_value(file, position + 4, GGUFValueType(value_type))

    entries = []
    for _ in range(tensor_count):
        name, position = _read_string(file, position)
        (dim_count,) = struct.unpack_from("<I", file, position)
        dims = struct.unpack_from(f"<{dim_count}Q", file, position + 4)
        tensor_type, offset = struct.unpack_from("<IQ", file, position + 4 + 8 * dim_count)
        position += 4 + 8 * dim_count + 12
        entries.append((name, tuple(reversed(dims)), GGMLQuantizationType(tensor_type), offset))

    alignment = metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0:
        raise ModelLoadError(f"{path}: general.alignment is {alignment!r}, not a positive integer")
    data_start = (position + alignment - 1) // alignment * alignment
    tensors = []
    for name, shape, tensor_type, offset in entries:
        block_size, type_size = GGML_QUANT_SIZES[tensor_type]
        if not shape or shape[-1] % block_size:
            raise ModelLoadError(f"{path}: tensor {name} of shape {shape} does not fit {tensor_type.name} blocks")
        nbytes = prod(shape) // block_size * type_size
        tensors.append(GGUFTensor(name, shape, tensor_type, data_start + offset, nbytes))
    return metadata, tensors


def _read_string(file: np.ndarray, position: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", file, position)
    end = position + 8 + length
    if end > len(file):
        raise struct.error(f"a string at byte {position} runs past the end of the file")
    return bytes(file[position + 8 : end]).decode("utf-8"), end


def _read_value(file: np.ndarray, position: int, value_type: GGUFValueType) -> tuple[Any, int]:
    """A metadata value and the position after it; arrays are skipped (their value is None)."""
    if value_type in _SCALAR_FORMATS:
        fmt = _SCALAR_FORMATS[value_type]
        return struct.unpack_from(fmt, file, position)[0], position + struct.calcsize(fmt)
    if value_type == GGUFValueType.STRING:
        return _read_string(file, position)
    # an array: only the tokenizer needs arrays, and transformers reads those itself
    element_type, count = struct.unpack_from("<IQ", file, position)
    position += 12
    element_type = GGUFValueType(element_type)
    if element_type in _SCALAR_FORMATS:
        return None, position + count * struct.calcsize(_SCALAR_FORMATS[element_type])
    for _ in range(count):
        if element_type == GGUFValueType.STRING:  # the vocabulary and merges: skipped without decoding
            (length,) = struct.unpack_from("<Q", file, position)
            position += 8 + length
        else:
            _, position = _read_value(file, position, element_type)
    return None, position
