"""Tool calls and reasoning in replies, without a server: each family's real output format parsed into OpenAI's
tool_calls, the parse of every prefix a prefix of the whole (so stream deltas add up to the reply), the family
chosen from the vocabulary, the grammars that force a call accepting the family's syntax, and think blocks."""

from __future__ import annotations

import json

import llguidance
import llguidance.hf
import pytest
from chat_families import qwen3_template, variant  # noqa: F401 (a fixture)

from app.server.chat import ReplyFormat, ToolRequest, tool_grammar
from app.server.reasoning import Think, ThinkState, split_reasoning, think_state
from app.server.reply import DeltaState, message
from app.server.tool_parsers import (
    HermesFormat,
    JsonFormat,
    Llama3JsonFormat,
    MistralFormat,
    tool_format,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}

# Replies as each family writes them (from the models' chat templates and model cards).
QWEN_TWO_CALLS = (
    "I'll look both up.\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
)
QWEN3_THINKING = (
    "<think>\nThe user wants the weather in Paris. I should call get_weather.\n</think>\n\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
)
LLAMA_JSON = '{"name": "get_weather", "parameters": {"city": "San Francisco, CA", "unit": "fahrenheit"}}'
LLAMA_TWO = '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {}}'
MISTRAL_V3 = (
    '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}, '
    '{"name": "get_time", "arguments": {}}]'
)
MISTRAL_V11 = '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "celsius"}[TOOL_CALLS]get_time[ARGS]{}'

CASES = [
    (HermesFormat(), QWEN_TWO_CALLS, "I'll look both up.", [("get_weather", {"city": "Paris", "unit": "celsius"}),
                                                            ("get_time", {})]),
    (HermesFormat(), "The capital of France is Paris.\n", "The capital of France is Paris.\n", []),
    (HermesFormat(), "Use <b>bold</b> and a <tool in text", "Use <b>bold</b> and a <tool in text", []),
    (HermesFormat(), "<tool_call>\nnot json\n</tool_call>", "<tool_call>\nnot json\n</tool_call>", []),
    (HermesFormat(), '<tool_call>\n{"arguments": {"city": "Rome"}, "name": "get_weather"}\n</tool_call>', None,
     [("get_weather", {"city": "Rome"})]),
    (Llama3JsonFormat(), LLAMA_JSON, None, [("get_weather", {"city": "San Francisco, CA", "unit": "fahrenheit"})]),
    (Llama3JsonFormat(), LLAMA_TWO, None, [("get_weather", {"city": "Paris"}), ("get_time", {})]),
    (Llama3JsonFormat(), "It is sunny in Paris.", "It is sunny in Paris.", []),
    (Llama3JsonFormat(), '{"answer": 42}', '{"answer": 42}', []),
    (JsonFormat(), '[{"name": "get_time", "arguments": {}}]', None, [("get_time", {})]),
    (JsonFormat(), "[1, 2, 3]", "[1, 2, 3]", []),
    (MistralFormat(1, None), MISTRAL_V3, None, [("get_weather", {"city": "Paris", "unit": "celsius"}),
                                                ("get_time", {})]),
    (MistralFormat(1, None), "Sure thing." + MISTRAL_V3, "Sure thing.", [("get_weather", {"city": "Paris",
                                                                                       "unit": "celsius"}),
                                                                         ("get_time", {})]),
    (MistralFormat(1, 2), MISTRAL_V11, None, [("get_weather", {"city": "Paris", "unit": "celsius"}),
                                              ("get_time", {})]),
]  # fmt: skip


def assert_prefix_stable(parse, text: str) -> None:
    """Every prefix parses to a prefix of the whole: content, each call's name (once known) and arguments."""
    full = parse(text, True)
    for k in range(len(text) + 1):
        part = parse(text[:k], False)
        assert full.content.startswith(part.content), (text[:k], part)
        assert len(part.calls) <= len(full.calls), (text[:k], part)
        for a, b in zip(part.calls, full.calls):
            assert a.name in (None, b.name) and b.arguments.startswith(a.arguments), (text[:k], a, b)


