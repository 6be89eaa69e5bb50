"""A chat request's own fields: messages for the chat template, the template's options, tools and tool_choice,
and how the reply's text becomes a message (reasoning, content, tool calls)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from app.server.fields import bad, boolean, obj, short
from app.server.reasoning import Think, ThinkState, lark_reasoning
from app.server.structured import Constraint
from app.server.tool_parsers import ToolFormat
from engine.structured_output import StructuredOutputsParams

_CHAT_ROLES = ("system", "user", "assistant", "tool")
# apply_chat_template's own parameters, which chat_template_kwargs may not set: the request has fields for them.
_TEMPLATE_PARAMS = frozenset(
    {"conversation", "messages", "tools", "tokenize", "add_generation_prompt", "continue_final_message",
     "chat_template", "return_dict", "return_tensors", "padding", "truncation", "max_length", "tokenizer_kwargs"}
)  # fmt: skip


@dataclass(frozen=True)
class ReplyFormat:
    """How a chat reply's text becomes OpenAI's message."""

    think: ThinkState | None = None  # the model reasons in think blocks (reasoning.py); None: it does not
    tools: ToolFormat | None = None  # tool calls are parsed in this syntax; None: not asked for (or "none")
    parallel: bool = True  # parallel_tool_calls: false keeps the first call only
    echo: str = ""  # vLLM's chat echo: the last (assistant) message's text, which the reply continues


# ---- messages -------------------------------------------------------------------------------------------------------


def _arguments(value: Any) -> Any:
    """A tool call's arguments as the template wants them: OpenAI sends a JSON string; templates (Llama's, Qwen's)
    write an object with tojson, so a string that parses is given as what it holds (as vLLM does)."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _tool_calls(calls: Any, i: int) -> list[dict]:
    if not isinstance(calls, list) or not all(
        isinstance(c, dict) and isinstance(c.get("function"), dict) and isinstance(c["function"].get("name"), str)
        for c in calls
    ):
        raise bad(
            "messages", f'messages[{i}].tool_calls must be a list of {{"id", "type", "function": {{"name", ...}}}}'
        )
    out = []
    for c in calls:
        function = {**c["function"], "arguments": _arguments(c["function"].get("arguments", {}))}
        out.append({**c, "type": c.get("type", "function"), "function": function})
    return out


def message(m: Any, i: int) -> dict:
    """One message for the chat template: content as one string (text parts joined by newlines, as vLLM does)."""
    if not isinstance(m, dict) or m.get("role") not in _CHAT_ROLES:
        raise bad("messages", f"messages[{i}] must be an object whose role is one of {', '.join(_CHAT_ROLES)}")
    content = m.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise bad(
                "messages",
                f'messages[{i}].content parts must be {{"type": "text", "text": ...}}: this server takes text only',
            )
        content = "\n".join(p["text"] for p in content)
    elif content is None and m["role"] == "assistant" and m.get("tool_calls"):
        content = ""
    elif not isinstance(content, str):
        raise bad("messages", f"messages[{i}].content must be a string or a list of text parts")
    out = {"role": m["role"], "content": content}
    out.update({k: m[k] for k in ("name", "tool_call_id", "reasoning_content") if isinstance(m.get(k), str)})
    if m.get("tool_calls"):
        out["tool_calls"] = _tool_calls(m["tool_calls"], i)
    return out


def messages(value: Any) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise bad("messages", "messages must be a non-empty list")
    return [message(m, i) for i, m in enumerate(value)]


# ---- the template's options -----------------------------------------------------------------------------------------


