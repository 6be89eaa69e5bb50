"""No field silently ignored, without a server: every request field either reaches what it changes (SamplingParams,
the prompt, the reply's parsing) or is refused with a 400 naming it; and the response shapes those fields ask for
(best_of's choice, prompt_logprobs with ranks, usage in every chunk, token ids as names, reasoning and tool calls)."""

from __future__ import annotations

import logging

import pytest
from chat_families import QWEN3_TEMPLATE, QWEN3_TOKENS, variant
from test_protocol import USER, assert_400, chat, completion

from app.server.fields import FIELDS_REFUSED
from app.server.protocol import ModelInfo, parse_chat_request, parse_completion_request
from app.server.reasoning import ThinkState
from app.server.responses import StreamState, chat_response, completion_response
from app.server.tool_parsers import HermesFormat, MistralFormat
from engine import CompletionOutput, RequestOutput

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def family(model: ModelInfo, tokens=(), special=(), chat_template=None) -> ModelInfo:
    tok = variant(model.tokenizer, tokens, special, chat_template)
    return ModelInfo(model.name, tok, 512, len(tok), model.created)


# ---- refused fields -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("parse, make", [(parse_completion_request, completion), (parse_chat_request, chat)])
@pytest.mark.parametrize("name", sorted(FIELDS_REFUSED))
def test_fields_not_implemented_are_refused_by_name(model, parse, make, name):
    assert_400(parse, make(**{name: {"anything": 1} if name != "priority" else 5}), model, name)


def test_refused_fields_at_their_defaults_are_fine(model):
    defaults = dict(use_beam_search=False, length_penalty=1.0, priority=0, return_token_ids=False, modalities=["text"])
    assert parse_chat_request(chat(guided_decoding_backend="llguidance", **defaults), model).kind == "chat"
    assert_400(parse_chat_request, chat(modalities=["text", "audio"]), model, "modalities")


def test_unknown_fields_are_logged(model, caplog):
    with caplog.at_level(logging.WARNING, "kvstudio.server"):
        parse_chat_request(chat(frobnicate=1, user="me", store=False), model)
    assert "frobnicate" in caplog.text and "user" not in caplog.text


# ---- sampling fields ----------------------------------------------------------------------------------------------


def test_best_of_samples_more_and_keeps_n(model):
    req = parse_completion_request(completion(best_of=3), model)
    assert (req.params.n, req.n, req.params.logprobs, req.logprobs) == (3, 1, 0, None)
    req = parse_chat_request(chat(n=2, best_of=4, logprobs=True, top_logprobs=2), model)
    assert (req.params.n, req.n, req.params.logprobs) == (4, 2, 2)
    assert parse_completion_request(completion(best_of=2, n=2), model).params.n == 2
    assert_400(parse_completion_request, completion(best_of=1, n=2), model, "best_of")
    assert_400(parse_completion_request, completion(best_of=2, stream=True), model, "best_of")
    assert_400(parse_completion_request, completion(best_of=2, temperature=0), model, "best_of")
    assert_400(parse_completion_request, completion(best_of=17), model, "best_of")


def test_vllm_sampling_fields_reach_sampling_params(model):
    p = parse_completion_request(
        completion(seed=-1, bad_words=["foo", " bar"], allowed_token_ids=[5, 6, 7], prompt_logprobs=2), model
    ).params
    assert (p.seed, p.bad_words, p.allowed_token_ids, p.prompt_logprobs) == (None, ["foo", " bar"], [5, 6, 7], 2)
    assert parse_completion_request(completion(seed=7), model).params.seed == 7
    for field, value in (
        ("bad_words", "foo"),
        ("bad_words", [""]),
        ("allowed_token_ids", []),
        ("allowed_token_ids", [49152]),
        ("prompt_logprobs", 21),
        ("prompt_logprobs", -1),
    ):
        assert_400(parse_completion_request, completion(**{field: value}), model, field)


