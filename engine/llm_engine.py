"""LLMEngine: add_request / step / abort on one thread, synchronously. Owns model, KV pool, scheduler, sampler."""

from __future__ import annotations

import itertools
import time
from collections import deque

import torch

from engine.attention import select_backend
from engine.beam_search import BeamSearchParams, BeamSearchState
from engine.block_manager import BlockManager, blocks_for
from engine.config import EngineConfig, ModelConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.kv_cache import allocate_kv_caches
from engine.logits_processors import bad_words_token_ids
from engine.model_runner import ModelRunner
from engine.models.loader import open_model
from engine.models.registry import model_class
from engine.outputs import BlockMap, CompletionOutput, EngineStats, RequestOutput
from engine.prompts import PromptType
from engine.sampler import Sampler, SamplingBatch
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceGroup, SequenceStatus

# Tokens per step when max_num_batched_tokens is not given: large enough that prefill matmuls are efficient.
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048
# Throughput figures in stats average over this many seconds of recent steps.
_RATE_WINDOW_S = 2.0


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        device = self.device = config.torch_device
        source = open_model(config.model, revision=config.revision, cache_dir=config.download_dir)
        hf = source.hf_config
        cls = model_class(hf)
        self.tokenizer = source.tokenizer
        self.eos_token_ids = frozenset(source.eos_token_ids)
        max_pos = getattr(hf, "max_position_embeddings", None)
        max_model_len = config.max_model_len or max_pos
        if max_pos is not None and max_model_len > max_pos:
            raise ValueError(f"max_model_len {max_model_len} exceeds the model's context of {max_pos} tokens")
        checkpoint_dtype = getattr(hf, "dtype", None)
        dtype = config.model_dtype(checkpoint_dtype if isinstance(checkpoint_dtype, torch.dtype) else None)
        model = cls(hf, max_positions=max_model_len)
        a = model.arch
        self.model_config = ModelConfig(
            model=config.model,
            architecture=hf.architectures[0],
            dtype=dtype,
            kv_cache_dtype=config.cache_dtype(dtype),
            max_model_len=max_model_len,
            vocab_size=a.vocab_size,
            num_layers=a.num_layers,
            num_kv_heads=a.num_kv_heads,
            head_dim=a.head_dim,
        )
        bs = config.block_size
        backend = select_backend(
            config.attention_backend, device, bs, a.head_dim, a.sliding_window, self.model_config.kv_cache_dtype
        )
        model.materialize(device, dtype, triton_kernels=backend.fused_kernels)
        model.load_weights(source.weights(dtype))
        model.eval()

        self.max_num_batched_tokens = config.max_num_batched_tokens or DEFAULT_MAX_NUM_BATCHED_TOKENS
        caches = allocate_kv_caches(config, self.model_config, model, backend, self.max_num_batched_tokens)
        self.block_manager = BlockManager(caches.num_blocks, bs, config.enable_prefix_caching, caches.num_swap_blocks)
        self.scheduler = Scheduler(
            self.block_manager, config.max_num_seqs, self.max_num_batched_tokens, config.preemption_mode
        )
        self.runner = ModelRunner(model, backend, caches.device_cache, bs, device, caches.swap_cache)
        if device.type == "cuda" and config.cuda_graphs and backend.fused_kernels:
            from engine.cuda_graphs import DecodeGraphs

            graphs = DecodeGraphs(
                model, backend, caches.device_cache, min(config.max_num_seqs, 256), blocks_for(max_model_len, bs)
            )
            graphs.capture()
            self.runner.graphs = graphs
        self.sampler = Sampler(torch.Generator(device).manual_seed(config.seed))
        self._requests: dict[str, SequenceGroup] = {}
        self._seq_ids = itertools.count()
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0
        self._recent: deque[tuple[float, int, int]] = deque()  # (time, prompt tokens, generated tokens)

    # ---- requests -----------------------------------------------------------------------------------------
    def add_request(
        self, request_id: str, prompt: PromptType, params: SamplingParams | BeamSearchParams | None = None
    ) -> None:
        """Queue a request. SamplingParams(n=N) gives N samples sharing the prompt's blocks; BeamSearchParams runs
        a beam search whose beams share blocks, and whose output lists the beams best first."""
        params = params or SamplingParams()
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, token_ids = self._tokenize(prompt)
        self._check_prompt(token_ids)
        width = params.beam_width if isinstance(params, BeamSearchParams) else params.n
        if width > self.config.max_num_seqs:
            what = "beam_width" if isinstance(params, BeamSearchParams) else "n"
            raise ValueError(f"{what}={width} exceeds max_num_seqs={self.config.max_num_seqs}")
        if isinstance(params, BeamSearchParams):
            group = self._beam_group(request_id, text, token_ids, params)
        else:
            group = self._sampling_group(request_id, text, token_ids, params)
        self._requests[request_id] = group
        self.scheduler.add(group)

    def _sampling_group(
        self, request_id: str, text: str | None, token_ids: list[int], params: SamplingParams
    ) -> SequenceGroup:
        vocab = self.model_config.vocab_size
        params.check_vocab(vocab)
        bad_words = bad_words_token_ids(params.bad_words, self.tokenizer) if params.bad_words else []
        if any(t >= vocab for word in bad_words for t in word):
            raise ValueError(f"bad_words encode to token ids beyond the model's vocabulary of {vocab}")
        seqs = []
        for i in range(params.n):
            # Sample i draws from seed + i, so it equals what a request with that seed alone would produce.
            gen = None
            if params.seed is not None:
                gen = torch.Generator(self.device).manual_seed(params.seed + i)
            detok = IncrementalDetokenizer(
                self.tokenizer,
                token_ids,
                skip_special_tokens=params.skip_special_tokens,
                stop=list(params.stop_strings),
                include_stop_str_in_output=params.include_stop_str_in_output,
                min_tokens=params.min_tokens,
            )
            seq = Sequence(next(self._seq_ids), request_id, i, token_ids, params, detok, gen)
            seq.bad_words_token_ids = bad_words
            seqs.append(seq)
        return SequenceGroup(request_id, text, token_ids, params, seqs[:1], pending_forks=seqs[1:])

    def _beam_group(
        self, request_id: str, text: str | None, token_ids: list[int], params: BeamSearchParams
    ) -> SequenceGroup:
        # Beams never reach the sampler or the stop checks: the beam search picks their tokens and ends them.
        seq_params = SamplingParams(temperature=0.0, max_tokens=params.max_tokens)
        seq = Sequence(next(self._seq_ids), request_id, 0, token_ids, seq_params, None)
        beam = BeamSearchState(params, self.eos_token_ids)
        return SequenceGroup(request_id, text, token_ids, seq_params, [seq], beam=beam)

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) for t in ids):
                raise ValueError("prompt_token_ids must be a list of integers")
            return prompt.get("prompt"), list(ids)
        if isinstance(prompt, dict) and isinstance(prompt.get("prompt"), str):
            return prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
        raise ValueError(
            f"a prompt must be a string or a dict with 'prompt_token_ids' or 'prompt', got {type(prompt).__name__}"
        )

    def _check_prompt(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids out of range [0, {vocab}): {bad[:5]}")
        max_len = self.model_config.max_model_len
        if len(token_ids) >= max_len:
            raise ValueError(
                f"the prompt has {len(token_ids)} tokens, which leaves no room to generate within "
                f"max_model_len={max_len}"
            )

    def abort_request(self, request_id: str) -> None:
        group = self._requests.pop(request_id, None)
        if group is None:
            return
        for seq in group.seqs + group.pending_forks:
            if not seq.is_finished:
                seq.finish_reason = "abort"
                self.scheduler.free_seq(seq)
        group.pending_forks = []
        if group.beam is not None:
            group.beam.done = True
        self.scheduler.remove(group)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def has_request(self, request_id: str) -> bool:
        """Whether request_id is queued or running (not finished, aborted, or aborted by a failed step)."""
        return request_id in self._requests

    # ---- the step -----------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        if out.is_empty and not (out.swap_out or out.swap_in):
            # Capacity was checked at start-up (one max_model_len sequence always fits), so an empty step with
            # work pending and no preemption to recover from means a broken invariant, not a busy pool.
            if self.scheduler.has_unfinished() and not out.preempted:
                raise RuntimeError("the scheduler could not schedule any pending request")
            return []
        try:
            result = self.runner.execute(out)
            self.scheduler.on_step_done(out)
            touched = self._record_prompt_logprobs(result.prompt_logits)
            seqs, rows, beam_rows = self._fork_and_split(result.sample_seqs)
            sampled = None
            if seqs:
                batch = SamplingBatch.from_sequences(
                    seqs, list(self.eos_token_ids), self.model_config.vocab_size, self.device
                )
                sampled = self.sampler(result.logits[rows], batch)
            beam_logprobs = torch.log_softmax(result.logits[beam_rows], dim=-1) if beam_rows else None
        except Exception:
            # Retrying the same batch would fail the same way, so its requests are aborted (their blocks freed)
            # and the engine stays usable for the others.
            for rid in {seq.request_id for seq, _ in out.scheduled()}:
                self.abort_request(rid)
            raise
        if sampled is not None:
            for seq, token, lp in zip(seqs, sampled.token_ids, sampled.logprobs):
                self._append_token(seq, token, lp)
                touched[seq.request_id] = self._requests[seq.request_id]
        if beam_logprobs is not None:
            for i, row in enumerate(beam_rows):
                seq = result.sample_seqs[row]
                group = self._requests[seq.request_id]
                group.beam.add(seq, beam_logprobs[i])
                touched[seq.request_id] = group
            for group in list(touched.values()):
                if group.beam is not None and group.beam.ready(group.seqs):
                    self._beam_step(group)
        num_prompt = out.num_batched_tokens - len(out.decodes)
        self._record(num_prompt, len(seqs) + len(beam_rows))
        outputs = []
        for group in touched.values():
            if group.is_finished:
                self.scheduler.remove(group)
                del self._requests[group.request_id]
            if group.beam is None or group.is_finished:  # a beam search reports once, at the end
                outputs.append(self._make_output(group))
        return outputs

    def _fork_and_split(self, sample_seqs: list[Sequence]) -> tuple[list[Sequence], list[int], list[int]]:
        """Sequences that sample a token and their logits rows, after parallel samples took over their prompt's
        blocks (they sample from the prompt's logits row, each with its own generator); and the rows of beams."""
        seqs, rows, beam_rows = [], [], []
        for row, seq in enumerate(sample_seqs):
            group = self._requests[seq.request_id]
            if group.beam is not None:
                beam_rows.append(row)
                continue
            seqs.append(seq)
            rows.append(row)
            if group.pending_forks and seq is group.seqs[0]:
                for child in group.pending_forks:
                    child.take_state_of(seq)
                    self.block_manager.fork(seq, child)
                    seqs.append(child)
                    rows.append(row)
                group.seqs.extend(group.pending_forks)
                group.pending_forks = []
        return seqs, rows, beam_rows

    def _beam_step(self, group: SequenceGroup) -> None:
        """Advance a beam search by one token: the kept continuations reuse their parent's sequence (the first)
        or fork it (the others, sharing its blocks); parents with none are dropped, their blocks freed."""
        beam = group.beam
        # This step appends one token to every beam: at_limit when that token is the last max_model_len allows.
        at_limit = group.seqs[0].num_tokens + 1 >= self.model_config.max_model_len
        kept = beam.step(group.seqs, at_limit)
        if beam.done:
            for seq in group.seqs:
                self.scheduler.free_seq(seq)
            return
        taken: set[int] = set()
        new_seqs: list[tuple[Sequence, int, float]] = []
        for parent, token, score in kept:  # forks first: a fork copies its parent's tokens before they change
            if parent.seq_id in taken:
                child = parent.fork(next(self._seq_ids), len(new_seqs))
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
            beam.scores[seq.seq_id] = score
        group.seqs = [s for s, _, _ in new_seqs]

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
            touched[seq.request_id] = self._requests[seq.request_id]
        return touched

    def _append_token(self, seq: Sequence, token: int, lp: tuple[float, dict[int, float]] | None) -> None:
        seq.token_ids.append(token)
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
            elif (
                p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens
            ) or seq.num_tokens >= self.model_config.max_model_len:
                reason = "length"
        if reason is not None:
            seq.detokenizer.finish()
            seq.finish_reason = reason
            self.scheduler.free_seq(seq)

    def _make_output(self, group: SequenceGroup) -> RequestOutput:
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

    # ---- stats --------------------------------------------------------------------------------------------
    def _record(self, num_prompt: int, num_generated: int) -> None:
        now = time.perf_counter()
        self._prompt_tokens_total += num_prompt
        self._generation_tokens_total += num_generated
        self._recent.append((now, num_prompt, num_generated))
        while self._recent and now - self._recent[0][0] > _RATE_WINDOW_S:
            self._recent.popleft()

    def get_stats(self) -> EngineStats:
        bm = self.block_manager
        rate_p = rate_g = 0.0
        span = self._recent[-1][0] - self._recent[0][0] if self._recent else 0.0
        # An engine that has not stepped for a whole window is idle: its rates are 0, not the last ones seen.
        if span > 0 and time.perf_counter() - self._recent[-1][0] <= _RATE_WINDOW_S:
            # The first entry marks the window's start; the tokens after it were produced within span.
            produced = list(self._recent)[1:]
            rate_p = sum(r[1] for r in produced) / span
            rate_g = sum(r[2] for r in produced) / span
        free = bm.num_free_blocks
        sched = self.scheduler
        return EngineStats(
            num_blocks_total=bm.num_blocks,
            num_blocks_used=bm.num_blocks - free,
            num_blocks_free=free,
            num_blocks_cached=bm.num_cached_free_blocks,
            num_blocks_shared=bm.num_shared_blocks,
            num_blocks_without_sharing=sum(len(s.block_table) for s in self._running_seqs()),
            block_size=bm.block_size,
            num_running=sched.num_running_seqs,
            num_waiting=len(sched.waiting),
            num_swapped=sched.num_swapped_seqs,
            num_swap_blocks_total=bm.num_swap_blocks,
            num_swap_blocks_used=bm.num_swap_blocks - bm.num_free_swap_blocks,
            num_preemptions=sched.num_preemptions,
            prefix_cache_queries=bm.prefix_queries,
            prefix_cache_hits=bm.prefix_hits,
            prompt_tokens_total=self._prompt_tokens_total,
            generation_tokens_total=self._generation_tokens_total,
            prompt_tokens_per_s=rate_p,
            generation_tokens_per_s=rate_g,
        )

    def get_block_map(self) -> BlockMap:
        """Each KV block's state and owning request, for the monitor's block map."""
        owners: dict[int, str] = {}
        for seq in self._running_seqs():
            for block_id in seq.block_table:
                owners.setdefault(block_id, seq.request_id)
        return BlockMap(self.block_manager.block_states(), owners)

    def _running_seqs(self) -> list[Sequence]:
        return [s for g in self.scheduler.running for s in g.seqs if s.status is SequenceStatus.RUNNING]
