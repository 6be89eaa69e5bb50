"""The engine end to end on tiny random models (and SmolLM2 for chat): continuous batching with late joiners,
sampling features in mixed batches, stop conditions, logprobs against transformers, the offline LLM API, and the
KV pool's bookkeeping (checked after every step by the `drive` fixture).
"""

from __future__ import annotations

import math

import pytest
import torch

from engine import LLM, SamplingParams

BLOCK = 4
MAX_LEN = 64
POOL = 32  # 128 tokens: the 8-request workloads below preempt
LENGTHS = (3, 4, 5, 8, 9, 13, 17, 24)


def token_prompts(lengths, vocab: int, seed: int) -> list[dict]:
    """Random token-id prompts of the given lengths; ids from 2 up, so never BOS (0) or EOS (1)."""
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_token_ids": torch.randint(2, vocab, (n,), generator=g).tolist()} for n in lengths]


def greedy(max_tokens: int = 32, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def llm(tiny_llama) -> LLM:
    return tiny_llama.llm(num_blocks=POOL, block_size=BLOCK, max_model_len=MAX_LEN)


@pytest.fixture(scope="module")
def engine(llm):
    return llm.llm_engine


@pytest.fixture(scope="module")
def prompts(tiny_llama) -> list[dict]:
    return token_prompts(LENGTHS, tiny_llama.config.vocab_size, seed=5)


# ---- continuous batching ------------------------------------------------------------------------------------


def test_requests_joining_mid_decode_get_the_tokens_they_get_alone(engine, prompts, drive):
    """Greedy and seeded sampled requests arrive over 21 steps while others decode; a small pool preempts some.
    Each must produce exactly what it produces when it runs alone."""
    params = [
        greedy(32),
        SamplingParams(temperature=0.9, top_k=40, seed=1, max_tokens=30, ignore_eos=True),
        greedy(24),
        SamplingParams(temperature=1.2, top_p=0.9, seed=2, max_tokens=32, ignore_eos=True),
        greedy(32),
        SamplingParams(temperature=0.8, min_p=0.05, seed=3, max_tokens=28, ignore_eos=True),
        greedy(20),
        SamplingParams(temperature=1.0, seed=4, max_tokens=32, ignore_eos=True),
    ]
    requests = list(zip(prompts, params))
    preempted_before = engine.scheduler.num_preemptions
    together, trace = drive(engine, requests, add_at=[0, 0, 2, 3, 5, 8, 13, 21])
    assert trace.joined_mid_decode >= 5
    assert engine.scheduler.num_preemptions > preempted_before
    alone = [drive(engine, [r])[0][0] for r in requests]
    assert tokens(together) == tokens(alone)
    assert [len(t) for t in tokens(together)] == [p.max_tokens for p in params]
    assert [o.outputs[0].text for o in together] == [o.outputs[0].text for o in alone]


def test_abort_frees_the_blocks_and_the_others_finish(engine, prompts, all_blocks_free):
    for i, p in enumerate(prompts[:4]):
        engine.add_request(f"abort-{i}", p, greedy(32))
    for _ in range(6):
        engine.step()
    engine.abort_request("abort-1")
    assert all(s.request_id != "abort-1" for s in engine.scheduler.running + list(engine.scheduler.waiting))
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id != "abort-1"
            if out.finished:
                finished[out.request_id] = out
    assert set(finished) == {"abort-0", "abort-2", "abort-3"}
    all_blocks_free(engine)


# ---- sampling -----------------------------------------------------------------------------------------------

SEEDED = [
    SamplingParams(temperature=1.0, seed=11, max_tokens=24, ignore_eos=True),
    SamplingParams(temperature=0.7, top_k=20, seed=12, max_tokens=24, ignore_eos=True),
    SamplingParams(temperature=1.0, top_p=0.8, seed=13, max_tokens=24, ignore_eos=True),
    SamplingParams(temperature=1.0, min_p=0.1, seed=14, max_tokens=24, ignore_eos=True),
    SamplingParams(temperature=1.3, top_k=50, top_p=0.95, min_p=0.02, seed=15, max_tokens=24, ignore_eos=True),
]


def test_seeded_sampling_is_reproducible_and_does_not_depend_on_the_batch(engine, prompts, drive):
    seeded = list(zip(prompts, SEEDED))
    # Neighbours: unseeded sampling (draws from the engine's generator) and greedy, in the same steps.
    neighbours = [
        (prompts[5], SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True)),
        (prompts[6], greedy(24)),
        (prompts[7], SamplingParams(temperature=0.5, top_k=5, max_tokens=24)),
    ]
    first, _ = drive(engine, seeded + neighbours)
    second, _ = drive(engine, neighbours[::-1] + seeded[::-1])
    alone = [drive(engine, [r])[0][0] for r in seeded]
    first_seeded = tokens(first)[: len(seeded)]
    assert first_seeded == tokens(second)[len(neighbours) :][::-1]
    assert first_seeded == tokens(alone)
    # The seed matters, and sampling is not greedy in disguise.
    reseeded = [
        SamplingParams(
            temperature=p.temperature,
            top_k=p.top_k,
            top_p=p.top_p,
            min_p=p.min_p,
            seed=p.seed + 100,
            max_tokens=24,
            ignore_eos=True,
        )
        for p in SEEDED
    ]
    other_seed = tokens(drive(engine, list(zip(prompts, reseeded)))[0])
    as_greedy = tokens(drive(engine, [(p, greedy(24)) for p in prompts[: len(SEEDED)]])[0])
    assert sum(a != b for a, b in zip(first_seeded, other_seed)) >= 4
    assert sum(a != b for a, b in zip(first_seeded, as_greedy)) >= 4


