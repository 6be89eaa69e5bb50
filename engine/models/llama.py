"""The Llama family: Llama, Mistral, Qwen2 (q/k/v bias), Qwen3 (q/k RMSNorm). One class, configured per family."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.layers import (
    Embedding,
    ForwardContext,
    Linear,
    QuantizedEmbedding,
    RMSNorm,
    RopeStep,
    RotaryEmbedding,
)
from kernels.quant import QuantizedWeight, qmatmul


@dataclass(frozen=True)
class LlamaArch:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool
    sliding_window: int | None

    @classmethod
    def from_hf(cls, c) -> LlamaArch:
        arch = (c.architectures or [""])[0]
        heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        act = getattr(c, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported (only silu)")
        attention_bias = bool(getattr(c, "attention_bias", False))
        if arch == "Qwen2ForCausalLM":
            window = c.sliding_window if getattr(c, "use_sliding_window", False) else None
        else:
            window = getattr(c, "sliding_window", None)
        return cls(
            hidden_size=c.hidden_size,
            num_layers=c.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(c, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            intermediate_size=c.intermediate_size,
            vocab_size=c.vocab_size,
            rms_norm_eps=c.rms_norm_eps,
            qkv_bias=attention_bias or arch == "Qwen2ForCausalLM",
            o_bias=attention_bias and arch != "Qwen2ForCausalLM",
            mlp_bias=bool(getattr(c, "mlp_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
            sliding_window=window,
        )


class LlamaAttention(nn.Module):
    def __init__(self, a: LlamaArch, layer_idx: int, fused: bool) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = a.num_heads, a.num_kv_heads, a.head_dim
        q_size, kv_size = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        self.split = (q_size, kv_size, kv_size)
        self.qkv_proj = Linear(a.hidden_size, list(self.split), bias=a.qkv_bias)
        self.o_proj = Linear(q_size, [a.hidden_size], bias=a.o_bias)
        self.q_norm = RMSNorm(a.head_dim, a.rms_norm_eps, fused) if a.qk_norm else None
        self.k_norm = RMSNorm(a.head_dim, a.rms_norm_eps, fused) if a.qk_norm else None

    def forward(self, rope: RopeStep, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        T, H, KVH, D = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)  # [T, (H + 2 * KVH) * D]
        v = qkv[:, (H + KVH) * D :].view(T, KVH, D)
        if self.q_norm is None and not rope.fused:
            # q and k sit side by side in qkv: rotate them in one pass, [T, H + KVH, D].
            qk = rope.rotate(qkv[:, : (H + KVH) * D].view(T, H + KVH, D))
            q, k = qk[:, :H], qk[:, H:]
        else:
            q = qkv[:, : H * D].view(T, H, D)
            k = qkv[:, H * D : (H + KVH) * D].view(T, KVH, D)
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = rope.apply(q, k)
        o = ctx.backend.forward(q, k, v, ctx.kv_cache[0, self.layer_idx], ctx.kv_cache[1, self.layer_idx], ctx.metadata)
        return self.o_proj(o.view(T, -1))


class LlamaMLP(nn.Module):
    def __init__(self, a: LlamaArch) -> None:
        super().__init__()
        self.gate_up_proj = Linear(a.hidden_size, [a.intermediate_size] * 2, bias=a.mlp_bias)
        self.down_proj = Linear(a.intermediate_size, [a.hidden_size], bias=a.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        # In place on the matmul's fresh output: no new [T, intermediate] tensors.
        return self.down_proj(F.silu(gate, inplace=True).mul_(up))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, a: LlamaArch, layer_idx: int, fused: bool) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(a, layer_idx, fused)
        self.mlp = LlamaMLP(a)
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps, fused)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps, fused)

    def forward(
        self, rope: RopeStep, h: torch.Tensor, residual: torch.Tensor | None, ctx: ForwardContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """h: this layer's input (the previous layer's MLP output), residual: the running sum before it (None at
        the first layer). Returns (MLP output, residual): each norm adds its input into the residual first."""
        if residual is None:
            x, residual = self.input_layernorm(h), h
        else:
            x, residual = self.input_layernorm(h, residual)
        x, residual = self.post_attention_layernorm(self.self_attn(rope, x, ctx), residual)
        return self.mlp(x), residual


class LlamaForCausalLM(nn.Module):
    # HF checkpoint name -> (our merged parameter, shard index)
    _merged: ClassVar[dict[str, tuple[str, int]]] = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    arch_from_hf = LlamaArch.from_hf  # the shapes an attention backend is chosen for, before the model is built

    def __init__(self, hf_config, max_positions: int, fused_kernels: bool = False) -> None:
        """fused_kernels: norms and rotary embedding run as fused Triton kernels (the GPU path)."""
        super().__init__()
        a = self.arch = LlamaArch.from_hf(hf_config)
        fused = fused_kernels
        self.rotary = RotaryEmbedding(hf_config, max_positions, fused)
        self.embed_tokens = Embedding(a.vocab_size, a.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(a, i, fused) for i in range(a.num_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps, fused)
        self.lm_head = None if a.tie_word_embeddings else Linear(a.hidden_size, [a.vocab_size], bias=False)

    def keep_quantized(self, candidates: set[str] | None) -> set[str]:
        """Before materialize: hold quantized every weight module whose checkpoint tensors are all candidates (HF
        names; None: every linear layer and the embedding). Returns the HF names it will take quantized."""
        kept: set[str] = set()
        modules: list[tuple[str, nn.Module]] = [(n, m) for n, m in self.named_modules() if isinstance(m, Linear)]
        for path, module in modules:
            names = self._hf_names(path, len(module.shard_sizes))
            if candidates is None or all(n in candidates for n in names):
                module.keep_quantized()
                kept.update(names)
        embed = "model.embed_tokens.weight"
        if candidates is None or embed in candidates:
            self.embed_tokens = QuantizedEmbedding(self.arch.vocab_size, self.arch.hidden_size)
            kept.add(embed)
        return kept

    def _hf_names(self, path: str, num_shards: int) -> list[str]:
        """The checkpoint names of a Linear's shards, e.g. layers.0.self_attn.qkv_proj -> q/k/v_proj weights."""
        if path == "lm_head":
            return ["lm_head.weight"]
        parent, ours = path.rsplit(".", 1)
        hf = [name for name, (merged, _) in sorted(self._merged.items(), key=lambda kv: kv[1]) if merged == ours]
        return [f"model.{parent}.{name}.weight" for name in hf] if hf else [f"model.{path}.weight"]

    def materialize(self, device: torch.device, dtype: torch.dtype) -> None:
        """Allocate the parameters (uninitialised: load_weights fills them) and the rotary table."""
        self.to_empty(device=device)
        self.to(dtype)
        self.rotary.build(device)
        self.device = device
        if isinstance(self.embed_tokens, QuantizedEmbedding):
            self.embed_tokens.dtype = dtype

    def weight_bytes(self) -> int:
        """Bytes the weights hold resident: float parameters and quantized weights alike."""
        floats = sum(p.numel() * p.element_size() for p in self.parameters())
        quantized = [qw for m in self.modules() if isinstance(m, Linear) for qw in m.qweights]
        if isinstance(self.embed_tokens, QuantizedEmbedding) and self.embed_tokens.qweight is not None:
            quantized.append(self.embed_tokens.qweight)
        return floats + sum(qw.nbytes for qw in quantized)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """input_ids, positions: [T] -> hidden states [T, hidden]."""
        h = self.embed_tokens(input_ids)
        rope = self.rotary.step(positions, h.dtype)
        residual = None
        for layer in self.layers:
            h, residual = layer(rope, h, residual, ctx)
        return h + residual

    def compute_logits(self, h: torch.Tensor) -> torch.Tensor:
        """h: [N, hidden] (only the rows that sample) -> logits [N, vocab] in float32."""
        h = self.norm(h)
        if self.lm_head is not None:
            logits = self.lm_head(h)
        elif isinstance(self.embed_tokens, QuantizedEmbedding):
            logits = qmatmul(h, self.embed_tokens.qweight)
        else:  # tied: the embedding matrix itself, [vocab, hidden], rather than a transposed copy of it
            logits = F.linear(h, self.embed_tokens.weight)
        return logits.float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | QuantizedWeight]]) -> None:
        """Copy HF-named tensors into our parameters, and quantized weights into the modules kept quantized;
        every parameter (every shard of one) must be filled."""
        params = dict(self.named_parameters())
        missing = set()
        for pname in params:
            module = self.get_submodule(pname.rsplit(".", 1)[0])
            shards = len(module.shard_sizes) if isinstance(module, Linear) else 1
            missing |= {(pname, i) for i in range(shards)}
        for path, module in self.named_modules():
            if isinstance(module, Linear) and module.quantized:
                missing |= {(f"{path}.weight", i) for i in range(len(module.shard_sizes))}
        if isinstance(self.embed_tokens, QuantizedEmbedding):
            missing.add(("embed_tokens.weight", 0))
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name or (self.lm_head is None and name == "lm_head.weight"):
                continue
            name = name.removeprefix("model.")
            target, shard = name, 0
            for hf, (ours, idx) in self._merged.items():
                if f".{hf}." in name:
                    target, shard = name.replace(f".{hf}.", f".{ours}."), idx
                    break
            if isinstance(tensor, QuantizedWeight):
                self._load_quantized(name, target, shard, tensor)
                missing.discard((target, shard))
                continue
            param = params.get(target)
            if param is None:
                raise ValueError(f"checkpoint has a weight this model does not use: {name}")
            module = self.get_submodule(target.rsplit(".", 1)[0])
            if isinstance(module, Linear):
                module.load(param, tensor, shard)
            elif param.shape != tensor.shape:
                raise ValueError(f"weight {name} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
            else:
                param.data.copy_(tensor)
            missing.discard((target, shard))
        if missing:
            names = sorted(f"{n}[{s}]" for n, s in missing)
            raise ValueError(f"checkpoint lacks weights: {names[:8]}")

    def _load_quantized(self, name: str, target: str, shard: int, qw: QuantizedWeight) -> None:
        module = self.get_submodule(target.rsplit(".", 1)[0]) if "." in target else None
        if target == "embed_tokens.weight" and isinstance(self.embed_tokens, QuantizedEmbedding):
            if qw.shape != self.embed_tokens.shape:
                raise ValueError(f"weight {name} has shape {qw.shape}, expected {self.embed_tokens.shape}")
            self.embed_tokens.qweight = qw.to(self.device)
        elif isinstance(module, Linear) and module.quantized:
            module.load_quantized(qw, shard, self.device)
        else:
            raise ValueError(f"checkpoint weight {name} arrives quantized, but this model holds it in floats")
