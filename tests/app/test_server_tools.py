"""Tool calls and reasoning through the endpoint, driven by the official `openai` client: tool_choice "required"
and a named function always give a valid call (the grammar writes the family's syntax, so even a tiny random model
does), streamed as OpenAI's delta.tool_calls; "auto" parses what the model wrote, "none" leaves it as text; a
Qwen3-style model's think block comes back as reasoning_content. Two tiny models: SmolLM2's tokenizer as it is (no
family: the JSON-array syntax) and with Qwen3's tokens and template (Hermes syntax, think blocks)."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from chat_families import tiny_qwen3_model  # noqa: F401 (a fixture)

from app.engine_thread import EngineThread
from app.server.app import ServerConfig
from app.server.run import BackgroundServer, model_info
from engine import LLM

WEATHER_PARAMS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit"],
}
TIME_PARAMS = {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 6}}, "required": ["tz"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "strict": True, "parameters": WEATHER_PARAMS}},
    {"type": "function", "function": {"name": "get_time", "strict": True, "parameters": TIME_PARAMS}},
]
SCHEMAS = {"get_weather": WEATHER_PARAMS, "get_time": TIME_PARAMS}
ASK = [{"role": "user", "content": "What's the weather in Paris?"}]
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


@pytest.fixture(scope="module")
def qwen3(tiny_qwen3_model):  # noqa: F811
    engine = LLM(str(tiny_qwen3_model), max_model_len=1024, kv_cache_memory=0.04).llm_engine
    thread = EngineThread(engine).start()
    server = BackgroundServer(thread, model_info(engine, "tiny"), ServerConfig(port=0)).start()
    yield openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    server.stop()
    thread.stop()


@pytest.fixture(scope="module")
def plain(openai_endpoint):
    return openai.OpenAI(base_url=openai_endpoint.base_url, api_key=openai_endpoint.api_key, max_retries=0)


def assemble(stream) -> dict[int, dict]:
    """Each choice's streamed message, checking OpenAI's tool-call chunk order on the way: a call's first delta
    has its id, type and name (arguments ""), then its arguments come in fragments; one finish_reason, last."""
    choices: dict[int, dict] = {}
    for chunk in stream:
        for c in chunk.choices:
            got = choices.setdefault(
                c.index, {"content": "", "reasoning": "", "calls": [], "finish_reason": None, "role": c.delta.role}
            )
            assert got["finish_reason"] is None, "a chunk after the finish"
            got["content"] += c.delta.content or ""
            got["reasoning"] += (c.delta.model_extra or {}).get("reasoning_content") or ""
            for call in c.delta.tool_calls or []:
                if call.id is not None:
                    assert call.index == len(got["calls"]) and call.type == "function"
                    assert call.function.name and call.function.arguments == ""
                    got["calls"].append({"id": call.id, "name": call.function.name, "arguments": ""})
                else:
                    assert call.function.name is None
                    got["calls"][call.index]["arguments"] += call.function.arguments
            got["finish_reason"] = c.finish_reason
    assert all(c["role"] == "assistant" for c in choices.values())
    return choices


def calls_of(message) -> list[tuple[str, str]]:
    return [(c.function.name, c.function.arguments) for c in message.tool_calls or []]


def assert_valid(calls: list[tuple[str, str]], finish_reason: str) -> None:
    """Every call names a tool and its arguments keep to that tool's schema (a last one cut by max_tokens aside)."""
    assert calls
    complete = calls[:-1] if finish_reason == "length" else calls
    for name, arguments in complete:
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])
    if finish_reason != "length":
        assert finish_reason == "tool_calls"


# ---- forced calls ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen3", "plain"])
@pytest.mark.parametrize(
    "choice, parallel",
    [("required", False), ({"type": "function", "function": {"name": "get_time"}}, True)],
    ids=["required", "named"],
)
def test_forced_calls_are_valid_calls(request, family, choice, parallel):
    client = request.getfixturevalue(family)
    kw = dict(model="tiny", messages=ASK, tools=TOOLS, tool_choice=choice, parallel_tool_calls=parallel)
    kw.update(max_tokens=200, n=3, seed=4, extra_body=NO_THINKING if family == "qwen3" else None)
    reply = client.chat.completions.create(**kw)
    streamed = assemble(client.chat.completions.create(stream=True, **kw))
    for c in reply.choices:
        assert c.finish_reason == "tool_calls" and c.message.content is None and len(c.message.tool_calls) == 1
        assert all(t.id and t.type == "function" for t in c.message.tool_calls)
        assert_valid(calls_of(c.message), c.finish_reason)
        s = streamed[c.index]
        assert s["finish_reason"] == "tool_calls" and s["content"] == "" and len(s["calls"]) == 1
        assert_valid([(x["name"], x["arguments"]) for x in s["calls"]], s["finish_reason"])
        if isinstance(choice, dict):
            assert calls_of(c.message)[0][0] == s["calls"][0]["name"] == "get_time"


@pytest.mark.parametrize("family", ["qwen3", "plain"])
def test_required_parallel_calls_are_each_valid(request, family):
    client = request.getfixturevalue(family)
    reply = client.chat.completions.create(
        model="tiny", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=200, n=2, seed=8,
        extra_body=NO_THINKING if family == "qwen3" else None,
    )  # fmt: skip
    for c in reply.choices:
        assert_valid(calls_of(c.message), c.finish_reason)


