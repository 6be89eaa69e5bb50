"""A page's status line: the last thing the page has to say, in a sentence, coloured by its tone."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QLabel, QWidget

from ui.theme import tone_color


class StatusLine(QLabel):
    """Wrapped, selectable (to copy an error), plain text unless `rich` (a page that bolds a name escapes the rest
    itself). say(text, tone): "ok", "warn" or "error" colours it, None leaves the palette's text colour."""

    def __init__(self, rich: bool = False, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWordWrap(True)
        self.setTextFormat(Qt.TextFormat.RichText if rich else Qt.TextFormat.PlainText)
        self.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

    def say(self, text: str, tone: str | None = None) -> None:
        self.setStyleSheet(f"color: {tone_color(tone).name()};" if tone is not None else "")
        self.setText(text)