def test_spaces_between_special_tokens_is_what_the_decoder_does(model):
    """The fast decoder writes special tokens with nothing between them: true matters, and is refused, only where
    special tokens are kept."""
    assert parse_chat_request(chat(spaces_between_special_tokens=True), model).params.skip_special_tokens
    assert parse_chat_request(chat(spaces_between_special_tokens=False, skip_special_tokens=False), model)
    bad = chat(spaces_between_special_tokens=True, skip_special_tokens=False)
    assert_400(parse_chat_request, bad, model, "spaces_between_special_tokens")
    tok = model.tokenizer
    ids = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|><|im_end|>"


def test_continuous_usage_stats_needs_include_usage(model):
    req = parse_chat_request(
        chat(stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True}), model
    )
    assert req.continuous_usage and req.include_usage
    bad = chat(stream=True, stream_options={"continuous_usage_stats": True})
    assert_400(parse_chat_request, bad, model, "continuous_usage_stats")


def test_request_id_and_token_ids_as_names(model):
    req = parse_chat_request(chat(request_id="my-req-1", return_tokens_as_token_ids=True), model)
    assert (req.request_id, req.tokens_as_ids) == ("my-req-1", True)
    assert_400(parse_chat_request, chat(request_id=""), model, "request_id")
    assert_400(parse_chat_request, chat(request_id="a\nb"), model, "request_id")


# ---- the prompt -----------------------------------------------------------------------------------------------------


def test_truncate_prompt_tokens_keeps_the_last_tokens(model, tok):
    ids = list(range(100, 200))
    req = parse_completion_request(completion(prompt=ids, truncate_prompt_tokens=10, echo=True), model)
    assert req.prompts == [{"prompt_token_ids": ids[-10:], "prompt": None}]  # the echo decodes what is kept
    long = "word " * 400  # too long for the 64-token context, unless truncated
    req = parse_completion_request(completion(prompt=long, truncate_prompt_tokens=20), model)
    assert req.prompts[0]["prompt_token_ids"] == tok.encode(long)[-20:]
    chat_ids = parse_chat_request(chat(messages=[{"role": "user", "content": long}], truncate_prompt_tokens=30), model)
    assert len(chat_ids.prompts[0]["prompt_token_ids"]) == 30
    assert (
        parse_completion_request(completion(prompt=ids[:5], truncate_prompt_tokens=-1), model).prompts[0][
            "prompt_token_ids"
        ]
        == ids[:5]
    )
    for value in (0, -2, 65, "10", True):
        assert_400(parse_completion_request, completion(truncate_prompt_tokens=value), model, "truncate_prompt_tokens")


def test_add_generation_prompt_and_continue_final_message(model):
    def text(**fields):
        return parse_chat_request(chat(**fields), model).prompts[0]["prompt"]

    assert text().endswith("<|im_start|>assistant\n")
    assert text(add_generation_prompt=False).endswith("<|im_start|>user\nhi<|im_end|>\n")
    prefill = [*USER, {"role": "assistant", "content": "The answer is"}]
    assert text(messages=prefill, add_generation_prompt=False, continue_final_message=True).endswith(
        "<|im_start|>assistant\nThe answer is"
    )
    assert_400(parse_chat_request, chat(messages=prefill, continue_final_message=True), model, "continue_final_message")
    req = parse_chat_request(
        chat(messages=prefill, add_generation_prompt=False, continue_final_message=True, echo=True), model
    )
    assert req.reply.echo == "The answer is"
    assert parse_chat_request(chat(echo=True), model).reply.echo == ""  # the last message is the user's


def test_template_options(model):
    listing = (
        "{{ greeting }}{% for m in messages %}{{ m.content }}{% endfor %}{{ documents | length }}{{ reasoning_effort }}"
    )
    req = parse_chat_request(
        chat(
            chat_template=listing,
            chat_template_kwargs={"greeting": "Hello:"},
            documents=[{"title": "a"}, {"title": "b"}],
            reasoning_effort="low",
        ),
        model,
    )
    assert req.prompts[0]["prompt"] == "Hello:hi2low"
    assert_400(parse_chat_request, chat(chat_template_kwargs={"tokenize": True}), model, "chat_template_kwargs")
    assert_400(parse_chat_request, chat(chat_template_kwargs=[1]), model, "chat_template_kwargs")
    assert_400(parse_chat_request, chat(chat_template=5), model, "chat_template")
    assert_400(parse_chat_request, chat(documents="doc"), model, "documents")
    assert_400(parse_chat_request, chat(reasoning_effort="high"), model, "reasoning_effort")  # SmolLM2's ignores it


