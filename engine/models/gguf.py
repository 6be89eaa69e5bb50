"""GGUF files of the Llama family: config, tokenizer, and weights under HF names, dequantized or raw.

Architectures: `llama` (Llama 1-3.x, Mistral and SmolLM, which llama.cpp's converter also writes as `llama`),
`qwen2` (q/k/v biases) and `qwen3` (q/k RMSNorm, head_dim from `qwen3.attention.key_length`). Any other
architecture is refused by name. The config is rebuilt from the metadata as the HF config of
LlamaForCausalLM, MistralForCausalLM (a `llama` file whose name says Mistral, or that has a sliding window),
Qwen2ForCausalLM or Qwen3ForCausalLM. Rope scaling: Llama 3.x files carry no scaling keys, only a
`rope_freqs` tensor (each frequency's divisor); the HF llama3 parameters that give exactly those divisors are
recovered (rope.llama3_from_freq_factors). `rope.scaling.type` linear and yarn map to HF's linear and yarn.

llama.cpp's converter renames every tensor and, for `llama` files only, permutes the rows of the q/k
projections so that each head's rotary pairs sit next to each other; both are undone here, so a GGUF model
loads through the same Hugging Face parameter names as a safetensors one.

Weights come out two ways, one tensor at a time, in file order (a tied LM head has no tensor of its own):
- `weights(dtype)`: (HF name, float CPU tensor in dtype), dequantized with gguf.quants.dequantize.
- `raw_tensors()`: (HF name, GGUFTensorData) with nothing dequantized, for layers that run on the blocks:
    ggml_type  GGMLQuantizationType, an IntEnum: int() is ggml's type id, .name e.g. "Q4_K" ("F32" for floats)
    shape      HF orientation: (N, K) = (out_features, in_features) for a matrix, (N,) for a norm or bias
    data       uint8, read-only, [N, K // block_size * type_size]: row n is the blocks of output row n, as
               ggml lays them out (block_size, type_size = gguf.GGML_QUANT_SIZES[ggml_type]); [nbytes] for
               a vector. A view of the file's memory map, except the q/k projections of `llama` files: their
               rows are un-permuted (whole rows of blocks move, so no block is touched) into a new array.
  `tensor_types()` is {HF name: ggml type name}, and `file_type` the file's label (e.g. "Q4_K_M").

The header is parsed here rather than with gguf.GGUFReader: the reader turns each of the ~100k tokenizer
strings into numpy memmap slices, which takes 3-5 s for SmolLM2 on two cores, longer than dequantizing
every weight. Scalars, strings and numeric arrays (as views) are kept; string arrays (vocabulary, merges)
are skipped, since the tokenizer (gguf_tokenizer.py) has transformers read them.
"""

from __future__ import annotations

import functools
import re
import struct
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType, LlamaFileType
from gguf.quants import dequantize

from engine.models.hub import ModelLoadError
from engine.models.rope import llama3_from_freq_factors

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerFast

