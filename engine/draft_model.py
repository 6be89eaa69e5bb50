"""Speculative decoding with a draft model: a smaller model of the target's tokenizer proposes k tokens greedily,
and the target verifies them in one step (spec_decode.py, rejection_sampler.py).

The draft keeps its own paged KV pool, block tables and model runner, keyed by the target's sequence ids, so the
target's scheduler never sees it: preemption, swapping or copy-on-write of the target's blocks leave the draft's
KV as it was. Before a step, for the sequences about to decode:
1. one pass catches the draft up on the tokens it has not computed (the whole prompt on a sequence's first
   step, then the tokens the last verification kept) and takes the first draft from its last row;
2. k - 1 one-token passes take the others, writing their KV after the sequence's tokens.
The drafts' KV is never trusted later: the next catch-up starts at the first token the draft did not see as a
real one. A greedy draft is a point mass, for which the rejection sampler's acceptance min(1, p/q) is exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from engine.block_manager import blocks_for
from engine.config import EngineConfig
from engine.kv_cache import kv_block_bytes
from engine.model_builder import BuiltModel
from engine.model_runner import ModelRunner
from engine.scheduler import SchedulerOutput
from engine.sequence import Sequence
from engine.spec_decode import draft_room

# The draft's KV pool is sized for max_num_seqs sequences of max_model_len tokens, at most this many GiB; a
# sequence the pool cannot hold gets no drafts (it decodes one token at a time) until blocks free up.
MAX_DRAFT_KV_GIB = 1.0
# A catch-up of at most this many tokens runs as decode rows (the fused CPU step serves those), more as a prefill.
SHORT_CATCH_UP = 16


@dataclass
class _DraftSeq:
    """A sequence as the draft's model runner reads it: its tokens (then the drafts), its blocks in the draft's
    pool, and how many of its tokens have their KV there."""

    token_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    needs_prompt_logprobs: bool = False
    spec_token_ids: list[int] = field(default_factory=list)  # a short catch-up's tokens after its first
    # After a proposal: the real tokens it started from, and the drafts whose KV it wrote after them (all but the
    # last), valid only as far as the sequence's next tokens turn out to be those drafts.
    num_real: int = 0
    drafts_written: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


class DraftModelProposer:
    def __init__(
        self, built: BuiltModel, config: EngineConfig, k: int, target_vocab: int, max_num_batched_tokens: int
    ) -> None:
        """built: the draft model, loaded for the target's max_model_len. Raises ValueError when its vocabulary
        cannot be the target's."""
        m = built.model_config
        if m.vocab_size < target_vocab:
            raise ValueError(
                f"the draft model {m.model} has {m.vocab_size} tokens, fewer than the target's {target_vocab}: a "
                "draft model must share the target's tokenizer"
            )
        self.k, self.vocab, self.max_model_len = k, target_vocab, m.max_model_len
        device = config.torch_device
        self.runner = ModelRunner(built.model, built.backend, m, config.block_size, device)
        blocks = config.max_num_seqs * blocks_for(m.max_model_len + k, config.block_size)
        gib = min(blocks * kv_block_bytes(m, config.block_size) / 2**30, MAX_DRAFT_KV_GIB)
        pool = replace(config, kv_cache_memory=gib, preemption_mode="recompute", speculative_config=None)
        size = self.runner.init_kv_cache(pool, max_num_batched_tokens)
        if device.type == "cpu" and config.cpu_fused_decode:
            self.runner.build_fused_decode()
        self.block_size = config.block_size
        self.free_blocks = list(range(size.num_blocks - 1, -1, -1))  # popped from the end: low ids first
        self.seqs: dict[int, _DraftSeq] = {}

    def propose(self, seqs: list[Sequence], running: list[Sequence]) -> list[list[int]]:
        """Up to k greedy drafts for each sequence of seqs; running: every running sequence (the others' state
        is dropped, their blocks freed)."""
        self._forget_all_but({s.seq_id for s in running})
        wanted = [draft_room(seq, self.k, self.max_model_len) for seq in seqs]
        drafting: list[tuple[_DraftSeq, int, int]] = []  # (draft view, tokens before the drafts, drafts wanted)
        for seq, k in zip(seqs, wanted):
            view = self._view(seq, k) if k > 0 else None
            if view is not None:
                drafting.append((view, seq.num_tokens, k))
        if drafting:
            self._draft(drafting)
        views = {id(v): v for v, _, _ in drafting}
        out = []
        for seq in seqs:
            view = self.seqs.get(seq.seq_id)
            if view is None or id(view) not in views:
                out.append([])
                continue
            drafts = view.token_ids[seq.num_tokens :]
            out.append(drafts)
            view.num_real, view.drafts_written = seq.num_tokens, drafts[:-1]
            del view.token_ids[seq.num_tokens :]
        return out

    def _view(self, seq: Sequence, k: int) -> _DraftSeq | None:
        """The sequence's draft view with its tokens brought up to date and blocks for its k drafts; None when
        the pool has no blocks for them."""
        view = self.seqs.setdefault(seq.seq_id, _DraftSeq())
        view.token_ids = list(seq.token_ids)
        # The KV of the tokens the draft saw as real holds; a written draft's holds when it became the real token
        # there (verified, or sampled alike later); the last token is always fed, its logits give the first draft.
        valid = view.num_real
        for draft, token in zip(view.drafts_written, view.token_ids[valid:]):
            if draft != token:
                break
            valid += 1
        view.num_computed_tokens = min(valid, seq.num_tokens - 1)
        # Positions up to num_tokens + k - 2 get KV: the sequence's tokens, then every draft but the last.
        need = blocks_for(seq.num_tokens + k - 1, self.block_size) - len(view.block_table)
        if need > len(self.free_blocks):
            return None
        view.block_table.extend(self.free_blocks.pop() for _ in range(max(need, 0)))
        return view

    @torch.inference_mode()
    def _draft(self, drafting: list[tuple[_DraftSeq, int, int]]) -> None:
        """Append each view's greedy drafts to its token_ids: the catch-up pass, then one token per pass. A short
        catch-up (the tokens the last verification kept) runs as decode rows, one per token, as the target
        verifies drafts, so the fused decode step serves it; a long one (a prompt) as a prefill."""
        catch_up = SchedulerOutput()
        for view, n, _ in drafting:
            behind = n - view.num_computed_tokens
            if behind == 1:
                catch_up.decodes.append(view)
            elif behind <= SHORT_CATCH_UP:
                view.spec_token_ids = view.token_ids[view.num_computed_tokens + 1 : n]
                catch_up.spec_decodes.append((view, behind))
            else:
                catch_up.prefills.append((view, behind))
        self._pass(catch_up)
        for step in range(1, max(k for _, _, k in drafting)):
            self._pass(SchedulerOutput(decodes=[v for v, _, k in drafting if k > step]))

    def _pass(self, out: SchedulerOutput) -> None:
        """Run the draft over `out` and append each sampled view's argmax (over the target's vocabulary)."""
        result = self.runner.execute(out)
        views = list(result.sample_seqs)
        rows = [result.logits[:, : self.vocab]] if views else []
        for view, logits in result.spec_logits:  # a short catch-up: its last row follows the last token
            views.append(view)
            rows.append(logits[-1:, : self.vocab])
            view.spec_token_ids = []
        picks = torch.cat(rows).argmax(dim=-1).tolist()
        for view, token in zip(views, picks):
            view.num_computed_tokens = view.num_tokens
            view.token_ids.append(token)

    def _forget_all_but(self, live: set[int]) -> None:
        for seq_id in [s for s in self.seqs if s not in live]:
            self.free_blocks.extend(reversed(self.seqs.pop(seq_id).block_table))
