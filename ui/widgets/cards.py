"""The cards and labels the pages share: rounded panels with a caption, muted text, section titles, big figures."""

from __future__ import annotations

from PySide6.QtCore import QRectF
from PySide6.QtGui import QFont, QPainter, QPalette
from PySide6.QtWidgets import QLabel, QVBoxLayout, QWidget


class Card(QWidget):
    """A rounded panel in the palette's base colour. Painted here rather than styled with a style sheet, which
    would freeze the palette's colours at polish time and miss a switch between light and dark."""

    def paintEvent(self, event) -> None:
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        painter.setPen(self.palette().color(QPalette.ColorRole.Midlight))
        painter.setBrush(self.palette().color(QPalette.ColorRole.Base))
        painter.drawRoundedRect(QRectF(self.rect()).adjusted(0.5, 0.5, -0.5, -0.5), 8, 8)
        painter.end()


def muted(text: str = "") -> QLabel:
    label = QLabel(text)
    label.setForegroundRole(QPalette.ColorRole.PlaceholderText)
    return label


def emphasised(label: QLabel, size_delta: float) -> QLabel:
    """Demi-bold, size_delta points off the default: card captions, big figures, section titles."""
    font = QFont(label.font())
    font.setPointSizeF(font.pointSizeF() + size_delta)
    font.setWeight(QFont.Weight.DemiBold)
    label.setFont(font)
    return label


def value_label() -> QLabel:
    return emphasised(QLabel("—"), 8)


def section(title: str) -> QLabel:
    return emphasised(QLabel(title), 2)


def card(title: str) -> tuple[Card, QVBoxLayout]:
    card = Card()
    layout = QVBoxLayout(card)
    layout.setContentsMargins(16, 12, 16, 14)
    layout.setSpacing(4)
    layout.addWidget(emphasised(muted(title.upper()), -1))
    return card, layout
