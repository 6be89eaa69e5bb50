"""The card the chat shows above the message box when what is about to be sent does not fit the model's context:
how many tokens it needs of how many, and the choices: leave the oldest turns out (the system prompt stays; the
conversation itself keeps every message), send it anyway when the engine can still take the prompt (the reply stops
where the context ends), or cancel (the message stays in the box, nothing is saved or sent).

The page decides what each choice does; the card only asks (ui/pages/chat.py, app/context_fit.py).
"""

from __future__ import annotations

from collections.abc import Callable

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QHBoxLayout, QLabel, QPushButton, QWidget

from app.context_fit import ContextCheck
from ui.widgets.cards import card

# A choice the card hands back to the page: "drop" (oldest turns) or "anyway".
Choose = Callable[[str], None]


class ContextOverflowCard(QWidget):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._choose: Choose | None = None
        frame, column = card("Too long for the model's context")
        self.text = QLabel(wordWrap=True, textFormat=Qt.TextFormat.PlainText)
        self.drop_button = QPushButton("Leave out the oldest turns and send")
        self.drop_button.clicked.connect(lambda: self._chosen("drop"))
        self.anyway_button = QPushButton("Send anyway")
        self.anyway_button.setToolTip("Send it whole: the reply stops where the model's context ends")
        self.anyway_button.clicked.connect(lambda: self._chosen("anyway"))
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setToolTip("Keep the message in the box; nothing is sent")
        self.cancel_button.clicked.connect(self.dismiss)
        buttons = QHBoxLayout()
        for b in (self.drop_button, self.anyway_button, self.cancel_button):
            buttons.addWidget(b)
        buttons.addStretch(1)
        column.addWidget(self.text)
        column.addLayout(buttons)
        outer = QHBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(frame)
        self.hide()

    def ask(self, check: ContextCheck, cannot_drop: str | None, choose: Choose) -> None:
        """Say what does not fit and offer the choices; `cannot_drop` is why leaving turns out would not help
        (None when it would). `choose` gets the choice made; Cancel only hides the card."""
        self._choose = choose
        self.text.setText(check.sentence() + (f" {cannot_drop}" if cannot_drop else ""))
        self.drop_button.setEnabled(cannot_drop is None)
        self.drop_button.setToolTip(
            cannot_drop or "Send the system prompt and the newest turns that fit; the chat keeps every message"
        )
        self.anyway_button.setEnabled(check.prompt_fits)
        self.show()
        (self.drop_button if cannot_drop is None else self.cancel_button).setFocus()

    def dismiss(self) -> None:
        self._choose = None
        self.hide()

    def _chosen(self, choice: str) -> None:
        choose = self._choose
        self.dismiss()
        if choose is not None:
            choose(choice)
