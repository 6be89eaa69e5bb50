"""The OpenAI request layer without a server: every validation error of the contract (status, type, param, code),
defaults, prompt forms, echo, /tokenize and /detokenize (responses and streaming: test_responses.py)."""

from __future__ import annotations

import copy

import pytest

from app.server.protocol import (
    ApiError,
    ModelInfo,
    detokenize_response,
    model_card,
    parse_chat_request,
    parse_completion_request,
    tokenize_response,
)

CTX = 64  # the `model` fixture's context (tests/app/conftest.py)
USER = [{"role": "user", "content": "hi"}]


def variant(model: ModelInfo, **changes) -> ModelInfo:
    """The model with a copy of its tokenizer changed (special tokens added, another chat template)."""
    tok = copy.deepcopy(model.tokenizer)
    if "special" in changes:
        tok.add_special_tokens({"additional_special_tokens": changes["special"]})
    if "chat_template" in changes:
        tok.chat_template = changes["chat_template"]
    return ModelInfo(model.name, tok, model.max_model_len, len(tok), model.created)


def error(parse, body, model) -> ApiError:
    with pytest.raises(ApiError) as info:
        parse(body, model)
    return info.value


def assert_400(parse, body, model, param, code=None) -> None:
    e = error(parse, body, model)
    assert (e.status, e.type, e.param, e.code) == (400, "invalid_request_error", param, code), e.message
    assert e.body() == {"error": {"message": e.message, "type": "invalid_request_error", "param": param, "code": code}}


def completion(**fields) -> dict:
    return {"model": "smol", "prompt": "Hello", **fields}


def chat(**fields) -> dict:
    return {"model": "smol", "messages": USER, "max_tokens": 8, **fields}


# ---- validation -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("parse", [parse_completion_request, parse_chat_request])
@pytest.mark.parametrize("body", [[{"prompt": "x"}], "x", 3, None])
def test_a_body_that_is_not_an_object_is_400_without_param(model, parse, body):
    assert_400(parse, body, model, None)


def test_missing_prompt_or_messages(model):
    assert_400(parse_completion_request, {"model": "smol"}, model, "prompt")
    assert_400(parse_chat_request, {"model": "smol"}, model, "messages")


@pytest.mark.parametrize(
    "parse, body", [(parse_completion_request, completion(model="gpt-4")), (parse_chat_request, chat(model="other"))]
)
def test_unknown_model_is_404_model_not_found(model, parse, body):
    e = error(parse, body, model)
    assert (e.status, e.type, e.param, e.code) == (404, "invalid_request_error", "model", "model_not_found")


def test_model_may_be_left_out(model):
    assert parse_completion_request({"prompt": "x"}, model).model == "smol"
    assert parse_chat_request({"messages": USER}, model).model == "smol"


@pytest.mark.parametrize("parse, make", [(parse_completion_request, completion), (parse_chat_request, chat)])
@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.1),
        ("temperature", 2.01),
        ("temperature", "hot"),
        ("temperature", True),
        ("top_p", 0),
        ("top_p", 1.5),
        ("presence_penalty", 2.5),
        ("presence_penalty", -2.1),
        ("frequency_penalty", 3),
        ("frequency_penalty", -2.5),
        ("n", 0),
        ("n", 17),
        ("n", 1.5),
        ("max_tokens", 0),
        ("seed", "x"),
        ("stop", ""),
        ("stop", ["a", ""]),
        ("stop", 5),
        ("logit_bias", {"abc": 1}),
        ("logit_bias", {"-1": 1}),
        ("logit_bias", {"49152": 1}),
        ("logit_bias", [1]),
        ("stream", "yes"),
        ("top_k", -5),
        ("min_p", 1.5),
        ("repetition_penalty", 0),
        ("min_tokens", -1),
        ("ignore_eos", 1),
        ("stop_token_ids", [49152]),
        ("stop_token_ids", "2"),
    ],
)
def test_out_of_range_or_mistyped_fields_name_themselves(model, parse, make, field, value):
    assert_400(parse, make(**{field: value}), model, field)


@pytest.mark.parametrize("parse, make", [(parse_completion_request, completion), (parse_chat_request, chat)])
def test_sampling_params_own_errors_map_to_their_field(model, parse, make):
    assert_400(parse, make(n=2, temperature=0), model, "n")  # greedy n > 1
    assert_400(parse, make(min_tokens=9, max_tokens=8), model, "min_tokens")


