"""Bad input is refused with a ValueError (or subclass) that names the problem, and the engine keeps serving."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from transformers import GPT2Config, GPT2LMHeadModel

from engine import LLM, BeamSearchParams, SamplingParams

BLOCK = 4
MAX_LEN = 64


@pytest.fixture(scope="module")
def llm(tiny_llama) -> LLM:
    return tiny_llama.llm(num_blocks=32, block_size=BLOCK, max_model_len=MAX_LEN)


GOOD = {"prompt_token_ids": [5, 6, 7, 8, 9]}
GOOD_PARAMS = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


def assert_still_serves(llm: LLM) -> None:
    """Nothing half-submitted is left behind, and a good request runs to completion on a clean pool."""
    engine = llm.llm_engine
    assert not engine.has_unfinished_requests()
    out = llm.generate(GOOD, GOOD_PARAMS, use_tqdm=False)[0]
    assert out.finished and len(out.outputs[0].token_ids) == 4
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


# ---- models that cannot be loaded ---------------------------------------------------------------------------


def test_missing_path(tmp_path, llm):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ValueError, match="no such file or directory") as info:
        LLM(str(missing), kv_cache_memory=0.01)
    assert str(missing) in str(info.value)
    assert_still_serves(llm)


def test_unsupported_architecture(tmp_path, tiny_tokenizer, llm):
    config = GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64)
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="GPT2LMHeadModel") as info:
        LLM(str(tmp_path), kv_cache_memory=0.01)
    assert "LlamaForCausalLM" in str(info.value)  # says what would work
    assert_still_serves(llm)


def test_truncated_safetensors(tmp_path, tiny_llama, llm):
    for f in tiny_llama.path.iterdir():
        shutil.copy(f, tmp_path / f.name)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated") as info:
        LLM(str(tmp_path), kv_cache_memory=0.01)
    assert str(weights) in str(info.value)
    assert_still_serves(llm)


@pytest.mark.parametrize("keep", [0.5, 0.001], ids=["in-the-tensors", "in-the-header"])
def test_truncated_gguf(tmp_path, smollm2_gguf: Path, keep, llm):
    truncated = tmp_path / "truncated.gguf"
    with open(smollm2_gguf, "rb") as src:
        truncated.write_bytes(src.read(int(smollm2_gguf.stat().st_size * keep)))
    with pytest.raises(ValueError, match="truncated") as info:
        LLM(str(truncated), kv_cache_memory=0.01)
    assert str(truncated) in str(info.value)
    assert_still_serves(llm)


def test_kv_budget_too_small_for_max_model_len(tiny_llama):
    # 15 blocks of 4 tokens = 60 tokens < max_model_len 64.
    with pytest.raises(ValueError, match="max_model_len") as info:
        LLM(
            str(tiny_llama.path),
            block_size=BLOCK,
            max_model_len=MAX_LEN,
            kv_cache_memory=tiny_llama.kv_cache_gib(15, BLOCK),
        )
    assert "KV cache" in str(info.value)
    LLM(
        str(tiny_llama.path),
        block_size=BLOCK,
        max_model_len=MAX_LEN,
        kv_cache_memory=tiny_llama.kv_cache_gib(16, BLOCK),
    )  # exactly enough


# ---- bad requests -------------------------------------------------------------------------------------------

BAD_PROMPTS = {
    "too-long": ({"prompt_token_ids": [5] * MAX_LEN}, "max_model_len"),
    "empty-text": ("", "empty"),
    "empty-ids": ({"prompt_token_ids": []}, "empty"),
    "id-past-vocab": ({"prompt_token_ids": [5, 6, 10**6]}, "out of range"),
    "negative-id": ({"prompt_token_ids": [-1, 5]}, "out of range"),
    "not-ids": ({"prompt_token_ids": [5, "six"]}, "integers"),
    "not-a-prompt": (42, "prompt"),
}


@pytest.mark.parametrize("name", BAD_PROMPTS)
def test_bad_prompt_is_refused_and_the_engine_keeps_serving(name, llm):
    prompt, message = BAD_PROMPTS[name]
    with pytest.raises(ValueError, match=message):
        llm.llm_engine.add_request(f"bad-{name}", prompt, GOOD_PARAMS)
    # In a batch: all or nothing, the good prompt before it is withdrawn too.
    with pytest.raises(ValueError, match=message):
        llm.generate([GOOD, prompt], GOOD_PARAMS, use_tqdm=False)
    assert_still_serves(llm)


def test_longest_prompt_that_fits_still_generates(llm):
    out = llm.generate(
        {"prompt_token_ids": [5] * (MAX_LEN - 1)}, SamplingParams(temperature=0.0, max_tokens=10), use_tqdm=False
    )[0]
    assert len(out.outputs[0].token_ids) == 1 and out.outputs[0].finish_reason == "length"
    assert_still_serves(llm)


def test_duplicate_request_id(llm):
    engine = llm.llm_engine
    engine.add_request("dup", GOOD, GOOD_PARAMS)
    with pytest.raises(ValueError, match="dup"):
        engine.add_request("dup", GOOD, GOOD_PARAMS)
    while engine.has_unfinished_requests():
        engine.step()
    assert_still_serves(llm)


BAD_PARAMS = {
    "negative-temperature": (dict(temperature=-0.5), "temperature"),
    "top_p-zero": (dict(top_p=0.0), "top_p"),
    "top_p-above-one": (dict(top_p=1.01), "top_p"),
    "top_k-below-minus-one": (dict(top_k=-2), "top_k"),
    "min_p-above-one": (dict(min_p=1.5), "min_p"),
    "n-zero": (dict(n=0), "n must"),
    "max_tokens-zero": (dict(max_tokens=0), "max_tokens"),
    "min_tokens-above-max_tokens": (dict(min_tokens=8, max_tokens=4), "min_tokens"),
    "empty-stop-string": (dict(stop=""), "stop"),
    "empty-stop-in-list": (dict(stop=["end", ""]), "stop"),
    "negative-logprobs": (dict(logprobs=-1), "logprobs"),
    "too-many-logprobs": (dict(logprobs=10**4), "logprobs"),
    "greedy-with-n-2": (dict(n=2, temperature=0.0), "greedy"),
}


@pytest.mark.parametrize("name", BAD_PARAMS)
def test_bad_sampling_params_are_refused(name):
    kwargs, message = BAD_PARAMS[name]
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_sampling_params_must_match_the_prompts(llm):
    with pytest.raises(ValueError, match="2 sampling_params for 1 prompts"):
        llm.generate([GOOD], [GOOD_PARAMS, GOOD_PARAMS], use_tqdm=False)
    assert_still_serves(llm)


@pytest.mark.parametrize("field", ["stop_token_ids", "allowed_token_ids", "logit_bias"])
def test_token_ids_outside_the_vocabulary(llm, field):
    vocab = llm.llm_engine.model_config.vocab_size
    value = {vocab: 1.0} if field == "logit_bias" else [vocab]
    with pytest.raises(ValueError, match=f"{field} has token ids outside the vocabulary"):
        llm.generate(GOOD, SamplingParams(max_tokens=4, min_tokens=1, **{field: value}), use_tqdm=False)
    assert_still_serves(llm)


def test_parallel_sampling_wider_than_max_num_seqs(llm):
    limit = llm.llm_engine.config.max_num_seqs
    with pytest.raises(ValueError, match=f"n={limit + 1} exceeds max_num_seqs={limit}"):
        llm.generate(GOOD, SamplingParams(n=limit + 1, max_tokens=4), use_tqdm=False)
    with pytest.raises(ValueError, match=f"beam_width={limit + 1} exceeds max_num_seqs"):
        llm.beam_search(GOOD, BeamSearchParams(beam_width=limit + 1, max_tokens=4))
    assert_still_serves(llm)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"beam_width": 0, "max_tokens": 4}, "beam_width must be an integer >= 1"),
        ({"beam_width": 2, "max_tokens": 0}, "max_tokens must be an integer >= 1"),
        ({"beam_width": 2, "max_tokens": 4, "early_stopping": "sometimes"}, "early_stopping must be"),
    ],
)
def test_bad_beam_search_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BeamSearchParams(**kwargs)


def test_a_step_that_fails_aborts_its_batch_and_the_engine_serves_on(llm, monkeypatch):
    engine = llm.llm_engine

    def broken(logits, batch):
        raise RuntimeError("sampler failure")

    with monkeypatch.context() as m:
        m.setattr(engine, "sampler", broken)
        with pytest.raises(RuntimeError, match="sampler failure"):
            llm.generate([GOOD, GOOD], GOOD_PARAMS, use_tqdm=False)
    assert_still_serves(llm)


def test_generate_interrupted_leaves_nothing_behind(llm, monkeypatch):
    engine = llm.llm_engine
    real_step = engine.step
    calls = []

    def interrupted_step():
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_step()

    with monkeypatch.context() as m:
        m.setattr(engine, "step", interrupted_step)
        with pytest.raises(KeyboardInterrupt):
            llm.generate([GOOD] * 3, GOOD_PARAMS, use_tqdm=False)
    # The interrupted call's requests were aborted: a new call gets exactly its own outputs.
    assert_still_serves(llm)
