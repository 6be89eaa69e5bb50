"""Layers shared by the model families: RMSNorm, rotary embedding, fused linear shards, the per-step context."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from engine.attention.backend import AttentionBackend


@dataclass
class ForwardContext:
    """What every attention layer needs for one step; passed down explicitly (no global state)."""
    backend: AttentionBackend
    metadata: Any
    kv_cache: torch.Tensor    # [2, num_layers, *backend.kv_cache_shape(...)]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and scale in the input dtype, as the reference implementations do.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """Neox-layout rotary embedding with a cos/sin table for every position up to max_positions."""

    def __init__(self, hf_config, head_dim: int, max_positions: int) -> None:
        super().__init__()
        self.hf_config, self.head_dim, self.max_positions = hf_config, head_dim, max_positions
        self.cos = self.sin = None   # built by build() once the model sits on its device

    def build(self, device: torch.device) -> None:
        """The cos/sin tables are not parameters: the model is created on the meta device and materialised with
        to_empty(), which would leave buffers uninitialised, so they are computed here afterwards."""
        hf_config, head_dim, max_positions = self.hf_config, self.head_dim, self.max_positions
        params = dict(getattr(hf_config, "rope_parameters", None) or {})
        rope_type = params.get("rope_type", "default")
        if rope_type == "default":
            theta = params.get("rope_theta", 10000.0)
            inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
            scaling = 1.0
        elif rope_type in ROPE_INIT_FUNCTIONS and rope_type != "dynamic":
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"))
        else:
            raise ValueError(f"rope_type {rope_type!r} is not supported")
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq.float()[None, :]
        self.cos = (freqs.cos() * scaling).to(device)   # [max_positions, head_dim / 2]
        self.sin = (freqs.sin() * scaling).to(device)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for the step's positions, each [T, 1, dim / 2]: looked up once per step, shared by all layers."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)

    @staticmethod
    def rotate(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x: [T, heads, dim] -> a rotated copy."""
        cos, sin = rope
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Linear(nn.Module):
    """y = x @ weight + bias with the weight stored transposed, [in, out]: BLAS multiplies a small batch of rows
    by a row-major [in, out] matrix faster than by the checkpoint's [out, in] layout (about 15% on the CPU at
    decode batch sizes). Several projections of one input (q/k/v, gate/up) can share it as column shards."""

    def __init__(self, in_features: int, shard_sizes: list[int], bias: bool) -> None:
        super().__init__()
        out_features = sum(shard_sizes)
        self.weight = nn.Parameter(torch.empty(in_features, out_features, device="meta"))
        self.bias = nn.Parameter(torch.empty(out_features, device="meta")) if bias else None
        self.shard_offsets = [sum(shard_sizes[:i]) for i in range(len(shard_sizes))]
        self.shard_sizes = shard_sizes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return x @ self.weight
        return torch.addmm(self.bias, x, self.weight)

    def load(self, param: nn.Parameter, loaded: torch.Tensor, shard: int = 0) -> None:
        """Copy a checkpoint tensor ([out, in] weight or [out] bias) into column shard `shard` of param."""
        start, size = self.shard_offsets[shard], self.shard_sizes[shard]
        expected = (size, param.shape[0]) if param is self.weight else (size,)
        if tuple(loaded.shape) != expected:
            raise ValueError(f"weight shard {shard} has shape {tuple(loaded.shape)}, expected {expected}")
        if param is self.weight:
            param.data[:, start:start + size].copy_(loaded.t())
        else:
            param.data[start:start + size].copy_(loaded)
