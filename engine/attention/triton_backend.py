"""The GPU backend: Triton kernels for the cache write, decode attention and varlen prefill attention.

The cache is block-major, [num_blocks, kv_heads, block_size, head_dim] per layer: one block of one kv head is a
contiguous [block_size, head_dim] tile, which is what the kernels load per step of their loop over a sequence's
block table. New K/V are written into their slots first (reshape_and_cache), so the prefill kernel reads a
sequence's cached prefix and its new tokens alike from the cache. On the CPU these kernels run only under
Triton's interpreter (the tests); the engine picks this backend on CUDA.

Metadata holds device tensors only and forward() never reads a value back to the host, so a decode step can be
captured in a CUDA graph and replayed with new contents in the same tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.attention.backend import AttentionBackend, AttentionInputs
from kernels.triton_attention import paged_decode_attention
from kernels.triton_cache import copy_blocks, reshape_and_cache, swap_blocks
from kernels.triton_prefill import prefill_attention


@dataclass
class TritonAttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64, -1 for padding tokens (skipped)
    num_decodes: int
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks] int32
    decode_context_lens: torch.Tensor  # [num_decodes] int32
    prefill_cu_query_lens: torch.Tensor | None  # [num_prefills + 1] int32
    prefill_context_lens: torch.Tensor | None  # [num_prefills] int32
    prefill_block_tables: torch.Tensor | None  # [num_prefills, max_blocks] int32


class TritonAttentionBackend(AttentionBackend):
    block_dim = 0
    fused_kernels = True

    def __init__(
        self,
        block_size: int,
        scale: float,
        sliding_window: int | None = None,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ) -> None:
        self.block_size = block_size
        self.scale = scale
        self.sliding_window = sliding_window
        self.k_scale, self.v_scale = k_scale, v_scale  # fp8 caches: stored = value / scale

    @staticmethod
    def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
        return (num_blocks, num_kv_heads, block_size, head_dim)

    def prepare(self, inputs: AttentionInputs) -> TritonAttentionMetadata:
        nd = inputs.num_decodes
        prefill = (None, None, None)
        if inputs.num_prefills:
            q_lens = inputs.prefill_query_lens.to(torch.int32)
            cu = torch.zeros(q_lens.numel() + 1, dtype=torch.int32, device=q_lens.device)
            torch.cumsum(q_lens, 0, out=cu[1:])
            prefill = (cu, inputs.prefill_context_lens.to(torch.int32), inputs.prefill_block_tables.to(torch.int32))
        return TritonAttentionMetadata(
            inputs.slot_mapping,
            nd,
            inputs.decode_block_tables.to(torch.int32),
            inputs.decode_context_lens.to(torch.int32),
            *prefill,
        )

    def forward(self, q, k, v, k_cache, v_cache, metadata: TritonAttentionMetadata) -> torch.Tensor:
        m = metadata
        reshape_and_cache(k, v, k_cache, v_cache, m.slot_mapping, self.k_scale, self.v_scale)
        nd = m.num_decodes
        # Decode splits the context across programs ("flash decoding") when the batch alone cannot fill the GPU;
        # the kernel decides from the block table's width, a shape, so a captured graph keeps its choice.
        if m.prefill_cu_query_lens is None:
            return paged_decode_attention(
                q,
                k_cache,
                v_cache,
                m.decode_block_tables,
                m.decode_context_lens,
                self.scale,
                self.sliding_window,
                self.k_scale,
                self.v_scale,
            )
        out = torch.empty_like(q)
        if nd:
            out[:nd] = paged_decode_attention(
                q[:nd],
                k_cache,
                v_cache,
                m.decode_block_tables,
                m.decode_context_lens,
                self.scale,
                self.sliding_window,
                self.k_scale,
                self.v_scale,
            )
        out[nd:] = prefill_attention(
            q[nd:],
            k_cache,
            v_cache,
            m.prefill_cu_query_lens,
            m.prefill_context_lens,
            m.prefill_block_tables,
            self.scale,
            self.sliding_window,
            self.k_scale,
            self.v_scale,
        )
        return out

    def copy_blocks(self, kv_cache: torch.Tensor, pairs: list[tuple[int, int]]) -> None:
        # Ids built on the host: the wrapper checks them there and moves them to the device itself.
        ids = torch.tensor(pairs, dtype=torch.int64)  # [pairs, 2]
        copy_blocks(kv_cache, ids[:, 0], ids[:, 1])

    def swap_blocks(self, src_cache: torch.Tensor, dst_cache: torch.Tensor, pairs: list[tuple[int, int]]) -> None:
        ids = torch.tensor(pairs, dtype=torch.int64)
        swap_blocks(src_cache, dst_cache, ids[:, 0], ids[:, 1])
