"""LLMEngine: add_request / step / abort on one thread, synchronously. Owns model, KV pool, scheduler, sampler."""
from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass

import torch

from engine.attention import select_backend
from engine.block_manager import BlockManager, blocks_for
from engine.config import DEFAULT_CPU_KV_CACHE_GIB, EngineConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.model_runner import ModelRunner
from engine.models.loader import open_model
from engine.models.registry import model_class
from engine.outputs import CompletionOutput, EngineStats, RequestOutput
from engine.sampler import Sampler, SamplingBatch
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput
from engine.sequence import Sequence

# Tokens per step when max_num_batched_tokens is not given: large enough that prefill matmuls are efficient.
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048
# Throughput figures in stats average over this many seconds of recent steps.
_RATE_WINDOW_S = 2.0


@dataclass(frozen=True)
class ModelConfig:
    """What the engine resolved about the model it runs."""
    model: str
    architecture: str
    dtype: torch.dtype
    kv_cache_dtype: torch.dtype
    max_model_len: int
    vocab_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Sequence]


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
        model.materialize(device, dtype)
        model.load_weights(source.weights(dtype))
        model.eval()
        a = model.arch
        self.model_config = ModelConfig(
            model=config.model, architecture=hf.architectures[0], dtype=dtype,
            kv_cache_dtype=config.cache_dtype(dtype), max_model_len=max_model_len, vocab_size=a.vocab_size,
            num_layers=a.num_layers, num_kv_heads=a.num_kv_heads, head_dim=a.head_dim)

        bs = config.block_size
        self.max_num_batched_tokens = config.max_num_batched_tokens or DEFAULT_MAX_NUM_BATCHED_TOKENS
        backend = select_backend(config.attention_backend, device, bs, a.head_dim, a.sliding_window)
        num_blocks = self._num_kv_blocks(model, backend)
        # Zeroed, not empty: attention reads whole blocks and masks the slots past a sequence's end, and a
        # masked NaN left in reused memory would still poison the weighted sum (0 * NaN).
        kv_cache = torch.zeros((2, a.num_layers, *backend.kv_cache_shape(num_blocks, bs, a.num_kv_heads, a.head_dim)),
                               dtype=self.model_config.kv_cache_dtype, device=device)
        self.block_manager = BlockManager(num_blocks, bs, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, self.max_num_batched_tokens)
        self.runner = ModelRunner(model, backend, kv_cache, bs, device)
        self.sampler = Sampler(torch.Generator(device).manual_seed(config.seed))
        self._requests: dict[str, _Request] = {}
        self._seq_ids = itertools.count()
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0
        self._recent: deque[tuple[float, int, int]] = deque()   # (time, prompt tokens, generated tokens)

    # ---- set-up -------------------------------------------------------------------------------------------
    def _kv_block_bytes(self) -> int:
        m = self.model_config
        elem = torch.empty((), dtype=m.kv_cache_dtype).element_size()
        return 2 * m.num_layers * self.config.block_size * m.num_kv_heads * m.head_dim * elem

    def _num_kv_blocks(self, model, backend) -> int:
        cfg, block_bytes = self.config, self._kv_block_bytes()
        if self.device.type == "cuda" and cfg.kv_cache_memory is None:
            budget = self._cuda_kv_budget(model, backend)
            what = f"gpu_memory_utilization={cfg.gpu_memory_utilization}"
        else:
            gib = cfg.kv_cache_memory or DEFAULT_CPU_KV_CACHE_GIB
            budget = int(gib * 2**30)
            what = f"kv_cache_memory={gib} GiB"
        max_len = self.model_config.max_model_len
        # More blocks than max_num_seqs full-length sequences can use would only cost memory and start-up time.
        useful = cfg.max_num_seqs * blocks_for(max_len, cfg.block_size)
        num_blocks = min(budget // block_bytes, useful)
        if num_blocks * cfg.block_size < max_len:
            need = blocks_for(max_len, cfg.block_size) * block_bytes / 2**30
            raise ValueError(
                f"the KV cache ({what}) holds {max(num_blocks, 0) * cfg.block_size} tokens, fewer than "
                f"max_model_len={max_len}: one sequence cannot fit. Give the KV cache at least {need:.3f} GiB "
                f"or lower max_model_len")
        return num_blocks

    def _cuda_kv_budget(self, model, backend) -> int:
        """Bytes left for KV blocks after weights and the peak activations of a full-budget prefill."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        n = min(self.max_num_batched_tokens, self.model_config.max_model_len)
        bs = self.config.block_size
        m = self.model_config
        probe_blocks = blocks_for(n, bs)
        shape = backend.kv_cache_shape(probe_blocks, bs, m.num_kv_heads, m.head_dim)
        probe_cache = torch.empty((2, m.num_layers, *shape), dtype=m.kv_cache_dtype, device=self.device)
        seq = Sequence(-1, "profile", 0, [0] * n, SamplingParams(), None)
        seq.block_table = list(range(probe_blocks))
        ModelRunner(model, backend, probe_cache, bs, self.device).execute(SchedulerOutput(prefills=[(seq, n)]))
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - probe_cache.numel() * probe_cache.element_size()
        del probe_cache
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(self.device).total_memory
        return int(total * self.config.gpu_memory_utilization - peak)

    # ---- requests -----------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | dict, params: SamplingParams | None = None) -> None:
        params = params or SamplingParams()
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, token_ids = self._tokenize(prompt)
        self._check_prompt(token_ids)
        vocab = self.model_config.vocab_size
        if any(t >= vocab for t in params.stop_token_ids):
            raise ValueError(f"stop_token_ids must be below the vocabulary size {vocab}, got {params.stop_token_ids}")
        seqs = []
        for i in range(params.n):
            gen = None
            if params.seed is not None:
                gen = torch.Generator(self.device).manual_seed(params.seed + i)
            detok = IncrementalDetokenizer(self.tokenizer, token_ids, skip_special_tokens=params.skip_special_tokens,
                                           stop=list(params.stop_strings),
                                           include_stop_str_in_output=params.include_stop_str_in_output,
                                           min_tokens=params.min_tokens)
            seqs.append(Sequence(next(self._seq_ids), request_id, i, token_ids, params, detok, gen))
        self._requests[request_id] = _Request(request_id, text, token_ids, seqs)
        for seq in seqs:
            self.scheduler.add(seq)

    def _tokenize(self, prompt: str | dict) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) for t in ids):
                raise ValueError("prompt_token_ids must be a list of integers")
            return prompt.get("prompt"), list(ids)
        if isinstance(prompt, dict) and isinstance(prompt.get("prompt"), str):
            return prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
        raise ValueError(f"a prompt must be a string or a dict with 'prompt_token_ids' or 'prompt', "
                         f"got {type(prompt).__name__}")

    def _check_prompt(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids out of range [0, {vocab}): {bad[:5]}")
        max_len = self.model_config.max_model_len
        if len(token_ids) >= max_len:
            raise ValueError(f"the prompt has {len(token_ids)} tokens, which leaves no room to generate within "
                             f"max_model_len={max_len}")

    def abort_request(self, request_id: str) -> None:
        req = self._requests.pop(request_id, None)
        if req is None:
            return
        for seq in req.seqs:
            if not seq.is_finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    # ---- the step -----------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        if out.is_empty:
            # Capacity was checked at start-up (one max_model_len sequence always fits), so an empty step with
            # work pending and no preemption to recover from means a broken invariant, not a busy pool.
            if self.scheduler.has_unfinished() and not out.preempted:
                raise RuntimeError("the scheduler could not schedule any pending request")
            return []
        try:
            seqs, logits = self.runner.execute(out)
            sampled = None
            if seqs:
                batch = SamplingBatch.from_sequences(seqs, list(self.eos_token_ids),
                                                     self.model_config.vocab_size, self.device)
                sampled = self.sampler(logits, batch)
        except Exception:
            # Nothing of this step was applied; retrying the same batch would fail the same way, so its requests
            # are aborted (their blocks freed) and the engine stays usable for the others.
            for rid in {seq.request_id for seq, _ in out.scheduled()}:
                self.abort_request(rid)
            raise
        self.scheduler.on_step_done(out)
        touched: dict[str, _Request] = {}
        if sampled is not None:
            for seq, token, lp in zip(seqs, sampled.token_ids, sampled.logprobs):
                self._append_token(seq, token, lp)
                touched[seq.request_id] = self._requests[seq.request_id]
        num_prompt = out.num_batched_tokens - len(out.decodes)
        self._record(num_prompt, len(seqs))
        return [self._make_output(req) for req in touched.values()]

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
            elif p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens:
                reason = "length"
            elif seq.num_tokens >= self.model_config.max_model_len:
                reason = "length"
        if reason is not None:
            seq.detokenizer.finish()
            seq.finish_reason = reason
            self.scheduler.finish(seq)

    def _make_output(self, req: _Request) -> RequestOutput:
        outputs = [CompletionOutput(s.index, s.text, s.output_token_ids, s.cumulative_logprob,
                                    list(s.logprobs) if s.logprobs is not None else None,
                                    s.finish_reason, s.stop_reason) for s in req.seqs]
        finished = all(s.is_finished for s in req.seqs)
        if finished:
            del self._requests[req.request_id]
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outputs, finished,
                             num_cached_tokens=req.seqs[0].num_cached_tokens)

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
        if span > 0:
            # The first entry marks the window's start; the tokens after it were produced within span.
            produced = list(self._recent)[1:]
            rate_p = sum(r[1] for r in produced) / span
            rate_g = sum(r[2] for r in produced) / span
        free = bm.num_free_blocks
        return EngineStats(
            num_blocks_total=bm.num_blocks, num_blocks_used=bm.num_blocks - free, num_blocks_free=free,
            num_blocks_cached=bm.num_cached_free_blocks, block_size=bm.block_size,
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            num_preemptions=self.scheduler.num_preemptions, prefix_cache_queries=bm.prefix_queries,
            prefix_cache_hits=bm.prefix_hits, prompt_tokens_total=self._prompt_tokens_total,
            generation_tokens_total=self._generation_tokens_total, prompt_tokens_per_s=rate_p,
            generation_tokens_per_s=rate_g)
