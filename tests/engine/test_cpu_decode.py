"""The CPU's fused decode step against the eager model: the same hidden states and K/V for every tiny family
(float32 and kept-quantized weights, batch 1 and 5, contexts over several blocks), the same greedy outputs with
it on and off (speculative decoding and preemption included), and steps with a prefill left to the eager path."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.models.cpu_decode import MAX_FLOAT_WEIGHT_ROWS
from engine.models.layers import ForwardContext

BLOCK = 4
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
# Prompt lengths of the rows: contexts across several blocks, ending inside and at block boundaries.
LENGTHS = {1: [70], 5: [9, 16, 23, 38, 61]}


def prompts_of(lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


def repetitive_prompts(vocab: int, seed: int) -> list[list[int]]:
    """Prompts that repeat a phrase, so prompt lookup has drafts to propose from the start."""
    g = torch.Generator().manual_seed(seed)
    phrases = [torch.randint(2, vocab, (n,), generator=g).tolist() for n in (5, 7, 3, 11)]
    return [p * r + p[:2] for p, r in zip(phrases, (3, 2, 5, 2))]


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def decode_step_both_ways(ref, quantization: str, batch: int, kv_cache_dtype: str = "auto"):
    """Prefill `batch` prompts, schedule the first decode step, and run it fused and eagerly on copies of the
    same KV pool (poisoned with NaN where nothing was written). Returns (fused, eager) hidden states and pools."""
    llm = ref.llm(
        num_blocks=96, block_size=BLOCK, max_model_len=128, quantization=quantization, kv_cache_dtype=kv_cache_dtype
    )
    engine = llm.llm_engine
    runner = engine.runner
    assert runner.fused_decode is not None
    runner.kv_cache.fill_(float("nan"))
    for i, p in enumerate(prompts_of(LENGTHS[batch], ref.config.vocab_size, seed=batch)):
        engine.add_request(f"r{i}", {"prompt_token_ids": p}, greedy(4))
    engine.step()  # every prefill, in one step
    out = engine.scheduler.schedule()
    assert len(out.decodes) == batch and not out.prefills
    input_ids, positions, inputs, _, _ = runner._prepare(out)
    pool = runner.kv_cache.clone()
    with torch.inference_mode():
        fused = runner.fused_decode.run(input_ids, positions, inputs)
        fused_pool = runner.kv_cache.clone()
        runner.kv_cache.copy_(pool)
        ctx = ForwardContext(runner.backend, runner.backend.prepare(inputs), runner.kv_cache)
        eager = runner.model(input_ids, positions, ctx)
    return fused, eager, fused_pool, runner.kv_cache.clone()


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_float_weights_give_the_eager_hidden_states(tiny_models, family, batch):
    fused, eager, fused_pool, eager_pool = decode_step_both_ways(tiny_models[family], "none", batch)
    assert torch.isfinite(fused).all()
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5 * eager.abs().max().item())
    # The K/V written at the rows' slots; every other slot (NaN included) left as it was.
    torch.testing.assert_close(fused_pool, eager_pool, rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("kv_cache_dtype", ["float32", "float16"])
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("quantization", ["int8", "int4"])
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_quantized_weights_give_the_eager_hidden_states(tiny_models, family, quantization, batch, kv_cache_dtype):
    """The same int8-activation kernels as the eager qmatmul: only float rounding differs (norms and rotary
    summed in another order), and now and then it moves an activation across an int8 rounding boundary, a
    step of 1/254 of its block's largest value. float16 is the KV of kept-quantized weights by default."""
    fused, eager, fused_pool, eager_pool = decode_step_both_ways(
        tiny_models[family], quantization, batch, kv_cache_dtype
    )
    assert fused_pool.dtype == getattr(torch, kv_cache_dtype)
    assert torch.isfinite(fused).all()
    scale = eager.abs().max().item()
    if kv_cache_dtype == "float32":
        torch.testing.assert_close(fused, eager, rtol=1e-3, atol=1e-3 * scale)
        torch.testing.assert_close(fused_pool, eager_pool, rtol=1e-3, atol=1e-3, equal_nan=True)
        return
    # A K rounded to float16 one ulp apart (the two paths sum in another order) moves an activation across an
    # int8 boundary now and then: from that layer on a row is off by a rounding step's worth (seen: 1.5% of the
    # largest value, and that row's K/V in the next layer), everything else as close as with float32 KV.
    torch.testing.assert_close(fused, eager, rtol=1e-3, atol=3e-2 * scale)
    assert (fused - eager).abs().median() <= 1e-4 * scale
    torch.testing.assert_close(fused_pool, eager_pool, rtol=1e-3, atol=0.1, equal_nan=True)
    written = ~eager_pool.isnan()
    off = ((fused_pool - eager_pool).abs() > 1e-3 + 1e-3 * eager_pool.abs()) & written
    assert off.sum() <= 0.01 * written.sum()


def run_both(ref, requests, **options):
    """Greedy outputs of the same requests with the fused decode step on and off, the fused engine's count of
    steps run fused, and the fused engine."""
    outputs, engines = {}, {}
    calls = 0
    for fused in (True, False):
        engine = engines[fused] = ref.llm(cpu_fused_decode=fused, **options).llm_engine
        assert (engine.runner.fused_decode is not None) == fused
        if fused:
            run = engine.runner.fused_decode.run

            def counted(*args, run=run):
                nonlocal calls
                calls += 1
                return run(*args)

            engine.runner.fused_decode.run = counted
        ids = [f"q{i}" for i in range(len(requests))]
        for rid, (prompt, params) in zip(ids, requests):
            engine.add_request(rid, {"prompt_token_ids": prompt}, params)
        done = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.outputs[0].token_ids
        outputs[fused] = [done[rid] for rid in ids]
    return outputs[True], outputs[False], calls, engines[True]


