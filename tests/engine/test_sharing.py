"""Memory sharing end to end on tiny random models: parallel samples fork the prompt's blocks and copy a shared
block on the first write, beam search equals transformers' beam search while its beams share blocks, swap and
recompute preemption leave greedy outputs unchanged, a shared system prompt is computed once, prompt logprobs
match transformers, and the stats and block map report what the pool holds. Every run goes through the `drive`
fixture, which checks after each step that ref counts equal the tables holding each block.
"""

from __future__ import annotations

import math

import pytest
import torch

from engine import BeamSearchParams, SamplingParams
from engine.outputs import BlockState


def token_prompts(lengths, vocab: int, seed: int) -> list[list[int]]:
    """Random prompts of the given lengths; ids from 2 up, so never BOS (0) or EOS (1)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


def greedy_requests(prompts: list[list[int]], max_tokens: int = 32) -> list:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return [({"prompt_token_ids": p}, params) for p in prompts]


@pytest.fixture(scope="module")
def long_llama(make_tiny):
    """A tiny Llama with room for a 512-token prompt and 128 new tokens."""
    return make_tiny("llama", seed=21, max_position_embeddings=1024)


@pytest.fixture(scope="module")
def eos_llama(make_tiny, tiny_tokenizer):
    """A tiny Llama whose EOS probability varies from step to step around a few percent, so beams finish at
    different lengths (the last MLP's bias drives one hidden feature, which EOS's lm_head row reads)."""

    def favour_eos(model) -> None:
        with torch.no_grad():
            model.model.layers[-1].mlp.down_proj.bias[0] = 200.0
            model.lm_head.weight[tiny_tokenizer.eos_token_id, 0] = 0.6

    return make_tiny("llama", seed=11, edit=favour_eos, mlp_bias=True)


def sampled(seed: int, n: int = 1, **kw) -> SamplingParams:
    return SamplingParams(n=n, temperature=1.0, top_k=50, seed=seed, max_tokens=24, ignore_eos=True, **kw)


# ---- parallel sampling ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt_len, block_size", [(512, 16), (500, 16)])
def test_n4_blocks_in_use_are_the_prompt_once_plus_each_samples_own(long_llama, drive, prompt_len, block_size):
    """512-token prompt, n=4, 128 new tokens: ceil(512/bs) + 4 * ceil(128/bs) blocks at the peak; a prompt that
    ends inside a block adds one copied block per fork (n - 1: the last holder writes in place)."""
    n, new = 4, 128
    llm = long_llama.llm(num_blocks=128, block_size=block_size, max_model_len=1024)
    prompt = token_prompts([prompt_len], long_llama.config.vocab_size, seed=3)[0]
    params = SamplingParams(n=n, temperature=1.0, seed=0, max_tokens=new, ignore_eos=True)
    (out,), trace = drive(llm.llm_engine, [({"prompt_token_ids": prompt}, params)])
    assert [len(c.token_ids) for c in out.outputs] == [new] * n
    # Each sample's KV covers prompt + new - 1 tokens (its last token is sampled, never computed).
    own = math.ceil((prompt_len + new - 1) / block_size) - math.ceil(prompt_len / block_size)
    assert own == math.ceil(new / block_size)
    copies = (n - 1) if prompt_len % block_size else 0
    assert trace.peak_blocks_used == math.ceil(prompt_len / block_size) + n * own + copies
    assert trace.peak_blocks_shared == math.ceil(prompt_len / block_size)  # right after the fork


def test_n4_with_a_seed_is_reproducible_and_each_sample_is_its_seed_alone(tiny_llama, drive):
    llm = tiny_llama.llm(num_blocks=64, block_size=4, max_model_len=64)
    prompt = {"prompt_token_ids": token_prompts([9], tiny_llama.config.vocab_size, seed=4)[0]}
    params = sampled(seed=7, n=4, logprobs=2)
    (first,), trace = drive(llm.llm_engine, [(prompt, params)])
    (again,), _ = drive(llm.llm_engine, [(prompt, params)])
    alone, _ = drive(llm.llm_engine, [(prompt, sampled(seed=7 + i, logprobs=2)) for i in range(4)])
    assert trace.peak_blocks_shared > 0
    got = [c.token_ids for c in first.outputs]
    assert len({tuple(t) for t in got}) == 4, "the four samples should differ"
    assert got == [c.token_ids for c in again.outputs]
    assert got == [o.outputs[0].token_ids for o in alone]
    for fork, single in zip(first.outputs, (o.outputs[0] for o in alone)):
        assert fork.cumulative_logprob == pytest.approx(single.cumulative_logprob, abs=1e-4)
        assert [sorted(d) for d in fork.logprobs] == [sorted(d) for d in single.logprobs]


# ---- beam search ---------------------------------------------------------------------------------------------


def hf_beams(
    ref, prompt: list[int], width: int, max_new: int, length_penalty: float, early_stopping
) -> tuple[list[list[int]], list[float]]:
    with torch.inference_mode():
        r = ref.hf.generate(
            torch.tensor([prompt]),
            num_beams=width,
            num_return_sequences=width,
            do_sample=False,
            max_new_tokens=max_new,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
    # beam_indices is -1 past each hypothesis' end: it tells generated tokens from padding.
    lengths = (r.beam_indices != -1).sum(dim=1).tolist()
    return [
        r.sequences[i, len(prompt) : len(prompt) + n].tolist() for i, n in enumerate(lengths)
    ], r.sequences_scores.tolist()


def assert_beams_match(ref, outputs, prompts, width, max_new, length_penalty, early_stopping) -> None:
    for prompt, out in zip(prompts, outputs):
        expected, scores = hf_beams(ref, prompt, width, max_new, length_penalty, early_stopping)
        got = [s.tokens[len(prompt) :] for s in out.sequences]
        assert got == expected, f"prompt {prompt}: beams {got} vs transformers {expected}"
        ours = [s.cum_logprob / len(t) ** length_penalty for s, t in zip(out.sequences, got)]
        assert ours == pytest.approx(scores, abs=1e-4)


@pytest.mark.parametrize("early_stopping", [False, True, "never"])
@pytest.mark.parametrize("length_penalty", [1.0, 0.5, 2.0])
def test_beam_search_equals_transformers(eos_llama, early_stopping, length_penalty):
    llm = eos_llama.llm(num_blocks=96, block_size=4, max_model_len=64)
    prompts = token_prompts([5, 9, 13], eos_llama.config.vocab_size, seed=3)
    params = BeamSearchParams(beam_width=4, max_tokens=12, length_penalty=length_penalty, early_stopping=early_stopping)
    outputs = llm.beam_search([{"prompt_token_ids": p} for p in prompts], params)
    assert_beams_match(eos_llama, outputs, prompts, 4, 12, length_penalty, early_stopping)
    assert llm.llm_engine.block_manager.num_free_blocks == 96


def test_some_beams_end_on_eos_before_the_length_limit(eos_llama):
    """The model above must actually exercise finished hypotheses of different lengths."""
    llm = eos_llama.llm(num_blocks=96, block_size=4, max_model_len=64)
    prompts = token_prompts([5, 9, 13], eos_llama.config.vocab_size, seed=3)
    outputs = llm.beam_search([{"prompt_token_ids": p} for p in prompts], BeamSearchParams(4, 12))
    lengths = {len(s.tokens) - len(p) for p, o in zip(prompts, outputs) for s in o.sequences}
    reasons = {s.finish_reason for o in outputs for s in o.sequences}
    assert len(lengths) >= 3 and reasons == {"stop", "length"}


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_beam_search_equals_transformers_for_each_family(tiny_models, family):
    ref = tiny_models[family]
    llm = ref.llm(num_blocks=96, block_size=4, max_model_len=64)
    prompts = token_prompts([6, 11], ref.config.vocab_size, seed=8)
    outputs = llm.beam_search([{"prompt_token_ids": p} for p in prompts], BeamSearchParams(3, 10))
    assert_beams_match(ref, outputs, prompts, 3, 10, 1.0, False)


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_beam_search_survives_preemption(eos_llama, drive, mode):
    """A pool too small for four 4-beam searches: beams groups are swapped out (or recomputed, when forced) and
    still end exactly as transformers does."""
    llm = eos_llama.llm(num_blocks=28, block_size=4, max_model_len=64, preemption_mode=mode)
    prompts = token_prompts([5, 9, 13, 7], eos_llama.config.vocab_size, seed=3)
    params = BeamSearchParams(beam_width=4, max_tokens=12, early_stopping="never")
    engine = llm.llm_engine
    before = engine.scheduler.num_preemptions
    outputs, trace = drive(engine, [({"prompt_token_ids": p}, params) for p in prompts])
    assert engine.scheduler.num_preemptions > before
    assert trace.swapped == (mode == "swap")
    for prompt, out in zip(prompts, outputs):
        expected, _ = hf_beams(eos_llama, prompt, 4, 12, 1.0, "never")
        assert [c.token_ids for c in out.outputs] == expected


# ---- preemption and prefix caching leave greedy outputs unchanged --------------------------------------------


@pytest.mark.parametrize("mode, pool", [("swap", 24), ("recompute", 24), (None, 512)])
def test_greedy_outputs_are_the_same_under_swap_recompute_or_no_preemption(tiny_llama, drive, mode, pool):
    llm = tiny_llama.llm(num_blocks=pool, block_size=4, max_model_len=64, preemption_mode=mode)
    prompts = token_prompts([3, 4, 5, 8, 9, 16, 17, 27], tiny_llama.config.vocab_size, seed=5)
    engine = llm.llm_engine
    before = engine.scheduler.num_preemptions
    outputs, trace = drive(engine, greedy_requests(prompts))
    assert [o.outputs[0].token_ids for o in outputs] == tiny_llama.greedy_reference(prompts, 32)
    assert (engine.scheduler.num_preemptions > before) == (mode is not None)
    assert trace.swapped == (mode == "swap")


def test_parallel_samples_under_swap_preemption_equal_their_seeds_alone(tiny_llama, drive):
    """vLLM's policy swaps a group of several samples (their shared blocks stay shared) and recomputes single
    sequences; either way each sample ends as it does alone."""
    llm = tiny_llama.llm(num_blocks=20, block_size=4, max_model_len=64)
    prompts = token_prompts([9, 13, 6], tiny_llama.config.vocab_size, seed=6)
    requests = [({"prompt_token_ids": p}, sampled(seed=10 * i, n=3)) for i, p in enumerate(prompts)]
    outputs, trace = drive(llm.llm_engine, requests)
    assert trace.swapped
    big = tiny_llama.llm(num_blocks=256, block_size=4, max_model_len=64)
    for i, (p, out) in enumerate(zip(prompts, outputs)):
        alone, _ = drive(big.llm_engine, [({"prompt_token_ids": p}, sampled(seed=10 * i + j)) for j in range(3)])
        assert [c.token_ids for c in out.outputs] == [a.outputs[0].token_ids for a in alone]


def test_a_second_request_with_the_same_system_prompt_computes_only_its_own_tokens(tiny_llama, drive):
    llm = tiny_llama.llm(num_blocks=64, block_size=4, max_model_len=64)
    engine = llm.llm_engine
    system, q1, q2 = token_prompts([21, 5, 7], tiny_llama.config.vocab_size, seed=9)
    drive(engine, [({"prompt_token_ids": system + q1}, SamplingParams(temperature=0, max_tokens=2))])
    before = engine.get_stats()
    (out,), _ = drive(engine, [({"prompt_token_ids": system + q2}, SamplingParams(temperature=0, max_tokens=2))])
    after = engine.get_stats()
    assert out.num_cached_tokens == 20  # the system prompt's 5 full blocks
    assert after.prompt_tokens_total - before.prompt_tokens_total == len(system + q2) - 20
    assert after.prefix_cache_hits - before.prefix_cache_hits == 20
    assert after.prefix_cache_queries - before.prefix_cache_queries == len(system + q2)


# ---- prompt logprobs -----------------------------------------------------------------------------------------


def test_prompt_logprobs_match_transformers_across_chunks_and_cached_prefixes(tiny_llama, drive):
    """A chunked prefill (8-token budget) and a prompt whose prefix is cached: the prompt is still computed in
    full, since cached blocks carry no logits."""
    llm = tiny_llama.llm(num_blocks=64, block_size=4, max_model_len=64, max_num_batched_tokens=8)
    prompt = token_prompts([19], tiny_llama.config.vocab_size, seed=12)[0]
    engine = llm.llm_engine
    drive(engine, [({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=1))])  # caches it
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3)
    (out,), trace = drive(engine, [({"prompt_token_ids": prompt}, params)])
    assert trace.chunked_prefill and out.num_cached_tokens == 0
    reference = torch.log_softmax(tiny_llama.logits(prompt), dim=-1)  # row i predicts token i + 1
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        entry = out.prompt_logprobs[pos]
        top = reference[pos - 1].topk(3).indices.tolist()
        assert set(entry) == set(top) | {prompt[pos]}
        for token, value in entry.items():
            assert value == pytest.approx(reference[pos - 1, token].item(), abs=1e-4)


# ---- stats and the block map ---------------------------------------------------------------------------------


def test_block_map_and_stats_show_sharing_while_it_happens(tiny_llama):
    llm = tiny_llama.llm(num_blocks=32, block_size=4, max_model_len=64)
    engine = llm.llm_engine
    prompt = token_prompts([10], tiny_llama.config.vocab_size, seed=13)[0]
    engine.add_request("shared", {"prompt_token_ids": prompt}, sampled(seed=1, n=3))
    engine.step()  # the prompt: 3 blocks (2 full, 1 partial), then the forks take them
    stats, block_map = engine.get_stats(), engine.get_block_map()
    assert stats.num_running == 3 and stats.num_blocks_used == 3 and stats.num_blocks_shared == 3
    assert stats.num_blocks_without_sharing == 9
    assert block_map.states[:3] == bytes([BlockState.SHARED] * 3) and set(block_map.states[3:]) == {BlockState.FREE}
    assert block_map.owners == dict.fromkeys(range(3), ("shared",) * 3)
    engine.step()  # two forks copy the partial block; the third writes in place
    stats, block_map = engine.get_stats(), engine.get_block_map()
    assert stats.num_blocks_used == 5 and stats.num_blocks_shared == 2
    assert sorted(block_map.states) == sorted([BlockState.SHARED] * 2 + [BlockState.USED] * 3 + [BlockState.FREE] * 27)
    while engine.has_unfinished_requests():
        engine.step()
    stats, block_map = engine.get_stats(), engine.get_block_map()
    assert stats.num_blocks_used == 0 and stats.num_blocks_cached > 0
    assert set(block_map.states) == {BlockState.FREE, BlockState.CACHED} and block_map.owners == {}


def test_block_map_names_every_request_holding_a_prefix_hit_and_its_hash(tiny_llama):
    llm = tiny_llama.llm(num_blocks=32, block_size=4, max_model_len=64)
    engine = llm.llm_engine
    prefix, tail_a, tail_b = token_prompts([8, 3, 3], tiny_llama.config.vocab_size, seed=17)
    engine.add_request("first", {"prompt_token_ids": prefix + tail_a}, sampled(seed=1))
    engine.step()  # "first" computes the prefix's two full blocks and caches them
    engine.add_request("second", {"prompt_token_ids": prefix + tail_b}, sampled(seed=2))
    engine.step()  # "second" takes them from the prefix cache
    block_map = engine.get_block_map()
    first = engine.scheduler.running_seqs()[0]
    shared = first.block_table[:2]
    assert [block_map.states[b] for b in shared] == [BlockState.SHARED] * 2
    assert {b: block_map.owners[b] for b in shared} == dict.fromkeys(shared, ("first", "second"))
    assert [block_map.hashes[b] for b in shared] == first.block_hashes[:2]
    assert block_map.owners[first.block_table[2]] == ("first",)
    while engine.has_unfinished_requests():
        engine.step()
    block_map = engine.get_block_map()
    assert block_map.owners == {} and [block_map.hashes[b] for b in shared] == first.block_hashes[:2]


def test_aborting_a_swapped_out_group_frees_its_swap_blocks(tiny_llama):
    llm = tiny_llama.llm(num_blocks=16, block_size=4, max_model_len=64)
    engine = llm.llm_engine
    prompts = token_prompts([9, 9, 9], tiny_llama.config.vocab_size, seed=14)
    for i, p in enumerate(prompts):
        engine.add_request(f"g{i}", {"prompt_token_ids": p}, sampled(seed=i, n=3))
    for _ in range(40):
        engine.step()
        if engine.scheduler.swapped:
            break
    assert engine.get_stats().num_swapped > 0 and engine.get_stats().num_swap_blocks_used > 0
    for i in range(3):
        engine.abort_request(f"g{i}")
    stats = engine.get_stats()
    assert stats.num_swap_blocks_used == 0 and stats.num_blocks_used == 0 and stats.num_swapped == 0
    assert not engine.scheduler.has_unfinished()


# ---- limits ----------------------------------------------------------------------------------------------------


def test_max_num_seqs_counts_samples_not_forked_yet_and_the_full_beam_width(tiny_llama):
    llm = tiny_llama.llm(num_blocks=32, block_size=4, max_model_len=64, max_num_seqs=2)
    engine = llm.llm_engine
    a, b, c = token_prompts([7, 8, 9], tiny_llama.config.vocab_size, seed=15)
    engine.add_request("pair", {"prompt_token_ids": a}, sampled(seed=1, n=2))
    engine.add_request("single", {"prompt_token_ids": b}, sampled(seed=2))
    engine.add_request("beams", {"prompt_token_ids": c}, BeamSearchParams(beam_width=2, max_tokens=6))
    while engine.has_unfinished_requests():
        engine.step()
        assert engine.scheduler.num_running_seqs <= 2


def test_a_swapped_group_that_outgrew_the_pool_continues_by_recompute(tiny_llama, drive):
    """Two samples whose blocks together exceed the pool: swapped out, the group could never come back whole, so
    its samples are recomputed one at a time instead; each still equals its seed alone."""
    llm = tiny_llama.llm(num_blocks=16, block_size=4, max_model_len=64)
    prompt = token_prompts([6], tiny_llama.config.vocab_size, seed=16)[0]
    params = SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=50, ignore_eos=True)
    (out,), _ = drive(llm.llm_engine, [({"prompt_token_ids": prompt}, params)])
    big = tiny_llama.llm(num_blocks=64, block_size=4, max_model_len=64)
    alone, _ = drive(
        big.llm_engine,
        [
            ({"prompt_token_ids": prompt}, SamplingParams(temperature=1.0, seed=3 + i, max_tokens=50, ignore_eos=True))
            for i in range(2)
        ],
    )
    assert [c.token_ids for c in out.outputs] == [a.outputs[0].token_ids for a in alone]


def test_beams_stop_at_max_model_len_and_count_in_the_token_stats(tiny_llama):
    llm = tiny_llama.llm(num_blocks=64, block_size=4, max_model_len=32)
    prompt = token_prompts([10], tiny_llama.config.vocab_size, seed=17)[0]
    (out,) = llm.beam_search(
        {"prompt_token_ids": prompt}, BeamSearchParams(beam_width=2, max_tokens=100, ignore_eos=True)
    )
    assert [len(s.tokens) for s in out.sequences] == [32, 32]
    assert {s.finish_reason for s in out.sequences} == {"length"}
    # The first step samples from the prompt (1 row), each later one from both beams: 1 + 2 * 21 tokens.
    assert llm.llm_engine.get_stats().generation_tokens_total == 1 + 2 * 21


# ---- sampling extras through the engine ------------------------------------------------------------------------


@pytest.mark.parametrize("penalty", [1.5, 0.7])
def test_greedy_with_a_repetition_penalty_equals_transformers(tiny_llama, drive, penalty):
    llm = tiny_llama.llm(num_blocks=64, block_size=4, max_model_len=64)
    prompts = token_prompts([6, 11], tiny_llama.config.vocab_size, seed=18)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, repetition_penalty=penalty)
    outputs, _ = drive(llm.llm_engine, [({"prompt_token_ids": p}, params) for p in prompts])
    for prompt, out in zip(prompts, outputs):
        with torch.inference_mode():
            hf = tiny_llama.hf.generate(
                torch.tensor([prompt]),
                do_sample=False,
                max_new_tokens=20,
                min_new_tokens=20,
                repetition_penalty=penalty,
                pad_token_id=0,
            )
        assert out.outputs[0].token_ids == hf[0, len(prompt) :].tolist()


def test_allowed_ids_bad_words_and_bias_shape_what_is_sampled(tiny_llama, drive):
    llm = tiny_llama.llm(num_blocks=64, block_size=4, max_model_len=64)
    tok = llm.get_tokenizer()
    prompt = {"prompt_token_ids": token_prompts([8], tiny_llama.config.vocab_size, seed=19)[0]}
    plain, _ = drive(llm.llm_engine, [(prompt, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))])
    greedy_ids = plain[0].outputs[0].token_ids
    favourite = greedy_ids[0]
    allowed = [favourite, 40, 41]
    # A token of the greedy output that is a word of its own (it encodes back to itself) becomes the bad word.
    banned = next(t for t in greedy_ids if tok.encode(tok.decode([t]), add_special_tokens=False) == [t])
    word = tok.decode([banned])
    outs, _ = drive(
        llm.llm_engine,
        [
            (
                prompt,
                SamplingParams(n=3, temperature=1.0, seed=2, max_tokens=16, ignore_eos=True, allowed_token_ids=allowed),
            ),
            (prompt, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, bad_words=[word])),
            (prompt, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logit_bias={77: 100})),
        ],
    )
    assert all(set(c.token_ids) <= set(allowed) for c in outs[0].outputs)
    assert banned not in outs[1].outputs[0].token_ids
    assert outs[1].outputs[0].token_ids != plain[0].outputs[0].token_ids
    assert outs[2].outputs[0].token_ids == [77] * 6
