"""SchedulerOutput -> block copies, then one flat batch (tokens, positions, slots, block tables) -> forward ->
logits to sample (and, for requests that ask for prompt logprobs, logits of their prompt positions).

The runner also owns what the forward pass needs set up once: the KV pool (sized on CUDA by profiling the
peak memory of a full-budget prefill) and, for decode-only steps, the CUDA graphs on CUDA with the Triton kernels
or the fused decode step on the CPU (engine/models/cpu_decode.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from engine import kv_cache
from engine.attention.backend import AttentionBackend, AttentionInputs
from engine.block_manager import blocks_for
from engine.config import DEFAULT_CPU_KV_CACHE_GIB, EngineConfig, ModelConfig
from engine.host_memory import HeapTrimmer
from engine.models.layers import ForwardContext
from engine.scheduler import SchedulerOutput
from engine.sequence import Sequence


@dataclass
class StepResult:
    sample_seqs: list[Sequence]  # the sequences whose chunk reached their last token, in logits' row order
    logits: torch.Tensor  # [len(sample_seqs), vocab] float32
    # (sequence, position of the chunk's first token, logits [chunk tokens, vocab] float32) for every prefill
    # chunk of a sequence that owes prompt logprobs; row i predicts the token at position + i + 1.
    prompt_logits: list[tuple[Sequence, int, torch.Tensor]] = field(default_factory=list)
    # (sequence, logits [1 + drafts, vocab] float32) for every speculative decode: row i follows its i-th draft.
    spec_logits: list[tuple[Sequence, torch.Tensor]] = field(default_factory=list)


@dataclass(frozen=True)
class KVCacheSize:
    num_blocks: int
    num_swap_blocks: int


class ModelRunner:
    def __init__(
        self,
        model: nn.Module,
        backend: AttentionBackend,
        model_config: ModelConfig,
        block_size: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.backend = backend
        self.model_config = model_config
        self.block_size = block_size
        self.device = device
        self.kv_cache: torch.Tensor | None = None  # [2, num_layers, *backend.kv_cache_shape(num_blocks, ...)]
        self.swap_cache: torch.Tensor | None = None  # the same layout with num_swap_blocks, in host memory
        self.graphs = None  # DecodeGraphs once captured (CUDA only): decode-only steps replay them
        self.fused_decode = None  # CpuDecodeStep once built (CPU only): decode-only steps run it
        # On the CPU a long prefill's activations would otherwise stay resident (see engine/host_memory.py).
        self.heap = HeapTrimmer() if device.type == "cpu" else None
        if self.heap is not None:
            # What loading the weights freed (file reads, dequantized copies): SmolLM2 Q4_1 holds 16 MiB less.
            self.heap.trim()

    # ---- set-up ----------------------------------------------------------------------------------------------
    def init_kv_cache(self, config: EngineConfig, max_num_batched_tokens: int) -> KVCacheSize:
        """Size and allocate the KV pool and the host swap space; returns their sizes in blocks."""
        m, bs = self.model_config, self.block_size
        if self.device.type == "cuda" and config.kv_cache_memory is None:
            budget = self._cuda_kv_budget(config.gpu_memory_utilization, max_num_batched_tokens)
            what = f"gpu_memory_utilization={config.gpu_memory_utilization}"
        else:
            gib = config.kv_cache_memory or DEFAULT_CPU_KV_CACHE_GIB
            budget, what = int(gib * 2**30), f"kv_cache_memory={gib} GiB"
        num_blocks = kv_cache.num_kv_blocks(config, m, budget, what)
        # Not zeroed: every backend reads a slot only once its KV is written (tests poison the pool with NaN to
        # prove it), and pages never written cost no physical memory: a 2 GiB pool that holds one chat's blocks
        # is resident only as far as those blocks.
        self.kv_cache = torch.empty(
            kv_cache.cache_shape(self.backend, m, num_blocks, bs), dtype=m.kv_cache_dtype, device=self.device
        )
        # The swap space only ever receives whole blocks copied from the pool, so it needs no zeroing, and pages
        # never written cost no physical memory.
        num_swap = kv_cache.num_swap_blocks(config, m)
        self.swap_cache = torch.empty(
            kv_cache.cache_shape(self.backend, m, num_swap, bs), dtype=m.kv_cache_dtype, device="cpu"
        )
        return KVCacheSize(num_blocks, num_swap)

    def _cuda_kv_budget(self, gpu_memory_utilization: float, max_num_batched_tokens: int) -> int:
        """Bytes left for KV blocks after weights and the peak activations of a full-budget prefill."""
        m, bs = self.model_config, self.block_size
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        n = min(max_num_batched_tokens, m.max_model_len)
        probe_blocks = blocks_for(n, bs)
        probe = torch.empty(
            kv_cache.cache_shape(self.backend, m, probe_blocks, bs), dtype=m.kv_cache_dtype, device=self.device
        )
        # One prefill of n tokens over blocks 0 .. probe_blocks - 1.
        positions = torch.arange(n, device=self.device)
        inputs = AttentionInputs(
            slot_mapping=positions,
            num_decodes=0,
            decode_context_lens=torch.zeros(0, dtype=torch.int64, device=self.device),
            decode_block_tables=torch.zeros((0, 0), dtype=torch.int64, device=self.device),
            prefill_query_lens=torch.tensor([n], device=self.device),
            prefill_context_lens=torch.tensor([n], device=self.device),
            prefill_block_tables=torch.arange(probe_blocks, device=self.device)[None],
        )
        with torch.inference_mode():
            hidden = self.model(
                torch.zeros(n, dtype=torch.int64, device=self.device),
                positions,
                ForwardContext(self.backend, self.backend.prepare(inputs), probe),
            )
            self.model.compute_logits(hidden[-1:])
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - probe.numel() * probe.element_size()
        del probe, hidden
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(self.device).total_memory
        return int(total * gpu_memory_utilization - peak)

    def capture_cuda_graphs(self, max_batch: int) -> None:
        """Capture the decode forward pass for each graph batch size up to max_batch (CUDA and the fused Triton
        kernels only); later decode-only steps replay them."""
        from engine.cuda_graphs import DecodeGraphs

        assert self.device.type == "cuda" and self.backend.fused_kernels and self.kv_cache is not None
        max_blocks = blocks_for(self.model_config.max_model_len, self.block_size)
        self.graphs = DecodeGraphs(self.model, self.backend, self.kv_cache, max_batch, max_blocks)
        self.graphs.capture()

    def build_fused_decode(self) -> bool:
        """Build the CPU's fused decode step over the model's weights and the KV pool; later decode-only steps run
        it. Returns whether it applies here (the cpu attention backend, float32, kernels that build)."""
        from engine.models.cpu_decode import CpuDecodeStep

        assert self.kv_cache is not None
        self.fused_decode = CpuDecodeStep.from_model(self.model, self.backend, self.kv_cache)
        return self.fused_decode is not None

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> StepResult:
        """Run one step: the block copies the scheduler decided, then the forward pass over the flat batch."""
        self._move_blocks(out)
        if out.is_empty:
            return StepResult([], torch.empty((0, 0)))
        input_ids, positions, inputs, sample_rows, sample_seqs = self._prepare(out)
        hidden = None  # [num_tokens, hidden]
        if self.graphs is not None and not out.prefills:
            hidden = self.graphs.run(input_ids, positions, inputs)
        elif self.fused_decode is not None and not out.prefills:
            hidden = self.fused_decode.run(input_ids, positions, inputs)
        if hidden is None:
            ctx = ForwardContext(self.backend, self.backend.prepare(inputs), self.kv_cache)
            hidden = self.model(input_ids, positions, ctx)
        result = StepResult(sample_seqs, hidden.new_empty((0, 0), dtype=torch.float32))
        row = len(out.decodes)
        for seq, n in out.spec_decodes:
            result.spec_logits.append((seq, self.model.compute_logits(hidden[row : row + n])))
            row += n
        for seq, n in out.prefills:
            if seq.needs_prompt_logprobs:
                logits = self.model.compute_logits(hidden[row : row + n])
                result.prompt_logits.append((seq, seq.num_computed_tokens, logits))
            row += n
        if sample_seqs:
            result.logits = self.model.compute_logits(hidden[sample_rows])
        del hidden
        if self.heap is not None:
            self.heap.after_step(out.num_prefill_tokens)
        return result

    def _move_blocks(self, out: SchedulerOutput) -> None:
        """Swap out, swap in, then copy-on-write, each batched over every layer's K and V. Order matters: blocks
        swapped out this step may be handed to other sequences that write them in the forward pass, so every
        copy completes before it."""
        if out.swap_out:
            self.backend.swap_blocks(self.kv_cache, self.swap_cache, out.swap_out)
        if out.swap_in:
            self.backend.swap_blocks(self.swap_cache, self.kv_cache, out.swap_in)
        if out.copies:
            self.backend.copy_blocks(self.kv_cache, out.copies)

    def _prepare(self, out: SchedulerOutput):
        """-> (input_ids, positions, AttentionInputs, the rows of hidden that sample, the sequences they sample)."""
        # Decode rows, one query token each: a decode's token at position num_computed_tokens; a speculative
        # decode's last token and drafts, one row per position, each attending to the keys up to its own (the
        # drafts' KV is written first), so the backends' decode kernels verify drafts as they decode.
        rows: list[tuple[Sequence, int, int]] = [(s, s.num_computed_tokens, s.token_ids[-1]) for s in out.decodes]
        for seq, _ in out.spec_decodes:
            start = seq.num_computed_tokens
            rows += [(seq, start + i, tok) for i, tok in enumerate([seq.token_ids[start], *seq.spec_token_ids])]
        if not out.prefills:
            return self._prepare_decode(out, rows)
        bs = self.block_size
        tokens = [tok for _, _, tok in rows]
        dec_pos = [pos for _, pos, _ in rows]
        pos_chunks = [torch.tensor(dec_pos, dtype=torch.int64)]
        sample_rows = list(range(len(out.decodes)))
        sample_seqs = list(out.decodes)
        # Prefill chunks: tokens [start, start + n) of each sequence, attending to its cached prefix too.
        q_lens, p_ctx = [], []
        for seq, n in out.prefills:
            start = seq.num_computed_tokens
            tokens.extend(seq.token_ids[start : start + n])
            pos_chunks.append(torch.arange(start, start + n, dtype=torch.int64))
            q_lens.append(n)
            p_ctx.append(start + n)
            if start + n == seq.num_tokens:
                sample_rows.append(len(tokens) - 1)
                sample_seqs.append(seq)
        positions = torch.cat(pos_chunks)
        # Slot of every token: its sequence's block at position // bs, offset position % bs.
        tables = _padded([s.block_table for s, _, _ in rows] + [s.block_table for s, _ in out.prefills])
        seq_of_token = torch.repeat_interleave(torch.arange(tables.shape[0]), torch.tensor([1] * len(rows) + q_lens))
        slots = tables[seq_of_token, positions // bs] * bs + positions % bs  # [num_tokens]
        nd = len(rows)
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

    def _prepare_decode(self, out: SchedulerOutput, rows: list[tuple[Sequence, int, int]]):
        """_prepare for a step of decode rows only (the common step while a chat streams): the per-row values
        worked out in Python and made into two tensors, not a dozen small tensor ops."""
        bs = self.block_size
        width = blocks_for(max(pos for _, pos, _ in rows) + 1, bs)
        table_rows = []
        per_row: list[list[int]] = [[], [], [], []]  # token, position, slot, context length
        for seq, pos, tok in rows:
            table = seq.block_table
            per_row[0].append(tok)
            per_row[1].append(pos)
            per_row[2].append(table[pos // bs] * bs + pos % bs)
            per_row[3].append(pos + 1)
            row = table[:width]
            table_rows.append(row if len(row) == width else row + [0] * (width - len(row)))
        dev = self.device
        values = torch.tensor(per_row, dtype=torch.int64).to(dev)  # [4, rows]
        no_prefill = values.new_zeros(0)
        inputs = AttentionInputs(
            slot_mapping=values[2],
            num_decodes=len(rows),
            decode_context_lens=values[3],
            decode_block_tables=torch.tensor(table_rows, dtype=torch.int64).view(len(rows), width).to(dev),
            prefill_query_lens=no_prefill,
            prefill_context_lens=no_prefill,
            prefill_block_tables=values.new_zeros((0, 0)),
        )
        # The decodes sample from their rows, which come first and in order: a slice, not a gather.
        return values[0], values[1], inputs, slice(0, len(out.decodes)), list(out.decodes)


def _padded(tables: list[list[int]]) -> torch.Tensor:
    width = max((len(t) for t in tables), default=0)
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int64).view(len(tables), width)


def _trim(tables: torch.Tensor, max_context: int, block_size: int) -> torch.Tensor:
    """Keep only the block columns a group's longest context needs."""
    return tables[:, : blocks_for(max_context, block_size)]
