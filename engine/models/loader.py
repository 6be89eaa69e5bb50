"""From a model name to what the model classes need: config, tokenizer, EOS ids and weights under HF names.

`open_model` validates everything it can before returning (files present, headers readable, sizes
covering the data they promise), so a broken model fails here, with the file named, and not halfway
through building a model. Weights are read only when `ModelSource.weights` is iterated.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from engine.models.hub import ModelLoadError, resolve_model_path

__all__ = ["ModelLoadError", "ModelSource", "open_model"]

# a vocabulary in any of the forms transformers can build a fast tokenizer from
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


class WeightSource(Protocol):
    def weights(self, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]: ...


@dataclass
class ModelSource:
    path: Path  # the .gguf file or the HF model directory
    format: str  # "safetensors" | "gguf"
    hf_config: PretrainedConfig  # architectures set, e.g. ["LlamaForCausalLM"]
    tokenizer: PreTrainedTokenizerBase  # fast; .chat_template set when the model has one
    eos_token_ids: list[int]  # every id that ends generation: config, generation_config.json, tokenizer
    # the validated files weights() reads; for gguf a GGUFCheckpoint, whose raw_tensors(), tensor_types() and
    # file_type give the weights still quantized (engine/models/gguf.py)
    checkpoint: WeightSource = field(repr=False)

    def weights(self, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        """(Hugging Face parameter name, CPU tensor in dtype), one tensor at a time."""
        return self.checkpoint.weights(dtype)


def open_model(model: str, *, revision: str | None = None, cache_dir: str | None = None) -> ModelSource:
    """Open a model directory, a .gguf file, or a Hugging Face repo id (`org/name[@revision]`)."""
    path = resolve_model_path(model, revision=revision, cache_dir=cache_dir)
    if path.is_dir():
        return _open_hf_directory(path)
    if path.suffix.lower() == ".gguf":
        return _open_gguf(path)
    raise ModelLoadError(f"{path}: expected a model directory (config.json + *.safetensors) or a .gguf file")


class SafetensorsCheckpoint:
    """The *.safetensors files of a model directory, validated on construction."""

    def __init__(self, directory: Path) -> None:
        self.files = _safetensors_files(directory)

    def weights(self, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        for file in self.files:
            try:
                opened = safe_open(file, framework="pt")
            except (SafetensorError, OSError) as error:  # changed since open_model checked it
                raise ModelLoadError(f"{file}: cannot be read: {error}") from error
            with opened as tensors:
                for name in tensors.keys():  # noqa: SIM118 - a safe_open handle is not iterable
                    tensor = tensors.get_tensor(name)
                    # integer tensors (none in Llama/Qwen2 checkpoints) keep their type: a cast would corrupt them
                    yield name, tensor.to(dtype) if tensor.is_floating_point() else tensor


def _open_hf_directory(path: Path) -> ModelSource:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{path}: no config.json, so this is not a Hugging Face model directory")
    checkpoint = SafetensorsCheckpoint(path)
    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, OSError) as error:
        raise ModelLoadError(f"{config_file}: {error}") from error
    if not config.architectures:
        raise ModelLoadError(f'{config_file} names no architectures (e.g. "LlamaForCausalLM")')
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        # checked here because transformers would build some tokenizer classes with an empty vocabulary
        raise ModelLoadError(f"{path}: cannot load a tokenizer: none of {', '.join(_TOKENIZER_FILES)} is there")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (ValueError, KeyError, OSError) as error:
        raise ModelLoadError(
            f"{path}: cannot load a tokenizer (tokenizer.json, tokenizer_config.json): {error}"
        ) from error
    if not tokenizer.is_fast:
        raise ModelLoadError(f"{path}: needs a fast tokenizer (tokenizer.json)")

    generation_config = path / "generation_config.json"
    generation_eos = _read_json(generation_config).get("eos_token_id") if generation_config.is_file() else None
    eos_token_ids = _unique_ids(config.eos_token_id, generation_eos, tokenizer.eos_token_id)
    return ModelSource(path, "safetensors", config, tokenizer, eos_token_ids, checkpoint)


def _open_gguf(path: Path) -> ModelSource:
    # Imported here: the gguf package is only needed for GGUF files (a GPU image may lack it).
    from engine.models.gguf import GGUFCheckpoint

    checkpoint = GGUFCheckpoint(path)
    tokenizer = checkpoint.tokenizer()
    eos_token_ids = _unique_ids(checkpoint.end_of_generation_ids(), tokenizer.eos_token_id)
    return ModelSource(path, "gguf", checkpoint.config, tokenizer, eos_token_ids, checkpoint)


def _safetensors_files(directory: Path) -> list[Path]:
    """The weight files, each checked readable; every tensor in exactly one file (the one the index names)."""
    index = directory / "model.safetensors.index.json"
    weight_map: dict[str, str] | None = None
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index} has no weight_map")
        files = [directory / shard for shard in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise ModelLoadError(f"{file}: shard listed in {index.name} is missing")
    else:
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            only_bin = any(directory.glob("*.bin"))
            hint = " (only PyTorch .bin files, which kvstudio does not load)" if only_bin else ""
            raise ModelLoadError(f"{directory}: no *.safetensors weights{hint}")

    owner: dict[str, Path] = {}
    for file in files:
        for name in _tensor_names(file):
            if name in owner:
                raise ModelLoadError(f"tensor {name} is stored twice: in {owner[name]} and in {file}")
            owner[name] = file
    if weight_map is not None:
        for name, shard in weight_map.items():
            if owner.get(name) != directory / shard:
                raise ModelLoadError(f"{directory / shard}: lacks tensor {name}, which {index.name} places there")
    return files


def _tensor_names(file: Path) -> list[str]:
    # safe_open checks the header and that the file size covers exactly the data the header promises
    try:
        with safe_open(file, framework="pt") as tensors:
            return list(tensors.keys())
    except (SafetensorError, OSError) as error:
        raise ModelLoadError(f"{file} is truncated or not a valid safetensors file: {error}") from error


def _read_json(file: Path) -> dict[str, Any]:
    try:
        content = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{file}: cannot read it as JSON: {error}") from error
    if not isinstance(content, dict):
        raise ModelLoadError(f"{file}: expected a JSON object")
    return content


def _unique_ids(*sources: int | list[int] | None) -> list[int]:
    """Every id in sources (each None, an id or a list of ids), in first-seen order."""
    ids: list[int] = []
    for source in sources:
        for token_id in [source] if isinstance(source, int) else source or []:
            if token_id not in ids:
                ids.append(token_id)
    return ids