def test_top_k_1_is_greedy(engine, prompts, drive):
    top1 = [SamplingParams(temperature=t, top_k=1, max_tokens=32, ignore_eos=True) for t in (0.5, 1.0, 3.0)]
    requests = [(p, top1[i % 3]) for i, p in enumerate(prompts)]
    assert tokens(drive(engine, requests)[0]) == tokens(drive(engine, [(p, greedy(32)) for p in prompts])[0])


def _where_it_ranked(token: int, entry: dict[int, float]) -> tuple[int, float, float, float]:
    """(rank among the entry's tokens, probability of the listed tokens ranked above it, its probability, the top
    token's probability)."""
    above = [lp for lp in entry.values() if lp > entry[token]]
    return len(above), sum(map(math.exp, above)), math.exp(entry[token]), math.exp(max(entry.values()))


def test_top_k_top_p_min_p_only_sample_allowed_tokens(engine, prompts, drive):
    """Logprobs are the model's distribution before any filter (temperature 1 here), so the top 20 of them show
    where each sampled token ranked. 8 prompts x 32 tokens per filter. A token outside the top 20 has at least
    their mass above it, so the checks hold for it too."""

    def run(**kw):
        params = [
            SamplingParams(temperature=1.0, seed=200 + i, max_tokens=32, ignore_eos=True, logprobs=20, **kw)
            for i in range(len(prompts))
        ]
        outs = drive(engine, list(zip(prompts, params)))[0]
        return [
            _where_it_ranked(tok, entry)
            for o in outs
            for tok, entry in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)
        ]

    # Unfiltered, each filter below would have removed many of the sampled tokens.
    free = run()
    assert sum(rank >= 3 for rank, *_ in free) >= 30
    assert sum(above >= 0.25 for _, above, _, _ in free) >= 30
    assert sum(p < 0.3 * top for *_, p, top in free) >= 30
    # Each filter removes what it should and keeps what it should: the boundary cases do get sampled.
    top_k = run(top_k=3)
    assert all(rank < 3 for rank, *_ in top_k) and any(rank == 2 for rank, *_ in top_k)
    # (The tiny model's distributions are flat: the top 20 tokens hold well over 0.25 of the probability.)
    top_p = run(top_p=0.25)
    assert all(above < 0.25 + 1e-5 for _, above, _, _ in top_p)
    assert any(rank > 0 and above + p > 0.25 for rank, above, p, _ in top_p)  # the one crossing 0.25 stays
    min_p = run(min_p=0.3)
    assert all(p >= 0.3 * top - 1e-6 for *_, p, top in min_p) and any(p < 0.6 * top for *_, p, top in min_p)


