"""What the engine hands back: per-request outputs (vLLM names) and stats snapshots."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class RequestBlocks:
    """The KV blocks one request holds in the device pool now: its running sequences' block tables, a block its
    forks share counted once (LLMEngine.get_request_blocks).

    `num_shared` counts the blocks it holds but neither computed alone nor holds alone: those it took from the
    prefix cache when admitted (their KV was computed by an earlier request, whether or not that one still runs),
    and those another sequence holds too right now (ref count > 1: a fork of its own, or another request that hit
    the same prefix). `num_prefix_cached` is the first kind alone, so num_shared - num_prefix_cached blocks are
    shared only by being held twice."""

    num_blocks: int
    num_shared: int
    num_prefix_cached: int


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache
    # With SamplingParams.prompt_logprobs: None for the first token, then {token_id: logprob} per prompt token.
    prompt_logprobs: list[dict[int, float] | None] | None = None
    # The request's KV blocks right after the step that produced this output, for a submitter that asked for them
    # (app.engine_thread.EngineThread.submit(report_blocks=True)); None otherwise, and once the request finished.
    blocks: RequestBlocks | None = None


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine after a step; cheap to take every UI frame."""

    num_blocks_total: int
    num_blocks_used: int
    num_blocks_free: int
    num_blocks_cached: int  # free, but still holding a reusable prefix
    num_blocks_shared: int  # held by more than one sequence (forks, beams, prefix hits)
    num_blocks_without_sharing: int  # what the running sequences' block tables add up to, had nothing been shared
    block_size: int
    num_running: int  # sequences
    num_waiting: int  # requests
    num_swapped: int  # sequences whose KV sits in the swap space
    num_swap_blocks_total: int
    num_swap_blocks_used: int
    num_preemptions: int
    prefix_cache_queries: int  # prompt tokens looked up
    prefix_cache_hits: int  # of those, served from the cache
    prompt_tokens_total: int
    generation_tokens_total: int
    prompt_tokens_per_s: float
    generation_tokens_per_s: float
    spec_draft_tokens: int = 0  # speculative decoding: drafts verified so far
    spec_accepted_tokens: int = 0  # of those, accepted

    @property
    def spec_acceptance_rate(self) -> float | None:
        """Share of verified drafts accepted; None before any (speculation off, or nothing to draft yet)."""
        return self.spec_accepted_tokens / self.spec_draft_tokens if self.spec_draft_tokens else None

    @property
    def kv_usage(self) -> float:
        return self.num_blocks_used / self.num_blocks_total if self.num_blocks_total else 0.0


class BlockState(enum.IntEnum):
    """A KV block's state in BlockMap.states (one byte each)."""

    FREE = 0
    USED = 1  # held by one sequence
    SHARED = 2  # held by several (forks, beams, prefix hits)
    CACHED = 3  # free, but still holding a reusable prefix


@dataclass(frozen=True)
class BlockMap:
    """Every KV block's state (a BlockState, one byte per block), the requests holding each used block (one entry
    per holding sequence, so a block its request's forks share names that request once per fork) and the chain
    hash of each block that has one (full blocks in the prefix cache, held or cached)."""

    states: bytes
    owners: dict[int, tuple[str, ...]]
    hashes: dict[int, bytes] = field(default_factory=dict)
