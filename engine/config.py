"""EngineConfig: every user-facing engine option, validated once (ValueError on bad input)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# fp8 = float8 e4m3 with a per-tensor scale, on the GPU (Triton) backend only.
KV_CACHE_DTYPES = ("auto", "float32", "float16", "bfloat16", "fp8")
ATTENTION_BACKENDS = ("auto", "torch", "cpu", "triton")
# KV pool size on the CPU when kv_cache_memory is not given, in GiB.
DEFAULT_CPU_KV_CACHE_GIB = 2.0
PREEMPTION_MODES = ("swap", "recompute")
QUANTIZATION_MODES = ("auto", "none", "int8", "int4")


SPECULATIVE_METHODS = ("ngram", "draft_model")
_SPECULATIVE_KEYS = {
    "ngram": {"method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"},
    "draft_model": {"method", "model", "num_speculative_tokens"},
}


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding, with vLLM's speculative_config names. method "ngram" (prompt lookup): the last n
    tokens of a sequence (n from prompt_lookup_max down to prompt_lookup_min) are looked for earlier in it, and the
    num_speculative_tokens tokens that followed them there are proposed. method "draft_model" (the default when
    `model` is given): a smaller model of the same tokenizer proposes them. One forward pass verifies them all."""

    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1
    model: str | None = None  # the draft model: a path or repo id, as EngineConfig.model

    @classmethod
    def from_dict(cls, options: dict) -> SpeculativeConfig:
        if not isinstance(options, dict):
            raise ValueError(f"speculative_config must be a dict, got {type(options).__name__}")
        method = options.get("method", "draft_model" if "model" in options else "ngram")
        if method not in SPECULATIVE_METHODS:
            raise ValueError(
                f"speculative_config method must be one of {', '.join(SPECULATIVE_METHODS)}, got {method!r}"
            )
        unknown = set(options) - _SPECULATIVE_KEYS[method]
        if unknown:
            raise ValueError(f"speculative_config for method {method} has unknown keys: {', '.join(sorted(unknown))}")
        config = cls(**{**options, "method": method})
        if method == "draft_model" and not (isinstance(config.model, str) and config.model):
            raise ValueError("speculative_config method draft_model needs `model`: the draft model's path or repo id")
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"):
            value = getattr(config, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"speculative_config {name} must be an integer >= 1, got {value!r}")
        if config.prompt_lookup_min > config.prompt_lookup_max:
            raise ValueError(
                f"speculative_config prompt_lookup_min ({config.prompt_lookup_min}) must be <= prompt_lookup_max "
                f"({config.prompt_lookup_max})"
            )
        return config


@dataclass(frozen=True)
class EngineConfig:
    model: str
    revision: str | None = None
    download_dir: str | None = None
    dtype: str = "auto"
    kv_cache_dtype: str = "auto"
    max_model_len: int | None = None
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    kv_cache_memory: float | None = None  # GiB; the CPU's KV budget
    gpu_memory_utilization: float = 0.9  # fraction of the GPU that weights + activations + KV may use
    enable_prefix_caching: bool = True
    swap_space: float = 4.0  # GiB of host memory for preempted groups' KV (vLLM's default)
    preemption_mode: str | None = None  # None: vLLM's policy (swap groups of several sequences); swap | recompute
    attention_backend: str = "auto"  # auto | torch | cpu (the compiled CPU kernels) | triton (the GPU's)
    cuda_graphs: bool = True  # replay captured CUDA graphs for decode steps (CUDA + triton only)
    # run decode-only steps as one compiled call for all layers (CPU + the cpu attention backend, float32 only)
    cpu_fused_decode: bool = True
    # auto: a GGUF's quantized weights stay quantized; none: all in dtype; int8 / int4: quantized at load
    quantization: str = "auto"
    seed: int = 0
    device: str | None = None  # None = cuda when available, else cpu
    # vLLM's speculative_config: {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": n,
    # "prompt_lookup_min": m} or {"model": draft, "num_speculative_tokens": k}; validated into `speculative` (a
    # SpeculativeConfig) by __post_init__.
    speculative_config: dict | None = None
    speculative: SpeculativeConfig | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("model must name a model directory, a .gguf file or a Hugging Face repo id")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {self.dtype!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}; got {self.kv_cache_dtype!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be > 0 GiB, got {self.kv_cache_memory}")
        if self.swap_space < 0:
            raise ValueError(f"swap_space must be >= 0 GiB, got {self.swap_space}")
        if self.preemption_mode is not None and self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(
                f"preemption_mode must be swap or recompute (or None for the automatic policy); "
                f"got {self.preemption_mode!r}"
            )
        if self.preemption_mode == "swap" and self.swap_space == 0:
            raise ValueError("preemption_mode swap needs swap_space > 0")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.quantization not in QUANTIZATION_MODES:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_MODES)}; got {self.quantization!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}; got {self.attention_backend!r}"
            )
        if self.device not in (None, "cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")
        if self.speculative_config is not None:
            object.__setattr__(self, "speculative", SpeculativeConfig.from_dict(self.speculative_config))
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device cuda was asked for but torch sees no CUDA device")

    @property
    def torch_device(self) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def model_dtype(self, checkpoint_dtype: torch.dtype | None) -> torch.dtype:
        """auto = float32 on the CPU (16-bit matmuls are slow there), the checkpoint's dtype on a GPU."""
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        if self.torch_device.type == "cpu":
            return torch.float32
        return checkpoint_dtype if checkpoint_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16

    def cache_dtype(self, model_dtype: torch.dtype, *, quantized_on_cpu: bool = False) -> torch.dtype:
        """auto = the model's dtype, except float16 for weights kept quantized on the CPU (as llama.cpp's KV):
        their own rounding error is far above float16's, and it halves the KV memory and the bytes a decode step
        reads (SmolLM2 Q4_1: 46 MiB less resident at 2,000 tokens, same greedy tokens)."""
        if self.kv_cache_dtype == "fp8":
            return torch.float8_e4m3fn
        if self.kv_cache_dtype != "auto":
            return DTYPES[self.kv_cache_dtype]
        return torch.float16 if quantized_on_cpu else model_dtype


@dataclass(frozen=True)
class ModelConfig:
    """What the engine resolved about the model it runs."""

    model: str
    architecture: str
    dtype: torch.dtype
    kv_cache_dtype: torch.dtype
    max_model_len: int
    vocab_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
