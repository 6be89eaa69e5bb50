"""Paged attention in plain torch ops: the reference backend, the CUDA path until the Triton kernels exist, and
the CPU fallback where the compiled kernel cannot be built (the CPU backend reuses its prefill path).

The cache is head-major, [kv_heads, num_blocks, block_size, head_dim] per layer, so that gathering a group of
sequences' blocks with one index_select yields, for every kv head, each sequence's keys as one contiguous
[keys, head_dim] slab: batched matmuls then read them in place. Decodes (one query each) use two bmm calls with
the grouped query heads of a kv head stacked as rows; prefill chunks use SDPA with a causal mask over the
cached prefix. Decodes are sorted by context length and split into buckets so that short contexts are not
padded to the longest one.

Gathering whole blocks also gathers the slots past each sequence's context (the rest of its last block, and the
padding block 0 of shorter tables): they hold whatever the pool held, NaN or inf included. A masked score gives
such a slot weight 0, but 0 * NaN is NaN in the weighted sum of V, so those slots are zeroed in the gathered copy
(never in the cache) before the matmuls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from engine.attention.backend import AttentionBackend, AttentionInputs
from engine.block_manager import blocks_for

# Decodes per bucket: smaller buckets pad less but cost more kernel launches per layer.
_DECODE_BUCKET = 16


@dataclass
class _DecodeBucket:
    """Decodes of similar context length, their keys gathered and padded to the bucket's longest."""

    rows: torch.Tensor  # [seqs] rows of the flat batch in this bucket
    block_ids: torch.Tensor  # [seqs * max_blocks] int64: blocks to gather, padded with block 0
    num_keys: int  # max_blocks * block_size
    bias: torch.Tensor  # [seqs, 1, num_keys] additive mask (0 / -inf)
    unwritten: torch.Tensor  # [1, seqs, num_keys, 1] bool: slots past each context, zeroed after the gather


@dataclass
class _PrefillGroup:
    """Every prefill chunk of the step, queries and keys padded to the longest."""

    block_ids: torch.Tensor  # [seqs * max_blocks] int64
    num_keys: int
    mask: torch.Tensor  # [seqs, 1, q_len, num_keys] bool, True = attend
    query_index: torch.Tensor  # [seqs, q_len] int64 into the prefill tokens
    query_valid: torch.Tensor  # [seqs, q_len] bool
    unwritten: torch.Tensor  # [1, seqs, num_keys, 1] bool: slots past each context, zeroed after the gather


@dataclass
class TorchAttentionMetadata:
    slot_mapping: torch.Tensor
    num_decodes: int
    decode: Any  # whatever prepare_decodes() returned (here: a list of _DecodeBucket)
    prefill: _PrefillGroup | None


