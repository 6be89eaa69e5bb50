"""Text files attached to a chat message, without Qt: read and checked (a folder, an unreadable file, a binary one,
one that is not UTF-8, an empty one and one too large for the model's context are refused, each in words naming
the file), counted in tokens, and written into the message.

Each file goes into the message as a fenced code block headed by its name, before what the user typed: the fence
renders as code in the transcript (with its Copy link), a model reads a named, delimited document plainly, and a
long document placed before the question about it is what models answer best.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from app.units import byte_size

# Read whole and tokenized on the UI thread, so bounded: 8 MiB of text is some two million tokens, past any
# context a workstation runs.
MAX_BYTES = 8 * 2**20
BINARY_PROBE = 8192  # a NUL byte within the first this many bytes marks a binary file (as git decides)
CHARS_PER_TOKEN = 4  # the usual rule of thumb for English text, for an estimate without the model's tokenizer


class AttachmentError(ValueError):
    """A file that cannot be attached; the message begins with the file's name and says why."""


@dataclass(frozen=True)
class TokenCounter:
    """How attachments are counted: with the loaded model's tokenizer (`exact`), or estimated from their length;
    `context`: the model's context in tokens, when it is known."""

    count: Callable[[str], int]
    exact: bool
    context: int | None = None


def estimate_tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


ESTIMATE = TokenCounter(estimate_tokens, exact=False)


@dataclass(frozen=True)
class Attachment:
    """A file's text as it goes into the message (`block`), and the tokens that block takes."""

    path: Path
    text: str
    block: str
    tokens: int
    exact: bool  # counted by the model's tokenizer, not estimated

    @property
    def name(self) -> str:
        return self.path.name


def read_attachment(path: str | Path, counter: TokenCounter, attached_tokens: int = 0) -> Attachment:
    """`path` read as UTF-8 text and counted; `attached_tokens`: what the files attached before it take, which
    must leave it room in the context. Raises AttachmentError saying what is wrong."""
    path = Path(path)
    text = read_text(path)
    block = as_block(path.name, text)
    tokens = counter.count(block)
    if counter.context is not None and attached_tokens + tokens > counter.context:
        if attached_tokens:
            raise AttachmentError(
                f"{path.name}: {tokens:,} tokens; with the {attached_tokens:,} tokens attached already that is more "
                f"than the model's context of {counter.context:,} tokens"
            )
        raise AttachmentError(
            f"{path.name}: {tokens:,} tokens, more than the model's context of {counter.context:,} tokens"
        )
    return Attachment(path, text, block, tokens, counter.exact)


def read_text(path: Path) -> str:
    """The file's text (a UTF-8 BOM dropped, line ends made \\n); raises AttachmentError for anything else."""
    if path.is_dir():
        raise AttachmentError(f"{path.name}: a folder; attach the files in it")
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise AttachmentError(
                f"{path.name}: {byte_size(size)}, too large to attach (at most {byte_size(MAX_BYTES)})"
            )
        raw = path.read_bytes()
    except OSError as e:
        raise AttachmentError(f"{path.name}: cannot read the file: {e.strerror or e}") from e
    if b"\0" in raw[:BINARY_PROBE]:
        raise AttachmentError(f"{path.name}: a binary file, not text")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise AttachmentError(f"{path.name}: not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line})") from e
    if not text.strip():
        raise AttachmentError(f"{path.name}: the file is empty")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def as_block(name: str, text: str) -> str:
    """`text` fenced, headed by the file's name; the fence is longer than any run of backticks in the text, so
    none of them ends it early, and says the language by the file's suffix (py, md, ...) for colouring."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    suffix = Path(name).suffix.lstrip(".").lower()
    language = suffix if suffix.isalnum() else ""
    body = text.rstrip("\n")
    return f"File: {name}\n{fence}{language}\n{body}\n{fence}"


def compose(attachments: Iterable[Attachment], typed: str) -> str:
    """The message: each attachment's block, then what was typed, a blank line between each."""
    return "\n\n".join([a.block for a in attachments] + ([typed] if typed else []))