def test_enable_thinking_reaches_the_template(model):
    qwen3 = family(model, QWEN3_TOKENS, chat_template=QWEN3_TEMPLATE)
    off = parse_chat_request(chat(chat_template_kwargs={"enable_thinking": False}), qwen3)
    assert off.prompts[0]["prompt"].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert off.reply.think is ThinkState.CLOSED
    assert parse_chat_request(chat(), qwen3).reply.think is ThinkState.MAYBE
    assert parse_chat_request(chat(), model).reply.think is None  # no think tokens


def test_tool_calls_and_results_are_rendered_by_the_template(model):
    qwen3 = family(model, QWEN3_TOKENS, chat_template=QWEN3_TEMPLATE)
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    history = [
        *USER,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"temperature": 21}'},
    ]
    text = parse_chat_request(chat(messages=history, tools=[WEATHER]), qwen3).prompts[0]["prompt"]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>' in text
    assert '<|im_start|>user\n<tool_response>\n{"temperature": 21}\n</tool_response><|im_end|>' in text
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in text  # in the system turn
    bad = [*USER, {"role": "assistant", "content": None, "tool_calls": [{"function": "x"}]}]
    assert_400(parse_chat_request, chat(messages=bad), qwen3, "messages")


def test_tool_choice_decides_parsing_and_grammar(model):
    qwen3 = family(model, QWEN3_TOKENS, chat_template=QWEN3_TEMPLATE)
    auto = parse_chat_request(chat(tools=[WEATHER]), qwen3)
    assert isinstance(auto.reply.tools, HermesFormat) and auto.params.structured_outputs is None
    none = parse_chat_request(chat(tools=[WEATHER], tool_choice="none"), qwen3)
    assert none.reply.tools is None and "get_weather" in none.prompts[0]["prompt"]  # told of, not parsed
    required = parse_chat_request(chat(tools=[WEATHER], tool_choice="required", parallel_tool_calls=False), qwen3)
    assert required.params.structured_outputs.grammar and required.constraint_param == "tools"
    assert not required.reply.parallel
    assert_400(
        parse_chat_request,
        chat(tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"}),
        qwen3,
        "response_format",
    )
    assert_400(parse_chat_request, chat(tools=[WEATHER], parallel_tool_calls="no"), qwen3, "parallel_tool_calls")
    mistral = family(model, special=["[TOOL_CALLS]"])
    req = parse_chat_request(chat(tools=[WEATHER]), mistral)
    assert isinstance(req.reply.tools, MistralFormat) and not req.params.skip_special_tokens  # to see [TOOL_CALLS]
    assert parse_chat_request(chat(), mistral).params.skip_special_tokens


def test_a_strict_json_schema_closes_its_objects(model):
    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "integer"}}}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    params = parse_chat_request(chat(response_format=fmt), model).params.structured_outputs
    assert '"additionalProperties": false' in params.json and params.json.count("additionalProperties") == 2
    loose = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    assert (
        "additionalProperties"
        not in parse_chat_request(chat(response_format=loose), model).params.structured_outputs.json
    )


# ---- what those fields do to the response -------------------------------------------------------------------------


def output(choices: list[tuple[str, list[int], float, str]], prompt_ids=(1, 2, 3), prompt_logprobs=None):
    return RequestOutput(
        "r",
        None,
        list(prompt_ids),
        [
            CompletionOutput(i, text, ids, cum, [{t: cum / len(ids)} for t in ids], reason)
            for i, (text, ids, cum, reason) in enumerate(choices)
        ],
        True,
        prompt_logprobs=prompt_logprobs,
    )


