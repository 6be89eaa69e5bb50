"""Continuous batching: which sequences run this step and how many tokens each, under a token budget.

Every step: running sequences first, decodes (one token each) before unfinished prefill chunks, then waiting
sequences are admitted in arrival order with chunked prefill while budget, sequence slots and blocks last. When
the pool cannot grow a running sequence, the most recently admitted sequence not yet scheduled this step is
preempted by recompute: its blocks are freed and it returns to the front of the queue, keeping its output tokens,
which it later recomputes like prompt tokens (the prefix cache usually still holds most of them).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    """What the model runner executes this step. Decodes come first in the flat batch, then prefill chunks."""
    decodes: list[Sequence] = field(default_factory=list)
    prefills: list[tuple[Sequence, int]] = field(default_factory=list)   # (sequence, tokens in this chunk)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.decodes and not self.prefills

    @property
    def num_batched_tokens(self) -> int:
        return len(self.decodes) + sum(n for _, n in self.prefills)

    def scheduled(self) -> list[tuple[Sequence, int]]:
        return [(s, 1) for s in self.decodes] + self.prefills


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        scheduled: set[int] = set()
        decoding = [s for s in self.running if s.num_tokens - s.num_computed_tokens == 1]
        prefilling = [s for s in self.running if s.num_tokens - s.num_computed_tokens > 1]
        for seq in decoding + prefilling:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:   # preempted earlier in this loop
                continue
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self._allocate_or_preempt(seq, num_new, scheduled, out):
                continue
            scheduled.add(seq.seq_id)
            budget -= num_new
            self._add_to_output(out, seq, num_new)
        if not out.preempted:   # a pool that just ran short admits nobody new
            self._admit_waiting(out, budget)
        return out

    def _allocate_or_preempt(self, seq: Sequence, num_new: int, scheduled: set[int],
                             out: SchedulerOutput) -> bool:
        while not self.block_manager.allocate_slots(seq, num_new):
            victim = next((s for s in reversed(self.running) if s.seq_id not in scheduled), seq)
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        bm = self.block_manager
        # Chain hashes of the full blocks that sequences admitted in this step will compute. A block enters the
        # prefix cache only after the step that writes it, so a request that would compute one of them again
        # (requests arriving together with the same system prompt) waits one step and takes it from the cache.
        in_flight: set[bytes] = set()
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            bm.match_prefix(seq)
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            first = seq.num_computed_tokens // bm.block_size
            computes = seq.block_hashes[first:(seq.num_computed_tokens + num_new) // bm.block_size]
            if (computes and computes[0] in in_flight) or not bm.allocate_slots(seq, num_new):
                bm.free(seq)   # give back the prefix hits: holding them while waiting could starve the pool
                seq.num_computed_tokens = seq.num_cached_tokens = 0
                break
            in_flight.update(computes)
            bm.count_lookup(seq)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            budget -= num_new
            self._add_to_output(out, seq, num_new)

    @staticmethod
    def _add_to_output(out: SchedulerOutput, seq: Sequence, num_new: int) -> None:
        if num_new == 1 and seq.num_tokens - seq.num_computed_tokens == 1:
            out.decodes.append(seq)
        else:
            out.prefills.append((seq, num_new))

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def on_step_done(self, out: SchedulerOutput) -> None:
        """Advance each scheduled sequence past the tokens whose KV the step wrote; cache blocks that filled."""
        for seq, num_new in out.scheduled():
            seq.num_computed_tokens += num_new
            self.block_manager.cache_full_blocks(seq)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and free its blocks at once."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
