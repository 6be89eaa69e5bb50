"""Model classes keyed by the Hugging Face architecture name in config.json."""

from __future__ import annotations

from torch import nn

from engine.models.llama import LlamaForCausalLM

_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}


class UnsupportedModelError(ValueError):
    pass


def model_class(hf_config) -> type[nn.Module]:
    archs = list(getattr(hf_config, "architectures", None) or [])
    for arch in archs:
        if arch in _REGISTRY:
            return _REGISTRY[arch]
    raise UnsupportedModelError(
        f"unsupported model architecture {archs or '(none given in config.json)'}; "
        f"supported: {', '.join(sorted(_REGISTRY))}"
    )
