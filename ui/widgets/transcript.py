"""The chat transcript as bubbles: the user's messages on the right, the replies on the left, each rendered from
markdown with its code blocks coloured (ui/widgets/highlight.py), a Copy button under it, and under a finished
reply its tokens/s and time to first token.

A streaming reply re-renders its own bubble only (stream), so each new piece of text costs the one message, not
the conversation. Each bubble is as tall as its text at the width the transcript gives it, and the transcript
scrolls as a whole; it follows the end while it is scrolled to the end."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import replace

from PySide6.QtCore import QEvent, QRectF, Qt, QUrl, Signal
from PySide6.QtGui import QColor, QGuiApplication, QPainter, QPalette
from PySide6.QtWidgets import (
    QFrame,
    QHBoxLayout,
    QLabel,
    QScrollArea,
    QTextBrowser,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from app.history import Message
from ui.widgets.highlight import highlight_code
from ui.widgets.message_markdown import copy_text, message_markdown, stats_line

EMPTY = "*Start a conversation: type below and press Ctrl+Enter.*"
PAD = 10  # between a bubble's edge and its text
# A bubble's widest, as a share of the transcript's width: replies take more room (code, tables) than questions.
WIDEST = {"user": 0.75, "assistant": 0.9}
UNWRAPPED = 100_000  # px: wider than any line of a message
USER_TINT = 0.18  # how far a user's bubble leans from the base colour towards the accent


class MessageView(QTextBrowser):
    """A message's rendered text: transparent on its bubble, no scroll bars, as tall as its text (fit)."""

    def __init__(self) -> None:
        super().__init__(openLinks=False, frameShape=QFrame.Shape.NoFrame)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.viewport().setAutoFillBackground(False)
        self.document().setUndoRedoEnabled(False)  # re-rendered, never edited: no history to keep

    def fit(self, widest: int, grown: bool = False) -> None:
        """Take the width the text needs, up to `widest`, and the height it then has. A text that only `grown`
        since the last fit (a reply streaming) and was as wide as allowed stays so: the layout that measures its
        widest line, a good part of a long reply's redraw, is skipped."""
        document = self.document()
        if grown and self.width() == widest:
            width = widest
        else:
            # Laid out wider than any line can be, to learn the widest (a width of -1, "unwrapped", kept the
            # wrapping at the width before for a plain paragraph).
            document.setTextWidth(UNWRAPPED)
            width = max(1, min(math.ceil(document.idealWidth()) + 1, widest))
        document.setTextWidth(width)
        self.setFixedSize(width, math.ceil(document.size().height()))

    def wheelEvent(self, event) -> None:
        event.ignore()  # it never scrolls itself: the transcript around it does