class TorchAttentionBackend(AttentionBackend):
    block_dim = 1

    def __init__(self, block_size: int, scale: float, sliding_window: int | None = None) -> None:
        self.block_size = block_size
        self.scale = scale
        self.sliding_window = sliding_window

    @staticmethod
    def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
        return (num_kv_heads, num_blocks, block_size, head_dim)

    def prepare(self, inputs: AttentionInputs) -> TorchAttentionMetadata:
        decode = self.prepare_decodes(inputs) if inputs.num_decodes else None
        prefill = None
        if inputs.num_prefills:
            prefill = self._prefill_group(
                inputs.prefill_block_tables, inputs.prefill_context_lens, inputs.prefill_query_lens
            )
        return TorchAttentionMetadata(inputs.slot_mapping, inputs.num_decodes, decode, prefill)

    def prepare_decodes(self, inputs: AttentionInputs) -> Any:
        buckets = []
        order = torch.argsort(inputs.decode_context_lens)
        for rows in order.split(_DECODE_BUCKET):
            lens = inputs.decode_context_lens[rows]
            buckets.append(self._decode_group(inputs.decode_block_tables[rows], lens, rows))
        return buckets

    def attend_decodes(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, decode: Any
    ) -> torch.Tensor:
        """q: [num_decodes, heads, dim] -> [num_decodes, heads, dim]."""
        out = torch.empty_like(q)
        for g in decode:
            out[g.rows] = self._decode(q[g.rows], k_cache, v_cache, g)
        return out

    def _decode_group(
        self, block_tables: torch.Tensor, context_lens: torch.Tensor, rows: torch.Tensor
    ) -> _DecodeBucket:
        max_blocks = blocks_for(int(context_lens.max()), self.block_size)
        num_keys = max_blocks * self.block_size
        key_pos = torch.arange(num_keys, device=context_lens.device)
        written = key_pos[None, :] < context_lens[:, None]  # [seqs, num_keys]
        keep = written
        if self.sliding_window is not None:
            keep = written & (key_pos[None, :] >= context_lens[:, None] - self.sliding_window)
        bias = torch.zeros(keep.shape, dtype=torch.float32, device=keep.device).masked_fill_(~keep, float("-inf"))
        unwritten = ~written[None, :, :, None]
        return _DecodeBucket(rows, block_tables[:, :max_blocks].reshape(-1), num_keys, bias.unsqueeze(1), unwritten)

    def _prefill_group(self, block_tables, context_lens, query_lens) -> _PrefillGroup:
        _num_seqs, max_blocks = block_tables.shape
        device = block_tables.device
        num_keys = max_blocks * self.block_size
        q_len = int(query_lens.max())
        key_pos = torch.arange(num_keys, device=device)
        q_off = torch.arange(q_len, device=device)
        # Absolute position of each query: the chunk ends at context_len - 1.
        q_pos = (context_lens - query_lens)[:, None] + q_off[None, :]  # [seqs, q_len]
        mask = key_pos[None, None, :] <= q_pos[:, :, None]  # causal over prefix + chunk
        if self.sliding_window is not None:
            mask &= key_pos[None, None, :] > q_pos[:, :, None] - self.sliding_window
        query_valid = q_off[None, :] < query_lens[:, None]  # [seqs, q_len]
        starts = torch.cumsum(query_lens, 0) - query_lens
        query_index = torch.where(query_valid, starts[:, None] + q_off[None, :], 0)
        # A padding query attends to key 0 only, so softmax never sees an all-masked row.
        mask |= (~query_valid[:, :, None]) & (key_pos[None, None, :] == 0)
        unwritten = (key_pos[None, :] >= context_lens[:, None])[None, :, :, None]
        return _PrefillGroup(block_tables.reshape(-1), num_keys, mask.unsqueeze(1), query_index, query_valid, unwritten)

    def forward(self, q, k, v, k_cache, v_cache, metadata: TorchAttentionMetadata) -> torch.Tensor:
        num_kv_heads, _num_blocks, _block_size, head_dim = k_cache.shape
        # Write the new K/V into their slots first, so each query also sees its own token.
        slots = metadata.slot_mapping
        k_cache.view(num_kv_heads, -1, head_dim).index_copy_(1, slots, k.transpose(0, 1).to(k_cache.dtype))
        v_cache.view(num_kv_heads, -1, head_dim).index_copy_(1, slots, v.transpose(0, 1).to(v_cache.dtype))
        out = torch.empty_like(q)
        nd = metadata.num_decodes
        if nd:
            out[:nd] = self.attend_decodes(q[:nd], k_cache, v_cache, metadata.decode)
        if metadata.prefill is not None:
            g = metadata.prefill
            qp = q[nd:][g.query_index]  # [seqs, q_len, heads, dim]
            out[nd:] = self._prefill(qp, k_cache, v_cache, g)[g.query_valid]
        return out

    @staticmethod
    def _gather(
        cache: torch.Tensor, block_ids: torch.Tensor, num_keys: int, dtype: torch.dtype, unwritten: torch.Tensor
    ) -> torch.Tensor:
        """-> [kv_heads, seqs, num_keys, dim], upcast when the cache holds 16-bit values, the unwritten slots 0."""
        num_kv_heads, num_blocks, _block_size, head_dim = cache.shape
        rows = cache.view(num_kv_heads, num_blocks, -1).index_select(1, block_ids)  # a copy: the cache stays as is
        return rows.view(num_kv_heads, -1, num_keys, head_dim).to(dtype).masked_fill_(unwritten, 0)

    def _decode(self, q: torch.Tensor, k_cache, v_cache, g: _DecodeBucket) -> torch.Tensor:
        """q: [seqs, heads, dim] -> [seqs, heads, dim]."""
        s, h, d = q.shape
        kvh = k_cache.shape[0]
        k = self._gather(k_cache, g.block_ids, g.num_keys, q.dtype, g.unwritten).view(kvh * s, g.num_keys, d)
        v = self._gather(v_cache, g.block_ids, g.num_keys, q.dtype, g.unwritten).view(kvh * s, g.num_keys, d)
        # The h // kvh query heads that share a kv head become rows of one matmul: [kvh * s, h // kvh, d].
        qg = q.view(s, kvh, h // kvh, d).transpose(0, 1).reshape(kvh * s, h // kvh, d)
        scores = torch.bmm(qg, k.transpose(1, 2)).mul_(self.scale)  # [kvh * s, h // kvh, keys]
        scores = scores.view(kvh, s, h // kvh, g.num_keys).add_(g.bias).softmax(dim=-1)
        o = torch.bmm(scores.view(kvh * s, h // kvh, g.num_keys), v)  # [kvh * s, h // kvh, d]
        return o.view(kvh, s, h // kvh, d).transpose(0, 1).reshape(s, h, d)

    def _prefill(self, q: torch.Tensor, k_cache, v_cache, g: _PrefillGroup) -> torch.Tensor:
        """q: [seqs, q_len, heads, dim] -> [seqs, q_len, heads, dim]."""
        # [seqs, kv_heads, keys, dim]
        k = self._gather(k_cache, g.block_ids, g.num_keys, q.dtype, g.unwritten).transpose(0, 1)
        v = self._gather(v_cache, g.block_ids, g.num_keys, q.dtype, g.unwritten).transpose(0, 1)
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k, v, attn_mask=g.mask, scale=self.scale, enable_gqa=k.shape[1] != q.shape[2]
        )
        return o.transpose(1, 2)
