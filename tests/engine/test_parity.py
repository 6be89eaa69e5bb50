"""Greedy decoding through the paged engine is token-identical to transformers' generate, for every supported
family and for SmolLM2, with a block pool small enough that sequences are preempted and recomputed, block tables
many blocks long, prefix caching on or off, and chunked prefill. A bfloat16 KV cache stays close, and whatever
the KV pool held before a slot was written (NaN, inf) never reaches an output, on every attention backend.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from engine import SamplingParams

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
NEW_TOKENS = 32
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
GREEDY_LOGPROBS = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=1)

# Tiny models: 4-token blocks. Lengths sit on block boundaries (4, 8, 16) and one past them (5, 9, 17).
BLOCK = 4
LENGTHS = (3, 4, 5, 8, 9, 16, 17, 27)
MAX_LEN = 64  # 27 + 32 = 59 tokens fit
SMALL_POOL = 24  # 96 tokens, while the 8 sequences grow to 35-59 tokens each (~345 in all)

# SmolLM2: 8-token blocks; its engine (session fixture smollm2_llm) has 40 blocks = 320 tokens for ~460.
SMOL_LENGTHS = (7, 8, 9, 16, 17, 33, 48, 64)
SMOL_TEXTS = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg, a goldsmith "
    "in Mainz, developed a system of movable metal type. Books could now be produced far faster than by hand "
    "copying, and within fifty years presses were running in more than two hundred European cities. Prices "
    "fell, literacy spread, and ideas crossed borders in months instead of decades.",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    if n < 2:\n        return n\n'
    "    return fibonacci(n - 1) + fibonacci(n - 2)\n\n\n# Print the first twenty numbers of the sequence,\n"
    "# one per line, with their index.\nfor i in range(20):\n    print(i, fibonacci(i))\n",
    "Dear Ms. Alvarez,\n\nThank you for your letter of March 3rd about the community garden. The committee met on "
    "Tuesday evening and agreed to extend the watering schedule through October, to buy two new compost bins, "
    "and to hold a volunteer day on the first Saturday of every month. We hope to see you there.\n\nKind regards,",
)


def token_prompts(lengths, vocab: int, seed: int) -> list[list[int]]:
    """Random prompts of the given lengths; ids from 2 up, so never BOS (0) or EOS (1)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


def as_requests(prompts, params=GREEDY):
    return [({"prompt_token_ids": p}, params) for p in prompts]


def assert_same_tokens(got: list[list[int]], expected: list[list[int]]) -> None:
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        first = next((j for j, (a, b) in enumerate(zip(g, e)) if a != b), None)
        assert g == e, f"prompt {i}: first difference at output token {first}: engine {g} vs transformers {e}"


def assert_not_degenerate(outputs: list[list[int]]) -> None:
    """A model that says the same few tokens whatever the prompt would make parity meaningless."""
    assert len({tuple(o) for o in outputs}) == len(outputs), "two prompts gave the same output"
    for o in outputs:
        assert len(set(o)) >= 4, f"output nearly constant: {o}"


@pytest.fixture(scope="module")
def prompts(tiny_models) -> dict[str, list[list[int]]]:
    return {
        name: token_prompts(LENGTHS, m.config.vocab_size, seed=100 + i)
        for i, (name, m) in enumerate(tiny_models.items())
    }


def test_families_under_test_are_the_tiny_models(tiny_models):
    assert set(FAMILIES) == set(tiny_models)


