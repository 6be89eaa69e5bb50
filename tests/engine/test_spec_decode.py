"""Speculative decoding by prompt lookup and by a draft model: proposals, greedy outputs identical to decoding one
token at a time (on every attention backend, through preemption), sampled outputs from the same distribution, and
the settings that turn it off for a sequence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import SamplingParams
from engine.config import SpeculativeConfig
from engine.rejection_sampler import _verify_sampled
from engine.spec_decode import lookup

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}


def chi_square_p(observed: np.ndarray, expected: np.ndarray) -> float:
    """p-value of Pearson's chi-square statistic (categories with expected count >= 5)."""
    keep = expected >= 5
    observed, expected = observed[keep], expected[keep]
    stat = float(((observed - expected) ** 2 / expected).sum())
    dof = len(expected) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2)))


def two_sample_p(a: np.ndarray, b: np.ndarray) -> float:
    """p-value that two count vectors over the same categories come from one distribution (chi-square test of
    homogeneity), over categories seen at least 10 times in all."""
    keep = (a + b) >= 10
    a, b = a[keep].astype(float), b[keep].astype(float)
    total = a + b
    ea, eb = total * a.sum() / total.sum(), total * b.sum() / total.sum()
    stat = float((((a - ea) ** 2) / ea + ((b - eb) ** 2) / eb).sum())
    dof = len(total) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2)))


# ---- proposals ------------------------------------------------------------------------------------------------


def test_lookup_takes_the_latest_occurrence_of_the_longest_suffix():
    tokens = np.array([1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 2, 3])
    # Suffix [5, 2, 3] never occurred before; [2, 3] did, last at index 6: what followed it there is 7, 8, 5, 2.
    assert lookup(tokens, 1, 3, 4) == [7, 8, 5, 2]
    assert lookup(tokens, 1, 3, 2) == [7, 8]
    assert lookup(np.array([1, 2, 3, 4]), 1, 3, 4) == []  # nothing repeats
    assert lookup(np.array([4, 1, 4]), 2, 3, 4) == []  # only a 1-gram repeats, below prompt_lookup_min
    assert lookup(np.array([4, 1, 4]), 1, 3, 4) == [1, 4]  # the follow-up may run into the suffix itself


def test_the_config_is_checked_in_words():
    assert SpeculativeConfig.from_dict(NGRAM).num_speculative_tokens == 4
    with pytest.raises(ValueError, match="method must be one of ngram"):
        SpeculativeConfig.from_dict({"method": "eagle"})
    with pytest.raises(ValueError, match="unknown keys: draft_tensor_parallel_size"):
        SpeculativeConfig.from_dict({"method": "ngram", "draft_tensor_parallel_size": 1})
    with pytest.raises(ValueError, match="prompt_lookup_min \\(3\\) must be <= prompt_lookup_max \\(2\\)"):
        SpeculativeConfig.from_dict({"prompt_lookup_min": 3, "prompt_lookup_max": 2})
    with pytest.raises(ValueError, match="num_speculative_tokens must be an integer >= 1"):
        SpeculativeConfig.from_dict({"num_speculative_tokens": 0})


# ---- greedy: identical outputs ------------------------------------------------------------------------------


def repetitive_prompts(vocab: int, seed: int) -> list[list[int]]:
    """Prompts that repeat a phrase, so prompt lookup has something to propose from the start."""
    g = torch.Generator().manual_seed(seed)
    prompts = []
    for length, repeats in ((5, 3), (7, 2), (3, 5), (11, 2)):
        phrase = torch.randint(2, vocab, (length,), generator=g).tolist()
        prompts.append(phrase * repeats + phrase[:2])
    return prompts


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_greedy_outputs_are_identical_with_and_without_speculation(tiny_llama, drive, backend):
    prompts = repetitive_prompts(tiny_llama.config.vocab_size, seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    requests = [({"prompt_token_ids": p}, params) for p in prompts]
    options = dict(num_blocks=64, block_size=4, max_model_len=96, attention_backend=backend)
    plain, _ = drive(tiny_llama.llm(**options).llm_engine, requests)
    engine = tiny_llama.llm(**options, speculative_config=NGRAM).llm_engine
    spec, trace = drive(engine, requests)
    assert [o.outputs[0].token_ids for o in spec] == [o.outputs[0].token_ids for o in plain]
    assert [o.outputs[0].token_ids for o in spec] == tiny_llama.greedy_reference(prompts, 24)
    stats = engine.get_stats()
    assert stats.spec_accepted_tokens > 0 and stats.spec_draft_tokens >= stats.spec_accepted_tokens
    # Accepted drafts are tokens for free: fewer steps than one token each would take.
    assert trace.steps < 24 + 1


def test_speculation_survives_preemption_and_chunked_prefill(tiny_llama, drive):
    """A pool too small for every sequence's drafts: drafts are dropped or sequences preempted and recomputed,
    and the outputs stay those of plain greedy decoding."""
    prompts = repetitive_prompts(tiny_llama.config.vocab_size, seed=5)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    requests = [({"prompt_token_ids": p}, params) for p in prompts]
    llm = tiny_llama.llm(
        num_blocks=18, block_size=4, max_model_len=64, max_num_batched_tokens=10, speculative_config=NGRAM
    )
    outputs, trace = drive(llm.llm_engine, requests)
    assert trace.chunked_prefill and llm.llm_engine.get_stats().num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outputs] == tiny_llama.greedy_reference(prompts, 20)


