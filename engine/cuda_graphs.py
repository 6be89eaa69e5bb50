"""Decode steps replayed from captured CUDA graphs.

A decode step of a small model is a few hundred tiny kernel launches; launching them one by one from Python
costs more than running them. So, at start-up, the forward pass of a decode-only batch is captured once per batch
size in graph_batch_sizes() (a step's batch is padded up to the next one), reading its inputs from static
tensors. A step then copies its inputs into those tensors and replays the graph. Padding rows write nowhere (slot
-1, which the cache write skips) and attend to one slot of block 0; their outputs are dropped.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.attention.backend import AttentionInputs
from engine.attention.triton_backend import TritonAttentionBackend, TritonAttentionMetadata
from engine.models.layers import ForwardContext


def graph_batch_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 64, then every 16, up to max_batch (which is always included)."""
    sizes = [s for s in (1, 2, 4) if s < max_batch]
    sizes += list(range(8, min(64, max_batch) + 1, 8)) + list(range(80, max_batch + 1, 16))
    if not sizes or sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


class DecodeGraphs:
    def __init__(
        self, model: nn.Module, backend: TritonAttentionBackend, kv_cache: torch.Tensor, max_batch: int, max_blocks: int
    ) -> None:
        self.model, self.backend, self.kv_cache = model, backend, kv_cache
        self.sizes = graph_batch_sizes(max_batch)
        device = kv_cache.device
        self.input_ids = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((max_batch,), -1, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros((max_batch, max_blocks), dtype=torch.int32, device=device)
        self.context_lens = torch.ones(max_batch, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    @torch.inference_mode()
    def capture(self) -> None:
        pool = None
        for size in reversed(self.sizes):  # largest first: the smaller graphs reuse its memory pool
            ctx = ForwardContext(self.backend, self._metadata(size), self.kv_cache)
            self.model(self.input_ids[:size], self.positions[:size], ctx)  # warm-up: compiles the kernels
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self.model(self.input_ids[:size], self.positions[:size], ctx)
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()

    def _metadata(self, size: int) -> TritonAttentionMetadata:
        # The full-width block table fixes decode's context splits for the longest context a sequence can reach;
        # splits that start past a sequence's end do no work.
        return TritonAttentionMetadata(
            self.slot_mapping[:size], size, self.block_tables[:size], self.context_lens[:size], None, None, None
        )

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor | None:
        """The hidden states [n, hidden] of a decode-only step, or None when n is larger than every graph."""
        n = input_ids.shape[0]
        size = next((s for s in self.sizes if s >= n), None)
        if size is None:
            return None
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(inputs.slot_mapping)
        self.slot_mapping[n:size].fill_(-1)
        width = inputs.decode_block_tables.shape[1]
        self.block_tables[:size].zero_()
        self.block_tables[:n, :width].copy_(inputs.decode_block_tables)
        self.context_lens[:n].copy_(inputs.decode_context_lens)
        self.context_lens[n:size].fill_(1)
        self.graphs[size].replay()
        return self.outputs[size][:n]