@pytest.mark.parametrize("parse, make", [(parse_completion_request, completion), (parse_chat_request, chat)])
def test_stream_options_only_with_stream(model, parse, make):
    assert_400(parse, make(stream_options={"include_usage": True}), model, "stream_options")
    assert_400(parse, make(stream=False, stream_options={"include_usage": True}), model, "stream_options")
    assert_400(parse, make(stream=True, stream_options={"include_usage": "yes"}), model, "include_usage")
    req = parse(make(stream=True, stream_options={"include_usage": True}), model)
    assert (req.stream, req.include_usage) == (True, True)


def test_completion_logprobs_range(model):
    assert_400(parse_completion_request, completion(logprobs=21), model, "logprobs")
    assert_400(parse_completion_request, completion(logprobs=-1), model, "logprobs")
    assert_400(parse_completion_request, completion(logprobs=True), model, "logprobs")
    assert parse_completion_request(completion(logprobs=20), model).params.logprobs == 20


def test_top_logprobs_needs_logprobs(model):
    assert_400(parse_chat_request, chat(top_logprobs=2), model, "top_logprobs")
    assert_400(parse_chat_request, chat(logprobs=False, top_logprobs=2), model, "top_logprobs")
    assert_400(parse_chat_request, chat(logprobs=True, top_logprobs=21), model, "top_logprobs")
    assert parse_chat_request(chat(logprobs=True, top_logprobs=3), model).params.logprobs == 3
    only = parse_chat_request(chat(logprobs=True), model)
    assert (only.logprobs, only.params.logprobs) == (0, 0)
    assert parse_chat_request(chat(), model).params.logprobs is None


@pytest.mark.parametrize("prompt", [[49152], [-1], [[1, 2], [3, 49999]], [1, "a"], [[1], "a"], [True], {"a": 1}])
def test_bad_prompt_token_ids_or_forms(model, prompt):
    assert_400(parse_completion_request, completion(prompt=prompt), model, "prompt")


@pytest.mark.parametrize("prompt", ["", [], [[]], [""], ["a", ""]])
def test_empty_prompt(model, prompt):
    assert_400(parse_completion_request, completion(prompt=prompt), model, "prompt")


def test_prompt_longer_than_the_context(model, tok):
    long = " ".join(["word"] * CTX)
    assert len(tok.encode(long)) >= CTX
    assert_400(parse_completion_request, completion(prompt=long), model, "prompt", "context_length_exceeded")
    assert_400(
        parse_completion_request, completion(prompt=list(range(CTX))), model, "prompt", "context_length_exceeded"
    )
    assert_400(
        parse_chat_request,
        {"messages": [{"role": "user", "content": long}]},
        model,
        "messages",
        "context_length_exceeded",
    )


def test_prompt_plus_max_tokens_over_the_context(model):
    ids = list(range(1, CTX - 10 + 1))  # 54 tokens leave room for 10
    assert parse_completion_request(completion(prompt=ids, max_tokens=10), model).params.max_tokens == 10
    assert_400(
        parse_completion_request, completion(prompt=ids, max_tokens=11), model, "max_tokens", "context_length_exceeded"
    )
    assert_400(
        parse_completion_request, completion(prompt=ids[: CTX - 15]), model, "max_tokens", "context_length_exceeded"
    )  # the default 16 does not fit either
    prompt_len = len(parse_chat_request(chat(), model).prompts[0]["prompt_token_ids"])
    assert_400(
        parse_chat_request, chat(max_tokens=CTX - prompt_len + 1), model, "max_tokens", "context_length_exceeded"
    )
    assert_400(
        parse_chat_request,
        chat(max_completion_tokens=CTX - prompt_len + 1),
        model,
        "max_tokens",
        "context_length_exceeded",
    )


def test_suffix_needs_fim_tokens(model):
    assert_400(parse_completion_request, completion(suffix="end"), model, "suffix")
    assert_400(parse_completion_request, completion(suffix=3), model, "suffix")
    assert parse_completion_request(completion(suffix=""), model).prompts[0][
        "prompt_token_ids"
    ] == model.tokenizer.encode("Hello")


def test_suffix_builds_a_prefix_suffix_middle_prompt(model):
    fim = variant(model, special=["<fim_prefix>", "<fim_suffix>", "<fim_middle>"])
    pre, suf, mid = fim.tokenizer.convert_tokens_to_ids(["<fim_prefix>", "<fim_suffix>", "<fim_middle>"])
    req = parse_completion_request(completion(prompt="def f(", suffix="    return x\n"), fim)
    enc = model.tokenizer.encode
    assert req.prompts == [
        {"prompt_token_ids": [pre, *enc("def f("), suf, *enc("    return x\n"), mid], "prompt": "def f("}
    ]
    assert_400(parse_completion_request, completion(prompt=[1, 2], suffix="x"), fim, "suffix")
    assert_400(parse_completion_request, completion(suffix="x", echo=True), fim, "echo")