def template_options(body: dict, model_template: str | None) -> dict:
    """render_chat_text's keyword arguments from add_generation_prompt, continue_final_message, chat_template,
    chat_template_kwargs, documents and reasoning_effort."""
    add_generation_prompt = boolean(body, "add_generation_prompt", True)
    continue_final = boolean(body, "continue_final_message", False)
    if add_generation_prompt and continue_final:
        raise bad(
            "continue_final_message",
            "continue_final_message continues the last message, so it needs add_generation_prompt set to false",
        )
    template = body.get("chat_template")
    if template is not None and not isinstance(template, str):
        raise bad("chat_template", f"chat_template must be a Jinja template string, got {short(template)}")
    kwargs = dict(obj(body["chat_template_kwargs"], "chat_template_kwargs")) if body.get("chat_template_kwargs") else {}
    reserved = sorted(set(kwargs) & _TEMPLATE_PARAMS)
    if reserved:
        raise bad(
            "chat_template_kwargs", f"chat_template_kwargs cannot set {reserved[0]}: the request has a field for it"
        )
    if body.get("documents") is not None:
        docs = body["documents"]
        if not isinstance(docs, list) or not all(isinstance(d, dict) for d in docs):
            raise bad("documents", "documents must be a list of objects (their fields are the template's to read)")
        kwargs["documents"] = docs
    effort = body.get("reasoning_effort")
    if effort is not None:
        # Passed to the template, as vLLM does, when the template reads it; otherwise it would change nothing.
        if "reasoning_effort" not in (template or model_template or ""):
            raise bad(
                "reasoning_effort",
                "this model's chat template does not read reasoning_effort; a Qwen3-style model turns thinking off "
                'with chat_template_kwargs {"enable_thinking": false}',
            )
        kwargs["reasoning_effort"] = effort
    return {
        "add_generation_prompt": add_generation_prompt,
        "continue_final_message": continue_final,
        "chat_template": template,
        "chat_template_kwargs": kwargs,
    }


# ---- tools ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolRequest:
    tools: list[dict] | None  # for the template
    choice: str | dict  # "none" | "auto" | "required" | {"type": "function", "function": {"name": ...}}
    parallel: bool


def read_tools(body: dict) -> ToolRequest:
    tools = body.get("tools") or None
    if tools is not None and not (
        isinstance(tools, list)
        and all(
            isinstance(t, dict)
            and t.get("type", "function") == "function"
            and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str)
            and t["function"]["name"]
            and isinstance(t["function"].get("parameters", {}), dict)
            for t in tools
        )
    ):
        raise bad(
            "tools", 'tools must be a list of {"type": "function", "function": {"name": ..., "parameters": {...}}}'
        )
    parallel = boolean(body, "parallel_tool_calls", True)
    choice = body.get("tool_choice")
    if choice is None:
        return ToolRequest(tools, "auto" if tools else "none", parallel)
    if tools is None:
        raise bad("tool_choice", "tool_choice is only allowed when tools are given")
    names = {t["function"]["name"] for t in tools}
    named = (
        choice["function"].get("name")
        if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict)
        else None
    )
    if choice not in ("none", "auto", "required") and named not in names:
        raise bad(
            "tool_choice",
            f"tool_choice must be none, auto, required or a function among the tools, got {short(choice)}",
        )
    return ToolRequest(tools, choice, parallel)


def tool_grammar(req: ToolRequest, fmt: ToolFormat, think: Think | None) -> Constraint | None:
    """tool_choice "required" or a named function as a grammar: the model writes its family's call syntax, each
    call's arguments kept to its tool's parameters schema (after the reasoning the template asked for). With
    "auto", a grammar only when a tool is strict (OpenAI's strict function calling): text stays free, the calls
    keep to their schemas."""
    if req.choice == "none" or (req.choice == "auto" and not any(t["function"].get("strict") for t in req.tools)):
        return None
    if isinstance(req.choice, dict):
        name = req.choice["function"]["name"]
        tools, parallel = [t for t in req.tools if t["function"]["name"] == name], False
    else:
        tools, parallel = req.tools, req.parallel
    answer = fmt.lark_text_or_calls() if req.choice == "auto" else "answer: calls\n"
    lark = lark_reasoning(think) + answer + fmt.lark_calls(tools, parallel)
    return Constraint(StructuredOutputsParams(grammar=lark), "tools")
