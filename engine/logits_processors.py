"""Logits processors that run before temperature and truncation: banned tokens (min_tokens, bad words), an
allowed-token mask, logit bias, and repetition / frequency / presence penalties.

Each is built once per step from the rows that ask for it, as index tensors on the device, and edits the
[B, vocab] logits in place; a batch in which no row asks for any builds none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from engine.sequence import Sequence
from engine.structured_output import GrammarMask, StructuredOutputManager


class LogitsProcessor(Protocol):
    def apply(self, logits: torch.Tensor) -> None:
        """Edit logits [B, vocab] in place."""


def bad_words_token_ids(bad_words: list[str], tokenizer) -> list[list[int]]:
    """Token ids of each bad word as vLLM bans it: as encoded on its own and, to catch it mid-text, after a space.

    The spaced form is kept only where the space merges into a different first token and the length stays the
    same (vLLM's rule): otherwise the tokenizer already prefixes a space itself, or splits the space off as a token
    of its own, and banning that form would ban the word's continuation of any space.
    """
    out: list[list[int]] = []
    for word in bad_words:
        word = word.lstrip()
        plain = tokenizer.encode(word, add_special_tokens=False)
        spaced = tokenizer.encode(" " + word, add_special_tokens=False)
        forms = [plain]
        if plain and len(spaced) == len(plain) and spaced[0] != plain[0]:
            forms.append(spaced)
        out.extend(ids for ids in forms if ids and ids not in out)
    return out


def bad_word_bans(bad_words: list[list[int]], output_token_ids: list[int]) -> list[int]:
    """Tokens a row must not sample next: each one-token word, and the last token of each longer word whose
    other tokens end the output so far (vLLM matches against the output only, not the prompt)."""
    n = len(output_token_ids)
    return [w[-1] for w in bad_words if len(w) - 1 <= n and output_token_ids[n - len(w) + 1 :] == w[:-1]]


def _pairs(per_row: list[tuple[int, list[int]]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, token id) pairs flattened into two [n] index tensors."""
    rows = [row for row, ids in per_row for _ in ids]
    ids = [t for _, ids in per_row for t in ids]
    return (torch.tensor(rows, dtype=torch.int64, device=device), torch.tensor(ids, dtype=torch.int64, device=device))


@dataclass
class BannedTokens:
    """Tokens that must not be sampled: EOS and stop ids under min_tokens, bad words."""

    rows: torch.Tensor  # [n] int64
    ids: torch.Tensor  # [n] int64

    def apply(self, logits: torch.Tensor) -> None:
        logits[self.rows, self.ids] = float("-inf")


@dataclass
class AllowedTokens:
    """Rows that may only sample the listed tokens."""

    rows: torch.Tensor  # [k] the restricted rows
    pair_rows: torch.Tensor  # [n] (row, allowed token id) pairs
    pair_ids: torch.Tensor  # [n]

    def apply(self, logits: torch.Tensor) -> None:
        # Gather, blank, put back: no [k, vocab] mask to build.
        kept = logits[self.pair_rows, self.pair_ids]
        logits[self.rows] = float("-inf")
        logits[self.pair_rows, self.pair_ids] = kept


@dataclass
class LogitBias:
    rows: torch.Tensor  # [n] int64
    ids: torch.Tensor  # [n] int64, unique per row
    values: torch.Tensor  # [n] float32

    def apply(self, logits: torch.Tensor) -> None:
        logits.index_put_((self.rows, self.ids), self.values, accumulate=True)


def _token_counts(token_lists: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """How often each token occurs in each list: [len(token_lists), vocab_size] float32."""
    width = max(len(ids) for ids in token_lists)
    # Rows are padded with an id one past the vocabulary, whose column is dropped after counting.
    padded = torch.tensor(
        [ids + [vocab_size] * (width - len(ids)) for ids in token_lists], dtype=torch.int64, device=device
    )  # [k, width]
    counts = torch.zeros(len(token_lists), vocab_size + 1, dtype=torch.float32, device=device)
    counts.scatter_add_(1, padded, torch.ones(padded.shape, dtype=torch.float32, device=device))
    return counts[:, :vocab_size]


@dataclass
class Penalties:
    """vLLM's penalties, in its order: repetition (HF/CTRL, over prompt and output tokens), then frequency and
    presence (OpenAI, over output tokens). Rows without a penalty get neutral values, which leave them exact."""

    rows: torch.Tensor  # [k] rows with some penalty
    repetition: torch.Tensor | None  # [k] float32; None when no row uses it
    seen: torch.Tensor | None  # [k, vocab] bool: token in the prompt or the output
    frequency: torch.Tensor | None  # [k] float32
    presence: torch.Tensor | None  # [k] float32
    counts: torch.Tensor | None  # [k, vocab] float32: occurrences in the output

    @classmethod
    def build(cls, seqs: list[Sequence], vocab_size: int, device: torch.device) -> Penalties | None:
        rows = [
            row
            for row, s in enumerate(seqs)
            if s.params.repetition_penalty != 1.0
            or s.params.frequency_penalty != 0.0
            or s.params.presence_penalty != 0.0
        ]
        if not rows:
            return None
        params = [seqs[row].params for row in rows]

        def per_row(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        repetition = seen = frequency = presence = counts = None
        if any(p.repetition_penalty != 1.0 for p in params):
            repetition = per_row([p.repetition_penalty for p in params])
            seen = _token_counts([seqs[row].token_ids for row in rows], vocab_size, device) > 0
        use_frequency = any(p.frequency_penalty != 0.0 for p in params)
        use_presence = any(p.presence_penalty != 0.0 for p in params)
        if use_frequency or use_presence:
            counts = _token_counts([seqs[row].output_token_ids for row in rows], vocab_size, device)
            frequency = per_row([p.frequency_penalty for p in params]) if use_frequency else None
            presence = per_row([p.presence_penalty for p in params]) if use_presence else None
        return cls(torch.tensor(rows, dtype=torch.int64, device=device), repetition, seen, frequency, presence, counts)

    def apply(self, logits: torch.Tensor) -> None:
        x = logits[self.rows]  # [k, vocab], a copy
        if self.repetition is not None:
            penalty = torch.where(self.seen, self.repetition[:, None], 1.0)
            x = torch.where(x > 0, x / penalty, x * penalty)
        if self.frequency is not None:
            x -= self.frequency[:, None] * self.counts
        if self.presence is not None:
            x -= self.presence[:, None] * (self.counts > 0)
        logits[self.rows] = x


def build_processors(
    seqs: list[Sequence],
    eos_token_ids: list[int],
    vocab_size: int,
    device: torch.device,
    structured: StructuredOutputManager | None = None,
) -> list[LogitsProcessor]:
    """The processors this step's rows ask for, in the order they apply (vLLM's: bans and the allowed mask, then
    bias, then penalties; the -inf masks commute with each other, so min_tokens and bad words share one); the
    grammar mask of constrained rows (structured outputs) first."""
    processors: list[LogitsProcessor] = []
    grammar_rows = [(row, s.matcher) for row, s in enumerate(seqs) if s.matcher is not None]
    if grammar_rows:
        assert structured is not None, "constrained sequences need the structured output manager"
        processors.append(GrammarMask(structured, grammar_rows))
    banned, allowed, bias = [], [], []
    for row, s in enumerate(seqs):
        p = s.params
        ban = list(eos_token_ids) + p.stop_token_ids if s.num_output_tokens < p.min_tokens else []
        if p.bad_words:
            ban += bad_word_bans(s.bad_words_token_ids, s.output_token_ids)
        if ban:
            banned.append((row, ban))
        if p.allowed_token_ids:
            allowed.append((row, p.allowed_token_ids))
        if p.logit_bias:
            bias.append((row, p.logit_bias))
    if banned:
        processors.append(BannedTokens(*_pairs(banned, device)))
    if allowed:
        rows = torch.tensor([row for row, _ in allowed], dtype=torch.int64, device=device)
        processors.append(AllowedTokens(rows, *_pairs(allowed, device)))
    if bias:
        values = torch.tensor([v for _, b in bias for v in b.values()], dtype=torch.float32, device=device)
        processors.append(LogitBias(*_pairs([(row, list(b)) for row, b in bias], device), values))
    penalties = Penalties.build(seqs, vocab_size, device)
    if penalties is not None:
        processors.append(penalties)
    return processors
