"""Speculative decoding: draft tokens proposed before a step, verified by the target model in that step.

A running sequence with drafts d_1..d_k computes its last token and the drafts in one chunk of k + 1 positions;
the chunk's k + 1 logits rows verify the drafts left to right (rejection_sampler.py) and give one more token
after the last accepted one. So a step yields between 1 and k + 1 tokens for the price of one forward pass, which
on a memory-bound decode (weights read once per step, whatever the rows) costs about what one token costs.

Proposals come from prompt lookup (vLLM's "ngram" method, here): what followed the sequence's last n tokens the
last time they occurred in it. That suits what IDE plugins send: edits of code the prompt already holds. Or from a
smaller model of the same tokenizer (draft_model.py).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from engine.config import SpeculativeConfig
from engine.sequence import Sequence


class Proposer(Protocol):
    def propose(self, seqs: list[Sequence], running: list[Sequence]) -> list[list[int]]:
        """Draft tokens for each of seqs (sequences about to decode one token that may speculate); running: every
        running sequence, so a proposer that keeps state per sequence can drop the others'."""
        ...


def can_speculate(seq: Sequence) -> bool:
    """Whether a sequence's sampling settings let one forward pass verify several of its tokens: every verified
    position must see the same logits processing, so settings that depend on the tokens generated so far
    (penalties, bad words, min_tokens not yet reached, a grammar's state) decode one token at a time."""
    p = seq.params
    return (
        p.repetition_penalty == 1.0
        and p.presence_penalty == 0.0
        and p.frequency_penalty == 0.0
        and not p.bad_words
        and seq.num_output_tokens >= p.min_tokens
        and seq.matcher is None
    )


class NgramProposer:
    def __init__(self, config: SpeculativeConfig, max_model_len: int) -> None:
        self.k = config.num_speculative_tokens
        self.min_n, self.max_n = config.prompt_lookup_min, config.prompt_lookup_max
        self.max_model_len = max_model_len

    def propose(self, seqs: list[Sequence], running: list[Sequence]) -> list[list[int]]:
        """Up to k draft tokens for each decoding sequence of seqs (none when its last tokens occurred nowhere
        before). running: every running sequence (a draft model keeps state for them; lookup keeps none)."""
        return [self._propose_one(seq) for seq in seqs]

    def _propose_one(self, seq: Sequence) -> list[int]:
        k = draft_room(seq, self.k, self.max_model_len)
        if k <= 0 or seq.num_tokens <= self.min_n:
            return []
        return lookup(np.asarray(seq.token_ids, dtype=np.int64), self.min_n, self.max_n, k)


def draft_room(seq: Sequence, k: int, max_model_len: int) -> int:
    """How many of k drafts a sequence can take: never more than its max_tokens and the context leave room for
    after the token this step samples anyway."""
    p = seq.params
    room = max_model_len - seq.num_tokens - 1
    if p.max_tokens is not None:
        room = min(room, p.max_tokens - seq.num_output_tokens - 1)
    return min(k, room)


def lookup(tokens: np.ndarray, min_n: int, max_n: int, k: int) -> list[int]:
    """The k tokens that followed the latest earlier occurrence of tokens' last n tokens, for the longest n in
    [min_n, max_n] that occurs; [] when none does. tokens: [L] int64."""
    length = len(tokens)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = tokens[length - n :]
        # Windows starting at 0 .. length - n - 1: every occurrence but the suffix itself. [L - n, n]
        windows = np.lib.stride_tricks.sliding_window_view(tokens[: length - 1], n)
        starts = np.flatnonzero((windows == suffix).all(axis=1))
        if len(starts):
            follow = starts[-1] + n
            return tokens[follow : follow + k].tolist()
    return []