@pytest.mark.parametrize(
    "messages",
    [
        [],
        "hi",
        [{"role": "robot", "content": "hi"}],
        [{"content": "hi"}],
        [{"role": "user"}],
        [{"role": "user", "content": 5}],
        ["hi"],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}],
        [{"role": "user", "content": [{"type": "text"}]}],
    ],
)
def test_bad_messages(model, messages):
    assert_400(parse_chat_request, chat(messages=messages), model, "messages")


def test_no_chat_template_is_400(model):
    assert_400(parse_chat_request, chat(), variant(model, chat_template=None), "messages")


def test_a_template_that_raises_is_400(model):
    strict = variant(
        model,
        chat_template="{% if messages[0].role != 'user' %}{{ raise_exception('user first') }}"
        "{% endif %}{{ messages[0].content }}",
    )
    assert_400(parse_chat_request, chat(messages=[{"role": "system", "content": "s"}]), strict, "messages")


@pytest.mark.parametrize(
    "fmt",
    [
        {"type": "json_schema"},
        {"type": "json_schema", "json_schema": {"name": "x"}},
        {"type": "json_schema", "json_schema": {"schema": "obj"}},
        {"type": "xml"},
        {},
        "json_object",
    ],
)
def test_bad_response_format(model, fmt):
    assert_400(parse_chat_request, chat(response_format=fmt), model, "response_format")


@pytest.mark.parametrize(
    "fmt",
    [
        {"type": "text"},
        {"type": "json_object"},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
    ],
)
def test_accepted_response_formats(model, fmt):
    assert parse_chat_request(chat(response_format=fmt), model).kind == "chat"


TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def test_tools_and_tool_choice(model):
    assert_400(parse_chat_request, chat(tool_choice="auto"), model, "tool_choice")
    assert_400(
        parse_chat_request, chat(tool_choice={"type": "function", "function": {"name": "f"}}), model, "tool_choice"
    )
    assert_400(parse_chat_request, chat(tools=[TOOL], tool_choice="sometimes"), model, "tool_choice")
    assert_400(
        parse_chat_request,
        chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "f"}}),
        model,
        "tool_choice",
    )
    for tools in (
        [{"type": "function"}],
        [{"type": "code", "function": {"name": "f"}}],
        "get_weather",
        [{"type": "function", "function": {"name": ""}}],
    ):
        assert_400(parse_chat_request, chat(tools=tools), model, "tools")
    for choice in ("none", "auto", "required", {"type": "function", "function": {"name": "get_weather"}}):
        assert parse_chat_request(chat(tools=[TOOL], tool_choice=choice), model).kind == "chat"


def test_tools_reach_the_chat_template(model):
    listing = variant(
        model,
        chat_template="{% for t in tools or [] %}[{{ t.function.name }}]{% endfor %}"
        "{% for m in messages %}{{ m.role }}:{{ m.content }};{% endfor %}",
    )
    req = parse_chat_request(chat(tools=[TOOL]), listing)
    assert req.prompts[0]["prompt"] == "[get_weather]user:hi;"
    assert parse_chat_request(chat(), listing).prompts[0]["prompt"] == "user:hi;"


def test_unknown_fields_are_ignored(model):
    req = parse_completion_request(completion(best_of=1, user="me", logit_bias=None, frobnicate={"x": 1}), model)
    assert req.params.n == 1
    assert parse_chat_request(chat(user="me", parallel_tool_calls=False, store=True), model).kind == "chat"


# ---- what a good request becomes ------------------------------------------------------------------------------------


def test_chat_prompt_is_the_template_and_max_tokens_fills_the_context(model, tok):
    req = parse_chat_request(
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            ]
        },
        model,
    )
    text = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a\nb"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text.endswith("<|im_start|>assistant\n")
    ids = tok.encode(text, add_special_tokens=False)
    assert req.prompts == [{"prompt_token_ids": ids, "prompt": text}]
    assert req.params.max_tokens == CTX - len(ids)
    assert (req.kind, req.stream, req.include_usage, req.echo, req.logprobs) == ("chat", False, False, False, None)


def test_chat_max_completion_tokens_wins_over_max_tokens(model):
    assert parse_chat_request(chat(max_tokens=5, max_completion_tokens=3), model).params.max_tokens == 3
    assert parse_chat_request(chat(max_tokens=5), model).params.max_tokens == 5
    assert_400(parse_chat_request, chat(max_completion_tokens=0), model, "max_completion_tokens")