def test_drafts_stop_at_max_tokens_stop_strings_and_the_context(tiny_llama, drive):
    prompts = repetitive_prompts(tiny_llama.config.vocab_size, seed=7)
    cases = [
        SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True),  # runs into max_model_len
        SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=[7, 9, 11, 13], ignore_eos=True),
    ]
    requests = [({"prompt_token_ids": p}, c) for p in prompts for c in cases]
    options = dict(num_blocks=96, block_size=4, max_model_len=48)
    plain, _ = drive(tiny_llama.llm(**options).llm_engine, requests)
    spec, _ = drive(tiny_llama.llm(**options, speculative_config=NGRAM).llm_engine, requests)
    for a, b in zip(spec, plain):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].finish_reason == b.outputs[0].finish_reason
        assert a.outputs[0].text == b.outputs[0].text


def test_settings_that_depend_on_the_tokens_so_far_decode_one_token_at_a_time(tiny_llama, drive):
    prompts = repetitive_prompts(tiny_llama.config.vocab_size, seed=9)
    params = SamplingParams(temperature=0.0, max_tokens=16, repetition_penalty=1.3, ignore_eos=True)
    requests = [({"prompt_token_ids": p}, params) for p in prompts]
    options = dict(num_blocks=64, block_size=4, max_model_len=64)
    plain, _ = drive(tiny_llama.llm(**options).llm_engine, requests)
    engine = tiny_llama.llm(**options, speculative_config=NGRAM).llm_engine
    spec, _ = drive(engine, requests)
    assert [o.outputs[0].token_ids for o in spec] == [o.outputs[0].token_ids for o in plain]
    assert engine.get_stats().spec_draft_tokens == 0


def test_logprobs_of_verified_tokens_equal_plain_decoding(tiny_llama, drive):
    prompts = repetitive_prompts(tiny_llama.config.vocab_size, seed=3)[:2]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2)
    requests = [({"prompt_token_ids": p}, params) for p in prompts]
    options = dict(num_blocks=64, block_size=4, max_model_len=64)
    plain, _ = drive(tiny_llama.llm(**options).llm_engine, requests)
    engine = tiny_llama.llm(**options, speculative_config=NGRAM).llm_engine
    spec, _ = drive(engine, requests)
    assert engine.get_stats().spec_accepted_tokens > 0
    for a, b in zip(spec, plain):
        assert len(a.outputs[0].logprobs) == len(b.outputs[0].logprobs)
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert x.keys() == y.keys()
            assert all(abs(x[t] - y[t]) < 1e-4 for t in x)
        assert a.outputs[0].cumulative_logprob == pytest.approx(b.outputs[0].cumulative_logprob, abs=1e-3)


# ---- sampling: the same distribution ------------------------------------------------------------------------


def test_rejection_sampling_emits_tokens_from_the_target_distribution():
    """Rows p0, p1, p2 with drafts d1, d2: the first token emitted follows p0 whatever the draft, and the token
    after an accepted d1 follows p1."""
    probs = torch.tensor(
        [[0.1, 0.4, 0.2, 0.3, 0.0], [0.25, 0.05, 0.3, 0.1, 0.3], [0.2, 0.2, 0.2, 0.2, 0.2]], dtype=torch.float32
    )
    gen = torch.Generator().manual_seed(0)
    draws = 20_000
    first, second = np.zeros(5), np.zeros(5)
    for _ in range(draws):
        tokens = _verify_sampled([1, 2], probs, gen)
        first[tokens[0]] += 1
        if tokens[0] == 1:
            second[tokens[1]] += 1
    assert first[4] == 0  # a token the target never draws is never emitted
    assert chi_square_p(first, probs[0].numpy() * draws) > 1e-4
    assert chi_square_p(second, probs[1].numpy() * second.sum()) > 1e-4
    # The test tells distributions apart: the first token is not distributed like p1.
    assert chi_square_p(first, probs[1].numpy() * draws) < 1e-12


