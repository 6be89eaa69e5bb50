"""Tool calls in a model's reply, in each model family's own syntax: parsed into OpenAI's tool_calls, and written
as a grammar that makes the model produce them (tool_choice "required" or a named function).

Which syntax a model writes is read from its vocabulary, the first rule that holds:
- `<tool_call>` and `</tool_call>` are tokens: Hermes style, Qwen2.5 / Qwen3 / QwQ / Hermes 2 Pro and 3:
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one block per call, text around them allowed;
- `[TOOL_CALLS]` is a token: Mistral, `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`, or with an `[ARGS]`
  token too (Mistral Small 3.2, Magistral, Devstral) `[TOOL_CALLS]name[ARGS]{...}` per call;
- `<|python_tag|>` is a token: Llama 3.1+ JSON tool calling, the reply is `{"name": ..., "parameters": {...}}`
  (`<|python_tag|>` before it is a special token, left out of the text), several calls joined by "; ";
- any other model: a reply that is a JSON array of `{"name": ..., "arguments": {...}}` (or one such object) is a
  call; this is also the syntax the grammar makes such a model write.

Parsing is prefix-stable: parse(text, final=False) of a reply so far returns content and calls that the parse of
any longer reply starts with (text that may still turn out to be a tag, or whitespace next to a call, is held
back), so the stream's deltas add up to the reply not streamed.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass, field

from app.server.reasoning import partial_suffix, token_id
from app.server.structured import closed_objects
from engine.structured_output import StructuredOutputsParams

_ALNUM = string.ascii_letters + string.digits
# A call object's head, up to its arguments' first character: its name is then known, and the arguments stream.
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\S)')
_SCALAR_END = re.compile(r"[,\]\}\s]")


@dataclass
class ParsedCall:
    name: str | None  # None until the reply has shown it
    arguments: str = ""  # JSON text, so far
    complete: bool = False


@dataclass
class ParsedAnswer:
    content: str
    calls: list[ParsedCall] = field(default_factory=list)


# ---- JSON pieces ----------------------------------------------------------------------------------------------------


def value_end(text: str, start: int) -> int | None:
    """The end of the JSON value starting at text[start], or None while it is incomplete."""
    if start >= len(text):
        return None
    first = text[start]
    if first in "{[":
        depth, in_string, escaped = 0, False, False
        for i in range(start, len(text)):
            ch = text[i]
            if in_string:
                if escaped:
                    escaped = False
                elif ch == "\\":
                    escaped = True
                elif ch == '"':
                    in_string = False
            elif ch == '"':
                in_string = True
            elif ch in "{[":
                depth += 1
            elif ch in "}]":
                depth -= 1
                if depth == 0:
                    return i + 1
        return None
    if first == '"':
        escaped = False
        for i in range(start + 1, len(text)):
            if escaped:
                escaped = False
            elif text[i] == "\\":
                escaped = True
            elif text[i] == '"':
                return i + 1
        return None
    m = _SCALAR_END.search(text, start)
    return m.start() if m else None


def _arguments_text(value: object) -> str:
    """Arguments a model wrote in another shape than an object's text: a JSON string holding them, or a value."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def parse_call_object(text: str, final: bool) -> tuple[ParsedCall | None, int | None]:
    """A call written as a JSON object at the start of `text` (whitespace before it allowed): the call so far (None
    when the text does not show one yet, or is complete and not a call) and where the object ends (None while it is
    incomplete). The arguments stream as the model writes them when the name comes first, as every family's
    format has it; in another order they come whole once the object is complete."""
    stripped = len(text) - len(text.lstrip())
    end = value_end(text, stripped) if stripped < len(text) and text[stripped] == "{" else None
    complete = end is not None
    head = _HEAD.match(text)
    if head is not None:
        name = json.loads(f'"{head.group(1)}"')
        start = head.end()
        arg_end = value_end(text, start)
        if text[start] in "{[":
            arguments = text[start : arg_end if arg_end is not None else len(text)]
        elif arg_end is not None and (complete or final):
            try:
                arguments = _arguments_text(json.loads(text[start:arg_end]))
            except json.JSONDecodeError:
                arguments = text[start:arg_end]
        else:
            arguments = text[start:] if final else ""
        return ParsedCall(name, arguments, complete), end
    if not complete:
        return None, None
    try:
        value = json.loads(text[stripped:end])
    except json.JSONDecodeError:
        return None, end
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None, end
    arguments = value.get("arguments", value.get("parameters", {}))
    return ParsedCall(value["name"], _arguments_text(arguments), True), end