@pytest.mark.parametrize("fmt, text, content, calls", CASES, ids=[f"{c[0].name}-{i}" for i, c in enumerate(CASES)])
def test_each_family_output_parses_into_calls_and_content(fmt, text, content, calls):
    answer = fmt.parse(text, True)
    assert (answer.content or None) == content
    assert [(c.name, json.loads(c.arguments)) for c in answer.calls] == calls
    assert all(c.complete for c in answer.calls)
    assert_prefix_stable(fmt.parse, text)


def test_parallel_tool_calls_false_keeps_the_first_call():
    for fmt, text in (
        (HermesFormat(), QWEN_TWO_CALLS),
        (Llama3JsonFormat(), LLAMA_TWO),
        (MistralFormat(1, 2), MISTRAL_V11),
    ):
        answer = fmt.parse(text, True, parallel=False)
        assert [c.name for c in answer.calls] == ["get_weather"]
        assert_prefix_stable(lambda t, final, fmt=fmt: fmt.parse(t, final, parallel=False), text)


def test_a_call_cut_by_max_tokens_keeps_what_was_written():
    answer = HermesFormat().parse('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par', True)
    assert [(c.name, c.arguments, c.complete) for c in answer.calls] == [("get_weather", '{"city": "Par', False)]


def test_arguments_written_as_a_json_string_are_given_as_that_string():
    text = '<tool_call>\n{"name": "get_time", "arguments": "{\\"tz\\": \\"CET\\"}"}\n</tool_call>'
    assert [json.loads(c.arguments) for c in HermesFormat().parse(text, True).calls] == [{"tz": "CET"}]
    assert_prefix_stable(HermesFormat().parse, text)


# ---- which family ---------------------------------------------------------------------------------------------------


def test_the_family_is_read_from_the_vocabulary(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert isinstance(tool_format(variant(tok, ["<tool_call>", "</tool_call>"])), HermesFormat)
    mistral = tool_format(variant(tok, special=["[TOOL_CALLS]"]))
    assert isinstance(mistral, MistralFormat) and mistral.args_id is None and len(mistral.new_id()) == 9
    assert tool_format(variant(tok, special=["[TOOL_CALLS]", "[ARGS]"])).args_id is not None
    assert isinstance(tool_format(variant(tok, special=["<|python_tag|>"])), Llama3JsonFormat)
    assert type(tool_format(tok)) is JsonFormat  # SmolLM2 has none of them


# ---- grammars that force a call ------------------------------------------------------------------------------------


def accepts(tokenizer, grammar: str, text: str) -> bool:
    ll = llguidance.hf.from_tokenizer(tokenizer)
    matcher = llguidance.LLMatcher(ll, llguidance.grammar_from("grammar", grammar))
    ok = matcher.consume_tokens(tokenizer.encode(text, add_special_tokens=False))
    return ok and matcher.is_accepting()


@pytest.mark.parametrize(
    "tokens, special, fmt_text, other",
    [
        (["<tool_call>", "</tool_call>"], [], QWEN_TWO_CALLS.split("\n", 1)[1], LLAMA_TWO),
        ([], ["<|python_tag|>"], LLAMA_TWO, QWEN_TWO_CALLS.split("\n", 1)[1]),
        ([], ["[TOOL_CALLS]"], MISTRAL_V3.replace("[TOOL_CALLS] ", "[TOOL_CALLS]"), LLAMA_TWO),
        ([], ["[TOOL_CALLS]", "[ARGS]"], MISTRAL_V11, MISTRAL_V3),
        ([], [], '[{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}, '
                 '{"name": "get_time", "arguments": {}}]', LLAMA_TWO),
    ],
)  # fmt: skip
def test_required_grammar_writes_the_family_syntax(smollm2_tokenizer, tokens, special, fmt_text, other):
    tok = variant(smollm2_tokenizer, tokens, special)
    fmt = tool_format(tok)
    required = tool_grammar(ToolRequest([WEATHER, TIME], "required", True), fmt, None).params.grammar
    assert accepts(tok, required, fmt_text)
    assert not accepts(tok, required, other)
    single = tool_grammar(ToolRequest([WEATHER, TIME], "required", False), fmt, None).params.grammar
    assert not accepts(tok, single, fmt_text)  # two calls, one allowed
    named = {"type": "function", "function": {"name": "get_time"}}
    only_time = tool_grammar(ToolRequest([WEATHER, TIME], named, True), fmt, None).params.grammar
    one_time = fmt.parse(fmt_text, True)
    assert not accepts(tok, only_time, fmt_text) and [c.name for c in one_time.calls] == ["get_weather", "get_time"]


def test_forced_calls_keep_to_the_parameters_schema(smollm2_tokenizer):
    tok = variant(smollm2_tokenizer, ["<tool_call>", "</tool_call>"])
    grammar = tool_grammar(ToolRequest([WEATHER], "required", True), tool_format(tok), None).params.grammar
    good = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}\n</tool_call>'
    assert accepts(tok, grammar, good)
    assert not accepts(tok, grammar, good.replace('"celsius"', '"kelvin"'))
    assert not accepts(tok, grammar, good.replace('"city": "Oslo", ', ""))  # city is required
    assert not accepts(tok, grammar, good.replace("get_weather", "get_wether"))