def test_logprobs_match_transformers(engine, prompts, tiny_llama, drive):
    """logprobs=N: N entries per token (N + 1 when the sampled token is not among the top N), each equal to
    log_softmax of transformers' logits for the same tokens: the model's distribution, before temperature."""
    params = [
        greedy(16, logprobs=5),
        SamplingParams(temperature=1.0, seed=3, max_tokens=16, logprobs=2, ignore_eos=True),
        greedy(16, logprobs=0),
        SamplingParams(temperature=0.5, top_k=10, seed=4, max_tokens=16, logprobs=3, ignore_eos=True),
    ]
    outs = drive(engine, [(prompts[i], p) for i, p in enumerate(params)])[0]
    sizes = []
    for p, out in zip(params, outs):
        c = out.outputs[0]
        assert len(c.logprobs) == len(c.token_ids) == 16
        n = len(out.prompt_token_ids)
        ref = tiny_llama.logits(out.prompt_token_ids + c.token_ids)[n - 1 : -1].log_softmax(-1)  # [16, vocab]
        for step, (tok, entry) in enumerate(zip(c.token_ids, c.logprobs)):
            top = ref[step].topk(p.logprobs).indices.tolist() if p.logprobs else []
            assert set(entry) == set(top) | {tok}
            for t, lp in entry.items():
                assert lp == pytest.approx(ref[step, t].item(), abs=1e-4)
            sizes.append((p.logprobs, len(entry)))
        assert c.cumulative_logprob == pytest.approx(sum(e[t] for t, e in zip(c.token_ids, c.logprobs)), abs=1e-4)
    assert {s for n, s in sizes if n == 5} == {5}  # greedy picks the top token: no extra entry
    assert {s for n, s in sizes if n == 0} == {1}
    assert {s for n, s in sizes if n == 2} <= {2, 3}
    assert {s for n, s in sizes if n == 3} <= {3, 4}


# ---- stop conditions ----------------------------------------------------------------------------------------


def test_stop_strings_are_cut_from_the_text(engine, prompts, drive):
    base = drive(engine, [(prompts[7], greedy(32))])[0][0].outputs[0]
    text = base.text
    # A two-character stop string of plain ASCII first seen at least 4 characters in.
    start = next(
        i
        for i in range(4, len(text) - 1)
        if text[i : i + 2].isascii() and text[i : i + 2].isprintable() and text.find(text[i : i + 2]) == i
    )
    stop = text[start : start + 2]
    cut, kept = drive(
        engine,
        [
            (prompts[7], greedy(32, stop=[stop, "\x00never"])),
            (prompts[7], greedy(32, stop=stop, include_stop_str_in_output=True)),
        ],
    )[0]
    for out, expected_text in ((cut, text[:start]), (kept, text[: start + 2])):
        c = out.outputs[0]
        assert (c.finish_reason, c.stop_reason) == ("stop", stop)
        assert c.text == expected_text
        assert c.token_ids == base.token_ids[: len(c.token_ids)] and len(c.token_ids) < 32


def test_stop_token_ids_and_max_tokens(engine, prompts, drive):
    base = drive(engine, [(prompts[6], greedy(32))])[0][0].outputs[0]
    assert (base.finish_reason, base.stop_reason, len(base.token_ids)) == ("length", None, 32)
    ids = base.token_ids
    i = next(i for i in range(3, 32) if ids[i] not in ids[:i])  # a token first produced at step i
    out = drive(engine, [(prompts[6], greedy(32, stop_token_ids=[ids[i]]))])[0][0].outputs[0]
    assert (out.finish_reason, out.stop_reason) == ("stop", ids[i])
    assert out.token_ids == ids[: i + 1]
    short = drive(engine, [(prompts[6], greedy(5))])[0][0].outputs[0]
    assert (short.finish_reason, short.token_ids) == ("length", ids[:5])