def test_best_of_returns_the_n_most_likely(model):
    req = parse_completion_request(completion(n=2, best_of=3), model)
    out = output([("a", [5], -3.0, "stop"), ("b", [6], -1.0, "stop"), ("c", [7, 8], -2.0, "length")])
    resp = completion_response(req, "cmpl-1", [out], model)
    assert [(c["index"], c["text"], c["logprobs"]) for c in resp["choices"]] == [(0, "b", None), (1, "c", None)]
    assert resp["usage"]["completion_tokens"] == 4  # every sample was generated
    chat_req = parse_chat_request(chat(best_of=3, logprobs=True), model)
    choices = chat_response(chat_req, "c", [out], model)["choices"]
    assert [c["message"]["content"] for c in choices] == ["b"] and choices[0]["logprobs"]["content"]


def test_prompt_logprobs_have_ranks_and_decoded_tokens(model, tok):
    req = parse_completion_request(completion(prompt=[1, 2, 3], prompt_logprobs=1), model)
    entries = [None, {2: -0.5}, {4: -0.2, 3: -2.5}]  # the engine's: the top 1, and the prompt's token if not it
    resp = completion_response(req, "c", [output([("x", [5], -1.0, "stop")], prompt_logprobs=entries)], model)
    got = resp["choices"][0]["prompt_logprobs"]
    assert got[0] is None
    assert got[1] == {"2": {"logprob": -0.5, "rank": 1, "decoded_token": tok.decode([2])}}
    assert got[2] == {
        "4": {"logprob": -0.2, "rank": 1, "decoded_token": tok.decode([4])},
        "3": {"logprob": -2.5, "rank": None, "decoded_token": tok.decode([3])},  # past the top 1: not known
    }
    chat_req = parse_chat_request(chat(prompt_logprobs=1), model)
    assert (
        chat_response(chat_req, "c", [output([("x", [5], -1.0, "stop")], prompt_logprobs=entries)], model)[
            "prompt_logprobs"
        ]
        == got
    )


def test_tokens_as_ids_in_logprobs(model):
    req = parse_completion_request(completion(logprobs=0, return_tokens_as_token_ids=True), model)
    lp = completion_response(req, "c", [output([("x", [5, 6], -1.0, "stop")])], model)["choices"][0]["logprobs"]
    assert lp["tokens"] == ["token_id:5", "token_id:6"] and list(lp["top_logprobs"][0]) == ["token_id:5"]
    req = parse_chat_request(chat(logprobs=True, return_tokens_as_token_ids=True), model)
    content = chat_response(req, "c", [output([("x", [5], -1.0, "stop")])], model)["choices"][0]["logprobs"]["content"]
    assert content[0]["token"] == "token_id:5"


def test_continuous_usage_is_in_every_chunk(model):
    req = parse_chat_request(
        chat(stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True}), model
    )
    state = StreamState(req, "c", model)
    chunks = state.chunks(output([("a", [5], -1.0, None)])) + state.chunks(output([("ab", [5, 6], -1.0, "stop")]))
    assert [c["usage"]["completion_tokens"] for c in chunks] == [1, 1, 2]
    assert all(c["usage"]["prompt_tokens"] == 3 for c in chunks)


def test_a_chat_reply_with_reasoning_and_a_call(model):
    qwen3 = family(model, QWEN3_TOKENS, chat_template=QWEN3_TEMPLATE)
    req = parse_chat_request(chat(tools=[WEATHER]), qwen3)
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    text = "<think>\nweather!\n</think>\n\n" + call
    choice = chat_response(req, "c", [output([(text, [5], -1.0, "stop")])], qwen3)["choices"][0]
    message = choice["message"]
    assert choice["finish_reason"] == "tool_calls"
    assert (message["content"], message["reasoning_content"]) == (None, "weather!")
    assert [(c["type"], c["function"]) for c in message["tool_calls"]] == [
        ("function", {"name": "get_weather", "arguments": '{"city": "Oslo"}'})
    ]
    assert message["tool_calls"][0]["id"].startswith("call_")
    cut = chat_response(req, "c", [output([(text[:60], [5], -1.0, "length")])], qwen3)["choices"][0]
    assert cut["finish_reason"] == "length"