class Card(QWidget):
    """A bubble's rounded card: the base colour for a reply, leaning towards the accent for the user's message."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def color(self) -> QColor:
        palette = self.palette()
        base = palette.color(QPalette.ColorRole.Base)
        if self.role != "user":
            return base
        accent = palette.color(QPalette.ColorRole.Highlight)
        return QColor.fromRgbF(*(b + (a - b) * USER_TINT for b, a in zip(base.getRgbF()[:3], accent.getRgbF()[:3])))

    def paintEvent(self, _event) -> None:
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        painter.setPen(self.palette().color(QPalette.ColorRole.Mid))
        painter.setBrush(self.color())
        painter.drawRoundedRect(QRectF(self.rect()).adjusted(0.5, 0.5, -0.5, -0.5), 10, 10)


class Bubble(QWidget):
    """One message: its text on a rounded card, and under it a Copy button and (a finished reply) its stats."""

    link_clicked = Signal(QUrl)
    copied = Signal()

    def __init__(self, message: Message) -> None:
        super().__init__()
        self.message = message
        self.markdown = ""
        self.expanded = self.json_reply = False  # as last shown: a streaming redraw keeps them
        self._widest = 1
        self.view = MessageView()
        self.view.anchorClicked.connect(self.link_clicked)
        self.card = Card(message.role)
        card_layout = QVBoxLayout(self.card)
        card_layout.setContentsMargins(PAD, PAD // 2, PAD, PAD // 2)
        card_layout.addWidget(self.view)
        self.stats = QLabel()
        self.stats.setForegroundRole(QPalette.ColorRole.PlaceholderText)
        self.copy_button = QToolButton(text="Copy", autoRaise=True, toolTip="Copy this message (as markdown)")
        self.copy_button.clicked.connect(self.copy)
        footer = QHBoxLayout()
        footer.setContentsMargins(PAD // 2, 0, PAD // 2, 0)
        user = message.role == "user"
        if user:
            footer.addStretch(1)
        footer.addWidget(self.stats)
        footer.addWidget(self.copy_button)
        if not user:
            footer.addStretch(1)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(0)
        layout.addWidget(self.card, 0, Qt.AlignmentFlag.AlignRight if user else Qt.AlignmentFlag.AlignLeft)
        layout.addLayout(footer)
        self.setAccessibleName("You" if user else "Assistant" if message.role == "assistant" else message.role)

    def show_message(
        self, message: Message, streaming: bool, expanded: bool, json_reply: bool, grown: bool = False
    ) -> None:
        """Render `message` (this bubble's, as it stands now; `grown`: its text only grew since last shown)."""
        self.message, self.expanded, self.json_reply = message, expanded, json_reply
        self.markdown = message_markdown(message, streaming, expanded, json_reply)
        self._render(grown)
        finished = message.role == "assistant" and message.finished
        self.stats.setText(stats_line(message.stats) if finished else "")
        self.stats.setVisible(bool(self.stats.text()))
        self.copy_button.setEnabled(not streaming)  # kept in place: the bubble does not jump when the reply ends

    def fit(self, width: int) -> None:
        """Size the card for a transcript `width` wide."""
        self._widest = max(1, int(width * WIDEST.get(self.message.role, WIDEST["assistant"])) - 2 * PAD)
        self._fit_card()

    def copy(self) -> None:
        QGuiApplication.clipboard().setText(copy_text(self.message))
        self.copied.emit()

    def plain_text(self) -> str:
        return "\n".join(t for t in (self.view.toPlainText(), self.stats.text()) if t)

    def changeEvent(self, event: QEvent) -> None:
        super().changeEvent(event)
        if event.type() == QEvent.Type.PaletteChange and self.markdown:
            self._render()  # the code's colours and shade follow the theme

    def _render(self, grown: bool = False) -> None:
        view = self.view
        view.setMarkdown(self.markdown)
        palette = self.palette()
        dark = palette.color(QPalette.ColorRole.Base).lightness() < 128
        highlight_code(view.document(), palette.color(QPalette.ColorRole.AlternateBase), dark)
        self._fit_card(grown)

    def _fit_card(self, grown: bool = False) -> None:
        """The text's size, and the card's around it. The card's is set, not left to its layout: a bubble is
        sized before it is shown, and a layout not yet activated would keep the card at a stale size (the text
        then wrapped a few letters to a line)."""
        self.view.fit(self._widest, grown)
        margins = self.card.layout().contentsMargins()
        self.card.setFixedSize(
            self.view.width() + margins.left() + margins.right(), self.view.height() + margins.top() + margins.bottom()
        )


class Transcript(QScrollArea):
    """The conversation's bubbles in one scrolling column. anchorClicked relays the links clicked in any bubble
    ("copy:" and "think:" ones, and the web's); copied says a message was copied."""

    anchorClicked = Signal(QUrl)
    copied = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent, widgetResizable=True)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        column = QWidget()
        self._layout = QVBoxLayout(column)
        self._layout.setSpacing(12)
        self.empty = QLabel(EMPTY, textFormat=Qt.TextFormat.MarkdownText, alignment=Qt.AlignmentFlag.AlignCenter)
        self._layout.addWidget(self.empty)
        self._layout.addStretch(1)
        self.setWidget(column)
        self._bubbles: dict[int, Bubble] = {}
        self._follow = True  # scrolled to the end: stay there as the text grows
        bar = self.verticalScrollBar()
        bar.valueChanged.connect(self._on_scrolled)
        bar.rangeChanged.connect(self._on_grown)

    def set_messages(
        self,
        messages: Iterable[Message],
        streaming_id: int | None,
        expanded: frozenset[int] | set[int] = frozenset(),
        json_replies: bool = False,
    ) -> None:
        """Show these messages; message `streaming_id` is a reply being written. A reply's reasoning is unfolded
        for the ids in `expanded`; with json_replies each reply shows as a JSON block. A message shown before keeps
        its bubble (re-rendered), so a reply that ends or a fold that opens does not rebuild the transcript."""
        old, self._bubbles = self._bubbles, {}
        for index, message in enumerate(messages, start=1):  # after the empty transcript's hint
            bubble = old.pop(message.id, None)
            if bubble is None:
                bubble = Bubble(message)
                bubble.link_clicked.connect(self.anchorClicked)
                bubble.copied.connect(self.copied)
                bubble.fit(self.viewport().width())
            else:
                self._layout.removeWidget(bubble)  # to be put back in its place (messages can go from between)
            bubble.show_message(message, message.id == streaming_id, message.id in expanded, json_replies)
            self._layout.insertWidget(index, bubble)
            self._bubbles[message.id] = bubble
        for bubble in old.values():
            self._layout.removeWidget(bubble)
            bubble.deleteLater()
        self.empty.setVisible(not self._bubbles)

    def stream(self, message_id: int, text: str) -> None:
        """The streaming reply `message_id` has grown to `text`: re-render its bubble alone."""
        bubble = self._bubbles[message_id]
        message = replace(bubble.message, content=text)
        bubble.show_message(message, True, bubble.expanded, bubble.json_reply, grown=True)

    def follow_end(self) -> None:
        """Scroll to the end, and stay there as the text grows."""
        self._follow = True
        self.verticalScrollBar().setValue(self.verticalScrollBar().maximum())

    def bubbles(self) -> list[Bubble]:
        return list(self._bubbles.values())

    def bubble(self, message_id: int) -> Bubble:
        return self._bubbles[message_id]

    def toPlainText(self) -> str:
        """Every bubble's text and stats, or the empty transcript's hint."""
        if not self._bubbles:
            return self.empty.text()
        return "\n\n".join(b.plain_text() for b in self._bubbles.values())

    def toHtml(self) -> str:
        return "\n".join(b.view.toHtml() for b in self._bubbles.values())

    def _on_scrolled(self, value: int) -> None:
        self._follow = value >= self.verticalScrollBar().maximum() - 4

    def _on_grown(self, _bottom: int, top: int) -> None:
        if self._follow:
            self.verticalScrollBar().setValue(top)

    def resizeEvent(self, event) -> None:
        super().resizeEvent(event)
        for bubble in self._bubbles.values():
            bubble.fit(self.viewport().width())
