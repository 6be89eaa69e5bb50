"""The chat area's card while a model loads: which model, the stages done (ticked), the one under way with the
seconds it has taken so far, a busy bar, and Cancel. A first load can take a minute (the CPU kernels compile), and
an empty chat with an enabled Send looked ready when it was not.

Cancel asks for the load to stop (cancel_requested; the page hands it to the bridge); the load can only stop
between two stages, so the card says it is stopping until the page calls finish() on the outcome.
"""

from __future__ import annotations

import time

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtWidgets import QHBoxLayout, QLabel, QProgressBar, QPushButton, QVBoxLayout, QWidget

from app.library.hub_models import shown_name
from ui.widgets.cards import card, emphasised, muted

DONE, UNDER_WAY = "✓", "›"
WAITING_NOTE = "You can write your message meanwhile: Send works once the model is ready."
STOPPING_NOTE = "Stopping once the stage under way ends; the model loaded before keeps answering."


class LoadPanel(QWidget):
    cancel_requested = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.stages: list[str] = []
        self._stage_started = 0.0
        frame, column = card("Loading the model")
        self.title = emphasised(QLabel(wordWrap=True, textFormat=Qt.TextFormat.PlainText), 3)
        self.steps = QLabel(textFormat=Qt.TextFormat.PlainText, wordWrap=True)
        self.bar = QProgressBar(textVisible=False)
        self.bar.setRange(0, 0)  # busy: no stage says how far along it is
        self.bar.setFixedHeight(6)
        self.note = muted(WAITING_NOTE)
        self.note.setWordWrap(True)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setToolTip("Stop this load; the model loaded before keeps answering")
        self.cancel_button.clicked.connect(self.cancel)
        bottom = QHBoxLayout()
        bottom.addWidget(self.note, 1)
        bottom.addWidget(self.cancel_button, 0, Qt.AlignmentFlag.AlignBottom)
        for w in (self.title, self.steps, self.bar):
            column.addWidget(w)
        column.addLayout(bottom)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(frame)
        # The seconds beside the stage under way tick on, so a long kernel build does not look frozen.
        self._tick = QTimer(self, interval=1000, timeout=self._show_steps)
        self.hide()

    def start(self, model: str) -> None:
        self.title.setText(shown_name(model))
        self.stages = []
        self.note.setText(WAITING_NOTE)
        self.cancel_button.setEnabled(True)
        self.show_stage("Checking that it fits in memory")  # what the bridge does before the engine starts
        self._tick.start()
        self.show()

    def show_stage(self, stage: str) -> None:
        self.stages.append(stage)
        self._stage_started = time.monotonic()
        self._show_steps()

    def cancel(self) -> None:
        """Ask for the load to stop, once: the card says it is stopping until finish()."""
        if not self.cancel_button.isEnabled():
            return
        self.cancel_button.setEnabled(False)
        self.note.setText(STOPPING_NOTE)
        self.cancel_requested.emit()

    def finish(self) -> None:
        self._tick.stop()
        self.hide()

    def _show_steps(self) -> None:
        *done, current = self.stages
        seconds = int(time.monotonic() - self._stage_started)
        lines = [f"{DONE} {s}" for s in done] + [f"{UNDER_WAY} {current}…" + (f" {seconds} s" if seconds else "")]
        self.steps.setText("\n".join(lines))
