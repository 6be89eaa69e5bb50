"""Batched sampling: logits processors, greedy, temperature, min-p, top-k, top-p, seeds, logprobs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.logits_processors import LogitsProcessor, build_processors
from engine.sequence import Sequence
from engine.structured_output import StructuredOutputManager
from kernels.fused_decode import argmax


@dataclass
class SamplingBatch:
    """One step's per-row sampling settings, built from the sequences that sample, in row order."""

    all_greedy: bool
    greedy: torch.Tensor  # [B] bool
    temperature: torch.Tensor  # [B] float32 (1.0 on greedy rows)
    top_k: torch.Tensor | None  # [B] int64, vocab size where off; None when no row uses it
    top_p: torch.Tensor | None  # [B] float32
    min_p: torch.Tensor | None  # [B] float32
    seeded: list[tuple[int, torch.Generator]]
    processors: list[LogitsProcessor]  # in the order they apply; empty when no row asks for any
    num_logprobs: list[int | None]

    @classmethod
    def from_sequences(
        cls,
        seqs: list[Sequence],
        eos_token_ids: list[int],
        vocab_size: int,
        device: torch.device,
        structured: StructuredOutputManager | None = None,
    ) -> SamplingBatch:
        params = [s.params for s in seqs]
        greedy = [p.is_greedy for p in params]
        use_top_k = any(p.top_k > 0 for p in params)
        use_top_p = any(p.top_p < 1.0 for p in params)
        use_min_p = any(p.min_p > 0.0 for p in params)

        def tensor(values, dtype):
            return torch.tensor(values, dtype=dtype, device=device)

        return cls(
            all_greedy=all(greedy),
            greedy=tensor(greedy, torch.bool),
            temperature=tensor([1.0 if g else p.temperature for g, p in zip(greedy, params)], torch.float32),
            top_k=tensor([p.top_k if p.top_k > 0 else vocab_size for p in params], torch.int64) if use_top_k else None,
            top_p=tensor([p.top_p for p in params], torch.float32) if use_top_p else None,
            min_p=tensor([p.min_p for p in params], torch.float32) if use_min_p else None,
            seeded=[(row, s.generator) for row, s in enumerate(seqs) if s.generator is not None],
            processors=build_processors(seqs, eos_token_ids, vocab_size, device, structured),
            num_logprobs=[p.logprobs for p in params],
        )


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # Per row: None, or (sampled token's logprob, {token_id: logprob} for the top-N plus the sampled token).
    logprobs: list[tuple[float, dict[int, float]] | None]


class Sampler:
    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator  # for rows without a seed of their own

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        """logits: [B, vocab] float32, one row per sampling sequence."""
        want_logprobs = any(n is not None for n in batch.num_logprobs)
        # Logprobs are reported for the model's distribution, before any sampling transform (vLLM's default).
        raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
        logits = self.processed(logits, batch)
        if batch.all_greedy:
            tokens = argmax(logits)
        else:
            tokens = torch.where(batch.greedy, argmax(logits), self._sample(logits, batch))
        token_list = tokens.tolist()
        return SamplerOutput(
            token_list,
            self.logprobs(raw_logprobs, tokens, batch.num_logprobs) if want_logprobs else [None] * len(token_list),
        )

    @staticmethod
    def processed(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """logits [B, vocab] after the batch's logits processors (a copy when there are any)."""
        if batch.processors:
            logits = logits.clone()
            for processor in batch.processors:
                processor.apply(logits)
        return logits

    @staticmethod
    def distribution(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """What a non-greedy row samples from: processed logits [B, vocab] through temperature, min-p, top-k and
        top-p -> probabilities [B, vocab]."""
        x = logits / batch.temperature[:, None]
        if batch.min_p is not None:
            probs = x.softmax(dim=-1)
            threshold = batch.min_p[:, None] * probs.max(dim=-1, keepdim=True).values
            x = x.masked_fill(probs < threshold, float("-inf"))
        if batch.top_k is not None or batch.top_p is not None:
            vals, idx = x.sort(dim=-1, descending=True)
            if batch.top_k is not None:
                rank = torch.arange(vals.shape[-1], device=vals.device)
                vals.masked_fill_(rank[None, :] >= batch.top_k[:, None], float("-inf"))
            if batch.top_p is not None:
                p = vals.softmax(dim=-1)
                # Drop a token once the tokens ranked above it already cover top_p (the first always stays).
                vals.masked_fill_(p.cumsum(dim=-1) - p >= batch.top_p[:, None], float("-inf"))
            x = torch.full_like(x, float("-inf")).scatter_(1, idx, vals)
        return x.softmax(dim=-1)

    def _sample(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        probs = self.distribution(logits, batch)
        # Gumbel-style sampling without a host sync per row: argmax(p / q), q ~ Exp(1), samples from p.
        q = torch.empty_like(probs)
        seeded_rows = {row for row, _ in batch.seeded}
        if len(seeded_rows) < q.shape[0]:
            q.exponential_(generator=self.generator)
        for row, gen in batch.seeded:
            q[row].exponential_(generator=gen)
        # A draw of exactly 0 would make a masked token 0 / 0 = NaN, which argmax would pick.
        q.clamp_min_(torch.finfo(q.dtype).tiny)
        return (probs / q).argmax(dim=-1)

    @staticmethod
    def logprobs(raw: torch.Tensor, tokens: torch.Tensor, num_logprobs: list[int | None]):
        """raw: log-softmax rows [B, vocab]; tokens: [B] -> per row None (logprobs not asked for) or (the token's
        logprob, {token id: logprob} of the top num_logprobs plus the token)."""
        n_max = max(n for n in num_logprobs if n is not None)
        top_vals, top_ids = raw.topk(max(n_max, 1), dim=-1)
        sampled = raw.gather(1, tokens[:, None]).squeeze(1).tolist()
        top_vals, top_ids, tokens = top_vals.tolist(), top_ids.tolist(), tokens.tolist()
        out = []
        for row, n in enumerate(num_logprobs):
            if n is None:
                out.append(None)
                continue
            entry = dict(zip(top_ids[row][:n], top_vals[row][:n]))
            entry[tokens[row]] = sampled[row]
            out.append((sampled[row], entry))
        return out
