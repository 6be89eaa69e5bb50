"""One chat message as the markdown its bubble renders: a reply's reasoning (a think block) folded above its
answer, a JSON reply as a code block, a "Copy code" link under each code block of a finished reply, a cursor after
a reply still streaming; and a reply's stats as the line under it."""

from __future__ import annotations

import contextlib
import json
import re

from app.history import Message
from app.server.reasoning import THINK_END, THINK_START, ThinkState, split_reasoning

CURSOR = " ▍"  # after a reply that is still streaming

# A fenced code block: its opening fence (``` or ~~~, an optional language), its text, its closing fence.
_FENCE = re.compile(r"^(?P<fence>```|~~~)[^\n]*\n(?P<code>.*?)^(?P=fence)[ \t]*$", re.MULTILINE | re.DOTALL)


def message_markdown(message: Message, streaming: bool, expanded: bool, json_reply: bool) -> str:
    """The message as markdown; `streaming` (a reply being written) ends it in a cursor. A reply's reasoning shows
    as a fold link ("think:<id>"), its text under it when `expanded`. With json_reply (the conversation has a JSON
    schema) a reply shows as a JSON code block."""
    m = message
    if m.role != "assistant":
        return m.content
    reasoning, content = split_think(m.content)
    if json_reply and content:
        content = json_block(content)
    if m.finished:
        content = with_copy_links(content, m.id)
    if streaming and (content or reasoning is None):
        content += CURSOR
    fold = "" if reasoning is None else reasoning_fold(m.id, reasoning, expanded, streaming and not content)
    return fold + (content or ("" if fold else "…"))


def copy_text(message: Message) -> str:
    """What a message's Copy button copies: its text as written (markdown), a reply's reasoning left out."""
    return split_think(message.content)[1] if message.role == "assistant" else message.content


def split_think(content: str) -> tuple[str | None, str]:
    """A reply's reasoning (None without a think block) and its answer. A reply that opens with `<think>` reasons
    until `</think>` (all of it, while that has not come); so does one with a `</think>` alone, whose template
    opened the block in the prompt."""
    if content.lstrip().startswith(THINK_START):
        state = ThinkState.MAYBE
    elif THINK_END in content:
        state = ThinkState.OPEN
    else:
        return None, content
    split = split_reasoning(content, state, final=True)
    return split.reasoning, split.answer


def json_block(answer: str) -> str:
    """A JSON reply as a code block, indented when it parses (a reply still streaming is shown as it is)."""
    with contextlib.suppress(json.JSONDecodeError):
        answer = json.dumps(json.loads(answer), indent=2, ensure_ascii=False)
    return f"```json\n{answer}\n```"


def shown_answer(content: str, json_reply: bool) -> str:
    """A reply's answer as its bubble shows it (the text its Copy code links copy from)."""
    answer = split_think(content)[1]
    return json_block(answer) if json_reply and answer else answer


def reasoning_fold(message_id: int, reasoning: str, open_: bool, thinking: bool) -> str:
    """The fold line of a reply's reasoning (a link that opens or closes it), and the reasoning quoted when open."""
    words = len(reasoning.split())
    label = f"{'▾' if open_ else '▸'} {'Thinking…' if thinking else 'Reasoning'} ({words} word{'s' * (words != 1)})"
    fold = f"[{label}](think:{message_id})\n\n"
    if open_ and reasoning:
        fold += "\n".join(f"> {line}" if line else ">" for line in reasoning.splitlines()) + "\n\n"
    return fold


def code_blocks(markdown: str) -> list[str]:
    """The text of each fenced code block, in order."""
    return [m.group("code") for m in _FENCE.finditer(markdown)]


def with_copy_links(markdown: str, message_id: int) -> str:
    """The reply with a "Copy code" link under each fenced code block."""
    count = iter(range(1 << 30))
    return _FENCE.sub(lambda m: f"{m.group(0)}\n\n[Copy code](copy:{message_id}/{next(count)})\n", markdown)


def stats_line(stats: dict) -> str:
    """A finished reply's figures in words: tokens, tokens/s, time to first token, how it ended if not by itself."""
    bits = []
    if "tokens" in stats:
        bits.append(f"{stats['tokens']} tokens")
    if "tokens_per_s" in stats:
        bits.append(f"{stats['tokens_per_s']} tok/s")
    if "ttft_s" in stats:
        bits.append(f"first token {stats['ttft_s'] * 1000:.0f} ms")
    if stats.get("finish_reason") == "abort":
        bits.append("stopped")
    if stats.get("error"):
        bits.append(f"error: {stats['error']}")
    return " · ".join(bits)