def test_forced_calls_leave_room_for_the_reasoning_the_template_asked_for(smollm2_tokenizer):
    tok = variant(smollm2_tokenizer, ["<tool_call>", "</tool_call>", "<think>", "</think>"])
    fmt, tools = tool_format(tok), ToolRequest([WEATHER], "required", True)
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    ids = tok.convert_tokens_to_ids(["<think>", "</think>"])

    def think(state: ThinkState) -> Think:
        return Think(state, *ids, special=False)

    maybe = tool_grammar(tools, fmt, think(ThinkState.MAYBE)).params.grammar
    assert accepts(tok, maybe, QWEN3_THINKING) and accepts(tok, maybe, call)
    opened = tool_grammar(tools, fmt, think(ThinkState.OPEN)).params.grammar
    assert accepts(tok, opened, QWEN3_THINKING.removeprefix("<think>")) and not accepts(tok, opened, call)
    closed = tool_grammar(tools, fmt, think(ThinkState.CLOSED)).params.grammar
    assert accepts(tok, closed, call) and not accepts(tok, closed, QWEN3_THINKING)


# ---- reasoning ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "state, text, reasoning, answer",
    [
        (ThinkState.MAYBE, "<think>\nLet me think.\n</think>\n\nParis.", "Let me think.", "Paris."),
        (ThinkState.MAYBE, "Paris.", None, "Paris."),
        (ThinkState.MAYBE, "<think>\nStill thinking when max_tokens ran o", "Still thinking when max_tokens ran o", ""),
        (ThinkState.OPEN, "The user asks.\n</think>\n\nParis.", "The user asks.", "Paris."),
        (ThinkState.OPEN, "cut before the end", "cut before the end", ""),
        (ThinkState.CLOSED, "Paris. <think>", None, "Paris. <think>"),
        (None, "<think>x</think>y", None, "<think>x</think>y"),
    ],
)
def test_think_blocks_split_from_the_answer(state, text, reasoning, answer):
    split = split_reasoning(text, state, final=True)
    assert (split.reasoning, split.answer) == (reasoning, answer)
    for k in range(len(text) + 1):
        part = split_reasoning(text[:k], state, final=False)
        assert (reasoning or "").startswith(part.reasoning or "") and answer.startswith(part.answer), text[:k]


