"""Structured outputs through the endpoint, driven by the official `openai` client against the tiny random model:
under a JSON schema every reply parses and validates (streamed and not, n=3), whichever field carries the
constraint (response_format, vLLM's structured_outputs, the older guided_* fields), and a constraint the grammar
engine cannot compile is a 400 naming its field."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

USER = [{"role": "user", "content": "Describe a person as JSON."}]
# Strings and arrays are bounded so that a random model, which writes whatever the grammar allows, finishes.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "tags", "address"],
    "additionalProperties": False,
}
JSON_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
MAX_TOKENS = 180  # bounded as the schema is, a reply fits well within this


@pytest.fixture(scope="module")
def client(openai_endpoint) -> openai.OpenAI:
    return openai.OpenAI(base_url=openai_endpoint.base_url, api_key=openai_endpoint.api_key, max_retries=0)


def streamed_texts(stream) -> tuple[dict[int, str], dict[int, str]]:
    texts, reasons = {}, {}
    for chunk in stream:
        for choice in chunk.choices:
            piece = choice.delta.content if hasattr(choice, "delta") else choice.text
            texts[choice.index] = texts.get(choice.index, "") + (piece or "")
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    return texts, reasons


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_json_schema_replies_validate(client, stream):
    kw = dict(model="tiny", messages=USER, n=3, max_tokens=MAX_TOKENS, response_format=JSON_SCHEMA_FORMAT, seed=1)
    if stream:
        texts, reasons = streamed_texts(client.chat.completions.create(stream=True, **kw))
    else:
        reply = client.chat.completions.create(**kw)
        texts = {c.index: c.message.content for c in reply.choices}
        reasons = {c.index: c.finish_reason for c in reply.choices}
    assert sorted(texts) == [0, 1, 2] and set(reasons.values()) == {"stop"}
    for text in texts.values():
        jsonschema.validate(json.loads(text), PERSON)
    assert len(set(texts.values())) > 1  # three samples, not one repeated


@pytest.mark.parametrize(
    "extra",
    [
        {"structured_outputs": {"json": PERSON}},
        {"structured_outputs": {"json": json.dumps(PERSON), "disable_any_whitespace": True}},
        {"guided_json": PERSON},
        {"guided_json": PERSON, "guided_whitespace_pattern": " ?"},
    ],
    ids=["structured_outputs", "as-text-no-whitespace", "guided_json", "guided_whitespace_pattern"],
)
def test_vllm_fields_carry_a_schema_too(client, extra):
    reply = client.chat.completions.create(model="tiny", messages=USER, max_tokens=MAX_TOKENS, extra_body=extra)
    text = reply.choices[0].message.content
    jsonschema.validate(json.loads(text), PERSON)
    if extra.get("structured_outputs", {}).get("disable_any_whitespace"):
        assert not re.search(r'[\n\t]|": |, "', text)
    if "guided_whitespace_pattern" in extra:
        assert "\n" not in text


def test_json_object_is_some_object(client):
    reply = client.chat.completions.create(
        model="tiny", messages=USER, max_tokens=MAX_TOKENS, response_format={"type": "json_object"}, seed=3
    )
    choice = reply.choices[0]
    if choice.finish_reason == "stop":  # an object without bounds may run to max_tokens on a random model
        assert isinstance(json.loads(choice.message.content), dict)
    else:
        assert choice.message.content.lstrip().startswith("{")


def test_regex_choice_and_grammar(client):
    kw = dict(model="tiny", messages=USER, max_tokens=40)
    regex = r"[A-Z][a-z]{2,8}-[0-9]{3}"
    text = client.chat.completions.create(extra_body={"guided_regex": regex}, **kw).choices[0].message.content
    assert re.fullmatch(regex, text)
    text = client.chat.completions.create(extra_body={"structured_outputs": {"regex": regex}}, **kw)
    assert re.fullmatch(regex, text.choices[0].message.content)
    colours = ["red", "green", "blue"]
    text = client.chat.completions.create(extra_body={"guided_choice": colours}, **kw).choices[0].message.content
    assert text in colours
    lark = 'start: "yes" | "no" | "maybe " NUM\nNUM: /[0-9]{1,2}/'
    text = client.chat.completions.create(extra_body={"guided_grammar": lark}, **kw).choices[0].message.content
    assert re.fullmatch(r"yes|no|maybe [0-9]{1,2}", text)


def test_completions_take_a_schema_too(client):
    reply = client.completions.create(
        model="tiny", prompt="A person:", max_tokens=MAX_TOKENS, n=2, extra_body={"response_format": JSON_SCHEMA_FORMAT}
    )
    for choice in reply.choices:
        jsonschema.validate(json.loads(choice.text), PERSON)
    texts, _ = streamed_texts(
        client.completions.create(
            model="tiny", prompt="A person:", max_tokens=MAX_TOKENS, stream=True, extra_body={"guided_json": PERSON}
        )
    )
    jsonschema.validate(json.loads(texts[0]), PERSON)


BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strung"}}}},
     "response_format"),
    ({"structured_outputs": {"json": {"properties": {"a": {"$ref": "#/$defs/missing"}}}}}, "structured_outputs"),
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"guided_grammar": "start: missing_rule"}, "guided_grammar"),
    ({"guided_json": {"type": "object", "properties": {"z": {"type": "string", "pattern": "(("}}}}, "guided_json"),
]  # fmt: skip


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("extra, param", BAD, ids=[p for _, p in BAD])
def test_a_constraint_that_cannot_compile_is_a_400_naming_its_field(client, extra, param, stream):
    with pytest.raises(openai.BadRequestError) as info:
        reply = client.chat.completions.create(
            model="tiny", messages=USER, max_tokens=8, stream=stream, extra_body=extra
        )
        if stream:
            list(reply)
    assert info.value.status_code == 400 and info.value.body["param"] == param
    assert "cannot be compiled" in info.value.body["message"]
    assert client.chat.completions.create(model="tiny", messages=USER, max_tokens=2).usage.completion_tokens == 2


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"guided_json": PERSON, "guided_regex": "a+"}, "guided_regex"),
        ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
        ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "a", "whitespace_pattern": " "}}, "structured_outputs"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"guided_whitespace_pattern": " "}, "guided_whitespace_pattern"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": PERSON, "strict": "yes"}}},
         "response_format"),
    ],
)  # fmt: skip
def test_constraints_refused_before_the_engine_sees_them(client, extra, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=USER, max_tokens=8, extra_body=extra)
    assert info.value.body["param"] == param