def _join(parts: list[str], call_after: list[bool], final: bool) -> str:
    """Content around calls: whitespace next to a call goes; the last part's trailing whitespace is held back
    until the reply ends (a call may follow it). call_after[i]: a call follows parts[i]."""
    out, last = [], len(parts) - 1
    for i, part in enumerate(parts):
        if i > 0 and call_after[i - 1]:
            part = part.lstrip()
        if (i < last and call_after[i]) or (i == last and not final):
            part = part.rstrip()
        out.append(part)
    return "".join(out)


# ---- the families ---------------------------------------------------------------------------------------------------


class ToolFormat:
    """One family's tool-call syntax."""

    name = ""
    keeps_special_tokens = False  # the syntax has special tokens: the reply must be decoded with them

    def parse(self, text: str, final: bool, parallel: bool = True) -> ParsedAnswer:
        raise NotImplementedError

    def lark_calls(self, tools: list[dict], parallel: bool) -> str:
        """Lark rules defining `calls`: one call (or, parallel, one or more) of these tools."""
        raise NotImplementedError

    def lark_text_or_calls(self) -> str:
        """Lark rules defining `answer`: text, calls, or both as this family mixes them (tool_choice "auto" with
        strict tools: what the model writes is free, the calls it makes keep to their schemas)."""
        raise NotImplementedError

    def new_id(self) -> str:
        return "call_" + "".join(secrets.choice(_ALNUM) for _ in range(24))


def parameters_schema(tool: dict) -> dict:
    """A tool's parameters schema; a strict function's objects take no properties it does not list (OpenAI's
    strict mode)."""
    fn = tool["function"]
    schema = fn.get("parameters") or {"type": "object", "properties": {}}
    return closed_objects(schema) if fn.get("strict") else schema


def call_schema(tool: dict, arguments_key: str = "arguments") -> dict:
    """The JSON schema of a call object of this tool: its name, then its arguments (the tool's parameters)."""
    fn = tool["function"]
    return {
        "type": "object",
        "properties": {"name": {"const": fn["name"]}, arguments_key: parameters_schema(tool)},
        "required": ["name", arguments_key],
        "additionalProperties": False,
    }


def json_lark(schema: dict) -> str:
    """A Lark `%json` item for this schema, its whitespace bounded as the engine bounds a JSON schema's (a weak
    model cannot pad a reply with whitespace until max_tokens runs out)."""
    return "%json " + StructuredOutputsParams(json=schema).source[1]


def _alternatives(tools: list[dict], arguments_key: str) -> str:
    return "call_object: " + " | ".join(json_lark(call_schema(t, arguments_key)) for t in tools) + "\n"


