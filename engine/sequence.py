"""Sequence: one continuation of a request (its tokens, blocks and progress); SequenceGroup: the request itself,
whose sequences share KV blocks (parallel sampling forks them after the prompt, beam search at every step)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from engine.detokenizer import IncrementalDetokenizer
from engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from engine.beam_search import BeamSearchState


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"  # its KV sits in the CPU swap space; block_table holds swap block ids
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """Tokens are prompt + output; the KV of the first num_computed_tokens of them sits in block_table's blocks.

    A preempted sequence (recompute) drops its blocks and num_computed_tokens returns to 0: its output tokens
    so far are kept and recomputed like prompt tokens, so it resumes exactly where it stopped.
    """

    seq_id: int
    request_id: str
    index: int  # which of the request's n outputs this is
    prompt_token_ids: list[int]
    params: SamplingParams
    detokenizer: IncrementalDetokenizer | None
    generator: torch.Generator | None = None
    token_ids: list[int] = field(init=False)
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # chain hashes of its full blocks (tokens never change)
    num_registered_blocks: int = 0  # leading blocks of block_table already in the prefix cache
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at admission
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None
    bad_words_token_ids: list[list[int]] = field(default_factory=list)
    spec_token_ids: list[int] = field(default_factory=list)  # draft tokens proposed for the next step
    # The grammar's state after this sequence's output so far (structured outputs); None when unconstrained.
    matcher: Any = None
    # prompt_logprobs: [None, then per prompt token from the second: {token_id: logprob}], filled chunk by chunk.
    prompt_logprobs: list[dict[int, float] | None] | None = None

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        if self.params.logprobs is not None:
            self.logprobs = []
            self.cumulative_logprob = 0.0
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Still owes logprobs of prompt tokens: its prompt must then be computed, not taken from the cache."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    @property
    def text(self) -> str:
        return self.detokenizer.text if self.detokenizer is not None else ""

    def fork(self, seq_id: int, index: int) -> Sequence:
        """A copy that continues from the same tokens (a new beam): the same blocks, whose references the caller
        adds with BlockManager.fork."""
        child = Sequence(seq_id, self.request_id, index, self.prompt_token_ids, self.params, None, self.generator)
        child.token_ids = list(self.token_ids)
        child.take_state_of(self)
        if self.matcher is not None:
            child.matcher = self.matcher.deep_copy()
        return child

    def take_state_of(self, parent: Sequence) -> None:
        """Continue from parent's KV: same block table and progress. A parallel sample waiting for its prompt
        takes over this way when the prompt's prefill completes; the prompt's logprobs stay with the parent."""
        assert self.token_ids == parent.token_ids
        self.block_table = list(parent.block_table)
        self.block_hashes = list(parent.block_hashes)
        self.num_registered_blocks = parent.num_registered_blocks
        self.num_computed_tokens = parent.num_computed_tokens
        self.num_cached_tokens = parent.num_cached_tokens
        self.status = parent.status
        self.bad_words_token_ids = parent.bad_words_token_ids
        self.prompt_logprobs = None


@dataclass(eq=False)
class SequenceGroup:
    """One request. Scheduling moves it between queues as a unit: a group is swapped out and in together, so
    blocks its sequences share stay shared; its sequences are scheduled one by one within a step.

    Parallel sampling (n > 1): only seqs[0] runs the prompt; `pending_forks` (created up front with their own
    seeds and detokenizers) take its blocks when its prefill completes. Beam search: `beam` drives the forks.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    pending_forks: list[Sequence] = field(default_factory=list)
    beam: BeamSearchState | None = None

    def unfinished(self) -> list[Sequence]:
        return [s for s in self.seqs if not s.is_finished]

    @property
    def max_num_seqs(self) -> int:
        """The most sequences it will have running at once: what it claims of max_num_seqs."""
        if self.beam is not None:
            return self.beam.params.beam_width
        return len(self.unfinished()) + len(self.pending_forks)

    @property
    def is_finished(self) -> bool:
        return (
            not self.pending_forks and all(s.is_finished for s in self.seqs) and (self.beam is None or self.beam.done)
        )
