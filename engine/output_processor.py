"""After a step's forward pass: which sequences sample from which logits row, then what their new tokens do
(append, stop checks, beam steps, prompt logprobs) and the RequestOutputs that report it (vLLM v1's
OutputProcessor). Sequences that finish give their blocks back through the scheduler at once."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch

from engine.block_manager import BlockManager
from engine.outputs import CompletionOutput, RequestOutput
from engine.rejection_sampler import Verified
from engine.sampler import SamplerOutput
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceGroup


@dataclass
class SamplingPlan:
    """Which logits row each sequence reads this step: sequences that sample a token, and beams that offer
    their next-token log-probabilities to their beam search."""

    samples: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, logits row), sampler order
    beams: list[tuple[Sequence, int]] = field(default_factory=list)  # (beam, logits row)


@dataclass
class StepSamples:
    """What the sampler drew for a plan: tokens for plan.samples (in order), log-softmax rows for plan.beams, and
    the verified tokens of each speculative decode."""

    sampled: SamplerOutput | None = None
    beam_logprobs: torch.Tensor | None = None  # [len(plan.beams), vocab] float32
    verified: list[tuple[Sequence, Verified]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        """Tokens this step generated: one per sampling sequence and beam, and each speculative decode's."""
        sampled = len(self.sampled.token_ids) if self.sampled is not None else 0
        beams = 0 if self.beam_logprobs is None else self.beam_logprobs.shape[0]
        return sampled + beams + sum(len(v.token_ids) for _, v in self.verified)


