"""The engine's figures: token counts and recent rates, and snapshots of the pool and queues (EngineStats,
BlockMap) for the monitor and /metrics."""

from __future__ import annotations

import time
from collections import deque

from engine.block_manager import BlockManager
from engine.outputs import BlockMap, EngineStats
from engine.scheduler import Scheduler

# Throughput figures average over this many seconds of recent steps.
RATE_WINDOW_S = 2.0


class StatsCollector:
    def __init__(self, block_manager: BlockManager, scheduler: Scheduler) -> None:
        self.block_manager = block_manager
        self.scheduler = scheduler
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.spec_draft_tokens = 0  # drafts proposed and verified (speculative decoding)
        self.spec_accepted_tokens = 0  # of those, kept
        self._recent: deque[tuple[float, int, int]] = deque()  # (time, prompt tokens, generated tokens)

    def record_step(self, num_prompt: int, num_generated: int) -> None:
        now = time.perf_counter()
        self.prompt_tokens_total += num_prompt
        self.generation_tokens_total += num_generated
        self._recent.append((now, num_prompt, num_generated))
        while self._recent and now - self._recent[0][0] > RATE_WINDOW_S:
            self._recent.popleft()

    def record_speculation(self, num_drafts: int, num_accepted: int) -> None:
        self.spec_draft_tokens += num_drafts
        self.spec_accepted_tokens += num_accepted

    def _rates(self) -> tuple[float, float]:
        """Prompt and generated tokens per second over the recent window; 0 for an engine idle a whole window."""
        if not self._recent:
            return 0.0, 0.0
        span = self._recent[-1][0] - self._recent[0][0]
        if span <= 0 or time.perf_counter() - self._recent[-1][0] > RATE_WINDOW_S:
            return 0.0, 0.0
        # The first entry marks the window's start; the tokens after it were produced within span.
        produced = list(self._recent)[1:]
        return sum(r[1] for r in produced) / span, sum(r[2] for r in produced) / span

    def snapshot(self) -> EngineStats:
        bm, sched = self.block_manager, self.scheduler
        rate_p, rate_g = self._rates()
        free = bm.num_free_blocks
        return EngineStats(
            num_blocks_total=bm.num_blocks,
            num_blocks_used=bm.num_blocks - free,
            num_blocks_free=free,
            num_blocks_cached=bm.num_cached_free_blocks,
            num_blocks_shared=bm.num_shared_blocks,
            num_blocks_without_sharing=sum(len(s.block_table) for s in sched.running_seqs()),
            block_size=bm.block_size,
            num_running=sched.num_running_seqs,
            num_waiting=len(sched.waiting),
            num_swapped=sched.num_swapped_seqs,
            num_swap_blocks_total=bm.num_swap_blocks,
            num_swap_blocks_used=bm.num_swap_blocks - bm.num_free_swap_blocks,
            num_preemptions=sched.num_preemptions,
            prefix_cache_queries=bm.prefix_queries,
            prefix_cache_hits=bm.prefix_hits,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            prompt_tokens_per_s=rate_p,
            generation_tokens_per_s=rate_g,
            spec_draft_tokens=self.spec_draft_tokens,
            spec_accepted_tokens=self.spec_accepted_tokens,
        )

    def block_map(self) -> BlockMap:
        """Each KV block's state, holding requests and prefix hash, for the monitor's block map."""
        holders: dict[int, list[str]] = {}
        for seq in self.scheduler.running_seqs():
            for block_id in seq.block_table:
                holders.setdefault(block_id, []).append(seq.request_id)
        hashes = {b.block_id: b.hash for b in self.block_manager.blocks if b.hash is not None}
        return BlockMap(self.block_manager.block_states(), {b: tuple(ids) for b, ids in holders.items()}, hashes)
