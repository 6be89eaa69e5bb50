"""SchedulerOutput -> one flat batch (tokens, positions, slots, block tables) -> forward -> logits to sample."""
from __future__ import annotations

import torch
from torch import nn

from engine.attention.backend import AttentionBackend, AttentionInputs
from engine.block_manager import blocks_for
from engine.models.layers import ForwardContext
from engine.scheduler import SchedulerOutput
from engine.sequence import Sequence


class ModelRunner:
    def __init__(self, model: nn.Module, backend: AttentionBackend, kv_cache: torch.Tensor, block_size: int,
                 device: torch.device) -> None:
        self.model = model
        self.backend = backend
        self.kv_cache = kv_cache   # [2, num_layers, *backend.kv_cache_shape(...)]
        self.block_size = block_size
        self.device = device

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> tuple[list[Sequence], torch.Tensor]:
        """Run one step. Returns the sequences that sample a token (those whose chunk reaches their last token)
        and their logits [len(seqs), vocab] float32, in the same order."""
        input_ids, positions, inputs, sample_rows, sample_seqs = self._prepare(out)
        ctx = ForwardContext(self.backend, self.backend.prepare(inputs), self.kv_cache)
        hidden = self.model(input_ids, positions, ctx)              # [num_tokens, hidden]
        if not sample_seqs:
            return [], hidden.new_empty((0, 0), dtype=torch.float32)
        return sample_seqs, self.model.compute_logits(hidden[sample_rows])

    def _prepare(self, out: SchedulerOutput):
        bs = self.block_size
        tokens: list[int] = []
        pos_chunks: list[torch.Tensor] = []
        sample_rows: list[int] = []
        sample_seqs: list[Sequence] = []
        # Decodes: one token each at position num_computed_tokens.
        dec_pos = [s.num_computed_tokens for s in out.decodes]
        tokens.extend(s.token_ids[p] for s, p in zip(out.decodes, dec_pos))
        sample_rows.extend(range(len(out.decodes)))
        sample_seqs.extend(out.decodes)
        pos_chunks.append(torch.tensor(dec_pos, dtype=torch.int64))
        # Prefill chunks: tokens [start, start + n) of each sequence.
        q_lens, p_ctx = [], []
        for seq, n in out.prefills:
            start = seq.num_computed_tokens
            tokens.extend(seq.token_ids[start:start + n])
            pos_chunks.append(torch.arange(start, start + n, dtype=torch.int64))
            q_lens.append(n)
            p_ctx.append(start + n)
            if start + n == seq.num_tokens:
                sample_rows.append(len(tokens) - 1)
                sample_seqs.append(seq)
        positions = torch.cat(pos_chunks)
        seqs = out.decodes + [s for s, _ in out.prefills]
        # Slot of every token: its sequence's block at position // bs, offset position % bs.
        tables = _padded([s.block_table for s in seqs])                        # [num_seqs, max_blocks]
        seq_of_token = torch.repeat_interleave(torch.arange(len(seqs)), torch.tensor([1] * len(out.decodes) + q_lens))
        slots = tables[seq_of_token, positions // bs] * bs + positions % bs    # [num_tokens]
        nd = len(out.decodes)
        dev = self.device
        inputs = AttentionInputs(
            slot_mapping=slots.to(dev),
            num_decodes=nd,
            decode_context_lens=torch.tensor([p + 1 for p in dec_pos], dtype=torch.int64, device=dev),
            decode_block_tables=_trim(tables[:nd], max(dec_pos, default=-1) + 1, bs).to(dev),
            prefill_query_lens=torch.tensor(q_lens, dtype=torch.int64, device=dev),
            prefill_context_lens=torch.tensor(p_ctx, dtype=torch.int64, device=dev),
            prefill_block_tables=_trim(tables[nd:], max(p_ctx, default=0), bs).to(dev),
        )
        input_ids = torch.tensor(tokens, dtype=torch.int64, device=dev)
        return input_ids, positions.to(dev), inputs, torch.tensor(sample_rows, device=dev), sample_seqs


def _padded(tables: list[list[int]]) -> torch.Tensor:
    width = max((len(t) for t in tables), default=0)
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int64).view(len(tables), width)


def _trim(tables: torch.Tensor, max_context: int, block_size: int) -> torch.Tensor:
    """Keep only the block columns a group's longest context needs."""
    return tables[:, :blocks_for(max_context, block_size)]