@pytest.mark.parametrize("backend", ["cpu", "torch"])  # the compiled decode kernel and the plain torch path
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers_with_preemption(family, backend, tiny_models, prompts, drive):
    model = tiny_models[family]
    engine = model.llm(
        num_blocks=SMALL_POOL, block_size=BLOCK, max_model_len=MAX_LEN, attention_backend=backend
    ).llm_engine
    expected = {"cpu": "CpuAttentionBackend", "torch": "TorchAttentionBackend"}[backend]
    assert type(engine.runner.backend).__name__ == expected
    outputs, trace = drive(engine, as_requests(prompts[family]))
    got = [o.outputs[0].token_ids for o in outputs]
    assert_same_tokens(got, model.greedy_reference(prompts[family], NEW_TOKENS))
    assert_not_degenerate(got)
    assert all(o.outputs[0].finish_reason == "length" for o in outputs)
    assert engine.scheduler.num_preemptions > 0
    assert trace.peak_blocks_used == SMALL_POOL
    assert trace.max_table_blocks >= 12  # the longest sequence (59 tokens) spans 15 blocks


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_matches_transformers(family, tiny_models, prompts, drive):
    model = tiny_models[family]
    engine = model.llm(
        num_blocks=SMALL_POOL, block_size=BLOCK, max_model_len=MAX_LEN, max_num_batched_tokens=16
    ).llm_engine
    outputs, trace = drive(engine, as_requests(prompts[family]))
    assert trace.chunked_prefill
    assert_same_tokens([o.outputs[0].token_ids for o in outputs], model.greedy_reference(prompts[family], NEW_TOKENS))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_prefix_caching_on_and_off_give_the_same_tokens(family, tiny_models, drive):
    """Prompts sharing a 12-token prefix (3 blocks) arrive over several steps, so later ones hit the cache."""
    model = tiny_models[family]
    shared, *tails = token_prompts((12, 1, 3, 4, 5, 8, 9, 12, 15), model.config.vocab_size, seed=7)
    prompts = [shared + t for t in tails]
    add_at = [0, 1, 1, 2, 3, 5, 8, 13]
    results = {}
    for caching in (True, False):
        engine = model.llm(
            num_blocks=64, block_size=BLOCK, max_model_len=MAX_LEN, enable_prefix_caching=caching
        ).llm_engine
        outputs, trace = drive(engine, as_requests(prompts), add_at=add_at)
        results[caching] = [o.outputs[0].token_ids for o in outputs]
        cached = [o.num_cached_tokens for o in outputs]
        if caching:
            assert engine.block_manager.prefix_hits > 0
            assert max(cached) >= 12
        else:
            assert engine.block_manager.prefix_hits == 0 and not any(cached)
        assert trace.joined_mid_decode > 0
    assert results[True] == results[False]
    assert_same_tokens(results[True], model.greedy_reference(prompts, NEW_TOKENS))


def assert_close_to_reference(model, prompts, outputs) -> None:
    """For a 16-bit KV cache: rounding K/V may flip a near tie, after which greedy outputs diverge, so most (not
    all) outputs are identical; the first token's logprob (logprobs=1 requests) is off by rounding only."""
    expected = model.greedy_reference(prompts, NEW_TOKENS)
    got = [o.outputs[0].token_ids for o in outputs]
    agreeing = [next((j for j, (a, b) in enumerate(zip(g, e)) if a != b), NEW_TOKENS) for g, e in zip(got, expected)]
    assert sum(n == NEW_TOKENS for n in agreeing) >= 5, f"tokens before the first difference: {agreeing}"
    assert sum(agreeing) >= 0.6 * NEW_TOKENS * len(prompts), f"tokens before the first difference: {agreeing}"
    for p, o in zip(prompts, outputs):
        ref = model.logits(p)[-1].log_softmax(-1)
        token = o.outputs[0].token_ids[0]
        assert o.outputs[0].logprobs[0][token] == pytest.approx(ref[token].item(), abs=0.1)


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_kv_cache_stays_close_to_float32(family, tiny_models, prompts, drive):
    model = tiny_models[family]
    engine = model.llm(
        num_blocks=SMALL_POOL, block_size=BLOCK, max_model_len=MAX_LEN, kv_cache_dtype="bfloat16"
    ).llm_engine
    assert engine.runner.kv_cache.dtype == torch.bfloat16
    outputs, _ = drive(engine, as_requests(prompts[family], GREEDY_LOGPROBS))
    assert_close_to_reference(model, prompts[family], outputs)


def garbage_requests(model) -> tuple[list, list[int]]:
    """Requests that read the pool every way the engine does, over 4-token blocks: a prompt ending inside a block
    (decodes read a partly written block), a later prompt sharing its first 3 blocks (a prefix-cache hit: its
    prefill reads cached blocks and a fresh, partly written one), and n=2 samples of a prompt ending inside a
    block (the fork shares that block, and copy-on-write copies it whole, unwritten slots included). Contexts
    reach 21 tokens, past mistral's 16-token sliding window. Returns (requests, add_at)."""
    shared, tail_a, tail_b, other = token_prompts((12, 2, 3, 6), model.config.vocab_size, seed=31)
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=1)
    sampled = SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=6, ignore_eos=True, logprobs=1)
    requests = [
        ({"prompt_token_ids": shared + tail_a}, greedy),
        ({"prompt_token_ids": other}, sampled),
        ({"prompt_token_ids": shared + tail_b}, greedy),
    ]
    return requests, [0, 0, 2]


