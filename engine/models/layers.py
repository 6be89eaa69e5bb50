"""Layers shared by the model families: RMSNorm, rotary embedding, fused linear shards, the per-step context."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention.backend import AttentionBackend
from engine.models.rope import cos_sin_cache, rope_parameters
from kernels.quant import PANEL, QuantizedWeight, concat, qembedding, qmatmul

# The fused Triton kernels are imported where they run (a dictionary lookup once loaded): triton is needed on the
# GPU path only, and the CPU app bundle leaves it out.


@dataclass
class ForwardContext:
    """What every attention layer needs for one step; passed down explicitly (no global state)."""

    backend: AttentionBackend
    metadata: Any
    kv_cache: torch.Tensor  # [2, num_layers, *backend.kv_cache_shape(...)]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, fused: bool = False) -> None:
        """fused: the Triton kernel, with the residual add fused in (the GPU path), instead of torch ops."""
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.fused = fused

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """x: [..., dim] -> norm(x); with residual: (norm(x + residual), x + residual), the sum being the next
        layer's residual. Normalised in float32, cast back, then scaled in the input dtype, as HF does."""
        if self.fused:
            from kernels.triton_norm import rms_norm

            shape = x.shape
            out = rms_norm(x.reshape(-1, shape[-1]), self.weight, self.eps, residual)
            if residual is None:
                return out.view(shape)
            return out[0].view(shape), out[1]
        if residual is not None:
            x = residual = x + residual
        dtype = x.dtype
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        y = self.weight * y.to(dtype)
        return y if residual is None else (y, residual)


@dataclass
class RopeStep:
    """The rotary inputs of one step, shared by all layers: per-token cos/sin for the torch path, or the
    positions and the whole table for the Triton kernel, which rotates q and k in place."""

    positions: torch.Tensor  # [T]
    cos_sin_cache: torch.Tensor  # [max_positions, rot_dim]: cos | sin
    cos: torch.Tensor | None  # [T, 1, rot_dim / 2] in the activations' dtype (torch path)
    sin: torch.Tensor | None
    fused: bool

    def apply(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, heads, dim], k: [T, kv_heads, dim] -> rotated (in place on the Triton path)."""
        if self.fused:
            from kernels.triton_rotary import rotary_embedding

            rotary_embedding(self.positions, q, k, self.cos_sin_cache, True)
            return q, k
        return self.rotate(q), self.rotate(k)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """Torch path, neox layout: x: [T, heads, dim] -> a rotated copy (dims past rot_dim unchanged)."""
        half = self.cos.shape[-1]
        x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
        rotated = (x1 * self.cos - x2 * self.sin, x2 * self.cos + x1 * self.sin)
        return torch.cat(rotated + ((rest,) if rest.shape[-1] else ()), dim=-1)


class RotaryEmbedding(nn.Module):
    """Neox-layout rotary embedding with a cos|sin table for every position up to max_positions."""

    def __init__(self, hf_config, max_positions: int, fused: bool = False) -> None:
        """fused: the Triton kernel rotates q and k in place (the GPU path), instead of torch ops."""
        super().__init__()
        self.params = rope_parameters(hf_config)  # an unsupported rope type fails here, before any weight loads
        self.max_positions = max_positions
        self.cos_sin_cache = None  # built by build() once the model sits on its device
        self.fused = fused

    def build(self, device: torch.device) -> None:
        """The table is not a parameter: the model is created on the meta device and materialised with
        to_empty(), which would leave buffers uninitialised, so it is computed here afterwards."""
        self.cos_sin_cache = cos_sin_cache(self.params, self.max_positions, device)

    def step(self, positions: torch.Tensor, dtype: torch.dtype) -> RopeStep:
        if self.fused:
            return RopeStep(positions, self.cos_sin_cache, None, None, True)
        cos, sin = self.cos_sin_cache[positions].unsqueeze(1).to(dtype).chunk(2, dim=-1)
        return RopeStep(positions, self.cos_sin_cache, cos, sin, False)


class Linear(nn.Module):
    """y = x @ weight + bias with the weight stored transposed, [in, out]: BLAS multiplies a small batch of rows
    by a row-major [in, out] matrix faster than by the checkpoint's [out, in] layout (about 15% on the CPU at
    decode batch sizes). Several projections of one input (q/k/v, gate/up) can share it as column shards.

    Or kept quantized (keep_quantized, before the model is materialised): one QuantizedWeight per shard instead,
    stacked into as few matmuls as their formats allow, and the float weight never allocated."""

    def __init__(self, in_features: int, shard_sizes: list[int], bias: bool) -> None:
        super().__init__()
        out_features = sum(shard_sizes)
        self.in_features = in_features
        self.weight = nn.Parameter(torch.empty(in_features, out_features, device="meta"))
        self.bias = nn.Parameter(torch.empty(out_features, device="meta")) if bias else None
        self.shard_offsets = [sum(shard_sizes[:i]) for i in range(len(shard_sizes))]
        self.shard_sizes = shard_sizes
        self.qshards: list[QuantizedWeight | None] | None = None  # per shard, until all are loaded
        self.qweights: list[QuantizedWeight] = []  # the matmuls' weights once loaded, in output order

    @property
    def quantized(self) -> bool:
        return self.qshards is not None

    def keep_quantized(self) -> None:
        self.register_parameter("weight", None)
        self.qshards = [None] * len(self.shard_sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qweights:
            outs = [qmatmul(x, qw) for qw in self.qweights]
            y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
            return y if self.bias is None else y.add_(self.bias)
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
            param.data[:, start : start + size].copy_(loaded.t())
        else:
            param.data[start : start + size].copy_(loaded)

    def load_quantized(self, qw: QuantizedWeight, shard: int, device: torch.device) -> None:
        expected = (self.shard_sizes[shard], self.in_features)
        if qw.shape != expected:
            raise ValueError(f"weight shard {shard} has shape {qw.shape}, expected {expected}")
        self.qshards[shard] = qw.to(device)
        if all(q is not None for q in self.qshards):
            # The shards are let go once stacked: kept, they held each stacked weight's bytes a second time (41 MiB
            # of SmolLM2-135M's 92).
            self.qweights, self.qshards = _stack(self.qshards), [None] * len(self.shard_sizes)


def _stack(shards: list[QuantizedWeight]) -> list[QuantizedWeight]:
    """Consecutive shards of one format stacked into one weight (one matmul) where the layout allows."""
    groups: list[list[QuantizedWeight]] = []
    for qw in shards:
        last = groups[-1] if groups else None
        if last and last[-1].format == qw.format and last[-1].shape[0] % PANEL == 0:
            last.append(qw)
        else:
            groups.append([qw])
    return [g[0] if len(g) == 1 else concat(g) for g in groups]


class Embedding(nn.Module):
    """An embedding table [num_embeddings, dim] made on the meta device without initial values: torch's own
    nn.Embedding draws them with normal_, which on meta imports torch._dynamo (about 150 MB resident) only to be
    overwritten by the checkpoint."""

    def __init__(self, num_embeddings: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim, device="meta"))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class QuantizedEmbedding(nn.Module):
    """An embedding table kept quantized: a step dequantizes only the rows of its tokens. Tied to the output
    layer, the same weight serves the logits' matmul."""

    def __init__(self, num_embeddings: int, dim: int) -> None:
        super().__init__()
        self.shape = (num_embeddings, dim)
        self.qweight: QuantizedWeight | None = None
        self.dtype = torch.float32  # of the rows it returns (the model's activations)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return qembedding(ids, self.qweight).to(self.dtype)