@pytest.mark.parametrize("proposer", ["ngram", "draft_model"])
def test_sampled_outputs_follow_the_same_distribution_with_and_without_speculation(tiny_models, proposer):
    """A prompt that cycles through four tokens, sampling restricted to them: the marginal distribution of each
    generated position is the same with speculation (which verifies most positions) as without. The draft model
    is the target itself: its greedy drafts are accepted with the target's probability of that token, so both
    acceptance and the residual draws after a rejection are exercised."""
    tiny_llama = tiny_models["llama"]
    allowed = [5, 17, 29, 41]
    prompt = (allowed * 6)[:-1]
    runs = 600
    counts = {}
    speculative = NGRAM if proposer == "ngram" else draft_model(tiny_models["llama"])
    for spec in (False, True):
        options = {"speculative_config": speculative} if spec else {}
        llm = tiny_llama.llm(num_blocks=640, block_size=4, max_model_len=48, max_num_seqs=256, **options)
        params = [
            SamplingParams(
                temperature=1.0, seed=1000 * spec + i, max_tokens=5, ignore_eos=True, allowed_token_ids=allowed
            )
            for i in range(runs)
        ]
        outputs = llm.generate([{"prompt_token_ids": prompt}] * runs, params, use_tqdm=False)
        if spec:
            stats = llm.llm_engine.get_stats()
            assert stats.spec_accepted_tokens > runs // 4  # speculation did run
            assert stats.spec_draft_tokens > stats.spec_accepted_tokens  # and some drafts were rejected
        tokens = np.array([o.outputs[0].token_ids for o in outputs])  # [runs, 5]
        counts[spec] = [np.array([(tokens[:, i] == t).sum() for t in allowed]) for i in range(5)]
    for position in range(1, 5):
        assert two_sample_p(counts[False][position], counts[True][position]) > 1e-4, position


# ---- a draft model ------------------------------------------------------------------------------------------


def draft_model(ref, k: int = 3) -> dict:
    return {"model": str(ref.path), "num_speculative_tokens": k}


def random_prompts(vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in (5, 13, 30, 47)]


def test_a_draft_model_config_is_checked_in_words():
    config = SpeculativeConfig.from_dict({"model": "org/draft", "num_speculative_tokens": 5})
    assert (config.method, config.model, config.num_speculative_tokens) == ("draft_model", "org/draft", 5)
    with pytest.raises(ValueError, match="method draft_model needs `model`"):
        SpeculativeConfig.from_dict({"method": "draft_model"})
    with pytest.raises(ValueError, match="method draft_model has unknown keys: prompt_lookup_max"):
        SpeculativeConfig.from_dict({"model": "org/draft", "prompt_lookup_max": 2})


@pytest.mark.parametrize("draft", ["llama", "qwen2"])
def test_greedy_outputs_are_identical_with_a_draft_model(tiny_models, drive, draft):
    """The target as its own draft: nearly every draft accepted, a step yields up to k + 1 tokens. Another
    family's random model as the draft: most drafts rejected, and the outputs the same all the same."""
    target = tiny_models["llama"]
    prompts = random_prompts(target.config.vocab_size, seed=21)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    requests = [({"prompt_token_ids": p}, params) for p in prompts]
    options = dict(num_blocks=96, block_size=4, max_model_len=96)
    engine = target.llm(**options, speculative_config=draft_model(tiny_models[draft])).llm_engine
    spec, trace = drive(engine, requests)
    assert [o.outputs[0].token_ids for o in spec] == target.greedy_reference(prompts, 24)
    stats = engine.get_stats()
    assert stats.spec_draft_tokens > 0
    if draft == "llama":
        assert stats.spec_accepted_tokens >= 0.9 * stats.spec_draft_tokens
        assert trace.steps <= 24 // 2  # 3 drafts a step, nearly all kept
    else:
        assert stats.spec_accepted_tokens < 0.5 * stats.spec_draft_tokens
    # Finished sequences give the draft's blocks back at the next step.
    engine.step()
    proposer = engine.proposer
    assert not proposer.seqs and len(proposer.free_blocks) == proposer.runner.kv_cache.shape[3]


def test_a_draft_model_survives_preemption_and_chunked_prefill(tiny_llama, drive):
    """A target pool too small for every sequence: sequences are preempted and recomputed while the draft keeps
    its own KV, and the outputs stay those of plain greedy decoding."""
    prompts = repetitive_prompts(tiny_llama.config.vocab_size, seed=5)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    requests = [({"prompt_token_ids": p}, params) for p in prompts]
    llm = tiny_llama.llm(
        num_blocks=18,
        block_size=4,
        max_model_len=64,
        max_num_batched_tokens=10,
        speculative_config=draft_model(tiny_llama),
    )
    outputs, trace = drive(llm.llm_engine, requests)
    stats = llm.llm_engine.get_stats()
    assert trace.chunked_prefill and stats.num_preemptions > 0 and stats.spec_accepted_tokens > 0
    assert [o.outputs[0].token_ids for o in outputs] == tiny_llama.greedy_reference(prompts, 40)


def test_a_draft_model_must_cover_the_targets_vocabulary(tiny_llama, make_tiny):
    options = dict(num_blocks=32, block_size=4, max_model_len=64)
    small = make_tiny("llama", seed=11, vocab_size=tiny_llama.config.vocab_size - 8)
    with pytest.raises(
        ValueError,
        match=r"has \d+ tokens, fewer than the target's \d+: a draft model must share the target's tokenizer",
    ):
        tiny_llama.llm(**options, speculative_config=draft_model(small))
    with pytest.raises(ValueError, match=r"the draft model: .*/no/such/draft"):
        tiny_llama.llm(**options, speculative_config={"model": "/no/such/draft"})
