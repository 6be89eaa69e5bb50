"""A chat reply's text as OpenAI's message: reasoning_content, content and tool_calls, whole or as stream deltas.

The parsers (reasoning.py, tool_parsers.py) are prefix-stable, so a stream sends what each new parse adds to the
last, and the deltas add up to the message not streamed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from app.server.chat import ReplyFormat
from app.server.reasoning import split_reasoning
from app.server.tool_parsers import ParsedCall


@dataclass
class Reply:
    reasoning: str | None
    content: str
    calls: list[ParsedCall]


def parse_reply(fmt: ReplyFormat, text: str, final: bool) -> Reply:
    split = split_reasoning(text, fmt.think, final)
    calls: list[ParsedCall] = []
    content = split.answer
    if fmt.tools is not None and split.answer_started:
        answer = fmt.tools.parse(split.answer, final, fmt.parallel)
        content, calls = answer.content, answer.calls
    return Reply(split.reasoning, fmt.echo + content, calls)


def finish_reason(reply: Reply, reason: str | None) -> str | None:
    """A reply that ends in calls finishes with "tool_calls" (one cut by max_tokens keeps "length")."""
    return "tool_calls" if reason == "stop" and reply.calls else reason


def message(fmt: ReplyFormat, text: str) -> tuple[dict, Reply]:
    """The whole message of a finished reply."""
    reply = parse_reply(fmt, text, final=True)
    msg: dict = {"role": "assistant", "content": None if reply.calls and not reply.content else reply.content}
    if fmt.think is not None:
        msg["reasoning_content"] = reply.reasoning
    if reply.calls:
        msg["tool_calls"] = [
            {"id": fmt.tools.new_id(), "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in reply.calls
        ]
    return msg, reply


@dataclass
class _SentCall:
    id: str
    arguments: int = 0  # characters of its arguments sent


@dataclass
class DeltaState:
    """What one streamed choice has sent of its message."""

    fmt: ReplyFormat
    reasoning: int = 0
    content: int = 0
    calls: list[_SentCall] = field(default_factory=list)
    reply: Reply | None = None  # the last parse

    def deltas(self, text: str, final: bool) -> list[dict]:
        """The deltas the reply's text so far adds to what was sent: reasoning, content, then each call's head
        (id, type, name) and its arguments in fragments, OpenAI's delta.tool_calls."""
        reply = self.reply = parse_reply(self.fmt, text, final)
        out = []
        if reply.reasoning is not None and len(reply.reasoning) > self.reasoning:
            out.append({"reasoning_content": reply.reasoning[self.reasoning :]})
            self.reasoning = len(reply.reasoning)
        if len(reply.content) > self.content:
            out.append({"content": reply.content[self.content :]})
            self.content = len(reply.content)
        for index, call in enumerate(reply.calls):
            if index == len(self.calls):
                if call.name is None:
                    break
                sent = _SentCall(self.fmt.tools.new_id())
                self.calls.append(sent)
                head = {"name": call.name, "arguments": ""}
                out.append({"tool_calls": [{"index": index, "id": sent.id, "type": "function", "function": head}]})
            sent = self.calls[index]
            if len(call.arguments) > sent.arguments:
                fragment = call.arguments[sent.arguments :]
                out.append({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]})
                sent.arguments = len(call.arguments)
        return out
