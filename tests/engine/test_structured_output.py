"""Structured outputs on a tiny random model: whatever the model would say, every reply keeps to the JSON schema,
regex, choice or grammar, greedy and sampled, with parallel samples and beams; bad grammars are refused in words;
compiled grammars are cached."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from engine import BeamSearchParams, SamplingParams
from engine.structured_output import StructuredOutputsParams

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "mood": {"enum": ["happy", "sad", "calm"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 5}, "zip": {"type": "integer", "maximum": 999}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "mood", "address"],
    "additionalProperties": False,
}
PROMPTS = ["The quick brown fox", "Paged attention keeps keys", "Hello world!"]


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return tiny_llama.llm(num_blocks=256, block_size=8, max_model_len=256)


def texts(outputs) -> list[str]:
    return [c.text for o in outputs for c in o.outputs]


@pytest.mark.parametrize("whitespace", [False, True])
def test_every_reply_keeps_to_the_json_schema_greedy_and_sampled(llm, whitespace):
    structured = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=whitespace)
    params = [
        SamplingParams(temperature=0.0, max_tokens=200, structured_outputs=structured),
        SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=200, structured_outputs=structured),
    ]
    for p in params:
        outputs = llm.generate(PROMPTS, p, use_tqdm=False)
        for text, finish in zip(texts(outputs), [c.finish_reason for o in outputs for c in o.outputs]):
            assert finish == "stop", text
            jsonschema.validate(json.loads(text), SCHEMA)
            if whitespace:
                assert not re.search(r"\s(?=(?:[^\"]*\"[^\"]*\")*[^\"]*$)", text), text  # no whitespace outside strings


def test_without_a_schema_the_model_says_something_else(llm):
    """The tiny model does not write JSON by itself: the schema is what shapes the replies above."""
    out = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=20), use_tqdm=False)
    for text in texts(out):
        with pytest.raises(ValueError):
            json.loads(text)


def test_regex_choice_and_grammar(llm):
    cases = [
        (StructuredOutputsParams(regex=r"[0-9]{3}-[a-z]{2}"), lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2}", t)),
        (StructuredOutputsParams(choice=["yes", "no", "maybe so"]), lambda t: t in ("yes", "no", "maybe so")),
        (
            StructuredOutputsParams(grammar='start: "(" item ("," item)* ")"\nitem: /[a-c]/'),
            lambda t: re.fullmatch(r"\([a-c](,[a-c])*\)", t),
        ),
        (StructuredOutputsParams(grammar='root ::= "say " ("hi" | "bye")'), lambda t: t in ("say hi", "say bye")),
        # Any object: its strings are unbounded, so a random model may run out of tokens inside one.
        (StructuredOutputsParams(json_object=True), lambda t: t.startswith("{")),
    ]
    for structured, check in cases:
        params = SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=60, structured_outputs=structured)
        for text in texts(llm.generate(PROMPTS[:2], params, use_tqdm=False)):
            assert check(text), (structured, text)


def test_beams_keep_to_the_grammar(llm):
    structured = StructuredOutputsParams(
        json={
            "type": "object",
            "properties": {"n": {"enum": [1, 22, 333]}},
            "required": ["n"],
            "additionalProperties": False,
        }
    )
    beams = llm.beam_search(PROMPTS[:2], BeamSearchParams(beam_width=3, max_tokens=40, structured_outputs=structured))
    for out in beams:
        assert len(out.sequences) == 3
        for seq in out.sequences:
            assert json.loads(seq.text)["n"] in (1, 22, 333)


def test_a_grammar_that_cannot_compile_is_refused_in_words(llm):
    bad = [
        (StructuredOutputsParams(json={"type": "frobnicate"}), "JSON schema cannot be compiled"),
        (StructuredOutputsParams(regex="(unclosed"), "regular expression cannot be compiled"),
        (StructuredOutputsParams(grammar="start: nowhere"), "grammar cannot be compiled"),
    ]
    engine = llm.llm_engine
    for structured, message in bad:
        with pytest.raises(ValueError, match=message):
            engine.add_request("bad", "Hello", SamplingParams(structured_outputs=structured))
        assert not engine.has_request("bad")
    with pytest.raises(ValueError, match="exactly one of json, regex, choice, grammar, json_object; got regex, choice"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="json is not valid JSON"):
        StructuredOutputsParams(json="{nope")


def test_a_schema_is_compiled_once_for_a_batch(llm, monkeypatch):
    import llguidance

    calls = []
    real = llguidance.grammar_from
    monkeypatch.setattr(llguidance, "grammar_from", lambda kind, text: calls.append(kind) or real(kind, text))
    schema = {
        "type": "object",
        "properties": {"k": {"type": "boolean"}},
        "required": ["k"],
        "additionalProperties": False,
    }
    params = SamplingParams(n=2, temperature=1.0, seed=1, max_tokens=30, structured_outputs={"json": schema})
    for text in texts(llm.generate(PROMPTS, params, use_tqdm=False)):
        assert isinstance(json.loads(text)["k"], bool)
    assert calls == ["json_schema"]


def test_constrained_sequences_do_not_speculate(tiny_llama):
    llm = tiny_llama.llm(num_blocks=64, block_size=8, max_model_len=128, speculative_config={"method": "ngram"})
    structured = StructuredOutputsParams(regex="(ab){10}")
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=40, structured_outputs=structured))
    assert out[0].outputs[0].text == "ab" * 10
    assert llm.llm_engine.get_stats().spec_draft_tokens == 0
