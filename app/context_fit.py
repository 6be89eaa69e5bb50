"""Whether a conversation fits the model's context, and what of it to send when it does not: its oldest turns
left out, the system prompt kept.

A chat is sent whole, as its template renders it; a model's context (max_model_len) holds the prompt and the reply.
The engine refuses a prompt that leaves no room to generate, and cuts a reply that reaches the end of the context
(finish reason "length"). The chat page asks here before it sends, so the user hears of it first and chooses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# count(messages) -> the prompt's tokens, as a send would render and tokenize them.
CountTokens = Callable[[list[dict]], int]

# The room a reply is given is its max_tokens, at most this share of the context: a max_tokens as long as a short
# context would make every send overflow, and a reply that reaches the end stops there (finish reason "length").
MAX_REPLY_SHARE = 8


def reply_room(max_tokens: int, context: int) -> int:
    """The tokens to leave free for a reply of at most `max_tokens` in `context`."""
    return min(max_tokens, context // MAX_REPLY_SHARE)


@dataclass(frozen=True)
class ContextCheck:
    """A conversation measured against a context: `prompt_tokens` of the `context` holds, with `reply_tokens`
    (the reply's max_tokens) to leave room for."""

    prompt_tokens: int
    reply_tokens: int
    context: int

    @property
    def fits(self) -> bool:
        return self.prompt_tokens + self.reply_tokens <= self.context

    @property
    def prompt_fits(self) -> bool:
        """Whether the engine takes the prompt at all (it wants room for one token): the reply may be cut short."""
        return self.prompt_tokens < self.context

    def sentence(self) -> str:
        """What does not fit, in a sentence."""
        need = self.prompt_tokens + self.reply_tokens
        return (
            f"This conversation is {self.prompt_tokens:,} tokens; with up to {self.reply_tokens:,} for the reply it "
            f"needs {need:,}, more than the model's context of {self.context:,}."
        )


@dataclass(frozen=True)
class Trimmed:
    """What to send: `messages` (the system prompt, then the newest turns), with the `num_dropped` oldest
    messages left out, and its check."""

    messages: list[dict]
    num_dropped: int
    check: ContextCheck


class CannotFit(ValueError):
    """Even the last message alone (with the system prompt) leaves no room for the reply."""


def drop_oldest_turns(messages: list[dict], count: CountTokens, reply_tokens: int, context: int) -> Trimmed:
    """`messages` with the fewest oldest turns left out that makes the prompt and `reply_tokens` fit `context`.
    A turn starts at a user message, so a reply is never sent without the message it answers; the system prompt
    (a leading "system" message) and the last user message always stay. Raises CannotFit, with the count of what
    is left, when even those do not fit.

    Counting renders and tokenizes the whole prompt, so the cut is found by bisection: log2(turns) counts."""
    head = 1 if messages and messages[0]["role"] == "system" else 0
    system, rest = messages[:head], messages[head:]
    # starts[j]: drop rest[:starts[j]] (nothing, or up to a user message). Fewer tokens the more is dropped, so
    # find the first j that fits.
    starts = sorted({0} | {i for i, m in enumerate(rest) if m["role"] == "user"})
    lo, hi = 0, len(starts) - 1
    best: Trimmed | None = None
    while lo <= hi:
        mid = (lo + hi) // 2
        kept = system + rest[starts[mid] :]
        result = ContextCheck(count(kept), reply_tokens, context)
        if result.fits:
            best, hi = Trimmed(kept, starts[mid], result), mid - 1
        else:
            lo = mid + 1
    if best is None:
        last = count(system + rest[starts[-1] :])
        raise CannotFit(
            f"The last message alone is {last:,} tokens with the system prompt; with up to "
            f"{reply_tokens:,} for the reply that is more than the model's context of {context:,}. Shorten it, "
            "lower Max tokens, or load the model with a longer context (Engine options)."
        )
    return best
