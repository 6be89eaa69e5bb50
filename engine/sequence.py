"""Sequence: one generated continuation of a request, with its tokens, blocks and progress."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from engine.detokenizer import IncrementalDetokenizer
from engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """Tokens are prompt + output; the KV of the first num_computed_tokens of them sits in block_table's blocks.

    A preempted sequence (recompute) drops its blocks and num_computed_tokens returns to 0: its output tokens
    so far are kept and recomputed like prompt tokens, so it resumes exactly where it stopped.
    """
    seq_id: int
    request_id: str
    index: int                      # which of the request's n outputs this is
    prompt_token_ids: list[int]
    params: SamplingParams
    detokenizer: IncrementalDetokenizer | None
    generator: torch.Generator | None = None
    token_ids: list[int] = field(init=False)
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)   # chain hashes of its full blocks (tokens never change)
    num_registered_blocks: int = 0  # leading blocks of block_table already in the prefix cache
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0      # prompt tokens served by the prefix cache at admission
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        if self.params.logprobs is not None:
            self.logprobs = []
            self.cumulative_logprob = 0.0

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
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def text(self) -> str:
        return self.detokenizer.text if self.detokenizer is not None else ""