# GGUF name -> HF name, for the tensors outside the layers
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# blk.N.<GGUF part>.weight|bias -> model.layers.N.<HF part>.weight|bias
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LAYER_TENSOR = re.compile(r"blk\.(?P<layer>\d+)\.(?P<part>\w+)\.(?P<kind>weight|bias)")
_COMMON_LAYER_TENSORS = tuple(
    f"{part}.weight"
    for part in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")
)
# the tensors every layer of a file of each supported architecture holds
_LAYER_TENSORS = {
    "llama": _COMMON_LAYER_TENSORS,
    "qwen2": (*_COMMON_LAYER_TENSORS, "attn_q.bias", "attn_k.bias", "attn_v.bias"),
    "qwen3": (*_COMMON_LAYER_TENSORS, "attn_q_norm.weight", "attn_k_norm.weight"),
}
SUPPORTED_ARCHITECTURES = tuple(_LAYER_TENSORS)
_CONFIG_CLASSES = {
    "LlamaForCausalLM": "LlamaConfig",
    "MistralForCausalLM": "MistralConfig",
    "Qwen2ForCausalLM": "Qwen2Config",
    "Qwen3ForCausalLM": "Qwen3Config",
}
# rope.scaling.<key> -> HF's yarn rope parameter
_YARN_KEYS = {"yarn_beta_fast": "beta_fast", "yarn_beta_slow": "beta_slow", "yarn_attn_factor": "attention_factor"}
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
    """The Hugging Face name of a GGUF tensor, or None for one a Llama-family model has no place for."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match is None or match["part"] not in _LAYER_NAMES:
        return None
    return f"model.layers.{match['layer']}.{_LAYER_NAMES[match['part']]}.{match['kind']}"


def unpermute_rows(weight, num_heads: int):
    """Undo llama.cpp's q/k row permutation: per head, rows (0, d/2, 1, d/2+1, ...) back to (0, 1, ..., d-1).

    weight: a torch tensor or numpy array [num_heads * head_dim, cols] (for raw data, cols are bytes)."""
    # [num_heads * head_dim, cols] -> [num_heads, head_dim/2, 2, cols], swap the middle axes
    rows, cols = weight.shape
    return weight.reshape(num_heads, rows // num_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # torch order, e.g. [out_features, in_features]
    type: GGMLQuantizationType
    start: int  # byte offset of the data in the file
    nbytes: int


@dataclass(frozen=True)
class GGUFTensorData:
    """One tensor as the file stores it, rows in HF order (see the module docstring)."""

    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]  # (out_features, in_features), or (n,)
    data: np.ndarray  # uint8, read-only: [N, bytes per row], or [nbytes] for a vector

    def dequantize(self) -> torch.Tensor:
        """float32 CPU tensor of `shape`."""
        array = dequantize(self.data, self.ggml_type)
        # F32 tensors come back as read-only views of the memory map; torch wants memory it may own
        return torch.from_numpy(array if array.flags.writeable else array.copy()).reshape(self.shape)


class GGUFCheckpoint:
    """An opened, validated GGUF file of a supported architecture: its config, and its weights read on demand."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file, self._metadata, self.tensors = _read_header(path)
        self.architecture = self._field("general.architecture")
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(
                f"{path}: GGUF architecture '{self.architecture}' is not supported; kvstudio runs "
                f"{', '.join(SUPPORTED_ARCHITECTURES)} (Llama, Mistral, Qwen2, Qwen3)"
            )
        self._check_tensors()
        # Read and checked now; the config objects are made on first use, since a library listing needs only these.
        self.config_fields = self._config_fields()

    @functools.cached_property
    def config(self) -> PretrainedConfig:
        """What the engine reads (every field it needs is in the header): the fields on a plain PretrainedConfig.
        The family's own class would import transformers' modelling machinery, 60 MiB resident and a second at
        start for a chat app that never builds a transformers model."""
        from transformers import PretrainedConfig

        return PretrainedConfig(**self.config_fields)

    def transformers_config(self) -> PretrainedConfig:
        """The family's transformers config (LlamaConfig, Qwen2Config, ...), to build a transformers model of this
        file."""
        import transformers

        config_class = getattr(transformers, _CONFIG_CLASSES[self.config_fields["architectures"][0]])
        return config_class(**self.config_fields)

    def weights(self, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, CPU tensor in dtype), dequantizing one tensor at a time."""
        for name, tensor in self.raw_tensors():
            yield name, tensor.dequantize().to(dtype)

    def raw_tensors(self) -> Iterator[tuple[str, GGUFTensorData]]:
        """(HF name, the tensor's raw blocks), nothing dequantized; see the module docstring."""
        heads = {
            "q_proj": self.config_fields["num_attention_heads"],
            "k_proj": self.config_fields["num_key_value_heads"],
        }
        for tensor in self.tensors:
            name = hf_name(tensor.name)
            if name is None:  # rope_freqs, which the config holds
                continue
            data = self._data(tensor)
            projection = name.split(".")[-2]
            if self.architecture == "llama" and projection in heads:
                data = unpermute_rows(data, heads[projection])
                data.flags.writeable = False  # read-only like every other tensor's data
            yield name, GGUFTensorData(tensor.type, tensor.shape, data)

    def tensor_types(self) -> dict[str, str]:
        """{HF name: ggml type name}, e.g. {"model.layers.0.self_attn.q_proj.weight": "Q4_K", ...}."""
        return {name: tensor.type.name for tensor in self.tensors if (name := hf_name(tensor.name)) is not None}

    @property
    def file_type(self) -> str:
        """The file's quantization label, e.g. "Q4_K_M" or "F16": general.file_type, else the most common type
        among the weight matrices."""
        value = self._metadata.get("general.file_type")
        if isinstance(value, int):
            try:
                name = LlamaFileType(value & ~LlamaFileType.GUESSED).name
                return "F32" if name == "ALL_F32" else name.removeprefix("MOSTLY_")
            except ValueError:
                pass  # a type newer than this gguf package: fall back to counting
        counts = Counter({tensor.type.name: 0 for tensor in self.tensors})
        for tensor in self.tensors:
            if len(tensor.shape) == 2:
                counts[tensor.type.name] += prod(tensor.shape)
        return counts.most_common(1)[0][0]

    def tokenizer(self) -> PreTrainedTokenizerFast:
        """The tokenizer (and chat template) stored in the file's metadata; reads no tensor data."""
        from engine.models.gguf_tokenizer import build_tokenizer

        return build_tokenizer(self.path, self._metadata)

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
            if self._metadata[key] is None or isinstance(self._metadata[key], np.ndarray):
                raise ModelLoadError(f"{self.path}: GGUF metadata '{key}' is an array where one value was expected")
            return self._metadata[key]
        if default is _REQUIRED:
            raise ModelLoadError(f"{self.path}: GGUF metadata lacks '{key}'")
        return default

    def _check_tensors(self) -> None:
        """Every tensor has a place in a model of the file's architecture, lies inside the file, and is of a type
        gguf can dequantize."""
        layer_tensors = _LAYER_TENSORS[self.architecture]
        known = {*_GLOBAL_NAMES, "rope_freqs.weight"} if self.architecture == "llama" else {*_GLOBAL_NAMES}
        unknown = []
        for tensor in self.tensors:
            match = _LAYER_TENSOR.fullmatch(tensor.name)
            if tensor.name not in known and not (match and f"{match['part']}.{match['kind']}" in layer_tensors):
                unknown.append(tensor.name)
        if unknown:
            raise ModelLoadError(
                f"{self.path}: tensors with no place in a '{self.architecture}' model: {', '.join(unknown[:5])}"
            )
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
        """The HF config's keyword arguments, from the header; the tensors' names and shapes checked against it."""
        arch = self.architecture
        shapes = {tensor.name: tensor.shape for tensor in self.tensors}
        if "token_embd.weight" not in shapes:
            raise ModelLoadError(f"{self.path}: GGUF lacks tensor token_embd.weight")
        num_heads = int(self._field(f"{arch}.attention.head_count"))
        hidden_size = int(self._field(f"{arch}.embedding_length"))
        head_dim = int(self._field(f"{arch}.attention.key_length", hidden_size // num_heads))
        fields = dict(
            vocab_size=shapes["token_embd.weight"][0],
            hidden_size=hidden_size,
            intermediate_size=int(self._field(f"{arch}.feed_forward_length")),
            num_hidden_layers=int(self._field(f"{arch}.block_count")),
            num_attention_heads=num_heads,
            num_key_value_heads=int(self._field(f"{arch}.attention.head_count_kv", num_heads)),
            head_dim=head_dim,
            rms_norm_eps=float(self._field(f"{arch}.attention.layer_norm_rms_epsilon")),
            max_position_embeddings=int(self._field(f"{arch}.context_length")),
            bos_token_id=self._field("tokenizer.ggml.bos_token_id", None),
            eos_token_id=self._field("tokenizer.ggml.eos_token_id", None),
            # llama.cpp omits output.weight when the LM head shares the embedding matrix
            tie_word_embeddings="output.weight" not in shapes,
        )
        self._check_shapes(shapes, fields)
        fields["rope_parameters"] = self._rope_parameters(head_dim)
        window = int(self._field(f"{arch}.attention.sliding_window", 0))
        pattern = self._metadata.get(f"{arch}.attention.sliding_window_pattern")
        if window and pattern is not None and not np.all(pattern):
            raise ModelLoadError(f"{self.path}: a sliding window on some layers only is not supported")
        if arch == "llama":
            name = f"{self._metadata.get('general.name', '')} {self._metadata.get('general.basename', '')}"
            mistral = bool(window) or "mistral" in name.lower()
            # MistralConfig's default window is 4096: a file that states none has none
            extra = dict(sliding_window=window or None) if mistral else {}
            architecture = "MistralForCausalLM" if mistral else "LlamaForCausalLM"
        else:
            # max_window_layers 0: the window applies to every layer, as the engine applies it
            extra = dict(use_sliding_window=bool(window), sliding_window=window or None, max_window_layers=0)
            architecture = "Qwen2ForCausalLM" if arch == "qwen2" else "Qwen3ForCausalLM"
        return dict(architectures=[architecture], **fields, **extra)

    def _check_shapes(self, shapes: dict[str, tuple[int, ...]], c: dict[str, Any]) -> None:
        """Each tensor the architecture needs is there, and every tensor has the shape the config gives it."""
        hidden, inter, head_dim = c["hidden_size"], c["intermediate_size"], c["head_dim"]
        q, kv = c["num_attention_heads"] * head_dim, c["num_key_value_heads"] * head_dim
        part_shapes = {
            "attn_norm.weight": (hidden,),
            "attn_q.weight": (q, hidden),
            "attn_k.weight": (kv, hidden),
            "attn_v.weight": (kv, hidden),
            "attn_output.weight": (hidden, q),
            "ffn_norm.weight": (hidden,),
            "ffn_gate.weight": (inter, hidden),
            "ffn_up.weight": (inter, hidden),
            "ffn_down.weight": (hidden, inter),
            "attn_q.bias": (q,),
            "attn_k.bias": (kv,),
            "attn_v.bias": (kv,),
            "attn_q_norm.weight": (head_dim,),
            "attn_k_norm.weight": (head_dim,),
        }
        expected = {"token_embd.weight": (c["vocab_size"], hidden), "output_norm.weight": (hidden,)}
        for layer in range(c["num_hidden_layers"]):
            expected |= {f"blk.{layer}.{part}": part_shapes[part] for part in _LAYER_TENSORS[self.architecture]}
        missing = sorted(expected.keys() - shapes.keys())
        if missing:
            raise ModelLoadError(f"{self.path}: GGUF lacks tensors {', '.join(missing[:5])}")
        expected |= {"output.weight": (c["vocab_size"], hidden), "rope_freqs.weight": (head_dim // 2,)}
        wrong = [
            f"{name} is {list(shape)}, expected {list(expected[name])}"
            for name, shape in shapes.items()
            if shape != expected[name]
        ]
        if wrong:
            raise ModelLoadError(f"{self.path}: tensor shapes disagree with the metadata: {'; '.join(wrong[:3])}")

    def _rope_parameters(self, head_dim: int) -> dict[str, Any]:
        """HF's rope_parameters: rope_theta, and the scaling from `rope_freqs` or `rope.scaling.*`."""
        prefix = f"{self.architecture}.rope"
        rope = dict(rope_type="default", rope_theta=float(self._field(f"{prefix}.freq_base", 10000.0)))
        rot_dim = int(self._field(f"{prefix}.dimension_count", head_dim))
        if rot_dim != head_dim:
            raise ModelLoadError(f"{self.path}: rope over {rot_dim} of {head_dim} head dims is not supported")
        scaling = self._field(f"{prefix}.scaling.type", "none")
        original = self._field(f"{prefix}.scaling.original_context_length", None)
        freqs = next((tensor for tensor in self.tensors if tensor.name == "rope_freqs.weight"), None)
        if freqs is not None:  # Llama 3.x: llama.cpp divides each frequency by its factor
            if scaling != "none":
                raise ModelLoadError(f"{self.path}: rope_freqs.weight and rope scaling '{scaling}' together")
            factors = GGUFTensorData(freqs.type, freqs.shape, self._data(freqs)).dequantize()
            try:
                llama3 = llama3_from_freq_factors(factors, rope["rope_theta"], rot_dim, original)
            except ValueError as error:
                raise ModelLoadError(f"{self.path}: rope_freqs.weight: {error}") from error
            return rope | (llama3 or {})
        if scaling == "none":
            return rope
        factor = float(self._field(f"{prefix}.scaling.factor"))
        if scaling == "linear":
            return rope | dict(rope_type="linear", factor=factor)
        if scaling == "yarn":
            if original is None:
                raise ModelLoadError(f"{self.path}: yarn rope scaling without {prefix}.scaling.original_context_length")
            rope |= dict(rope_type="yarn", factor=factor, original_max_position_embeddings=int(original))
            for key, hf_key in _YARN_KEYS.items():
                if (value := self._field(f"{prefix}.scaling.{key}", None)) is not None:
                    rope[hf_key] = float(value)
            return rope
        raise ModelLoadError(
            f"{self.path}: rope scaling '{scaling}' is not supported (supported: none, linear, yarn, and the "
            "rope_freqs tensor of Llama 3.x)"
        )


def _read_header(path: Path) -> tuple[np.ndarray, dict[str, Any], list[GGUFTensor]]:
    """(the file as uint8, metadata, tensor table), reading no tensor data."""
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
    """A metadata value and the position after it. A numeric array comes back as a read-only numpy view of the
    file; a string array (the vocabulary, the merges) as None, skipped without decoding."""
    if value_type in _SCALAR_FORMATS:
        fmt = _SCALAR_FORMATS[value_type]
        value = struct.unpack_from(fmt, file, position)[0]
        if value_type == GGUFValueType.FLOAT32:  # the shortest decimal that is this float32: 1e-06, not 9.99e-07
            value = float(str(np.float32(value)))
        return value, position + struct.calcsize(fmt)
    if value_type == GGUFValueType.STRING:
        return _read_string(file, position)
    element_type, count = struct.unpack_from("<IQ", file, position)
    position += 12
    element_type = GGUFValueType(element_type)
    if element_type in _SCALAR_FORMATS:
        dtype = np.dtype(_SCALAR_FORMATS[element_type])
        end = position + count * dtype.itemsize
        if end > len(file):
            raise struct.error(f"an array at byte {position} runs past the end of the file")
        return file[position:end].view(dtype), end
    for _ in range(count):
        if element_type == GGUFValueType.STRING:
            (length,) = struct.unpack_from("<Q", file, position)
            position += 8 + length
        else:
            _, position = _read_value(file, position, element_type)
    return None, position
