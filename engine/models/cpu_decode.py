"""The CPU's fused decode step, its counterpart of the GPU's CUDA graphs (engine/cuda_graphs.py).

Eagerly, a decode step of a small model is some 40 torch ops a layer launched from Python (norms, rotary, cache
writes, casts, silu * mul...), and at batch 1 on two cores launching them costs more than the quantized matmuls.
So a decode-only step (every row one query token: decodes and speculative decodes' rows alike) runs every
decoder layer in one compiled call instead (kernels/fused_decode.py), reading the model's own weights, kept
quantized or float32, and its rotary table. It returns what the eager forward returns, the hidden states before
the final norm, so the logits and everything after them are the eager path's.

It applies to the Llama family in float32 with the "cpu" attention backend, where the kernels build; elsewhere
from_model returns None and every step runs eagerly. With float32 weights it runs steps of up to
MAX_FLOAT_WEIGHT_ROWS rows: beyond that, torch's float matmuls (which pack the weights for many rows) win.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.attention.backend import AttentionBackend, AttentionInputs
from engine.attention.cpu_backend import CpuAttentionBackend
from engine.models.layers import Linear, QuantizedEmbedding, RMSNorm
from engine.models.llama import LlamaForCausalLM
from kernels import fused_decode
from kernels.fused_decode import DecoderLayer, DecoderShape, FusedDecode, Projection

# SmolLM2 with float32 weights, 2 threads, ms per decode step fused / eager: 1 row 41/52, 16 rows 84/134,
# 32 rows 150/162, 64 rows 284/231. With quantized weights the fused step wins at 64 rows too (int8: 115/131).
MAX_FLOAT_WEIGHT_ROWS = 32


def _projection(linear: Linear) -> Projection:
    if linear.qweights:
        return Projection(list(linear.qweights), bias=linear.bias)
    return Projection([], weight=linear.weight, bias=linear.bias)


def _weight(norm: RMSNorm | None) -> torch.Tensor | None:
    return None if norm is None else norm.weight


class CpuDecodeStep:
    def __init__(self, fused: FusedDecode, kv_cache: torch.Tensor, max_rows: int | None = None) -> None:
        self.fused = fused
        self.kv_cache = kv_cache  # [2, num_layers, kv_heads, num_blocks, block_size, head_dim]
        self.max_rows = max_rows  # larger steps run eagerly; None: no limit

    @classmethod
    def from_model(cls, model: nn.Module, backend: AttentionBackend, kv_cache: torch.Tensor) -> CpuDecodeStep | None:
        """The fused step over model's weights (held by reference, built once), or None where it does not apply:
        another attention backend or model class, activations not float32, or kernels that cannot be built."""
        if not isinstance(backend, CpuAttentionBackend) or not isinstance(model, LlamaForCausalLM):
            return None
        if kv_cache.device.type != "cpu" or model.norm.weight.dtype != torch.float32:
            return None
        if not fused_decode.available():
            return None
        a = model.arch
        shape = DecoderShape(
            hidden=a.hidden_size,
            num_heads=a.num_heads,
            num_kv_heads=a.num_kv_heads,
            head_dim=a.head_dim,
            intermediate=a.intermediate_size,
            rms_norm_eps=a.rms_norm_eps,
            scale=backend.scale,
            sliding_window=backend.sliding_window,
        )
        embed = model.embed_tokens
        table = embed.qweight if isinstance(embed, QuantizedEmbedding) else embed.weight
        layers = [
            DecoderLayer(
                input_norm=layer.input_layernorm.weight,
                post_norm=layer.post_attention_layernorm.weight,
                qkv=_projection(layer.self_attn.qkv_proj),
                o=_projection(layer.self_attn.o_proj),
                gate_up=_projection(layer.mlp.gate_up_proj),
                down=_projection(layer.mlp.down_proj),
                q_norm=_weight(layer.self_attn.q_norm),
                k_norm=_weight(layer.self_attn.k_norm),
            )
            for layer in model.layers
        ]
        projections = [p for layer in layers for p in (layer.qkv, layer.o, layer.gate_up, layer.down)]
        float_weights = any(not p.qweights for p in projections)
        fused = FusedDecode(shape, model.rotary.cos_sin_cache, table, layers)
        return cls(fused, kv_cache, MAX_FLOAT_WEIGHT_ROWS if float_weights else None)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor | None:
        """A decode-only step (inputs.num_decodes rows, no prefill): writes its K/V into the cache and returns the
        hidden states [rows, hidden], as model.forward would; None, having done nothing, for more rows than
        max_rows (the caller runs the step eagerly)."""
        assert inputs.num_prefills == 0 and inputs.num_decodes == input_ids.shape[0]
        if self.max_rows is not None and input_ids.shape[0] > self.max_rows:
            return None
        return self.fused(
            input_ids,
            positions,
            inputs.slot_mapping,
            inputs.decode_block_tables.contiguous(),
            inputs.decode_context_lens,
            self.kv_cache,
        )
