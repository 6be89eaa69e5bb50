"""SamplingParams: the sampling extras' defaults, normalisation, validation and vocabulary check."""

from __future__ import annotations

import pytest

from engine.sampling_params import MAX_LOGPROBS, SamplingParams


def test_defaults_are_vllms():
    p = SamplingParams()
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert p.logit_bias is None and p.allowed_token_ids is None and p.bad_words is None
    assert p.prompt_logprobs is None


def test_logit_bias_keys_become_ints_and_values_are_clamped():
    p = SamplingParams(logit_bias={"7": 1.5, 3: -250, "012": 300.0})
    assert p.logit_bias == {7: 1.5, 3: -100.0, 12: 100.0}
    assert all(type(k) is int for k in p.logit_bias)


def test_lists_are_normalised():
    p = SamplingParams(allowed_token_ids=(4, 2), bad_words=("a b",))
    assert p.allowed_token_ids == [4, 2] and p.bad_words == ["a b"]


@pytest.mark.parametrize(
    "field, value",
    [
        ("presence_penalty", -2.0),
        ("presence_penalty", 2),
        ("frequency_penalty", 2.0),
        ("frequency_penalty", -2),
        ("repetition_penalty", 0.01),
        ("repetition_penalty", 5),
        ("prompt_logprobs", 0),
        ("prompt_logprobs", MAX_LOGPROBS),
        ("logprobs", 0),
        ("logprobs", MAX_LOGPROBS),
    ],
)
def test_range_edges_are_accepted_and_kept_as_given(field, value):
    """Each bound is inclusive (the values just past it are refused below) and the value is kept unchanged."""
    params = SamplingParams(**{field: value})
    assert getattr(params, field) == value


@pytest.mark.parametrize(
    "field, value",
    [
        ("presence_penalty", 2.01),
        ("presence_penalty", -2.5),
        ("presence_penalty", float("nan")),
        ("presence_penalty", "1"),
        ("frequency_penalty", 3.0),
        ("frequency_penalty", -2.01),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("repetition_penalty", float("inf")),
        ("repetition_penalty", None),
        ("logit_bias", {-1: 1.0}),
        ("logit_bias", {"-1": 1.0}),
        ("logit_bias", {"abc": 1.0}),
        ("logit_bias", {1.5: 1.0}),
        ("logit_bias", {True: 1.0}),
        ("logit_bias", {"1": 1.0, 1: 2.0}),
        ("logit_bias", {1: "x"}),
        ("logit_bias", {1: float("nan")}),
        ("logit_bias", [(1, 1.0)]),
        ("allowed_token_ids", []),
        ("allowed_token_ids", [1, -2]),
        ("allowed_token_ids", [1.0]),
        ("allowed_token_ids", 5),
        ("bad_words", "word"),
        ("bad_words", ["ok", 3]),
        ("prompt_logprobs", -1),
        ("prompt_logprobs", MAX_LOGPROBS + 1),
        ("prompt_logprobs", 1.5),
        ("logprobs", -1),
        ("logprobs", MAX_LOGPROBS + 1),
    ],
)
def test_bad_values_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_check_vocab_names_the_field_out_of_range():
    ok = SamplingParams(logit_bias={9: 1.0}, allowed_token_ids=[0, 9], stop_token_ids=[9])
    ok.check_vocab(10)
    for field, p in [
        ("logit_bias", SamplingParams(logit_bias={10: 1.0})),
        ("allowed_token_ids", SamplingParams(allowed_token_ids=[3, 10])),
        ("stop_token_ids", SamplingParams(stop_token_ids=[12])),
    ]:
        with pytest.raises(ValueError, match=field):
            p.check_vocab(10)