class HermesFormat(ToolFormat):
    name = "hermes"
    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self, open_id: int | None = None, close_id: int | None = None, special: bool = False) -> None:
        # The tags' token ids, for the grammar (the model writes the tokens it learned, not the tags spelled out).
        self.open_id, self.close_id, self.keeps_special_tokens = open_id, close_id, special

    def parse(self, text: str, final: bool, parallel: bool = True) -> ParsedAnswer:
        parts, calls, between, pos = [], [], [], 0
        while True:
            i = text.find(self.OPEN, pos)
            if i < 0 or (calls and not parallel):
                tail = "" if calls and not parallel else text[pos:]
                parts.append(tail if final else tail[: len(tail) - partial_suffix(tail, self.OPEN)])
                break
            start = i + len(self.OPEN)
            j = text.find(self.CLOSE, start)
            body = text[start : j if j >= 0 else len(text)]
            if j < 0 and not final:
                body = body[: len(body) - partial_suffix(body, self.CLOSE)]
            call, _ = parse_call_object(body, final or j >= 0)
            if call is None and (j >= 0 or final):  # a block that holds no call is text
                parts.append(text[pos : j + len(self.CLOSE) if j >= 0 else len(text)])
                between.append(False)
                if j < 0:
                    break
                pos = j + len(self.CLOSE)
                continue
            parts.append(text[pos:i])
            between.append(True)  # a call follows this part
            if call is not None:
                call.complete = j >= 0 or call.complete
                calls.append(call)
            if j < 0:
                parts.append("")
                break
            pos = j + len(self.CLOSE)
        return ParsedAnswer(_join(parts, between, final), calls)

    def lark_calls(self, tools: list[dict], parallel: bool) -> str:
        calls = 'call ("\\n" call)*' if parallel else "call"
        call = f'call: <[{self.open_id}]> "\\n" call_object "\\n" <[{self.close_id}]>\n'
        return f"calls: {calls}\n{call}" + _alternatives(tools, "arguments")

    def lark_text_or_calls(self) -> str:
        # Text cannot hold the tags' tokens (special tokens are no text), so it ends where a call begins.
        return "answer: TEXT (calls /[ \\t\\n]{0,4}/)?\nTEXT: /(.|\\n)*/\n"


class JsonFormat(ToolFormat):
    """A reply that is nothing but calls: a JSON array of call objects, or objects joined by ";" (Llama 3)."""

    name = "json"
    ARGUMENTS = "arguments"

    def parse(self, text: str, final: bool, parallel: bool = True) -> ParsedAnswer:
        stripped = text.lstrip()
        if not stripped:
            return ParsedAnswer(text if final else "")
        if stripped[0] == "[":
            return self._array(text, len(text) - len(stripped) + 1, final, parallel)
        if stripped[0] == "{":
            return self._objects(text, final, parallel)
        return ParsedAnswer(text)

    def _objects(self, text: str, final: bool, parallel: bool) -> ParsedAnswer:
        calls, pos = [], 0
        while True:
            call, end = parse_call_object(text[pos:], final)
            if call is None:
                if not calls:  # the first object is not a call (yet): text, once that is known
                    return ParsedAnswer(text if end is not None or final else "")
                break
            calls.append(call)
            if end is None or not parallel:
                break
            rest = text[pos + end :]
            m = re.match(r"\s*;\s*(?=\{)", rest)
            if m is None:
                break
            pos += end + m.end()
        return ParsedAnswer("", calls)

    def _array(self, text: str, pos: int, final: bool, parallel: bool) -> ParsedAnswer:
        calls = []
        while True:
            rest = text[pos:]
            skip = len(rest) - len(rest.lstrip())
            if not calls and skip < len(rest) and rest[skip] != "{":
                return ParsedAnswer(text)  # an array, but not of calls
            call, end = parse_call_object(rest, final)
            if call is None:
                if not calls:
                    return ParsedAnswer(text if end is not None or final else "")
                break
            calls.append(call)
            if end is None or not parallel:
                break
            m = re.match(r"\s*,\s*(?=\{)", text[pos + end :])
            if m is None:
                break
            pos += end + m.end()
        return ParsedAnswer("", calls)

    def lark_calls(self, tools: list[dict], parallel: bool) -> str:
        calls = 'call_object (", " call_object)*' if parallel else "call_object"
        return f'calls: "[" {calls} "]"\n' + _alternatives(tools, self.ARGUMENTS)

    def lark_text_or_calls(self) -> str:
        # Calls, or text that does not start as they do.
        return "answer: calls | TEXT\nTEXT: /[ \\t\\n]*([^\\[{ \\t\\n](.|\\n)*)?/\n"