def run_over_pool(model, backend, kv_cache_dtype, fill, drive, monkeypatch):
    """Build an engine, fill its whole KV pool and swap space (every block, layer, K and V) with `fill` before
    any request, drive garbage_requests through it, and return every completion's tokens and logprobs. 8 blocks
    for ~13 blocks' worth of sequences: some group is swapped out and back in (preemption_mode swap)."""
    engine = model.llm(
        num_blocks=8,
        block_size=BLOCK,
        max_model_len=32,
        attention_backend=backend,
        kv_cache_dtype=kv_cache_dtype,
        preemption_mode="swap",
    ).llm_engine
    runner = engine.runner
    runner.kv_cache.fill_(fill)
    runner.swap_cache.fill_(fill)
    moves = Counter()

    def counted(name):
        real = getattr(runner.backend, name)

        def call(*args):
            moves[name] += 1
            return real(*args)

        return call

    for name in ("copy_blocks", "swap_blocks"):
        monkeypatch.setattr(runner.backend, name, counted(name))
    requests, add_at = garbage_requests(model)
    outputs, trace = drive(engine, requests, add_at=add_at)
    # Every path under test ran: partly written blocks, a prefix-cache hit, copy-on-write, swap out and in.
    assert all(len(r[0]["prompt_token_ids"]) % BLOCK for r in requests)
    assert outputs[2].num_cached_tokens == 12 and engine.block_manager.prefix_hits >= 12
    assert trace.peak_blocks_shared > 0 and moves["copy_blocks"] > 0
    assert trace.swapped and moves["swap_blocks"] >= 2
    return [[(c.token_ids, c.logprobs) for c in o.outputs] for o in outputs]


POISONS = {"nan": float("nan"), "inf": float("inf")}


@pytest.mark.parametrize("poison", POISONS)
@pytest.mark.parametrize(
    "family, backend, kv_cache_dtype",
    [
        ("llama", "torch", "auto"),
        ("llama", "cpu", "auto"),
        ("llama", "triton", "auto"),  # under Triton's interpreter on the CPU
        ("mistral", "torch", "auto"),  # a sliding window
        ("mistral", "cpu", "auto"),
        ("mistral", "triton", "auto"),
        ("llama", "torch", "bfloat16"),
        ("llama", "cpu", "bfloat16"),
    ],
)
def test_garbage_in_the_kv_pool_never_reaches_the_outputs(
    family, backend, kv_cache_dtype, poison, tiny_models, drive, monkeypatch
):
    """The engine may allocate the pool with torch.empty: a slot holds whatever was there (NaN, inf) until the
    engine writes it. Attention reads whole blocks, and a masked slot given weight 0 still poisons the sum
    (0 * NaN and 0 * inf are NaN), so unwritten slots must be excluded. Outputs over a pool filled with garbage
    equal those over a zeroed pool, bit for bit."""
    model = tiny_models[family]
    clean = run_over_pool(model, backend, kv_cache_dtype, 0.0, drive, monkeypatch)
    assert all(math.isfinite(lp) for o in clean for _, lps in o for entry in lps for lp in entry.values())
    assert run_over_pool(model, backend, kv_cache_dtype, POISONS[poison], drive, monkeypatch) == clean


def test_smollm2_greedy_matches_transformers_with_preemption(smollm2_llm, smollm2_reference, drive):
    engine = smollm2_llm.llm_engine
    bs = engine.block_manager.block_size
    assert bs == 8 and {n % bs for n in SMOL_LENGTHS} >= {0, 1}  # on a boundary and one past it
    tok = smollm2_reference.tokenizer
    texts = [tok.encode(t) for t in SMOL_TEXTS]
    assert min(map(len, texts)) >= max(SMOL_LENGTHS)
    prompts = [texts[i % len(texts)][:n] for i, n in enumerate(SMOL_LENGTHS)]
    preemptions_before = engine.scheduler.num_preemptions
    outputs, trace = drive(engine, as_requests(prompts))
    got = [o.outputs[0].token_ids for o in outputs]
    assert_same_tokens(got, smollm2_reference.greedy_reference(prompts, NEW_TOKENS))
    assert_not_degenerate(got)
    assert engine.scheduler.num_preemptions > preemptions_before
    assert trace.max_table_blocks >= (max(SMOL_LENGTHS) + NEW_TOKENS) // bs - 1
