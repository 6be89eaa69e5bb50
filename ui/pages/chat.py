"""The chat page: conversations (ui/widgets/conversation_list.py: search, new, rename, delete, export to Markdown
or JSON and import of JSON, a branch from a chosen message), replies streamed as they are generated, stop,
regenerate, edit-and-resend of the last message, the model answering and its engine options
(ui/widgets/model_picker.py), text files attached to a message (ui/widgets/attachments.py), a system prompt (with
named presets, ui/widgets/prompt_presets.py) and sampling parameters, a JSON schema the replies keep to (a badge
marks the conversations that have one), a reasoning model's thinking folded under its reply, and the messages as
bubbles (ui/widgets/transcript.py): markdown with coloured code, Copy on each, tokens/s and time to first token
under each reply.

Every conversation lives in ChatHistory. A streaming reply is drawn only after the same text is saved (each
redraw writes it first, one UPDATE), so a crash mid-reply, kill -9 included, loses nothing that was on screen. A
save that fails (a full disk) stops the reply and says so; the transcript then shows what the history holds.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass

from PySide6.QtCore import Qt, QTimer, QUrl
from PySide6.QtGui import QDesktopServices, QGuiApplication, QKeySequence, QShortcut
from PySide6.QtWidgets import (
    QFrame,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QScrollArea,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from app.context_fit import CannotFit, ContextCheck, drop_oldest_turns, reply_room
from app.history import ChatHistory, HistoryError, Message, title_from
from app.prompt_presets import FILE_NAME as PRESETS_FILE
from app.prompt_presets import PresetStore
from engine import SamplingParams
from engine.structured_output import StructuredOutputsParams
from ui.bridge import (
    EngineBridge,
    ModelLoadCancelled,
    ModelLoaded,
    ModelLoadFailed,
    ModelLoadStage,
    PreparedChat,
    RequestFailed,
    RequestUpdate,
)
from ui.widgets.attachments import AttachmentBar
from ui.widgets.context_meter import ContextMeter
from ui.widgets.context_overflow import ContextOverflowCard
from ui.widgets.conversation_list import ConversationList
from ui.widgets.json_schema_dialog import ReplyFormatBox
from ui.widgets.load_panel import LoadPanel
from ui.widgets.message_markdown import code_blocks, shown_answer, split_think
from ui.widgets.model_picker import ModelPicker
from ui.widgets.prompt_presets import PresetPicker
from ui.widgets.sampling_form import FIELDS, SamplingForm
from ui.widgets.status_line import StatusLine
from ui.widgets.transcript import Transcript

# A streaming reply is redrawn (and saved) at most this often: its bubble is re-rendered whole, and doing that for
# every token would take the UI thread (and the GIL) from the engine thread.
RENDER_INTERVAL_MS = 50


@dataclass
class _Reply:
    """The reply being streamed."""

    request_id: str
    message_id: int
    sent: float
    first_token: float | None = None
    text: str = ""  # as the engine sent it last
    saved: str = ""  # as the history holds it (what is drawn)
    tokens: int = 0


@dataclass(frozen=True)
class _Outgoing:
    """A reply's request, ready to submit: the chat prepared for the target (fitted to the model's context, the
    `dropped` oldest messages left out) and its sampling parameters."""

    chat: PreparedChat
    params: SamplingParams
    dropped: int


class ChatPage(QWidget):
    def __init__(self, bridge: EngineBridge, history: ChatHistory, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.bridge, self.history = bridge, history
        self.reply: _Reply | None = None
        self.expanded: set[int] = set()  # replies whose reasoning is unfolded
        self.loading = False  # a model is loading into the in-process engine
        # Conversations whose oldest turns the user chose to leave out when they overflow (while the app runs).
        self.drop_oldest: set[int] = set()
        self._render_soon = QTimer(self, singleShot=True, interval=RENDER_INTERVAL_MS, timeout=self._draw_reply)
        self._build()
        bridge.request_update.connect(self._on_update)
        bridge.request_failed.connect(self._on_failed)
        bridge.model_loading.connect(self._on_model_loading)
        bridge.model_load_stage.connect(self._on_model_load_stage)
        bridge.model_loaded.connect(self._on_model_ready)
        bridge.model_load_failed.connect(self._on_model_ready)
        bridge.model_load_cancelled.connect(self._on_model_ready)
        bridge.connection_changed.connect(self._on_connection_changed)
        self.conversation_list.refresh()

    @property
    def conversation_id(self) -> int | None:
        """The open conversation (None: none), held by the conversation list, which highlights it."""
        return self.conversation_list.current_id

    @conversation_id.setter
    def conversation_id(self, conversation_id: int | None) -> None:
        self.conversation_list.current_id = conversation_id

    # ---- layout -------------------------------------------------------------------------------------------
    def _build(self) -> None:
        # Links are handled here: "copy:" ones copy a code block, the rest open in the browser.
        self.transcript = Transcript()
        self.transcript.anchorClicked.connect(self._on_link)
        self.transcript.copied.connect(lambda: self.status.say("Message copied."))
        self.input = QPlainTextEdit(placeholderText="Message (Ctrl+Enter sends)")
        self.input.setTabChangesFocus(True)  # Tab goes on to Send, as in a form; a message needs no tab character
        self.input.setMaximumHeight(110)
        self.send_button = QPushButton("Send")
        self.send_button.clicked.connect(lambda: self.send())
        self.stop_button = QPushButton("Stop")
        self.stop_button.clicked.connect(self.stop)
        self.regenerate_button = QPushButton("Regenerate")
        self.regenerate_button.clicked.connect(self.regenerate)
        self.edit_button = QPushButton("Edit last")
        self.edit_button.clicked.connect(self.edit_last)
        self.copy_button = QPushButton("Copy reply")
        self.copy_button.clicked.connect(self.copy_last_reply)
        self.status = StatusLine()
        self.conversation_list = left = ConversationList(self.history, self.status)
        left.opened.connect(self.open_conversation)
        left.new_requested.connect(self.new_conversation)
        left.delete_requested.connect(self.delete_conversation)
        # Text files for the next message: Attach…, or dropped anywhere on the page (the message box included).
        self.attachments = AttachmentBar(self.bridge, self.status)
        self.attachments.take_drops_on(self, self.input.viewport())
        middle = QWidget()
        self.load_panel = LoadPanel()
        self.load_panel.cancel_requested.connect(self.bridge.cancel_load)
        mv = QVBoxLayout(middle)
        mv.addWidget(self.load_panel)
        mv.addWidget(self.transcript, 1)
        self.meter = ContextMeter(self.bridge)
        mv.addWidget(self.meter)
        self.overflow = ContextOverflowCard()
        mv.addWidget(self.overflow)
        mv.addWidget(self.input)
        mv.addWidget(self.attachments)
        buttons = QHBoxLayout()
        for b in (self.send_button, self.stop_button, self.regenerate_button, self.edit_button, self.copy_button):
            buttons.addWidget(b)
        buttons.addStretch(1)
        mv.addLayout(buttons)
        mv.addWidget(self.status)
        # Escape belongs to the page (a dialog's Escape must not stop a reply); the window's Chat menu holds the
        # other shortcuts (ui/menus.py).
        QShortcut(QKeySequence("Escape"), self, activated=self.stop, context=Qt.WidgetWithChildrenShortcut)

        self.system_prompt = QPlainTextEdit(placeholderText="System prompt (optional)")
        self.system_prompt.setTabChangesFocus(True)
        self.system_prompt.setMaximumHeight(120)
        self.sampling = SamplingForm(FIELDS)  # every field there is
        self.reply_format = ReplyFormatBox()
        self.reply_format.chosen.connect(self.set_json_schema)
        right = QWidget()
        rv = QVBoxLayout(right)
        # Presets live beside the chat history, in the data folder.
        self.presets = PresetPicker(
            self.system_prompt, PresetStore(self.history.path.parent / PRESETS_FILE), self.status
        )
        rv.addWidget(QLabel("<b>System prompt</b>"))
        rv.addWidget(self.presets)
        rv.addWidget(self.system_prompt)
        rv.addSpacing(8)
        rv.addWidget(QLabel("<b>Replies</b>"))
        rv.addWidget(self.reply_format)
        rv.addSpacing(8)
        rv.addWidget(QLabel("<b>Sampling</b>"))
        rv.addWidget(self.sampling)
        rv.addStretch(1)
        # The settings scroll on a low window, and give way to the conversation on a narrow one (_fit_columns).
        self.settings_panel = QScrollArea(widgetResizable=True, frameShape=QFrame.Shape.NoFrame)
        self.settings_panel.setWidget(right)
        self.settings_panel.setMinimumWidth(1)

        self.splitter = splitter = QSplitter()
        for w, stretch in ((left, 0), (middle, 1), (self.settings_panel, 0)):
            splitter.addWidget(w)
            splitter.setStretchFactor(splitter.count() - 1, stretch)
        splitter.setSizes([220, 640, 260])
        self._settings_folded = False  # folded by _fit_columns, not by the user dragging its handle
        self.model_picker = ModelPicker(self.bridge)  # the top bar: the model that answers, its engine options
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.model_picker)
        layout.addWidget(splitter)
        self._sync_buttons()

    def resizeEvent(self, event) -> None:
        super().resizeEvent(event)
        self._fit_columns()

    def _fit_columns(self) -> None:
        """Fold the settings column away while the page is too narrow for all three columns at their least
        widths (a small screen), and open it again once it is wide enough; dragging its handle opens it too."""
        left, middle, settings = (self.splitter.widget(i) for i in range(3))
        handles = 2 * self.splitter.handleWidth()
        needed = left.minimumSizeHint().width() + middle.minimumSizeHint().width() + handles
        needed += settings.widget().minimumSizeHint().width() + settings.verticalScrollBar().sizeHint().width()
        sizes = self.splitter.sizes()
        if self.width() < needed and sizes[2] > 0:
            self.splitter.setSizes([sizes[0], sizes[1] + sizes[2], 0])
            self._settings_folded = True
        elif self.width() >= needed and self._settings_folded:
            width = settings.widget().sizeHint().width()
            self.splitter.setSizes([sizes[0], max(0, sizes[1] - width), width])
            self._settings_folded = False

    # ---- conversations --------------------------------------------------------------------------------------
    def new_conversation(self) -> None:
        try:
            conv = self.history.create_conversation(system_prompt=self.system_prompt.toPlainText())
        except HistoryError as e:
            self.status.say(f"Could not start a new chat: {e}")
            return
        self.open_conversation(conv.id)
        self.conversation_list.refresh()  # after it is open, so that the list highlights it

    def open_conversation(self, conversation_id: int) -> None:
        if self.reply is not None:
            self.stop()
        self.conversation_id = conversation_id
        self.expanded.clear()
        self.overflow.dismiss()  # its choice was for the conversation open before
        conv = self.history.conversation(conversation_id)
        self.system_prompt.setPlainText(conv.system_prompt)
        self.render()
        self.transcript.follow_end()
        self._sync_buttons()

    def set_json_schema(self, schema: str) -> bool:
        """Keep the open conversation's replies to `schema` (JSON text, checked by the dialog), or to nothing when
        "" (a new conversation is started when none is open). Says why in the status line when it cannot."""
        try:
            if self.conversation_id is None:
                self.conversation_id = self.history.create_conversation(
                    system_prompt=self.system_prompt.toPlainText()
                ).id
            self.history.set_json_schema(self.conversation_id, schema)
        except HistoryError as e:
            self.status.say(f"Could not keep the schema: {e}")
            return False
        self.conversation_list.refresh()
        self.render()
        self._sync_buttons()
        return True

    def delete_conversation(self) -> None:
        if self.conversation_id is None:
            return
        if self.reply is not None:
            self.stop()
        try:
            self.history.delete(self.conversation_id)
        except HistoryError as e:
            self.status.say(f"Could not delete the chat: {e}")
            return
        self.conversation_id = None
        self.overflow.dismiss()
        self.conversation_list.refresh()
        self.render()
        self._sync_buttons()

    # ---- sending ----------------------------------------------------------------------------------------------
    def send(self, text: str | None = None, overflow: str = "ask") -> None:
        """Send the input box's text (or `text`) as the next user message and stream the reply. A message the
        history cannot save stays in the input box, the reason said; so does one sent while nothing could answer it
        (no model loaded, no endpoint connected), saved nowhere, to send again once a model is loaded, and one that
        would overflow the model's context while the overflow card asks what to do (`overflow`, _prepare_reply)."""
        from_box = text is None  # the box's text goes with the files attached to it
        text = (self.attachments.message(self.input.toPlainText().strip()) if from_box else text).strip()
        if not text or self.reply is not None:
            return
        if self._waiting_for_model():
            self.status.say("The model is still loading: your message is kept, send it once it is ready.", "warn")
            return
        if not self.bridge.ready():
            self.status.say(
                "No model is loaded yet: load one on the Models page or with File › Load model…, then send again. "
                "Your message is kept.",
                "warn",
            )
            return
        retry = lambda choice: self.send(None if from_box else text, choice)  # noqa: E731
        outgoing = self._prepare_reply(self._request_messages(extra=text), overflow, retry)
        if outgoing is None:  # refused, or too long and the overflow card asks: the message stays in the box
            return
        try:
            if self.conversation_id is None:
                self.conversation_id = self.history.create_conversation(title_from(text)).id
            elif not self.history.messages(self.conversation_id):
                self.history.rename(self.conversation_id, title_from(text))
            self.history.add_message(self.conversation_id, "user", text)
        except HistoryError as e:
            self.status.say(f"Could not save your message: {e}")
            self.conversation_list.refresh()
            return
        self.input.clear()
        if from_box:
            self.attachments.clear()
        self.conversation_list.refresh()
        self._start_reply(outgoing)

    def _request_messages(self, extra: str | None = None, before: int | None = None) -> list[dict]:
        """The chat a reply is asked with: the system prompt, the open conversation's messages up to message
        `before` (a reply left unfinished by a crash left out), and `extra` as a new user message."""
        system = self.system_prompt.toPlainText().strip()
        messages = [{"role": "system", "content": system}] if system else []
        for m in self.history.messages(self.conversation_id) if self.conversation_id is not None else []:
            if m.id == before:
                break
            if m.role != "assistant" or m.finished:
                messages.append({"role": m.role, "content": m.content})
        if extra is not None:
            messages.append({"role": "user", "content": extra})
        return messages

    def _prepare_reply(self, messages: list[dict], overflow: str, retry) -> _Outgoing | None:
        """The request for a reply to `messages`, before anything is saved: None when it cannot be sent (said in
        the status line) or does not fit the model's context and the overflow card asks (its choice calls
        `retry(choice)`). `overflow` is that choice: "ask", "drop" (the oldest turns) or "anyway"."""
        self.overflow.dismiss()
        if not self.bridge.ready():
            self._refuse("No model is loaded yet.")
            return None
        has = self.conversation_id is not None
        schema = self.history.conversation(self.conversation_id).json_schema if has else ""
        if schema and self.bridge.remote is not None:
            # The connected endpoint is sent sampling fields only: its replies would not keep to the schema.
            self._refuse("A JSON schema is kept by this computer's engine: disconnect, or remove the schema.")
            return None
        try:
            params = self.sampling.params()
            if schema:
                params["structured_outputs"] = StructuredOutputsParams(json=json.loads(schema))
            sampling = SamplingParams(**params)
            chat = self.bridge.prepare_chat(messages)
            fitted = self._fit(chat, sampling.max_tokens, overflow, retry)
        except Exception as e:  # a bad parameter, a template error: said, not raised
            self._refuse(f"Could not send: {e}")
            return None
        return None if fitted is None else _Outgoing(fitted[0], sampling, fitted[1])

    def _fit(self, chat: PreparedChat, max_tokens: int, overflow: str, retry) -> tuple[PreparedChat, int] | None:
        """`chat` as it fits the model's context with room for the reply, and how many of its oldest messages
        were left out for it; None when it does not fit and the overflow card now asks what to do."""
        context, tokens = self.bridge.context_length(), chat.num_prompt_tokens
        if context is None or tokens is None:  # a remote endpoint: its context is not known here
            return chat, 0
        check = ContextCheck(tokens, reply_room(max_tokens, context), context)
        if check.fits or (overflow == "anyway" and check.prompt_fits):
            return chat, 0
        try:
            trimmed = drop_oldest_turns(chat.messages, self.bridge.count_chat_tokens, check.reply_tokens, context)
        except CannotFit as e:
            self.overflow.ask(check, str(e), retry)
            return None
        if overflow == "drop" or self.conversation_id in self.drop_oldest:
            return self.bridge.prepare_chat(trimmed.messages), trimmed.num_dropped
        self.overflow.ask(check, None, retry)
        return None

    def _start_reply(self, outgoing: _Outgoing) -> None:
        """Submit the reply's request. Its message is added only once the request is submitted, so a send refused
        at once (a full queue, a dead engine) leaves none behind."""
        try:
            self.history.set_system_prompt(self.conversation_id, self.system_prompt.toPlainText().strip())
            rid = self.bridge.submit_chat(outgoing.chat, outgoing.params)
        except Exception as e:  # a full queue, a dead engine, a full disk: said, not raised
            self._refuse(f"Could not send: {e}")
            return
        try:
            message = self.history.add_message(self.conversation_id, "assistant", "", finished=False)
        except HistoryError as e:  # nowhere to keep the reply: do not generate it
            self.bridge.abort(rid)
            self._refuse(f"Could not send: {e}")
            return
        self.reply = _Reply(rid, message.id, time.perf_counter())
        if outgoing.dropped:  # the conversation is long now: later sends leave its oldest turns out too
            self.drop_oldest.add(self.conversation_id)
        self.meter.start_reply(self.conversation_id, outgoing.chat.num_prompt_tokens, outgoing.dropped)
        left_out = f" (the oldest {outgoing.dropped} messages left out to fit the context)" if outgoing.dropped else ""
        self.status.say(f"Generating…{left_out}")
        self.render()
        self._sync_buttons()

    def _refuse(self, why: str) -> None:
        """A reply that could not start: say why, and show the conversation and its buttons as the history holds
        them (the user's message saved, waiting for Regenerate)."""
        self.status.say(why)
        self.render()
        self._sync_buttons()

    # ---- a model loading ---------------------------------------------------------------------------------------
    def _waiting_for_model(self) -> bool:
        """Whether sending must wait for the model loading here: a connected endpoint answers meanwhile."""
        return self.loading and self.bridge.remote is None

    def _on_model_loading(self, model: str) -> None:
        self.loading = True
        self.load_panel.start(model)
        self._sync_buttons()

    def _on_model_load_stage(self, stage: ModelLoadStage) -> None:
        self.load_panel.show_stage(stage.stage)

    def _on_model_ready(self, outcome: ModelLoaded | ModelLoadFailed | ModelLoadCancelled) -> None:
        """The load ended, loaded or not (failed or cancelled with the card's Cancel, the model loaded before
        serves on): the message box is where the user goes next."""
        self.loading = False
        self.load_panel.finish()
        self._sync_buttons()
        if self.reply is None:  # a new model: a new context, and a new tokenizer to count with
            self._measure()
        if isinstance(outcome, ModelLoadFailed):
            self.status.say(f"Could not load the model: {outcome.message}", "error")
        elif isinstance(outcome, ModelLoadCancelled):
            self.status.say(outcome.message, "warn")
        if self.isVisible():  # a load started from another page leaves the focus where the user is
            self.input.setFocus()

    def _on_update(self, update: RequestUpdate) -> None:
        reply = self.reply
        if reply is None or update.request_id != reply.request_id:
            return
        if reply.first_token is None:
            reply.first_token = time.perf_counter()
        reply.text, reply.tokens = update.text, update.num_tokens
        self.meter.update_reply(update)
        if update.finished:
            self._finish(update.finish_reason or "stop")
        elif not self._render_soon.isActive():
            self._render_soon.start()

    def _on_failed(self, failure: RequestFailed) -> None:
        reply = self.reply
        if reply is None or failure.request_id != reply.request_id:
            return
        if failure.refused:  # it never ran: its empty reply goes, the reason is said
            self.reply = None
            # if even the delete fails, the message stays empty and unfinished: harmless, the refusal is said
            with contextlib.suppress(HistoryError):
                self.history.delete_messages_after(reply.message_id)
            self._refuse(f"Could not send: {failure.message}")
        else:
            self._finish("error", failure.message)

    def _finish(self, reason: str, error: str | None = None) -> None:
        reply, self.reply = self.reply, None
        now = time.perf_counter()
        stats = {"finish_reason": reason, "tokens": reply.tokens}
        if reply.first_token is not None:
            stats["ttft_s"] = round(reply.first_token - reply.sent, 3)
            decode = now - reply.first_token
            if reply.tokens > 1 and decode > 0:
                stats["tokens_per_s"] = round((reply.tokens - 1) / decode, 1)
        if error:
            stats["error"] = error
        try:
            self.history.update_message(reply.message_id, reply.text, finished=True, stats=stats)
        except HistoryError as e:  # the transcript shows what was saved before; the reason is said
            self.status.say(f"Could not save the reply: {e}")
        else:
            self.status.say(f"Stopped: {error}" if error else "")
        self.conversation_list.refresh()
        self.render()
        self._sync_buttons()

    def stop(self) -> None:
        if self.reply is not None:
            self.bridge.abort(self.reply.request_id)
            self._finish("abort")

    def regenerate(self, overflow: str = "ask") -> None:
        """Drop the last reply and ask again. After a send that was refused (no model, an engine that stopped),
        the last message is the user's: it is asked again as it is. The reply is dropped only once the new
        request is ready (it fits the context, or the user chose what to leave out)."""
        if self.reply is not None or self.conversation_id is None or self._waiting_for_model():
            return
        messages = self.history.messages(self.conversation_id)
        if not messages:
            return
        last_reply = messages[-1].id if messages[-1].role == "assistant" else None
        outgoing = self._prepare_reply(self._request_messages(before=last_reply), overflow, self.regenerate)
        if outgoing is None:
            return
        if last_reply is not None:
            try:
                self.history.delete_messages_after(last_reply)
            except HistoryError as e:
                self.status.say(f"Could not regenerate: {e}")
                return
        self._start_reply(outgoing)

    def edit_last(self) -> None:
        """Put the last user message back in the input box and drop it and what followed, to edit and resend."""
        last = self._last("user")
        if self.reply is not None or last is None:
            return
        try:
            self.history.delete_messages_after(last.id)
        except HistoryError as e:
            self.status.say(f"Could not take the message back: {e}")
            return
        self.input.setPlainText(last.content)
        self.render()
        self._sync_buttons()

    def copy_last_reply(self) -> None:
        """The last reply's answer to the clipboard (its reasoning left out)."""
        last = self._last("assistant")
        if last is not None:
            QGuiApplication.clipboard().setText(split_think(last.content)[1])

    def _last(self, role: str) -> Message | None:
        if self.conversation_id is None:
            return None
        return next((m for m in reversed(self.history.messages(self.conversation_id)) if m.role == role), None)

    # ---- rendering --------------------------------------------------------------------------------------------
    def render(self) -> None:
        """The whole transcript, from the history. A streaming reply's new text is saved first, so only what the
        history holds is ever drawn."""
        self._render_soon.stop()
        if self.reply is not None and not self._save_streaming():
            return  # the reply stopped; _finish drew the transcript from what is saved
        messages = [] if self.conversation_id is None else self.history.messages(self.conversation_id)
        json_replies = self.conversation_id is not None and bool(
            self.history.conversation(self.conversation_id).json_schema
        )
        streaming = None if self.reply is None else self.reply.message_id
        self.transcript.set_messages(messages, streaming, self.expanded, json_replies)
        if self.reply is None:  # while a reply streams, its updates drive the meter
            self._measure()

    def _measure(self) -> None:
        """The context meter for the open conversation, as its next request would send it."""
        conv = self.conversation_id
        self.meter.show_conversation(
            conv, self._request_messages() if conv is not None else None, conv in self.drop_oldest
        )

    def _on_connection_changed(self, _endpoint) -> None:
        self._sync_buttons()
        if self.reply is None:
            self._measure()

    def _draw_reply(self) -> None:
        """The streaming reply's bubble alone, with its new text saved first (as render does)."""
        if self._save_streaming():
            self.transcript.stream(self.reply.message_id, self.reply.saved)

    def _save_streaming(self) -> bool:
        """Save the streaming reply's new text; on a failure (a full disk) stop the reply and return False."""
        reply = self.reply
        if reply.text == reply.saved:
            return True
        try:
            self.history.save_streaming_text(reply.message_id, reply.text)
        except HistoryError as e:
            self.bridge.abort(reply.request_id)
            self._finish("error", str(e))  # which tries once more to save the reply, then says why in words
            return False
        reply.saved = reply.text
        return True

    def _on_link(self, url: QUrl) -> None:
        if url.scheme() == "copy":  # copy:<message id>/<block number>, of the reply's answer
            message_id, block = (int(x) for x in url.path().split("/"))
            message = next(m for m in self.history.messages(self.conversation_id) if m.id == message_id)
            json_reply = bool(self.history.conversation(self.conversation_id).json_schema)
            QGuiApplication.clipboard().setText(code_blocks(shown_answer(message.content, json_reply))[block])
            self.status.say("Code copied.")
        elif url.scheme() == "think":  # think:<message id>: fold or unfold that reply's reasoning
            self.expanded ^= {int(url.path())}
            self.render()
        else:
            QDesktopServices.openUrl(url)

    def _sync_buttons(self) -> None:
        """Enable what has something to act on: Regenerate a last message (a reply, or the user's left without
        one), Edit last a user message, Copy reply a reply; none while a reply streams. Send and Regenerate wait
        for a model loading here."""
        has = self.conversation_id is not None
        schema = self.history.conversation(self.conversation_id).json_schema if has else ""
        self.reply_format.show_schema(schema)
        roles = {m.role for m in self.history.messages(self.conversation_id)} if has else set()
        idle = self.reply is None
        can_ask = idle and not self._waiting_for_model()
        self.send_button.setEnabled(can_ask)
        self.stop_button.setEnabled(not idle)
        self.regenerate_button.setEnabled(can_ask and bool(roles))
        self.edit_button.setEnabled(idle and "user" in roles)
        self.copy_button.setEnabled(idle and "assistant" in roles)
        self.conversation_list.enable(idle, bool(roles))