class Llama3JsonFormat(JsonFormat):
    name = "llama3_json"
    ARGUMENTS = "parameters"

    def lark_calls(self, tools: list[dict], parallel: bool) -> str:
        calls = 'call_object ("; " call_object)*' if parallel else "call_object"
        return f"calls: {calls}\n" + _alternatives(tools, self.ARGUMENTS)


class MistralFormat(ToolFormat):
    name = "mistral"
    keeps_special_tokens = True  # [TOOL_CALLS] is a special token
    MARK, ARGS = "[TOOL_CALLS]", "[ARGS]"

    def __init__(self, mark_id: int, args_id: int | None) -> None:
        self.mark_id, self.args_id = mark_id, args_id

    def new_id(self) -> str:
        return "".join(secrets.choice(_ALNUM) for _ in range(9))  # Mistral's templates insist on 9 characters

    def parse(self, text: str, final: bool, parallel: bool = True) -> ParsedAnswer:
        i = text.find(self.MARK)
        if i < 0:
            return ParsedAnswer(text if final else text[: len(text) - partial_suffix(text, self.MARK)].rstrip())
        content, rest = text[:i].rstrip(), text[i + len(self.MARK) :]
        if rest.lstrip().startswith("["):
            return ParsedAnswer(content, JsonFormat()._array(rest, rest.index("[") + 1, final, parallel).calls)
        calls = []
        segments = rest.split(self.MARK)
        for n, segment in enumerate(segments):
            segment_final = final or n < len(segments) - 1
            if not segment_final:
                segment = segment[: len(segment) - partial_suffix(segment, self.MARK)]
            j = segment.find(self.ARGS)
            if j < 0:  # the name is not finished yet (or, at the end, a name with no arguments: not a call)
                break
            start = j + len(self.ARGS)
            start += len(segment[start:]) - len(segment[start:].lstrip())
            end = value_end(segment, start)
            if start < len(segment) and segment[start] in "{[":
                arguments = segment[start : end if end is not None else len(segment)]
            elif end is not None or segment_final:
                arguments = segment[start : end if end is not None else len(segment)].strip()
            else:
                arguments = ""
            calls.append(ParsedCall(segment[:j].strip(), arguments, end is not None))
            if not parallel:
                break
        return ParsedAnswer(content, calls)

    def lark_calls(self, tools: list[dict], parallel: bool) -> str:
        mark = f"<[{self.mark_id}]>"
        if self.args_id is None:
            calls = 'call_object (", " call_object)*' if parallel else "call_object"
            return f'calls: {mark} "[" {calls} "]"\n' + _alternatives(tools, "arguments")
        each = " | ".join(
            f"{mark} {json.dumps(t['function']['name'])} <[{self.args_id}]> {json_lark(parameters_schema(t))}"
            for t in tools
        )
        return f"calls: call{'+' if parallel else ''}\ncall: {each}\n"

    def lark_text_or_calls(self) -> str:
        return "answer: TEXT calls?\nTEXT: /(.|\\n)*/\n"


def tool_format(tokenizer) -> ToolFormat:
    """The syntax this model writes tool calls in (the rule is the module's doc)."""
    open_id, close_id = token_id(tokenizer, HermesFormat.OPEN), token_id(tokenizer, HermesFormat.CLOSE)
    if open_id is not None and close_id is not None:
        return HermesFormat(open_id, close_id, special=HermesFormat.OPEN in tokenizer.all_special_tokens)
    mark_id = token_id(tokenizer, MistralFormat.MARK)
    if mark_id is not None:
        return MistralFormat(mark_id, token_id(tokenizer, MistralFormat.ARGS))
    if token_id(tokenizer, "<|python_tag|>") is not None:
        return Llama3JsonFormat()
    return JsonFormat()
