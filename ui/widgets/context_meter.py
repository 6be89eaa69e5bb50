"""The chat's context meter: how much of the model's context the open conversation uses, and the KV blocks its
reply holds in the engine's pool, own and shared (through the prefix cache, or with another request), live as the
reply grows.

Between replies the conversation is counted as its next prompt would be (its chat template rendered and tokenized),
on a worker thread: a long conversation takes a fifth of a second, too long for the UI thread. While a reply
streams, each update says the prompt's length, the tokens generated and the request's blocks as the engine counted
them after its step (app/engine_thread.py, report_blocks), so the meter shows the engine's own figures. A remote
endpoint says none of this: the meter says so instead of guessing.
"""

from __future__ import annotations

import threading

from PySide6.QtCore import QObject, Qt, Signal
from PySide6.QtWidgets import QHBoxLayout, QLabel, QProgressBar, QWidget

from engine import RequestBlocks
from ui.bridge import EngineBridge, RequestUpdate
from ui.theme import tone_color
from ui.widgets.cards import muted

# From this share of the context on, the figure turns to the warning tone: the next turns may not fit.
NEARLY_FULL = 0.85

BLOCKS_TIP = (
    "KV blocks the reply holds in the engine's cache: own ones it computed, shared ones it took from the prefix "
    "cache (the conversation so far, computed for an earlier turn) or holds with another request."
)


class _CountDone(QObject):
    """Carries a worker's count to the UI thread. Not parented to the meter: the worker holds it, so it outlives
    a meter closed while the count runs (the signal then reaches nobody)."""

    done = Signal(int, object)  # generation, token count | None | Exception


class ContextMeter(QWidget):
    def __init__(self, bridge: EngineBridge, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.bridge = bridge
        self.tokens: int | None = None  # of the conversation (with the reply so far while one streams)
        self.context: int | None = None  # the model's, None where not known
        self.blocks: RequestBlocks | None = None  # the streaming reply's, or the last one's at its end
        self.live = False  # a reply is streaming
        self.dropped = 0  # oldest messages left out of what the streaming reply was asked with
        self.drop_oldest = False  # the conversation's sends leave its oldest turns out when it overflows
        self._conversation: int | None = None
        self._generation = 0  # counts started; a count finishing after a newer one started is dropped
        self._counter = _CountDone()
        self._counter.done.connect(self._on_counted)
        self.bar = QProgressBar(textVisible=False, maximumWidth=140)
        self.bar.setFixedHeight(6)
        self.figure = QLabel(textFormat=Qt.TextFormat.PlainText)
        self.kv = muted()
        self.kv.setToolTip(BLOCKS_TIP)
        row = QHBoxLayout(self)
        row.setContentsMargins(2, 0, 2, 0)
        row.addWidget(self.bar)
        row.addWidget(self.figure)
        row.addWidget(self.kv, 1)
        self._show()

    # ---- between replies -----------------------------------------------------------------------------------
    def show_conversation(self, conversation_id: int | None, messages: list[dict] | None, drop_oldest: bool) -> None:
        """Conversation `conversation_id` between replies (None: none open), `messages` as its next request
        would send them, counted on a worker thread; `drop_oldest` when its sends leave the oldest turns out once
        it overflows. Its last reply's blocks stay shown, as they were at that reply's end."""
        self._generation += 1
        if conversation_id != self._conversation:
            self._conversation, self.blocks = conversation_id, None
        self.live, self.dropped, self.drop_oldest = False, 0, drop_oldest
        self.context = self.bridge.context_length()
        if not messages or self.context is None:
            self.tokens = 0 if self.context is not None else None
            self._show()
            return
        self._show()  # the figure stays as it was until the count comes (no flicker)
        generation, counter, bridge = self._generation, self._counter, self.bridge

        def count() -> None:
            try:
                result: int | Exception | None = bridge.count_chat_tokens(messages)
            except Exception as e:  # a template that cannot render them: the send will say so in words
                result = e
            counter.done.emit(generation, result)

        threading.Thread(target=count, name="context-count", daemon=True).start()

    def _on_counted(self, generation: int, result: int | Exception | None) -> None:
        if generation != self._generation:
            return
        self.tokens = result if isinstance(result, int) else None
        self._show()

    # ---- a reply -------------------------------------------------------------------------------------------
    def start_reply(self, conversation_id: int, prompt_tokens: int | None, dropped: int) -> None:
        """A reply in conversation `conversation_id` was sent: its prompt is `prompt_tokens` long (None from a
        remote endpoint), `dropped` oldest messages left out to fit."""
        self._generation += 1  # a count under way is of the conversation before this send
        self._conversation = conversation_id
        self.live, self.dropped, self.blocks = True, dropped, None
        self.context = self.bridge.context_length()
        self.tokens = prompt_tokens if self.context is not None else None
        self._show()

    def update_reply(self, update: RequestUpdate) -> None:
        """The streaming reply's update: the prompt and the tokens so far, and its blocks after that step."""
        if update.num_prompt_tokens is None:  # a remote endpoint
            return
        self.tokens = update.num_prompt_tokens + update.num_tokens
        if update.blocks is not None:  # None on the last update: the blocks are freed by then
            self.blocks = update.blocks
        self._show()

    # ---- drawing -------------------------------------------------------------------------------------------
    def _show(self) -> None:
        self.bar.setVisible(self.context is not None)
        if self.context is None:
            self.figure.setStyleSheet("")
            self.figure.setText(
                "Context use is not known for a remote endpoint"
                if self.bridge.remote is not None
                else "Context: no model is loaded"
            )
            self.kv.setText("")
            return
        self.bar.setRange(0, self.context)
        used = self.tokens
        self.bar.setValue(min(used or 0, self.context))
        nearly_full = used is not None and used >= NEARLY_FULL * self.context
        self.figure.setStyleSheet(f"color: {tone_color('warn').name()};" if nearly_full else "")
        shown = "…" if used is None else f"{used:,}"
        text = f"{shown} / {self.context:,} tokens"
        if self.dropped:
            text += f" (the oldest {self.dropped} messages left out)"
        elif used is not None and used >= self.context:
            text += " (the oldest turns are left out when sending)" if self.drop_oldest else " (too long to send whole)"
        self.figure.setText(text)
        self.kv.setText(self._blocks_text())

    def _blocks_text(self) -> str:
        b = self.blocks
        if b is None:
            return ""
        own = b.num_blocks - b.num_shared
        text = f"KV: {b.num_blocks} blocks, {own} own, {b.num_shared} shared"
        return text if self.live else f"Last reply: {text}"
