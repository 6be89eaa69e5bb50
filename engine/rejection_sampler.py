"""Verifying draft tokens against the target model's distributions, so that speculation never changes what is
generated: greedy rows keep the drafts that equal the target's argmax; sampled rows use speculative sampling
(Leviathan et al., 2023) with a draft that is one token for sure (prompt lookup proposes, it does not sample):
draft d at a row whose distribution is p is accepted with probability p(d); at the first rejection the token is
drawn from p with d removed and renormalised, which is p conditioned on "not d". Either way every emitted token
is distributed exactly as one-at-a-time decoding would draw it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.sampler import Sampler, SamplingBatch
from engine.sequence import Sequence


@dataclass
class Verified:
    """One sequence's step: its accepted drafts then one more token, and their logprobs when asked for."""

    token_ids: list[int]
    num_accepted: int  # drafts kept, so len(token_ids) - 1
    logprobs: list[tuple[float, dict[int, float]] | None]


def verify(
    sampler: Sampler,
    chunks: list[tuple[Sequence, torch.Tensor]],
    eos_token_ids: list[int],
    vocab_size: int,
    device: torch.device,
) -> list[Verified]:
    """chunks: (sequence, logits [k + 1, vocab] float32) per sequence whose drafts (seq.spec_token_ids, k of
    them) were computed this step; row i is the distribution after its i-th draft (row 0: after its last token)."""
    row_seqs = [seq for seq, logits in chunks for _ in range(logits.shape[0])]
    logits = torch.cat([lg for _, lg in chunks])  # [rows, vocab]
    batch = SamplingBatch.from_sequences(row_seqs, eos_token_ids, vocab_size, device)
    want_logprobs = any(n is not None for n in batch.num_logprobs)
    raw = torch.log_softmax(logits, dim=-1) if want_logprobs else None
    processed = sampler.processed(logits, batch)
    argmax = processed.argmax(dim=-1).tolist()
    probs = None if batch.all_greedy else sampler.distribution(processed, batch)
    results, first = [], 0
    for seq, lg in chunks:
        drafts = seq.spec_token_ids
        rows = range(first, first + lg.shape[0])
        if seq.params.is_greedy:
            tokens = _verify_greedy(drafts, [argmax[r] for r in rows])
        else:
            tokens = _verify_sampled(drafts, probs[first : first + lg.shape[0]], seq.generator or sampler.generator)
        row_ids = list(rows)[: len(tokens)]
        lps = [None] * len(tokens)
        if raw is not None and seq.params.logprobs is not None:
            lps = sampler.logprobs(
                raw[row_ids], torch.tensor(tokens, device=raw.device), [seq.params.logprobs] * len(tokens)
            )
        results.append(Verified(tokens, len(tokens) - 1, lps))
        first += lg.shape[0]
    return results


def _verify_greedy(drafts: list[int], argmax: list[int]) -> list[int]:
    """argmax: the target's choice at each of the k + 1 rows."""
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == argmax[accepted]:
        accepted += 1
    return [*drafts[:accepted], argmax[accepted]]


def _verify_sampled(drafts: list[int], probs: torch.Tensor, generator: torch.Generator) -> list[int]:
    """probs: [k + 1, vocab], the distribution each row samples from."""
    uniforms = torch.rand(len(drafts), generator=generator, device=probs.device).tolist()
    kept = []
    for i, draft in enumerate(drafts):
        if uniforms[i] < probs[i, draft].item():
            kept.append(draft)
            continue
        residual = probs[i].clone()
        residual[draft] = 0.0
        return [*kept, _draw(residual, generator)]
    return [*kept, _draw(probs[len(drafts)], generator)]


def _draw(weights: torch.Tensor, generator: torch.Generator) -> int:
    """One token drawn in proportion to weights [vocab] (they need not sum to 1)."""
    return int(torch.multinomial(weights, 1, generator=generator).item())
