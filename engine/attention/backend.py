"""The contract between the model runner and an attention backend."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class AttentionInputs:
    """Backend-neutral description of one step's flat batch, built once per step by the model runner.

    The flat batch holds num_decodes decode tokens (one per sequence) first, then each prefill chunk's tokens.
    Context lengths count every token whose KV the sequence has after this step, the new ones included.
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot (block_id * block_size + offset) per token
    num_decodes: int
    decode_context_lens: torch.Tensor  # [num_decodes] int64
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks] int64, padded with 0
    prefill_query_lens: torch.Tensor  # [num_prefills] int64: tokens in this step's chunk
    prefill_context_lens: torch.Tensor  # [num_prefills] int64
    prefill_block_tables: torch.Tensor  # [num_prefills, max_blocks] int64, padded with 0

    @property
    def num_prefills(self) -> int:
        return int(self.prefill_query_lens.numel())


class AttentionBackend(ABC):
    """Writes K/V into the paged cache and computes attention over it, for every layer of one step.

    prepare() runs once per step and may precompute whatever the layers share (indices, masks); forward() runs
    once per layer and must return the attention output in the query's layout.
    """

    # Which dimension of kv_cache_shape() indexes blocks: block copies (copy-on-write, swapping) move along it.
    block_dim: int
    # Whether the model runs its norms and rotary embedding as Triton kernels beside this backend (the GPU path),
    # and decode steps can be captured as CUDA graphs.
    fused_kernels: bool = False

    @staticmethod
    @abstractmethod
    def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
        """The layout of one layer's K (or V) cache, which the backend chooses for its own access pattern."""

    @abstractmethod
    def prepare(self, inputs: AttentionInputs) -> Any:
        """Per-step metadata shared by all layers."""

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        metadata: Any,
    ) -> torch.Tensor:
        """q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim];
        k_cache, v_cache: this layer's caches, shaped by kv_cache_shape(). Returns [num_tokens, num_heads, head_dim].
        """

    def copy_blocks(self, kv_cache: torch.Tensor, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: kv_cache[..., dst, ...] = kv_cache[..., src, ...] for every (src, dst) pair, every layer,
        K and V; every source is read before any destination is written."""
        dim = 2 + self.block_dim  # kv_cache: [2, num_layers, *kv_cache_shape]
        src, dst = torch.tensor(pairs, dtype=torch.int64, device=kv_cache.device).unbind(1)
        kv_cache.index_copy_(dim, dst, kv_cache.index_select(dim, src))

    def swap_blocks(self, src_cache: torch.Tensor, dst_cache: torch.Tensor, pairs: list[tuple[int, int]]) -> None:
        """Move whole blocks between the device pool and the host swap space (either way), per (src, dst) pair."""
        dim = 2 + self.block_dim
        src, dst = torch.tensor(pairs, dtype=torch.int64).unbind(1)
        blocks = src_cache.index_select(dim, src.to(src_cache.device)).to(dst_cache.device)
        dst_cache.index_copy_(dim, dst.to(dst_cache.device), blocks)