@pytest.mark.parametrize("quantization", ["none", "int8", "int4"])
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_greedy_outputs_are_the_same_fused_or_not(tiny_models, family, quantization):
    ref = tiny_models[family]
    requests = [(p, greedy(20)) for p in prompts_of([5, 13, 30, 47], ref.config.vocab_size, seed=7)]
    # float32 KV: float16 would round a K one ulp apart now and then, and through the int8 activations downstream
    # that can flip a tiny random model's near-tie; the hidden-state tests above cover float16 KV.
    fused, eager, calls, _ = run_both(
        ref,
        requests,
        num_blocks=96,
        block_size=BLOCK,
        max_model_len=128,
        quantization=quantization,
        kv_cache_dtype="float32",
    )
    assert fused == eager
    assert calls >= 19  # every decode-only step
    if quantization == "none":
        assert eager == ref.greedy_reference([p for p, _ in requests], 20)


@pytest.mark.parametrize("quantization", ["none", "int4"])
def test_speculative_decoding_runs_fused_with_the_same_outputs(tiny_llama, quantization):
    """Speculative decodes are decode rows too: the last token and each draft one row, with its own context."""
    requests = [(p, greedy(24)) for p in repetitive_prompts(tiny_llama.config.vocab_size, seed=3)]
    options = dict(
        num_blocks=64, block_size=BLOCK, max_model_len=96, quantization=quantization, kv_cache_dtype="float32"
    )
    fused, eager, calls, _ = run_both(tiny_llama, requests, speculative_config=NGRAM, **options)
    assert fused == eager
    assert 0 < calls < 24  # accepted drafts save steps: some decode steps verified drafts


def test_preemption_and_recompute_give_the_same_outputs(tiny_llama):
    """A pool too small for every request: sequences are preempted and recomputed (prefill steps, eager) between
    fused decode steps."""
    requests = [(p, greedy(24)) for p in prompts_of([9, 14, 21, 30, 6, 17], tiny_llama.config.vocab_size, seed=4)]
    fused, eager, calls, engine = run_both(tiny_llama, requests, num_blocks=24, block_size=BLOCK, max_model_len=64)
    assert fused == eager
    assert calls > 0 and engine.scheduler.num_preemptions > 0


def test_a_step_with_a_prefill_runs_eagerly(tiny_llama):
    engine = tiny_llama.llm(num_blocks=64, block_size=BLOCK, max_model_len=96).llm_engine
    runner = engine.runner
    steps = []
    fused_run, model_forward = runner.fused_decode.run, runner.model.forward
    runner.fused_decode.run = lambda *a: steps.append("fused") or fused_run(*a)
    runner.model.forward = lambda *a: steps.append("eager") or model_forward(*a)
    vocab = tiny_llama.config.vocab_size
    engine.add_request("a", {"prompt_token_ids": prompts_of([10], vocab, 1)[0]}, greedy(6))
    engine.step()  # a's prefill
    engine.step()  # a decodes
    engine.add_request("b", {"prompt_token_ids": prompts_of([7], vocab, 2)[0]}, greedy(3))
    engine.step()  # a decodes beside b's prefill
    engine.step()  # both decode
    assert steps == ["eager", "fused", "eager", "fused"]


@pytest.mark.parametrize("quantization", ["none", "int8"])
def test_float_weights_run_steps_past_the_row_limit_eagerly(tiny_llama, quantization):
    # Past MAX_FLOAT_WEIGHT_ROWS rows torch's float matmuls beat the fused step; kept-quantized weights stay fused.
    n = MAX_FLOAT_WEIGHT_ROWS
    engine = tiny_llama.llm(
        num_blocks=4 * (n + 1), block_size=BLOCK, max_model_len=32, max_num_seqs=n + 1, quantization=quantization
    ).llm_engine
    runner = engine.runner
    steps = []
    fused_run, model_forward = runner.fused_decode.run, runner.model.forward
    runner.fused_decode.run = lambda *a: steps.append("fused") or fused_run(*a)
    runner.model.forward = lambda *a: steps.append("eager") or model_forward(*a)
    prompts = prompts_of([5] * (n + 1), tiny_llama.config.vocab_size, 3)
    for i, p in enumerate(prompts):  # one request fewer decodes after the first decode step
        engine.add_request(f"r{i}", {"prompt_token_ids": p}, greedy(2 if i == 0 else 3))
    engine.step()  # every prefill
    engine.step()  # n + 1 rows
    engine.step()  # n rows
    assert not engine.has_unfinished_requests()
    if quantization == "none":
        assert steps == ["eager", "fused", "eager", "fused"]  # the fused step declined n + 1 rows
    else:
        assert steps == ["eager", "fused", "fused"]


def test_off_where_it_does_not_apply(tiny_llama):
    """The torch attention backend, and activations in bfloat16, run every step eagerly."""
    engine = tiny_llama.llm(num_blocks=16, block_size=BLOCK, max_model_len=32, attention_backend="torch").llm_engine
    assert engine.runner.fused_decode is None
    engine = LLM(str(tiny_llama.path), dtype="bfloat16", max_model_len=32, kv_cache_memory=0.01).llm_engine
    assert engine.runner.fused_decode is None
