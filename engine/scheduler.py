"""Continuous batching: which sequences run this step and how many tokens each, under a token budget.

Requests are SequenceGroups; queues hold groups, and a step schedules their sequences one by one. Every step:
running sequences first, decodes (one token each) before unfinished prefill chunks; then swapped-out groups come
back while the pool allows; then, once nothing is swapped out, waiting groups are admitted in arrival order with
chunked prefill while budget, sequence slots and blocks last.

Preemption. When the pool cannot grow a running sequence, the most recently admitted group with nothing
scheduled this step is preempted (the sequence's own group when no other is left). vLLM's policy picks how:
- a group with several live sequences (parallel samples, beams) is swapped out: its blocks move to the CPU swap
  space, shared blocks once, so the sharing survives; recomputing would give every sequence its own copy;
- a group with one sequence is recomputed: its blocks are freed and it returns to the front of the queue with its
  output tokens, which are recomputed like prompt tokens (the prefix cache usually still holds most of them);
- `preemption_mode` forces one of them; a swap that does not fit in the swap space falls back to recompute.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.block_manager import NO_COMPUTED_BLOCKS, BlockManager
from engine.config import PREEMPTION_MODES
from engine.sequence import Sequence, SequenceGroup, SequenceStatus


@dataclass
class SchedulerOutput:
    """What the runner executes this step: block copies first (swap out, swap in, copy-on-write), then one flat
    batch with the decodes first, then the speculative decodes (a sequence's last token and its drafts), then the
    prefill chunks."""

    decodes: list[Sequence] = field(default_factory=list)
    # (sequence, 1 + its drafts): seq.spec_token_ids hold the drafts, trimmed to what the budget allowed.
    spec_decodes: list[tuple[Sequence, int]] = field(default_factory=list)
    prefills: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens in this chunk)
    preempted: list[SequenceGroup] = field(default_factory=list)
    swap_out: list[tuple[int, int]] = field(default_factory=list)  # (device block, swap block)
    swap_in: list[tuple[int, int]] = field(default_factory=list)  # (swap block, device block)
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst) device blocks

    @property
    def is_empty(self) -> bool:
        return not self.decodes and not self.spec_decodes and not self.prefills

    @property
    def num_batched_tokens(self) -> int:
        return len(self.decodes) + sum(n for _, n in self.spec_decodes) + sum(n for _, n in self.prefills)

    @property
    def num_prefill_tokens(self) -> int:
        return sum(n for _, n in self.prefills)

    def scheduled(self) -> list[tuple[Sequence, int]]:
        return [(s, 1) for s in self.decodes] + self.spec_decodes + self.prefills


@dataclass
class _StepState:
    budget: int
    scheduled: set[int] = field(default_factory=set)  # id() of groups with a sequence scheduled this step
    # Chain hashes of the full blocks that sequences scheduled this step will compute. A block enters the prefix
    # cache only after the step that writes it, so a sequence that would compute one of them again (requests
    # arriving together with the same system prompt) waits one step and takes it from the cache.
    in_flight: set[bytes] = field(default_factory=set)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        preemption_mode: str | None = None,
    ) -> None:
        assert preemption_mode in (None, *PREEMPTION_MODES)
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.preemption_mode = preemption_mode
        self.waiting: deque[SequenceGroup] = deque()
        self.running: list[SequenceGroup] = []
        self.swapped: deque[SequenceGroup] = deque()
        self.num_preemptions = 0

    def add(self, group: SequenceGroup) -> None:
        self.waiting.append(group)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    @property
    def num_reserved_seqs(self) -> int:
        """Sequence slots the running groups claim: with the samples not forked yet and the full beam width."""
        return sum(g.max_num_seqs for g in self.running)

    def running_seqs(self) -> list[Sequence]:
        return [s for g in self.running for s in g.seqs if s.status is SequenceStatus.RUNNING]

    @property
    def num_running_seqs(self) -> int:
        return sum(len([s for s in g.seqs if s.status is SequenceStatus.RUNNING]) for g in self.running)

    @property
    def num_swapped_seqs(self) -> int:
        return sum(len([s for s in g.seqs if s.status is SequenceStatus.SWAPPED]) for g in self.swapped)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        step = _StepState(self.max_num_batched_tokens)
        live = [(g, s) for g in self.running for s in g.seqs if s.status is SequenceStatus.RUNNING]
        # A sequence with nothing to compute (a beam waiting for its siblings' logits) is not scheduled.
        work = [(g, s) for g, s in live if s.num_uncomputed_tokens == 1] + [
            (g, s) for g, s in live if s.num_uncomputed_tokens > 1
        ]
        for group, seq in work:
            if step.budget == 0:
                break
            if seq.status is SequenceStatus.RUNNING:  # else its group was preempted earlier in this loop
                self._schedule_seq(group, seq, out, step, may_preempt=True)
        if not out.preempted:  # a pool that just ran short takes nobody back and admits nobody new
            self._swap_in(out, step)
            if not self.swapped:
                self._admit_waiting(out, step)
        out.copies = self.block_manager.take_copies()
        return out

    def _schedule_seq(
        self, group: SequenceGroup, seq: Sequence, out: SchedulerOutput, step: _StepState, may_preempt: bool
    ) -> bool:
        bm = self.block_manager
        fresh = seq.num_computed_tokens == 0 and not seq.block_table
        computed = NO_COMPUTED_BLOCKS
        if fresh and not seq.needs_prompt_logprobs:
            computed = bm.get_computed_blocks(seq)
        start = computed.num_tokens if fresh else seq.num_computed_tokens
        num_new = min(seq.num_tokens - start, step.budget)
        if seq.spec_token_ids:  # a decode with drafts: they ride along as far as the budget allows
            seq.spec_token_ids = seq.spec_token_ids[: step.budget - 1]
            num_new += len(seq.spec_token_ids)
        computes = bm.hashes_computed(seq, start, min(start + num_new, seq.num_tokens))
        if computes and computes[0] in step.in_flight:
            return False
        while not bm.allocate_slots(seq, num_new, computed):
            if seq.spec_token_ids:  # drafts are an option: a pool too short for them decodes one token first
                num_new -= len(seq.spec_token_ids)
                seq.spec_token_ids = []
                continue
            victim = self._victim(group, step) if may_preempt else None
            if victim is None:
                if may_preempt and id(group) not in step.scheduled:
                    # Swapping out the group that asked for blocks would give it nothing back to run with.
                    self._preempt(group, out, allow_swap=False)
                return False
            # Preempting frees blocks but evicts none, so the prefix hits looked up above stay valid.
            self._preempt(victim, out)
        if fresh:
            seq.num_computed_tokens = seq.num_cached_tokens = computed.num_tokens
            if seq.num_output_tokens == 0:  # a recomputed sequence's lookups are not counted again
                bm.record_prefix_lookup(seq.num_tokens, computed.num_tokens)
        step.in_flight.update(computes)
        step.scheduled.add(id(group))
        step.budget -= num_new
        if seq.spec_token_ids:
            out.spec_decodes.append((seq, num_new))
        elif num_new == 1 and seq.num_uncomputed_tokens == 1:
            out.decodes.append(seq)
        else:
            out.prefills.append((seq, num_new))
        return True

    def _victim(self, group: SequenceGroup, step: _StepState) -> SequenceGroup | None:
        return next((g for g in reversed(self.running) if g is not group and id(g) not in step.scheduled), None)

    def _swap_in(self, out: SchedulerOutput, step: _StepState) -> None:
        bm = self.block_manager
        while self.swapped:
            group = self.swapped[0]
            seqs = [s for s in group.seqs if s.status is SequenceStatus.SWAPPED]
            needed = bm.swap_in_blocks_needed(seqs)
            if needed > bm.num_blocks:
                # Its sequences grew apart until they hold more than the pool: they continue one by one.
                self.swapped.popleft()
                self._recompute(group, seqs)
                continue
            if self.num_reserved_seqs + group.max_num_seqs > self.max_num_seqs or needed > bm.num_free_blocks:
                return
            out.swap_in.extend(bm.swap_in(seqs))
            self.swapped.popleft()
            self.running.append(group)
            for seq in seqs:
                seq.status = SequenceStatus.RUNNING
            for seq in seqs:
                if seq.num_uncomputed_tokens and step.budget:
                    self._schedule_seq(group, seq, out, step, may_preempt=False)

    def _admit_waiting(self, out: SchedulerOutput, step: _StepState) -> None:
        while self.waiting and step.budget > 0:
            group = self.waiting[0]
            if self.num_reserved_seqs + group.max_num_seqs > self.max_num_seqs:
                return
            seqs = [s for s in group.seqs if s.status is SequenceStatus.WAITING]
            # The group is admitted when its first sequence can start; the others (a recomputed group's) start
            # as budget and blocks allow, this step or later.
            if not self._schedule_seq(group, seqs[0], out, step, may_preempt=False):
                return
            self.waiting.popleft()
            self.running.append(group)
            for seq in seqs:
                seq.status = SequenceStatus.RUNNING
            for seq in seqs[1:]:
                if step.budget:
                    self._schedule_seq(group, seq, out, step, may_preempt=False)

    def _preempt(self, group: SequenceGroup, out: SchedulerOutput, allow_swap: bool = True) -> None:
        seqs = [s for s in group.seqs if s.status is SequenceStatus.RUNNING]
        for seq in seqs:  # drafts were proposed for a step it will not take part in
            seq.spec_token_ids = []
        self.running.remove(group)
        out.preempted.append(group)
        self.num_preemptions += 1
        swap = allow_swap and (self.preemption_mode == "swap" or (self.preemption_mode is None and len(seqs) > 1))
        pairs = self.block_manager.swap_out(seqs) if swap else None
        if pairs is None:
            self._recompute(group, seqs)
            return
        out.swap_out.extend(pairs)
        for seq in seqs:
            seq.status = SequenceStatus.SWAPPED
        self.swapped.append(group)

    def _recompute(self, group: SequenceGroup, seqs: list[Sequence]) -> None:
        """Drop the KV of seqs (on the device or in the swap space); the group waits at the front of the queue."""
        for seq in seqs:
            if seq.status is SequenceStatus.SWAPPED:
                self.block_manager.free_swapped(seq)
            else:
                self.block_manager.free(seq)
            seq.num_computed_tokens = 0
            seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(group)

    def on_step_done(self, out: SchedulerOutput) -> None:
        """Advance each scheduled sequence past the tokens whose KV the step wrote; cache blocks that filled.
        Speculative decodes advance once their drafts are verified (on_spec_verified)."""
        for seq, num_new in [(s, 1) for s in out.decodes] + out.prefills:
            seq.num_computed_tokens += num_new
            self.block_manager.cache_full_blocks(seq)

    def on_spec_verified(self, seq: Sequence, num_kept: int) -> None:
        """A speculative decode kept its last token and num_kept drafts (their KV is valid; the rejected drafts'
        slots are not): advance past them, cache blocks that filled, give back the blocks past its tokens."""
        seq.num_computed_tokens += 1 + num_kept
        seq.spec_token_ids = []
        self.block_manager.cache_full_blocks(seq)
        self.block_manager.trim(seq, seq.num_tokens)

    def free_seq(self, seq: Sequence) -> None:
        """A finished, aborted or dropped sequence gives its blocks back at once."""
        if seq.status is SequenceStatus.SWAPPED:
            self.block_manager.free_swapped(seq)
        else:
            self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED

    def remove(self, group: SequenceGroup) -> None:
        """Take a finished or aborted group out of whichever queue holds it."""
        for queue in (self.running, self.waiting, self.swapped):
            if group in queue:
                queue.remove(group)
                return
