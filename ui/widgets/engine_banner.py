"""The bar across the top of the window when the engine thread has died: what happened, in words, and a Reload
button that loads the same model with the same options again. Hidden until then, and again once a load starts.
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QPalette
from PySide6.QtWidgets import QHBoxLayout, QLabel, QPushButton, QWidget

from ui.bridge import EngineDied
from ui.theme import tone_color


class EngineBanner(QWidget):
    reload_requested = Signal(object)  # the EngineDied it shows: its model and options are what to load

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.died: EngineDied | None = None
        self.text = QLabel(wordWrap=True, textFormat=Qt.TextFormat.PlainText)  # the error may hold "<"
        self.reload_button = QPushButton("Reload model")
        self.reload_button.clicked.connect(lambda: self.reload_requested.emit(self.died))
        row = QHBoxLayout(self)
        row.setContentsMargins(12, 8, 12, 8)
        row.addWidget(self.text, 1)
        row.addWidget(self.reload_button)
        self.setAutoFillBackground(True)
        self.hide()

    def show_death(self, died: EngineDied) -> None:
        self.died = died
        name = Path(died.model).name
        said = died.message[:1].upper() + died.message[1:]
        self.text.setText(f"{said.rstrip('.')}. Replies being written ended with this error.")
        self.reload_button.setText(f"Reload {name}")
        # Painted from the palette of the moment, so it reads in light and dark alike.
        palette = self.palette()
        palette.setColor(QPalette.ColorRole.Window, tone_color("error"))
        palette.setColor(QPalette.ColorRole.WindowText, palette.color(QPalette.ColorRole.Base))
        self.setPalette(palette)
        self.show()
