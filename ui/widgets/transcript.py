"""The chat transcript as markdown: each message under its role, a finished reply's stats under it, a "Copy code"
link under each of its code blocks, and code blocks shaded apart from the prose once rendered."""

from __future__ import annotations

import re
from collections.abc import Iterable

from PySide6.QtGui import QColor, QTextCursor, QTextDocument, QTextFormat

from app.history import Message

ROLE_NAMES = {"user": "You", "assistant": "Assistant", "system": "System"}
EMPTY = "*Start a conversation: type below and press Ctrl+Enter.*"
CURSOR = " ▍"  # after a reply that is still streaming

# A fenced code block: its opening fence (``` or ~~~, an optional language), its text, its closing fence.
_FENCE = re.compile(r"^(?P<fence>```|~~~)[^\n]*\n(?P<code>.*?)^(?P=fence)[ \t]*$", re.MULTILINE | re.DOTALL)


def transcript_markdown(messages: Iterable[Message], streaming_id: int | None) -> str:
    """The conversation as one markdown text; message `streaming_id` (a reply being written) ends in a cursor."""
    parts = []
    for m in messages:
        content = m.content + CURSOR if m.id == streaming_id else m.content
        stats = ""
        if m.role == "assistant" and m.finished:
            content = with_copy_links(content, m.id)
            stats = stats_line(m.stats)
        parts.append(f"**{ROLE_NAMES.get(m.role, m.role)}**\n\n{content or '…'}" + (f"\n\n{stats}" if stats else ""))
    return "\n\n---\n\n".join(parts) if parts else EMPTY


def shade_code(document: QTextDocument, shade: QColor) -> None:
    """Give the rendered code blocks `shade` as background, so they stand apart from the prose around them."""
    block = document.begin()
    while block.isValid():
        fmt = block.blockFormat()
        if fmt.hasProperty(QTextFormat.Property.BlockCodeFence):
            fmt.setBackground(shade)
            QTextCursor(block).setBlockFormat(fmt)
        block = block.next()


def code_blocks(markdown: str) -> list[str]:
    """The text of each fenced code block, in order."""
    return [m.group("code") for m in _FENCE.finditer(markdown)]


def with_copy_links(markdown: str, message_id: int) -> str:
    """The reply with a "Copy code" link under each fenced code block."""
    count = iter(range(1 << 30))
    return _FENCE.sub(lambda m: f"{m.group(0)}\n\n[Copy code](copy:{message_id}/{next(count)})\n", markdown)


def stats_line(stats: dict) -> str:
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
    return f"*{' · '.join(bits)}*" if bits else ""
