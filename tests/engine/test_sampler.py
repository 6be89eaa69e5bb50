"""Logits processors in the sampler (bans, allowed tokens, bias, penalties), each against an independent
computation, and temperature against softmax(logits / T) by goodness of fit, on Sequence objects built directly:
no model."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from engine.logits_processors import bad_words_token_ids
from engine.sampler import Sampler, SamplingBatch
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

VOCAB = 12
EOS = 11
CPU = torch.device("cpu")


def make_seq(prompt: list[int], output: list[int] = (), bad_words: list[list[int]] | None = None, **params) -> Sequence:
    params.setdefault("temperature", 0.0)
    if bad_words is not None:
        params["bad_words"] = ["(tokenized below)"]
    seq = Sequence(0, "r", 0, list(prompt), SamplingParams(**params), None)
    seq.token_ids.extend(output)
    # The engine tokenizes params.bad_words into this at add_request.
    seq.bad_words_token_ids = bad_words or []
    return seq


def processed(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """The logits after the batch's processors, before temperature and truncation."""
    batch = SamplingBatch.from_sequences(seqs, [EOS], VOCAB, CPU)
    out = logits.clone()
    for processor in batch.processors:
        processor.apply(out)
    return out


def random_logits(rows: int, seed: int = 0) -> torch.Tensor:
    # Both signs, so repetition penalty's divide and multiply branches are both exercised.
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def test_plain_batch_builds_no_processors():
    seqs = [make_seq([1, 2], [3]), make_seq([4], temperature=0.7, top_k=3)]
    assert SamplingBatch.from_sequences(seqs, [EOS], VOCAB, CPU).processors == []


@pytest.mark.parametrize("penalty", [1.3, 0.6])
def test_repetition_penalty_matches_transformers(penalty):
    seqs = [
        make_seq([1, 2, 2, 5], [7, 1, 9], repetition_penalty=penalty),
        make_seq([3], [], repetition_penalty=penalty),
        make_seq([0, 4, 6, 8, 10], [10, 10, 3], repetition_penalty=penalty),
    ]
    logits = random_logits(3)
    got = processed(logits, seqs)
    hf = RepetitionPenaltyLogitsProcessor(penalty)
    for row, s in enumerate(seqs):
        want = hf(torch.tensor([s.token_ids]), logits[row : row + 1].clone())[0]
        assert torch.equal(got[row], want)
    assert not torch.equal(got[0], logits[0])


def test_frequency_and_presence_penalties_count_output_tokens_only():
    # Token 2 three times and token 3 once in the output; 4 and 5 only in the prompt.
    seq = make_seq([4, 5, 2], [2, 3, 2, 2], frequency_penalty=0.5, presence_penalty=0.25)
    logits = torch.arange(VOCAB, dtype=torch.float32)[None] - 4.0
    want = logits.clone()
    want[0, 2] -= 3 * 0.5 + 0.25
    want[0, 3] -= 1 * 0.5 + 0.25
    assert torch.equal(processed(logits, [seq]), want)


def test_negative_frequency_and_presence_raise_repeated_tokens():
    seq = make_seq([1], [6, 6], frequency_penalty=-1.0, presence_penalty=-2.0)
    logits = torch.zeros(1, VOCAB)
    want = torch.zeros(1, VOCAB)
    want[0, 6] = 2 * 1.0 + 2.0
    assert torch.equal(processed(logits, [seq]), want)


def test_logit_bias_is_added_exactly_and_clamped():
    seq = make_seq([1], [2], logit_bias={"3": 2.5, 7: -1.25, 9: 1e6})
    logits = random_logits(1)
    want = logits.clone()
    want[0, 3] += 2.5
    want[0, 7] += -1.25
    want[0, 9] += 100.0
    assert torch.equal(processed(logits, [seq]), want)


def test_allowed_token_ids_mask_everything_else():
    allowed = [2, 5, 8]
    logits = random_logits(1)
    got = processed(logits, [make_seq([1], allowed_token_ids=allowed)])
    keep = torch.zeros(VOCAB, dtype=torch.bool)
    keep[allowed] = True
    assert torch.equal(got[0, keep], logits[0, keep])
    assert torch.isinf(got[0, ~keep]).all() and (got[0, ~keep] < 0).all()


def test_allowed_token_ids_are_never_sampled_over():
    allowed = {0, 4, 10}
    # A flat distribution, so without the mask most draws would land outside the allowed set.
    seqs = [make_seq([1], temperature=1.0, allowed_token_ids=sorted(allowed), seed=s) for s in range(4)]
    for s, seq in enumerate(seqs):
        seq.generator = torch.Generator().manual_seed(s)
    sampler = Sampler(torch.Generator().manual_seed(0))
    drawn = set()
    for _ in range(50):
        batch = SamplingBatch.from_sequences(seqs, [EOS], VOCAB, CPU)
        drawn.update(sampler(torch.zeros(len(seqs), VOCAB), batch).token_ids)
    assert drawn == allowed