def test_chat_assistant_tool_call_turns_and_tool_results(model):
    messages = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    text = parse_chat_request(chat(messages=messages, tools=[TOOL]), model).prompts[0]["prompt"]
    assert "<|im_start|>assistant\n<|im_end|>" in text and "<|im_start|>tool\nsunny<|im_end|>" in text


def test_completion_prompt_forms_and_defaults(model, tok):
    one = parse_completion_request({"prompt": "Hello world"}, model)
    assert one.prompts == [{"prompt_token_ids": tok.encode("Hello world"), "prompt": "Hello world"}]
    assert (one.params.max_tokens, one.params.temperature, one.params.n) == (16, 1.0, 1)
    assert (one.kind, one.stream, one.echo, one.logprobs) == ("completion", False, False, None)
    assert [p["prompt_token_ids"] for p in parse_completion_request({"prompt": ["a", "b c"]}, model).prompts] == [
        tok.encode("a"),
        tok.encode("b c"),
    ]
    assert parse_completion_request({"prompt": [5, 6, 7]}, model).prompts == [
        {"prompt_token_ids": [5, 6, 7], "prompt": None}
    ]
    assert parse_completion_request({"prompt": [[5], [6, 7]]}, model).prompts == [
        {"prompt_token_ids": [5], "prompt": None},
        {"prompt_token_ids": [6, 7], "prompt": None},
    ]


def test_sampling_fields_reach_sampling_params(model):
    p = parse_completion_request(
        completion(
            n=3,
            temperature=0.5,
            top_p=0.9,
            presence_penalty=0.5,
            frequency_penalty=-0.5,
            seed=7,
            stop=["\n", "END"],
            logit_bias={"42": 150, "7": -5},
            top_k=40,
            min_p=0.05,
            repetition_penalty=1.1,
            min_tokens=2,
            ignore_eos=True,
            stop_token_ids=[2],
            skip_special_tokens=False,
            include_stop_str_in_output=True,
            max_tokens=9,
            logprobs=3,
            echo=True,
        ),
        model,
    ).params
    assert (p.n, p.temperature, p.top_p, p.presence_penalty, p.frequency_penalty, p.seed) == (3, 0.5, 0.9, 0.5, -0.5, 7)
    assert (p.stop_strings, p.logit_bias, p.top_k, p.min_p, p.repetition_penalty, p.min_tokens) == (
        ("\n", "END"),
        {42: 100.0, 7: -5.0},
        40,
        0.05,
        1.1,
        2,
    )
    assert (p.ignore_eos, p.stop_token_ids, p.skip_special_tokens, p.include_stop_str_in_output) == (
        True,
        [2],
        False,
        True,
    )
    assert (p.max_tokens, p.logprobs, p.prompt_logprobs) == (9, 3, 3)
    assert parse_completion_request(completion(logprobs=3), model).params.prompt_logprobs is None


# ---- /tokenize, /detokenize, models ---------------------------------------------------------------------------------


def test_tokenize_detokenize_round_trip(model, tok):
    resp = tokenize_response({"prompt": "Hello, paged world!"}, model)
    assert resp == {"tokens": tok.encode("Hello, paged world!"), "count": len(resp["tokens"]), "max_model_len": CTX}
    assert detokenize_response({"tokens": resp["tokens"]}, model) == {"prompt": "Hello, paged world!"}
    chat_ids = tokenize_response({"messages": USER}, model)["tokens"]
    assert chat_ids == parse_chat_request({"messages": USER}, model).prompts[0]["prompt_token_ids"]
    text = detokenize_response({"tokens": chat_ids}, model)["prompt"]
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    without = tokenize_response({"messages": USER, "add_generation_prompt": False}, model)["tokens"]
    assert chat_ids[: len(without)] == without and len(without) < len(chat_ids)


def test_tokenize_and_detokenize_errors(model):
    assert_400(tokenize_response, [1], model, None)
    assert_400(tokenize_response, {}, model, "prompt")
    assert_400(tokenize_response, {"prompt": 5}, model, "prompt")
    assert_400(tokenize_response, {"messages": [{"role": "x", "content": "y"}]}, model, "messages")
    assert_400(detokenize_response, {"tokens": [1, len(model.tokenizer)]}, model, "tokens")
    assert_400(detokenize_response, {"tokens": [-1]}, model, "tokens")
    assert_400(detokenize_response, {"tokens": "12"}, model, "tokens")
    assert_400(detokenize_response, {}, model, "tokens")
    assert error(detokenize_response, {"model": "x", "tokens": [1]}, model).status == 404


def test_model_card(model):
    assert model_card(model) == {
        "id": "smol",
        "object": "model",
        "created": 1700000000,
        "owned_by": "kvstudio",
        "max_model_len": CTX,
    }
