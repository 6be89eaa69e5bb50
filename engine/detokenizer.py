"""Incremental detokenization of one generated sequence: new token ids -> visible text deltas, stop strings.

Each call decodes only a short window of ids (vLLM's prefix_offset / read_offset technique; the ids before
prefix_offset are dropped, so the window starts at 0):

    window: | 0 ........................ read_offset ........................ end |
              context: ids already shown    new ids, not shown yet

decode(window) minus decode(window[:read_offset]) is the new text. The context tokens make word boundaries (a
byte-level leading space, SentencePiece's "▁" that a decoder strips at the start of a string) come out as in a
full decode. While the window's text ends in U+FFFD the newest ids stop inside a multi-byte character, so
nothing is shown until a later id completes it (or finish() gives up on it). Once shown, the new ids become the
next window's context and older ids are dropped, so the work per call stays O(window).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Prompt ids decoded ahead of the first output id: a few settle its word boundary, as vLLM does.
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Text deltas for one sequence; `text` is all visible output so far, `stop_reason` the stop string hit.

    With hold_back_partial_stop, text that may be the start of a stop string is withheld until a later append
    shows it is not (or finish() releases it), so the deltas always add up to `text`. Without it, a stop string
    (not kept in the output) that starts in text already shown cuts `text` shorter than the deltas returned.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        hold_back_partial_stop: bool = True,
        min_tokens: int = 0,
    ) -> None:
        if isinstance(stop, str) or any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {stop!r}")
        stop = tuple(stop)
        if min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {min_tokens}")
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stop = stop
        self._max_stop_len = max(map(len, stop), default=0)
        self._include_stop = include_stop_str_in_output
        # A stop string kept in the output is cut after its end, so text shown early is never cut.
        self._hold_back = hold_back_partial_stop and not include_stop_str_in_output
        self._window = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])  # see module doc
        self._read_offset = len(self._window)
        # As in vLLM, a stop string ends generation only once min_tokens output ids were generated.
        self._min_tokens = min_tokens
        self._num_output_ids = 0
        self._held = ""  # decoded text withheld because it may begin a stop string
        self._finished = False
        self.text = ""
        self.stop_reason: str | None = None

    def append(self, new_token_ids: Sequence[int]) -> str:
        """Adds one engine step's ids; returns the text they make visible ("" or more, never half a character)."""
        if self._finished:
            raise RuntimeError(f"append() after the sequence finished (stop_reason={self.stop_reason!r})")
        self._window.extend(new_token_ids)
        self._num_output_ids += len(new_token_ids)
        return self._show(self._decode_new(final=False), final=False)

    def finish(self) -> str:
        """Ends generation: flushes an incomplete character and held-back text; returns that delta."""
        if self._finished:
            return ""
        delta = self._show(self._decode_new(final=True), final=True)
        self._finished = True
        return delta

    def _decode(self, ids: list[int]) -> str:
        # Clean-up (" ." -> ".") rewrites text across token boundaries, which no window can reproduce.
        return self._tokenizer.decode(
            ids, skip_special_tokens=self._skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def _decode_new(self, final: bool) -> str:
        """Text of the ids past read_offset, or "" while it is empty or ends inside a character (unless final)."""
        prefix_text = self._decode(self._window[: self._read_offset])
        new_text = self._decode(self._window)
        if len(new_text) <= len(prefix_text) or (new_text.endswith(_REPLACEMENT_CHAR) and not final):
            # Keep the window (and its context) until the ids add complete text.
            return ""
        # Slide: the ids just shown become the next call's context; ids before them are no longer needed.
        del self._window[: self._read_offset]
        self._read_offset = len(self._window)
        return new_text[len(prefix_text) :]

    def _show(self, new_text: str, final: bool) -> str:
        """Appends decoded text, cuts at a stop string, holds back a possible stop start; returns the delta."""
        pending = self._held + new_text
        if self._stop and new_text and self._num_output_ids >= self._min_tokens:
            # A stop string ending in the new text starts at most max_stop_len - 1 chars before it.
            tail_len = min(len(self.text), self._max_stop_len - 1)
            searched = self.text[len(self.text) - tail_len :] + pending
            # A match must end in the new text: one lying wholly in text shown earlier, before min_tokens was
            # reached, is not a stop.
            found = min(
                ((i, s) for s in self._stop if (i := searched.find(s, max(0, tail_len - len(s) + 1))) != -1),
                key=lambda m: m[0],
                default=None,
            )  # earliest start; ties go to the first listed
            if found is not None:
                start, stop = found
                cut = len(self.text) - tail_len + start + (len(stop) if self._include_stop else 0)
                delta = pending[: max(cut - len(self.text), 0)]
                self.text = self.text[:cut] + delta
                self._held = ""
                self.stop_reason = stop
                self._finished = True
                return delta
        keep = 0 if final or not self._hold_back else self._partial_stop_len(pending)
        delta, self._held = pending[: len(pending) - keep], pending[len(pending) - keep :]
        self.text += delta
        return delta

    def _partial_stop_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        for n in range(min(len(text), self._max_stop_len - 1), 0, -1):
            suffix = text[-n:]
            if any(s.startswith(suffix) for s in self._stop):
                return n
        return 0