def test_one_token_bad_word_is_always_masked():
    logits = random_logits(1)
    got = processed(logits, [make_seq([1], [2], bad_words=[[5], [7]])])
    want = logits.clone()
    want[0, [5, 7]] = float("-inf")
    assert torch.equal(got, want)


@pytest.mark.parametrize(
    "prompt, output, masked",
    [
        ([1], [4, 2, 3], True),  # the output ends with the word's first tokens: its last one is banned
        ([1], [2, 3], True),  # ... also when that is the whole output
        ([1], [2, 3, 4], False),  # the prefix occurred, but not at the end
        ([1], [3], False),  # only part of the prefix
        ([2, 3], [], False),  # the prompt does not count (vLLM matches the output only)
        ([1, 2], [3], False),  # ... not even across the prompt/output boundary
    ],
)
def test_multi_token_bad_word_masks_its_last_token_after_its_prefix(prompt, output, masked):
    logits = random_logits(1)
    got = processed(logits, [make_seq(prompt, output, bad_words=[[2, 3, 9]])])
    want = logits.clone()
    if masked:
        want[0, 9] = float("-inf")
    assert torch.equal(got, want)


def test_bad_words_token_ids_encode_plain_and_spaced_forms(tiny_tokenizer):
    def enc(text):
        return tiny_tokenizer.encode(text, add_special_tokens=False)

    # " blocks" is one token where "blocks" is several: vLLM keeps only same-length spaced forms.
    assert len(enc(" blocks")) != len(enc("blocks"))
    assert len(enc(" quick")) == len(enc("quick")) and enc(" quick")[0] != enc("quick")[0]
    got = bad_words_token_ids(["cache", "  quick", "blocks", "cache", "", "   "], tiny_tokenizer)
    assert got == [enc("cache"), enc(" cache"), enc("quick"), enc(" quick"), enc("blocks")]


def test_min_tokens_and_bad_words_ban_together():
    seq = make_seq([1], [2], bad_words=[[4]], min_tokens=3, stop_token_ids=[6])
    logits = random_logits(1)
    want = logits.clone()
    want[0, [EOS, 6, 4]] = float("-inf")
    assert torch.equal(processed(logits, [seq]), want)


def test_processors_apply_after_each_other_in_vllms_order():
    # Bias first, then repetition penalty divides the biased logit: (1 + 3) / 2, not 1 / 2 + 3.
    seq = make_seq([5], [], logit_bias={5: 3.0}, repetition_penalty=2.0, allowed_token_ids=[5, 6])
    logits = torch.ones(1, VOCAB)
    got = processed(logits, [seq])
    assert got[0, 5] == 2.0 and got[0, 6] == 1.0 and torch.isinf(got[0, :5]).all()


def test_mixed_batch_leaves_plain_rows_bit_for_bit():
    seqs = [
        make_seq([1, 2], [3, 3]),
        make_seq(
            [4],
            [5, 6],
            repetition_penalty=1.5,
            frequency_penalty=0.3,
            presence_penalty=-0.7,
            logit_bias={1: 4.0},
            allowed_token_ids=[1, 2, 5],
            bad_words=[[6, 2], [8]],
            min_tokens=5,
        ),
        make_seq([7, 7], [8], temperature=0.8, top_p=0.9),
        make_seq([9], [], frequency_penalty=1.0),
    ]
    logits = random_logits(4, seed=3)
    logits[0, 0] = -0.0  # a signed zero must stay signed on untouched rows
    got = processed(logits, seqs)
    for row in (0, 2):
        assert torch.equal(got[row], logits[row])
        assert torch.equal(got[row].signbit(), logits[row].signbit())
    assert torch.equal(got[3], logits[3])  # a penalty row with no output yet
    assert not torch.equal(got[1], logits[1])


def test_greedy_rows_honour_penalties_bias_and_bans():
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0] + [0.0] * (VOCAB - 4)] * 4)
    seqs = [
        make_seq([0], [1]),  # plain greedy: token 1
        make_seq([0], [1], repetition_penalty=2.0),  # 5 / 2 < 4: token 2
        make_seq([0], [1], presence_penalty=1.5),  # 5 - 1.5 < 4: token 2
        make_seq([0], [2], logit_bias={3: 10.0}, bad_words=[[1]]),
    ]  # 1 banned, 3 boosted: token 3
    batch = SamplingBatch.from_sequences(seqs, [EOS], VOCAB, CPU)
    assert batch.all_greedy
    assert Sampler(torch.Generator())(logits, batch).token_ids == [1, 2, 2, 3]