@pytest.mark.parametrize("family", ["qwen3", "plain"])
def test_auto_with_strict_tools_keeps_any_call_to_its_schema(request, family):
    client = request.getfixturevalue(family)
    reply = client.chat.completions.create(
        model="tiny", messages=ASK, tools=TOOLS, max_tokens=120, n=4, seed=2,
        extra_body=NO_THINKING if family == "qwen3" else None,
    )  # fmt: skip
    for c in reply.choices:
        if c.message.tool_calls:
            assert_valid(calls_of(c.message), c.finish_reason)
        else:
            assert c.message.content is not None


def test_a_streamed_greedy_call_equals_the_whole_one(qwen3):
    kw = dict(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=200)
    kw.update(extra_body=NO_THINKING)
    whole = qwen3.chat.completions.create(**kw).choices[0]
    streamed = assemble(qwen3.chat.completions.create(stream=True, **kw))[0]
    assert [(c["name"], c["arguments"]) for c in streamed["calls"]] == calls_of(whole.message)
    assert len(streamed["calls"][0]["id"]) > 8 and streamed["calls"][0]["id"] != whole.message.tool_calls[0].id


# ---- calls the model writes by itself --------------------------------------------------------------------------------

# A grammar that makes the tiny model write what Qwen3 writes when it calls a tool (and a little text first). The
# tags are named as the tokens they are (llguidance's <name>): a model writes them as those tokens.
WRITES_A_CALL = (
    'start: "Checking.\\n" <tool_call> "\\n{\\"name\\": \\"get_weather\\", \\"arguments\\": {\\"city\\": \\"" CITY '
    '"\\", \\"unit\\": \\"celsius\\"}}\\n" </tool_call>\nCITY: /[A-Z][a-z]{2,8}/'
)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_auto_parses_the_call_the_model_wrote_and_none_leaves_it_text(qwen3, stream):
    kw = dict(model="tiny", messages=ASK, tools=TOOLS, max_tokens=80, stream=stream)
    for choice in ("auto", "none"):
        extra = {"guided_grammar": WRITES_A_CALL, **NO_THINKING}
        reply = qwen3.chat.completions.create(tool_choice=choice, extra_body=extra, **kw)
        if stream:
            got = assemble(reply)[0]
            content, calls, reason = got["content"], [(c["name"], c["arguments"]) for c in got["calls"]], None
            reason = got["finish_reason"]
        else:
            content, calls = reply.choices[0].message.content, calls_of(reply.choices[0].message)
            reason = reply.choices[0].finish_reason
        if choice == "auto":
            assert content == "Checking." and reason == "tool_calls"
            assert [name for name, _ in calls] == ["get_weather"]
            assert json.loads(calls[0][1])["unit"] == "celsius"
        else:
            assert content.startswith("Checking.\n<tool_call>\n") and calls == [] and reason == "stop"


# ---- reasoning ------------------------------------------------------------------------------------------------------

THINKS = 'start: <think> "\\nThe user asks " WORD ".\\n" </think> "\\n\\nIt is " WORD "."\nWORD: /[a-z]{2,8}/'


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_think_block_is_reasoning_content(qwen3, stream):
    reply = qwen3.chat.completions.create(
        model="tiny", messages=ASK, max_tokens=60, stream=stream, extra_body={"guided_grammar": THINKS}
    )
    if stream:
        got = assemble(reply)[0]
        reasoning, content = got["reasoning"], got["content"]
    else:
        message = reply.choices[0].message
        reasoning, content = message.model_extra["reasoning_content"], message.content
    assert reasoning.startswith("The user asks ") and "<think>" not in reasoning and "</think>" not in reasoning
    assert content.startswith("It is ") and content.endswith(".")


def test_with_thinking_off_the_reply_is_all_content(qwen3):
    reply = qwen3.chat.completions.create(
        model="tiny", messages=ASK, max_tokens=60, extra_body={"guided_grammar": THINKS, **NO_THINKING}
    )
    message = reply.choices[0].message
    assert message.content.startswith("<think>") and message.model_extra["reasoning_content"] is None


def test_a_reply_cut_inside_an_opened_think_block_is_all_reasoning(qwen3):
    opens = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "<|im_start|>assistant\n<think>\n"
    )
    extra = {"chat_template": opens, "add_generation_prompt": True, "ignore_eos": True}
    reply = qwen3.chat.completions.create(model="tiny", messages=ASK, max_tokens=12, extra_body=extra, seed=1)
    choice = reply.choices[0]
    assert choice.finish_reason == "length" and choice.message.content == ""
    assert choice.message.model_extra["reasoning_content"]


def test_tool_history_is_rendered_by_the_template(qwen3):
    """An assistant turn with tool_calls (arguments as OpenAI's JSON string) and the tool's result, sent back:
    Qwen3's template writes them in its own syntax (the prompt's length tells it was, the text is checked in
    test_protocol_fields.py)."""
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    ]
    reply = qwen3.chat.completions.create(model="tiny", messages=history, tools=TOOLS, max_tokens=4)
    short = qwen3.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, max_tokens=4)
    assert reply.usage.prompt_tokens > short.usage.prompt_tokens + 20
