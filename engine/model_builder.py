"""From a model name to its weights loaded on the device, with what the engine resolved about it: the step shared
by the target model and a speculative draft model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from engine.attention import AttentionBackend, select_backend
from engine.config import EngineConfig, ModelConfig
from engine.models import quantization
from engine.models.loader import ModelSource, open_model
from engine.models.registry import model_class


@dataclass
class BuiltModel:
    source: ModelSource
    model: nn.Module
    model_config: ModelConfig
    backend: AttentionBackend
    weight_bytes: int  # resident, quantized weights at their kept size


def build_model(
    name: str, config: EngineConfig, stage: Callable[[str], None], max_model_len: int | None = None
) -> BuiltModel:
    """Open `name` (a path or repo id) and load its weights as `config` asks. max_model_len: the context the
    model must serve (a draft serves its target's); None: config.max_model_len, else the model's own context.
    stage: called with a short sentence as each stage begins. Raises ValueError (ModelLoadError) in words."""
    device = config.torch_device
    stage("Reading the model file")
    source = open_model(name, revision=config.revision, cache_dir=config.download_dir)
    hf = source.hf_config
    cls = model_class(hf)
    max_pos = getattr(hf, "max_position_embeddings", None)
    max_model_len = max_model_len or config.max_model_len or max_pos
    if max_pos is not None and max_model_len > max_pos:
        raise ValueError(f"max_model_len {max_model_len} exceeds the model's context of {max_pos} tokens")
    checkpoint_dtype = getattr(hf, "dtype", None)
    dtype = config.model_dtype(checkpoint_dtype if isinstance(checkpoint_dtype, torch.dtype) else None)
    a = cls.arch_from_hf(hf)
    if device.type == "cpu":  # compiled on the first load of an install, found built after that
        stage("Building the CPU kernels")
    keep = quantization.candidates(source, config.quantization, device)  # None: every weight it can hold
    quantized_on_cpu = device.type == "cpu" and (keep is None or bool(keep))
    model_config = ModelConfig(
        model=name,
        architecture=hf.architectures[0],
        dtype=dtype,
        kv_cache_dtype=config.cache_dtype(dtype, quantized_on_cpu=quantized_on_cpu),
        max_model_len=max_model_len,
        vocab_size=a.vocab_size,
        num_layers=a.num_layers,
        num_kv_heads=a.num_kv_heads,
        head_dim=a.head_dim,
    )
    backend = select_backend(
        config.attention_backend, device, config.block_size, a.head_dim, a.sliding_window, model_config.kv_cache_dtype
    )
    stage("Loading the weights")
    model = cls(hf, max_positions=max_model_len, fused_kernels=backend.fused_kernels)
    quantized = model.keep_quantized(keep)
    model.materialize(device, dtype)
    model.load_weights(quantization.weight_stream(source, dtype, config.quantization, quantized))
    model.eval()
    return BuiltModel(source, model, model_config, backend, model.weight_bytes())