def test_the_think_state_is_read_from_the_prompt(smollm2_tokenizer, qwen3_template):  # noqa: F811
    tok = variant(smollm2_tokenizer, ["<think>", "</think>"])
    assert think_state(smollm2_tokenizer, [1, 2]) is None  # no think tokens: no reasoning parser
    user = [{"role": "user", "content": "hi"}]

    def state(**kwargs):
        ids = tok.apply_chat_template(user, chat_template=qwen3_template, add_generation_prompt=True, **kwargs)
        return think_state(tok, ids if isinstance(ids, list) else ids["input_ids"]).state

    assert state() is ThinkState.MAYBE
    assert state(enable_thinking=False) is ThinkState.CLOSED
    opening = "{{ messages[0].content }}<|im_start|>assistant\n<think>\n"  # DeepSeek-R1's way
    ids = tok.apply_chat_template(user, chat_template=opening, add_generation_prompt=True)
    assert think_state(tok, ids if isinstance(ids, list) else ids["input_ids"]).state is ThinkState.OPEN


# ---- the message and its stream -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt, text",
    [
        (ReplyFormat(ThinkState.MAYBE, HermesFormat()), QWEN3_THINKING),
        (ReplyFormat(None, HermesFormat()), QWEN_TWO_CALLS),
        (ReplyFormat(ThinkState.MAYBE, None), "<think>\nhmm\n</think>\n\nParis is the capital."),
        (ReplyFormat(None, MistralFormat(1, 2)), MISTRAL_V11),
        (ReplyFormat(None, Llama3JsonFormat(), echo="Sure: "), LLAMA_JSON),
    ],
)
def test_stream_deltas_add_up_to_the_message(fmt, text):
    whole, _ = message(fmt, text)
    state, deltas = DeltaState(fmt), []
    for k in range(len(text) + 1):
        deltas += state.deltas(text[:k], final=k == len(text))
    streamed = {"reasoning_content": "", "content": ""}
    calls = {}
    for delta in deltas:
        assert len(delta) == 1  # one kind of news per chunk
        for key in ("reasoning_content", "content"):
            streamed[key] += delta.get(key, "")
        for call in delta.get("tool_calls", []):
            if "id" in call:  # a call's first delta: id, type and name, then its arguments in fragments
                assert call["index"] == len(calls) and call["type"] == "function"
                calls[call["index"]] = {"id": call["id"], "name": call["function"]["name"], "arguments": ""}
            calls[call["index"]]["arguments"] += call["function"]["arguments"]
    assert streamed["content"] == (whole["content"] or "")
    assert streamed["reasoning_content"] == (whole.get("reasoning_content") or "")
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (c["function"]["name"], c["function"]["arguments"]) for c in whole.get("tool_calls", [])
    ]
    if whole.get("tool_calls"):
        assert whole["content"] is None or whole["content"].strip()


@pytest.mark.parametrize(
    "tokens, special, text_then_call",
    [
        (["<tool_call>", "</tool_call>"], [], "Let me look.\n" + QWEN_TWO_CALLS.split("\n", 1)[1]),
        ([], ["[TOOL_CALLS]", "[ARGS]"], "Sure." + MISTRAL_V11),
        ([], [], '[{"name": "get_weather", "arguments": {"city": "Paris"}}]'),
    ],
)
def test_auto_with_strict_tools_leaves_text_free_and_keeps_calls_to_their_schemas(
    smollm2_tokenizer, tokens, special, text_then_call
):
    tok = variant(smollm2_tokenizer, tokens, special)
    fmt = tool_format(tok)
    strict = [{**t, "function": {**t["function"], "strict": True}} for t in (WEATHER, TIME)]
    assert tool_grammar(ToolRequest([WEATHER, TIME], "auto", True), fmt, None) is None  # nothing strict: free
    grammar = tool_grammar(ToolRequest(strict, "auto", True), fmt, None).params.grammar
    assert accepts(tok, grammar, "Just text, no call.\nAt all.")
    assert accepts(tok, grammar, text_then_call)
    assert not accepts(tok, grammar, text_then_call.replace("get_", "got_"))  # no such tool
    assert not accepts(tok, grammar, text_then_call.replace('"Paris"', "42"))  # city is a string
    assert not accepts(tok, grammar, text_then_call.replace('{"city"', '{"extra": 1, "city"'))  # strict: closed
