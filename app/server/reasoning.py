"""Reasoning models: the `<think>…</think>` part of a reply apart from its answer (vLLM's reasoning_content).

The rule: a model reasons this way when its vocabulary holds `<think>` and `</think>` as single tokens (Qwen3,
QwQ, DeepSeek-R1 and their distills). Where the reply starts is read from the prompt the template wrote:
- the prompt ends inside a think block (the template opened `<think>` for the model, as DeepSeek-R1's and the
  Qwen3 "thinking" templates do): the reply starts as reasoning;
- the prompt ends with a closed one (Qwen3 with chat_template_kwargs {"enable_thinking": false} writes an empty
  `<think>\\n\\n</think>`): the reply is all answer;
- otherwise the reply is reasoning only if it opens with `<think>`.
Reasoning runs to `</think>`; a reply cut before it (max_tokens) is all reasoning.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

THINK_START, THINK_END = "<think>", "</think>"


class ThinkState(enum.Enum):
    OPEN = "open"  # the prompt opened the block: the reply starts as reasoning
    CLOSED = "closed"  # the prompt closed an (empty) block: no reasoning
    MAYBE = "maybe"  # reasoning if the reply opens a block


@dataclass(frozen=True)
class Think:
    """A reasoning model's think tokens, and where its reply starts."""

    state: ThinkState
    start_id: int
    end_id: int
    special: bool  # the tokens are special ones: the reply must be decoded with them to show them


def token_id(tokenizer, token: str) -> int | None:
    """The id of `token` when it is one token of the vocabulary (added tokens included), else None. Asked of the
    fast tokenizer directly: get_vocab() builds a dict of the whole vocabulary, tens of ms on every request."""
    return tokenizer.backend_tokenizer.token_to_id(token)


def think_state(tokenizer, prompt_token_ids: list[int]) -> Think | None:
    """None for a model that does not reason in think blocks (`<think>` and `</think>` are not both tokens)."""
    start, end = token_id(tokenizer, THINK_START), token_id(tokenizer, THINK_END)
    if start is None or end is None:
        return None
    special = THINK_START in tokenizer.all_special_tokens or THINK_END in tokenizer.all_special_tokens
    last_start = max((i for i, t in enumerate(prompt_token_ids) if t == start), default=-1)
    last_end = max((i for i, t in enumerate(prompt_token_ids) if t == end), default=-1)
    if last_start > last_end:
        return Think(ThinkState.OPEN, start, end, special)
    # A closed block right at the end of the prompt (whitespace after it aside) is the template turning it off.
    tail = tokenizer.decode(prompt_token_ids[last_end:]) if last_end >= 0 else ""
    state = ThinkState.CLOSED if last_end >= 0 and tail.strip() == THINK_END else ThinkState.MAYBE
    return Think(state, start, end, special)


def partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that is a proper start of `tag`: text to hold back while the tag
    may be coming."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


@dataclass
class Split:
    reasoning: str | None  # None: the reply has no reasoning (so far)
    answer: str  # the rest of the text: content and tool calls
    answer_started: bool  # past the reasoning (or there is none): the answer may be parsed


def split_reasoning(text: str, state: ThinkState | None, final: bool) -> Split:
    """The reply's reasoning and answer. Unless final, text that may still turn out to be a tag (or whitespace
    around the reasoning) is held back, so each call's parts start with the previous call's (the stream's deltas
    add up to the reply not streamed)."""
    if state is None or state is ThinkState.CLOSED:
        return Split(None, text, True)
    if state is ThinkState.MAYBE:
        stripped = text.lstrip()
        if not stripped.startswith(THINK_START):
            if not final and THINK_START.startswith(stripped):  # nothing yet, or the tag's start
                return Split(None, "", False)
            return Split(None, text, True)
        body = stripped[len(THINK_START) :]
    else:
        body = text
    end = body.find(THINK_END)
    if end >= 0:
        return Split(body[:end].strip(), body[end + len(THINK_END) :].lstrip(), True)
    if final:
        return Split(body.strip(), "", True)
    held = partial_suffix(body, THINK_END)
    return Split(body[: len(body) - held].strip(), "", False)


def lark_reasoning(think: Think | None) -> str:
    """Lark lines for a grammar whose rule `answer` follows the reasoning the template asked for: reasoning first
    (the prompt opened it), none (it closed it), or an optional block (the model decides); a few new lines may
    come between. `start` is defined here. The think tokens are named by id: the model writes them as the tokens
    it learned, not spelled out in pieces."""
    if think is None or think.state is ThinkState.CLOSED:
        return "start: answer\n"
    end = f"<[{think.end_id}]>"
    if think.state is ThinkState.OPEN:
        return f"start: think /[ \\t\\n]{{0,4}}/ answer\nthink: /(.|\\n)*/ {end}\n"
    return f"start: (think /[ \\t\\n]{{0,4}}/)? answer\nthink: <[{think.start_id}]> /(.|\\n)*/ {end}\n"