def test_eos_ends_generation_and_min_tokens_holds_it_off(eager_eos_model, drive):
    """This model's most likely next token is always EOS (probability ~1)."""
    llm = eager_eos_model.llm(num_blocks=32, block_size=BLOCK, max_model_len=MAX_LEN)
    eos = eager_eos_model.eos_token_id
    p = token_prompts((6,), eager_eos_model.config.vocab_size, seed=1)[0]
    plain, held, held_sampled, stop_held, ignored = tokens(
        drive(
            llm.llm_engine,
            [
                (p, SamplingParams(temperature=0.0, max_tokens=20)),
                (p, SamplingParams(temperature=0.0, max_tokens=20, min_tokens=7)),
                (p, SamplingParams(temperature=1.0, seed=1, max_tokens=20, min_tokens=5)),
                (
                    p,
                    SamplingParams(temperature=0.0, max_tokens=20, min_tokens=3, ignore_eos=True, stop_token_ids=[eos]),
                ),
                (p, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)),
            ],
        )[0]
    )
    assert plain == [eos]
    assert len(held) == 8 and eos not in held[:7] and held[7] == eos
    assert len(held_sampled) == 6 and eos not in held_sampled[:5] and held_sampled[5] == eos
    assert len(stop_held) == 4 and stop_held[3] == eos  # a stop token id is held off by min_tokens too
    assert ignored == [eos] * 6


# ---- the offline API ----------------------------------------------------------------------------------------


def test_generate_returns_outputs_in_input_order(llm, engine, all_blocks_free):
    texts = [
        "The quick brown fox",
        "Paged attention keeps keys",
        "Once upon a time",
        "Hello world!",
        "A scheduler batches requests; the block manager hands out blocks",
    ]
    # Later prompts finish first: fewer tokens to generate.
    per_prompt = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (20, 12, 7, 3, 1)]
    outs = llm.generate(texts, per_prompt, use_tqdm=False)
    tok = llm.get_tokenizer()
    assert [o.prompt for o in outs] == texts
    assert [o.prompt_token_ids for o in outs] == [tok.encode(t) for t in texts]
    assert [len(o.outputs[0].token_ids) for o in outs] == [20, 12, 7, 3, 1]
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outs)
    same = llm.generate(texts, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True), use_tqdm=False)
    assert [o.prompt for o in same] == texts
    for a, b in zip(outs, same):
        assert b.outputs[0].token_ids[: len(a.outputs[0].token_ids)] == a.outputs[0].token_ids
    single = llm.generate(texts[2], per_prompt[0], use_tqdm=False)
    assert len(single) == 1 and single[0].outputs[0].token_ids == same[2].outputs[0].token_ids
    n3 = llm.generate(texts[0], SamplingParams(n=3, temperature=1.0, seed=9, max_tokens=8), use_tqdm=False)[0]
    assert [c.index for c in n3.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in n3.outputs}) == 3
    all_blocks_free(engine)


def test_chat_applies_the_template(smollm2_llm, all_blocks_free):
    out = smollm2_llm.chat(
        [{"role": "user", "content": "Name the capital city of France."}],
        SamplingParams(temperature=0.0, max_tokens=24),
        use_tqdm=False,
    )[0]
    tok = smollm2_llm.get_tokenizer()
    assert tok.decode(out.prompt_token_ids).startswith("<|im_start|>")
    assert out.prompt_token_ids[-3:] == tok.encode("<|im_start|>assistant\n", add_special_tokens=False)[-3:]
    assert "Paris" in out.outputs[0].text
    all_blocks_free(smollm2_llm.llm_engine)


def test_a_load_reports_its_stages_in_order(tiny_llama):
    """The window shows these sentences while a model loads (a first load can take a minute); a stage that does
    not run here is not reported."""
    stages: list[str] = []
    llm = tiny_llama.llm(num_blocks=POOL, block_size=BLOCK, max_model_len=MAX_LEN, on_load_stage=stages.append)
    assert stages == [
        "Reading the model file",
        "Building the CPU kernels",
        "Loading the weights",
        "Allocating the KV pool",
        "Warming up: building the fused decode step",
    ]
    assert llm.generate("Hello", greedy(2), use_tqdm=False)[0].outputs[0].token_ids  # the engine it built works
    stages.clear()
    tiny_llama.llm(
        num_blocks=POOL, block_size=BLOCK, max_model_len=MAX_LEN, on_load_stage=stages.append, cpu_fused_decode=False
    )
    assert stages[-1] == "Allocating the KV pool"