def test_logprobs_stay_those_of_the_raw_distribution():
    logits = random_logits(1)
    seq = make_seq([1], [2], logit_bias={4: 100.0}, repetition_penalty=1.7, logprobs=2)
    out = Sampler(torch.Generator())(logits, SamplingBatch.from_sequences([seq], [EOS], VOCAB, CPU))
    raw = torch.log_softmax(logits, dim=-1)[0]
    assert out.token_ids == [4]
    sampled, top = out.logprobs[0]
    assert sampled == raw[4].item()
    top_ids = raw.topk(2).indices.tolist()
    assert top == {t: raw[t].item() for t in [*top_ids, 4]}


# ---- temperature ------------------------------------------------------------------------------------------------

TEMPERATURES = (0.5, 1.0, 2.0)
# Spread enough that the temperatures give clearly different distributions, and every token keeps 50+ expected
# draws at T=0.5 (the chi-square approximation wants 5+).
TEMPERATURE_LOGITS = torch.tensor([1.5, 1.0, 0.9, 0.75, 0.5, 0.25, 0.1, 0.0, -0.25, -0.5, -0.75, -1.0])
TEMPERATURE_ROWS, TEMPERATURE_STEPS = 1200, 50  # 20,000 draws per temperature


def softmax_at(temperature: float) -> torch.Tensor:
    return (TEMPERATURE_LOGITS.double() / temperature).softmax(-1)


@pytest.fixture(scope="module")
def draws_by_temperature() -> dict[float, torch.Tensor]:
    """Token counts [VOCAB] per temperature, drawn by the sampler from batches that mix the three temperatures
    (row r at TEMPERATURES[r % 3]; every other row with a seed of its own, the rest on the sampler's generator)."""
    seqs = [make_seq([1], temperature=TEMPERATURES[r % 3]) for r in range(TEMPERATURE_ROWS)]
    for r, seq in enumerate(seqs[::2]):
        seq.generator = torch.Generator().manual_seed(1000 + r)
    batch = SamplingBatch.from_sequences(seqs, [EOS], VOCAB, CPU)
    assert sorted(set(batch.temperature.tolist())) == list(TEMPERATURES)
    sampler = Sampler(torch.Generator().manual_seed(0))
    logits = TEMPERATURE_LOGITS.expand(TEMPERATURE_ROWS, VOCAB)
    which = torch.arange(TEMPERATURE_ROWS) % len(TEMPERATURES)
    counts = torch.zeros(len(TEMPERATURES), VOCAB, dtype=torch.float64)
    for _ in range(TEMPERATURE_STEPS):
        tokens = torch.tensor(sampler(logits, batch).token_ids)
        counts.index_put_((which, tokens), torch.ones(TEMPERATURE_ROWS, dtype=torch.float64), accumulate=True)
    return dict(zip(TEMPERATURES, counts))


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's goodness-of-fit test: the chance that draws from `probs` fit them this badly or worse."""
    expected = counts.sum() * probs
    statistic = ((counts - expected) ** 2 / expected).sum()
    dof = torch.tensor((counts.numel() - 1) / 2, dtype=torch.float64)
    return torch.special.gammaincc(dof, statistic / 2).item()  # the chi-square survival function


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_draws_follow_the_softmax_of_the_logits_over_the_temperature(draws_by_temperature, temperature):
    counts = draws_by_temperature[temperature]
    assert counts.sum() == TEMPERATURE_ROWS // len(TEMPERATURES) * TEMPERATURE_STEPS
    assert (counts.sum() * softmax_at(min(TEMPERATURES))).min() >= 50
    # The draws are seeded, so this is deterministic; a correct sampler would fail it once in 10^4 seeds.
    assert chi_square_p_value(counts, softmax_at(temperature)) > 1e-4
    # ... and the test tells temperatures apart: the other temperatures' distributions do not fit at all.
    for other in set(TEMPERATURES) - {temperature}:
        assert chi_square_p_value(counts, softmax_at(other)) < 1e-12


def test_a_higher_temperature_flattens_the_distribution(draws_by_temperature):
    """The empirical entropy rises with the temperature, and each is within its statistical error of the entropy
    of softmax(logits / T)."""
    entropies = []
    for temperature in TEMPERATURES:
        counts = draws_by_temperature[temperature]
        n = counts.sum()
        observed = counts / n
        estimate = -(observed * observed.log()).nansum()  # a token never drawn adds 0
        p = softmax_at(temperature)
        exact = -(p * p.log()).sum()
        # The plug-in estimate's standard error is sqrt(Var[-log p] / n); its bias is below (vocab - 1) / (2 n).
        std_error = (((p * p.log() ** 2).sum() - exact**2) / n).sqrt()
        assert abs(estimate - exact) < 6 * std_error + (VOCAB - 1) / (2 * n)
        entropies.append(estimate.item())
    assert entropies == sorted(entropies) and entropies[-1] < math.log(VOCAB)
    assert entropies[1] - entropies[0] > 0.1 and entropies[2] - entropies[1] > 0.1
