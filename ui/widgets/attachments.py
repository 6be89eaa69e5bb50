"""Text files attached to the message being written: an Attach… button, files dropped on the chat, and each file
pending with its token count and a button that takes it off. Reading and checking are app/attachments.py's; what
cannot be attached is said in the page's status line, and nothing typed is touched.

Tokens are counted with the in-process model's tokenizer (and checked against its context) while it is the one
that answers; otherwise (nothing loaded, a remote endpoint connected) they are estimated, and shown as such.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from PySide6.QtCore import QEvent, QMimeData, QObject, Qt, Signal
from PySide6.QtWidgets import (
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QStyle,
    QToolButton,
    QWidget,
)

from app.attachments import (
    CHARS_PER_TOKEN,
    ESTIMATE,
    Attachment,
    AttachmentError,
    TokenCounter,
    compose,
    read_attachment,
)
from ui.bridge import EngineBridge
from ui.widgets.status_line import StatusLine
from ui.widgets.wrap_layout import WrapLayout

_DRAG_EVENTS = (QEvent.Type.DragEnter, QEvent.Type.DragMove, QEvent.Type.Drop)


def token_counter(bridge: EngineBridge) -> TokenCounter:
    """The loaded model's tokenizer and context while the in-process engine answers; else an estimate."""
    thread = bridge.engine_thread
    if bridge.remote is not None or thread is None or thread.failure is not None:
        return ESTIMATE
    tokenizer, context = thread.engine.tokenizer, thread.engine.model_config.max_model_len
    # Without special tokens: the file is a piece of a message, whose template adds them once.
    return TokenCounter(lambda text: len(tokenizer.encode(text, add_special_tokens=False)), True, context)


def local_files(mime: QMimeData) -> list[str]:
    return [url.toLocalFile() for url in mime.urls() if url.isLocalFile()]


def tokens_label(attachment: Attachment, estimate: str = " (estimate)") -> str:
    """ "1,234 tokens", or "~1,234 tokens" followed by `estimate` when they are estimated."""
    if attachment.exact:
        return f"{attachment.tokens:,} tokens"
    return f"~{attachment.tokens:,} tokens{estimate}"


class AttachmentChip(QWidget):
    """One pending file: its name, its tokens, and ✕ to take it off."""

    def __init__(self, attachment: Attachment) -> None:
        super().__init__()
        icon = QLabel()
        icon.setPixmap(self.style().standardIcon(QStyle.StandardPixmap.SP_FileIcon).pixmap(16, 16))
        self.label = QLabel(f"<b>{_escape(attachment.name)}</b> · {tokens_label(attachment)}")
        self.remove_button = QToolButton(text="✕", autoRaise=True, toolTip=f"Take {attachment.name} off")
        how = (
            "counted with the loaded model's tokenizer"
            if attachment.exact
            else f"estimated (about {CHARS_PER_TOKEN} characters a token): the answering model's tokenizer is not "
            "at hand here"
        )
        self.setToolTip(f"{attachment.path}\nTokens {how}.")
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.setSpacing(4)
        row.addWidget(icon)
        row.addWidget(self.label)
        row.addWidget(self.remove_button)
        row.addStretch(1)


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class AttachmentBar(QWidget):
    """Attach… and the files pending for the next message. `changed` after each file added or taken off."""

    changed = Signal()

    def __init__(self, bridge: EngineBridge, status: StatusLine, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.bridge, self.status = bridge, status
        self.attachments: list[Attachment] = []
        self.attach_button = QPushButton("Attach…", toolTip="Attach text files to the message (or drop them here)")
        self.attach_button.clicked.connect(self._choose)
        self.chips = QWidget()
        self.chips_layout = WrapLayout(self.chips, spacing=8)
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.attach_button, 0, Qt.AlignmentFlag.AlignTop)
        row.addWidget(self.chips, 1)
        # A model loaded or an endpoint connected counts tokens its own way. Methods, not lambdas: Qt drops the
        # connections with the widget.
        bridge.model_loaded.connect(self.recount)
        bridge.connection_changed.connect(self.recount)

    # ---- files -----------------------------------------------------------------------------------------------
    def _choose(self) -> None:
        paths, _ = QFileDialog.getOpenFileNames(self, "Attach text files", "", "All files (*)")
        if paths:
            self.add_files(paths)

    def add_files(self, paths: Iterable[str | Path]) -> None:
        """Attach each file that can be; say which were attached and why the others were not."""
        counter = token_counter(self.bridge)
        added, refused = [], []
        for path in paths:
            try:
                attachment = read_attachment(path, counter, sum(a.tokens for a in self.attachments))
            except AttachmentError as e:
                refused.append(str(e))
                continue
            self.attachments.append(attachment)
            added.append(f"{attachment.name} ({tokens_label(attachment, ', estimated')})")
        said = [f"Attached {', '.join(added)}."] if added else []
        said += [f"Could not attach {why}." for why in refused]
        self.status.say(" ".join(said), "error" if refused else None)
        if added:
            self._show()

    def remove(self, index: int) -> None:
        del self.attachments[index]
        self._show()

    def clear(self) -> None:
        """After the message they went into was sent."""
        if self.attachments:
            self.attachments.clear()
            self._show()

    def message(self, typed: str) -> str:
        """The message to send: the attached files, then what was typed."""
        return compose(self.attachments, typed)

    def recount(self, *_) -> None:
        """Count the pending files again, the way the model that now answers counts them."""
        if not self.attachments:
            return
        counter = token_counter(self.bridge)
        self.attachments = [
            Attachment(a.path, a.text, a.block, counter.count(a.block), counter.exact) for a in self.attachments
        ]
        self._show()

    def _show(self) -> None:
        while (item := self.chips_layout.takeAt(0)) is not None:
            item.widget().deleteLater()
        for i, attachment in enumerate(self.attachments):
            chip = AttachmentChip(attachment)
            chip.remove_button.clicked.connect(lambda _=False, i=i: self.remove(i))
            self.chips_layout.add_widget(chip, stretch=0)
        self.chips.updateGeometry()
        self.changed.emit()

    # ---- dropped files -----------------------------------------------------------------------------------------
    def take_drops_on(self, *widgets: QWidget) -> None:
        """Files dropped on `widgets` (a page, a text box's viewport) are attached; a text box would otherwise
        paste a dropped file's path. Other drags (text, a web link) go on to them as before."""
        for widget in widgets:
            widget.setAcceptDrops(True)
            widget.installEventFilter(self)

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:
        if event.type() in _DRAG_EVENTS and local_files(event.mimeData()):
            event.acceptProposedAction()
            if event.type() == QEvent.Type.Drop:
                self.add_files(local_files(event.mimeData()))
            return True
        return super().eventFilter(watched, event)