class OutputProcessor:
    def __init__(
        self,
        requests: Mapping[str, SequenceGroup],
        scheduler: Scheduler,
        block_manager: BlockManager,
        tokenizer,
        eos_token_ids: frozenset[int],
        max_model_len: int,
        seq_ids: Iterator[int],
    ) -> None:
        self.requests = requests  # the engine's live requests (read only here)
        self.scheduler = scheduler
        self.block_manager = block_manager
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.seq_ids = seq_ids

    def plan_sampling(self, sample_seqs: list[Sequence]) -> SamplingPlan:
        """sample_seqs: the sequences whose chunk reached their last token, in logits row order. Parallel samples
        waiting for their prompt (n > 1) take over its blocks here, when its prefill completes: each then samples
        its first token from the prompt's logits row with its own generator."""
        plan = SamplingPlan()
        for row, seq in enumerate(sample_seqs):
            group = self.requests[seq.request_id]
            if group.beam is not None:
                plan.beams.append((seq, row))
                continue
            plan.samples.append((seq, row))
            if group.pending_forks and seq is group.seqs[0]:
                for child in group.pending_forks:
                    child.take_state_of(seq)
                    self.block_manager.fork(seq, child)
                    plan.samples.append((child, row))
                group.seqs.extend(group.pending_forks)
                group.pending_forks = []
        return plan

    def process(
        self,
        prompt_logits: list[tuple[Sequence, int, torch.Tensor]],
        plan: SamplingPlan,
        samples: StepSamples,
    ) -> list[RequestOutput]:
        """Apply one step's results; returns an output for every request that moved (a beam search only once it
        ends). Finished sequences have freed their blocks; the caller retires finished requests."""
        touched = self._record_prompt_logprobs(prompt_logits)
        if samples.sampled is not None:
            for (seq, _), token, lp in zip(plan.samples, samples.sampled.token_ids, samples.sampled.logprobs):
                reason = self._append(seq, token, lp)
                if reason is not None:
                    self._finish(seq, reason)
                touched[seq.request_id] = self.requests[seq.request_id]
        for seq, verified in samples.verified:
            self._append_verified(seq, verified)
            touched[seq.request_id] = self.requests[seq.request_id]
        if samples.beam_logprobs is not None:
            for (seq, _), logprobs in zip(plan.beams, samples.beam_logprobs):
                group = self.requests[seq.request_id]
                group.beam.add(seq, logprobs)
                touched[seq.request_id] = group
            for group in touched.values():
                if group.beam is not None and group.beam.ready(group.seqs):
                    self._beam_step(group)
        return [self.make_output(group) for group in touched.values() if group.beam is None or group.is_finished]

    def _record_prompt_logprobs(self, prompt_logits: list[tuple[Sequence, int, torch.Tensor]]) -> dict:
        """Fill prompt_logprobs from this step's prefill chunks: logits row i of a chunk starting at `start`
        scores the prompt token at start + i + 1."""
        touched = {}
        for seq, start, logits in prompt_logits:
            n = seq.params.prompt_logprobs
            lp = torch.log_softmax(logits, dim=-1)  # [chunk, vocab]
            first = len(seq.prompt_logprobs) - start - 1  # rows before it were recorded before a preemption
            last = min(lp.shape[0], seq.num_prompt_tokens - start - 1)
            if first >= last:
                continue
            targets = torch.tensor(seq.prompt_token_ids[start + first + 1 : start + last + 1], device=lp.device)
            chosen = lp[first:last].gather(1, targets[:, None]).squeeze(1).tolist()
            top_vals, top_ids = lp[first:last].topk(max(n, 1), dim=-1)
            for tok, val, ids, vals in zip(targets.tolist(), chosen, top_ids.tolist(), top_vals.tolist()):
                entry = dict(zip(ids[:n], vals[:n]))
                entry[tok] = val
                seq.prompt_logprobs.append(entry)
            touched[seq.request_id] = self.requests[seq.request_id]
        return touched

    def _append_verified(self, seq: Sequence, verified: Verified) -> None:
        """A speculative decode's accepted drafts and the token after them, up to a stop; the scheduler then
        advances it past the drafts kept (before a finished sequence gives its blocks back, so the blocks it filled
        enter the prefix cache)."""
        reason, appended = None, 0
        for token, lp in zip(verified.token_ids, verified.logprobs):
            reason = self._append(seq, token, lp)
            appended += 1
            if reason is not None:
                break
        self.scheduler.on_spec_verified(seq, min(appended, verified.num_accepted))
        if reason is not None:
            self._finish(seq, reason)

    def _append(self, seq: Sequence, token: int, lp: tuple[float, dict[int, float]] | None) -> str | None:
        """Append one token; returns why the sequence ends with it ("stop", "length"), or None."""
        seq.token_ids.append(token)
        if seq.matcher is not None:
            seq.matcher.consume_token(token)
        if lp is not None:
            seq.cumulative_logprob += lp[0]
            seq.logprobs.append(lp[1])
        p = seq.params
        reason: str | None = None
        # The sampler never picks EOS or a stop token id before min_tokens, so these need no min_tokens check.
        if not p.ignore_eos and token in self.eos_token_ids:
            reason = "stop"
        elif token in p.stop_token_ids:
            reason, seq.stop_reason = "stop", token
        else:
            seq.detokenizer.append([token])
            if seq.detokenizer.stop_reason is not None:
                reason, seq.stop_reason = "stop", seq.detokenizer.stop_reason
            elif seq.matcher is not None and seq.matcher.is_stopped():  # the grammar is complete: nothing follows
                reason = "stop"
            elif (p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens) or (
                seq.num_tokens >= self.max_model_len
            ):
                reason = "length"
        return reason

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.detokenizer.finish()
        seq.finish_reason = reason
        self.scheduler.free_seq(seq)

    def _beam_step(self, group: SequenceGroup) -> None:
        """Advance a beam search by one token: the kept continuations reuse their parent's sequence (the first)
        or fork it (the others, sharing its blocks); parents with none are dropped, their blocks freed."""
        beam = group.beam
        # This step appends one token to every beam: at_limit when that token is the last max_model_len allows.
        at_limit = group.seqs[0].num_tokens + 1 >= self.max_model_len
        kept = beam.step(group.seqs, at_limit)
        if beam.done:
            for seq in group.seqs:
                self.scheduler.free_seq(seq)
            return
        taken: set[int] = set()
        new_seqs: list[tuple[Sequence, int, float]] = []
        for parent, token, score in kept:  # forks first: a fork copies its parent's tokens before they change
            if parent.seq_id in taken:
                child = parent.fork(next(self.seq_ids), len(new_seqs))
                self.block_manager.fork(parent, child)
                new_seqs.append((child, token, score))
            else:
                taken.add(parent.seq_id)
                new_seqs.append((parent, token, score))
        for seq in group.seqs:
            if seq.seq_id not in taken:
                self.scheduler.free_seq(seq)
        for seq, token, score in new_seqs:
            seq.token_ids.append(token)
            if seq.matcher is not None:
                seq.matcher.consume_token(token)
            beam.scores[seq.seq_id] = score
        group.seqs = [s for s, _, _ in new_seqs]

    def make_output(self, group: SequenceGroup) -> RequestOutput:
        if group.beam is not None:
            outputs = [
                CompletionOutput(
                    i,
                    self.tokenizer.decode(h.token_ids, skip_special_tokens=True),
                    h.token_ids,
                    h.cumulative_logprob,
                    None,
                    h.finish_reason,
                )
                for i, h in enumerate(group.beam.best())
            ]
        else:
            seqs = sorted(group.seqs + group.pending_forks, key=lambda s: s.index)
            outputs = [
                CompletionOutput(
                    s.index,
                    s.text,
                    s.output_token_ids,
                    s.cumulative_logprob,
                    list(s.logprobs) if s.logprobs is not None else None,
                    s.finish_reason,
                    s.stop_reason,
                )
                for s in seqs
            ]
        prompt_lp = group.seqs[0].prompt_logprobs
        return RequestOutput(
            group.request_id,
            group.prompt,
            group.prompt_token_ids,
            outputs,
            group.is_finished,
            num_cached_tokens=group.seqs[0].num_cached_tokens,
            prompt_logprobs=list(prompt_lp) if prompt_lp is not None else None,
        )
