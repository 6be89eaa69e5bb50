"""Beam search over the engine's sequences, step for step the algorithm of transformers' `generate(num_beams=W)`.

Each step every live beam offers its next-token log-probabilities; the best K = max(2, 1 + #EOS ids) * W
continuations over all beams (by cumulative log-probability) are ranked. Among the first W of them, those that end
(an EOS token, or the length limit) become finished hypotheses, scored cumulative / generated_length **
length_penalty, and the best W hypotheses are kept. The W best continuations that do not end are the next live
beams. The search stops at the length limit, when the live beams can no longer beat the worst kept hypothesis
(early_stopping=False: judged at the current length; "never": at the longest possible length when the penalty
rewards length), or, with early_stopping=True, as soon as W hypotheses are finished.

The engine turns each step's continuations into sequence forks that share their parent's KV blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from engine.sequence import Sequence
from engine.structured_output import StructuredOutputsParams


@dataclass
class BeamSearchParams:
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # True | False | "never", as in transformers
    structured_outputs: StructuredOutputsParams | None = None  # every beam kept to the grammar

    def __post_init__(self) -> None:
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        if not isinstance(self.beam_width, int) or self.beam_width < 1:
            raise ValueError(f"beam_width must be an integer >= 1, got {self.beam_width!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if not isinstance(self.length_penalty, (int, float)):
            raise ValueError(f"length_penalty must be a number, got {self.length_penalty!r}")


@dataclass
class Hypothesis:
    """A finished beam: its generated tokens (ending with EOS when it stopped on one)."""

    token_ids: list[int]
    cumulative_logprob: float
    score: float  # cumulative_logprob / len(token_ids) ** length_penalty
    finish_reason: str  # "stop" (EOS) or "length"


@dataclass
class BeamSearchState:
    params: BeamSearchParams
    eos_token_ids: frozenset[int]
    scores: dict[int, float] = field(default_factory=dict)  # live beam seq_id -> cumulative logprob
    finished: list[Hypothesis] = field(default_factory=list)  # best first, at most beam_width
    done: bool = False
    # Log-probabilities each live beam produced this step; a step runs once every live beam has its row (beams
    # recomputed after a preemption reach their last token in different steps).
    _pending: dict[int, torch.Tensor] = field(default_factory=dict)
    _improvable: bool = True  # transformers' is_early_stop_heuristic_unsatisfied

    def add(self, seq: Sequence, logprobs: torch.Tensor) -> None:
        """logprobs: [vocab] float32, log-softmax of seq's next-token logits."""
        self._pending[seq.seq_id] = logprobs

    def ready(self, live: list[Sequence]) -> bool:
        return bool(live) and all(s.seq_id in self._pending for s in live)

    def step(self, live: list[Sequence], at_limit: bool) -> list[tuple[Sequence, int, float]]:
        """Rank the continuations of the live beams. Returns the next live beams as (parent, token, cumulative
        logprob), best first; sets `done` (and returns []) when the search is over. at_limit: the sequences
        cannot grow past one more token (max_model_len)."""
        p, width = self.params, self.params.beam_width
        eos = frozenset() if p.ignore_eos else self.eos_token_ids
        lps = torch.stack([self._pending.pop(s.seq_id) for s in live])  # [beams, vocab]
        base = torch.tensor([self.scores.pop(s.seq_id, 0.0) for s in live], device=lps.device)
        vocab = lps.shape[1]
        keep = min(max(2, 1 + len(eos)) * width, lps.numel())
        top_vals, top_idx = (lps + base[:, None]).view(-1).topk(keep)
        gen_len = live[0].num_output_tokens + 1  # every live beam has the same length
        max_len = min(p.max_tokens, gen_len if at_limit else p.max_tokens)
        ends_on_length = gen_len >= max_len
        # A continuation at -inf is one a grammar forbids (structured outputs): it is no candidate at all.
        candidates = [
            (live[i // vocab], i % vocab, v) for i, v in zip(top_idx.tolist(), top_vals.tolist()) if v != -math.inf
        ]
        ends = [ends_on_length or tok in eos for _, tok, _ in candidates]
        running = [c for c, e in zip(candidates, ends) if not e][:width]

        # Only the best `width` continuations may finish; the rest are there to keep `width` beams alive.
        full = len(self.finished) == width
        if self._improvable and not (full and p.early_stopping is True):
            for (parent, tok, v), e in zip(candidates[:width], ends[:width]):
                if e:
                    reason = "length" if tok not in eos else "stop"
                    self.finished.append(
                        Hypothesis([*parent.output_token_ids, tok], v, v / gen_len**p.length_penalty, reason)
                    )
            self.finished.sort(key=lambda h: h.score, reverse=True)  # stable: earlier ones win ties
            del self.finished[width:]

        full = len(self.finished) == width
        if full and running:
            best_len = max_len if p.early_stopping == "never" and p.length_penalty > 0 else gen_len
            best_possible = running[0][2] / best_len**p.length_penalty
            self._improvable = self._improvable and best_possible > self.finished[-1].score
        if not self._improvable or (full and p.early_stopping is True) or all(ends):
            self.done = True
            self._pending.clear()
            self.scores.clear()
            return []
        return running

    def best(self) -> list[Hypothesis]:
        return list(self.finished)
