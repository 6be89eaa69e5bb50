"""The fused decode step on the CPU (kernels/csrc/fused_decode.cpp): a decoder's weights handed to the compiled
step once, then one call per decode step runs every layer. Its torch twin is the eager model itself (tests
compare the two).

The step holds references to the weight tensors it was given (no copies): they must stay as they are while it
is used.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch

from kernels import cpu_ops
from kernels.quant import QuantizedWeight

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Projection:
    """y = x @ W (+ bias): W kept quantized (qweights, [out, in] each, stacked along out in order) or as a float32
    [in, out] matrix."""

    qweights: list[QuantizedWeight]
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    def spec(self) -> tuple:
        parts = [(*qw.tensors(), qw.shape[0]) for qw in self.qweights]
        return parts, _f32(self.weight), _f32(self.bias)


@dataclass(frozen=True)
class DecoderLayer:
    """One decoder layer's weights: norms (q_norm and k_norm only for Qwen3) and projections."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: Projection  # q, k, v outputs side by side
    o: Projection
    gate_up: Projection  # gate, up outputs side by side
    down: Projection
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None


@dataclass(frozen=True)
class DecoderShape:
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    rms_norm_eps: float
    scale: float  # attention's softmax scale
    sliding_window: int | None


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None:
        return None
    if t.dtype != torch.float32 or t.device.type != "cpu":
        raise ValueError(f"the fused decode step takes float32 CPU tensors, got {t.dtype} on {t.device}")
    return t.detach().contiguous()


@functools.cache
def _module():
    """The compiled module, or None (after one warning) where it cannot be built: decode steps then run eagerly."""
    try:
        return cpu_ops.load_fused()
    except cpu_ops.KernelBuildError as e:
        logger.warning("%s; decode steps run eagerly", e)
        return None


def available() -> bool:
    return _module() is not None


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(dim=-1) for [B, V]: the compiled pick for float32 on the CPU (the first of equal largest,
    NaN first, as torch answers), else torch's."""
    module = _module() if logits.is_cpu and logits.dtype == torch.float32 and logits.dim() == 2 else None
    if module is None or logits.stride(1) != 1:
        return logits.argmax(dim=-1)
    return module.argmax_rows(logits)


class FusedDecode:
    def __init__(
        self,
        shape: DecoderShape,
        cos_sin_cache: torch.Tensor,
        embedding: torch.Tensor | QuantizedWeight,
        layers: list[DecoderLayer],
    ) -> None:
        """cos_sin_cache: [max_positions, rot_dim] float32, cos | sin per position (neox layout); embedding: the
        float32 [vocab, hidden] table or the table kept quantized. Raises KernelBuildError without the kernels,
        ValueError (or the kernel's RuntimeError) on weights it cannot take."""
        module = _module()
        if module is None:
            raise cpu_ops.KernelBuildError("the fused decode step's kernels could not be built")
        s = shape
        self._step = module.DecodeStep(
            s.hidden,
            s.num_heads,
            s.num_kv_heads,
            s.head_dim,
            s.intermediate,
            s.rms_norm_eps,
            s.scale,
            s.sliding_window or 0,
            _f32(cos_sin_cache),
        )
        if isinstance(embedding, QuantizedWeight):
            self._step.set_embedding(None, (*embedding.tensors(), embedding.shape[0]))
        else:
            self._step.set_embedding(_f32(embedding), None)
        for layer in layers:
            self._step.add_layer(
                _f32(layer.input_norm),
                _f32(layer.post_norm),
                _f32(layer.q_norm),
                _f32(layer.k_norm),
                layer.qkv.spec(),
                layer.o.spec(),
                layer.gate_up.spec(),
                layer.down.spec(),
            )

    def __call__(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        kv_cache: torch.Tensor,
    ) -> torch.Tensor:
        """One decode step, every row one query token: input_ids, positions, slot_mapping, context_lens [B] int64,
        block_tables [B, max_blocks] int64, kv_cache [2, layers, kv_heads, num_blocks, block_size, head_dim]
        (written at the rows' slots) -> the hidden states [B, hidden] before the final norm."""
        return self._step.run(input_ids, positions, slot_mapping, block_tables, context_lens, kv_cache)
