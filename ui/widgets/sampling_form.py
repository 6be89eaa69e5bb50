"""The sampling fields Chat and Batch share: each page shows the ones it offers (temperature, top p/k, min p,
max tokens, penalties) and a seed, and reads them back as SamplingParams keyword arguments."""

from __future__ import annotations

from collections.abc import Iterable

from PySide6.QtWidgets import QAbstractSpinBox, QCheckBox, QDoubleSpinBox, QFormLayout, QSpinBox, QWidget

from ui.widgets.form_state import FormWidgets

# name (SamplingParams' field) -> (label, integer field, minimum, maximum, default, step)
FIELDS: dict[str, tuple[str, bool, float, float, float, float]] = {
    "temperature": ("Temperature", False, 0.0, 2.0, 0.7, 0.05),
    "top_p": ("Top p", False, 0.01, 1.0, 1.0, 0.05),
    "top_k": ("Top k", True, -1, 1000, -1, 1),
    "min_p": ("Min p", False, 0.0, 1.0, 0.0, 0.01),
    "max_tokens": ("Max tokens", True, 1, 32768, 512, 16),
    "presence_penalty": ("Presence penalty", False, -2.0, 2.0, 0.0, 0.1),
    "frequency_penalty": ("Frequency penalty", False, -2.0, 2.0, 0.0, 0.1),
    "repetition_penalty": ("Repetition penalty", False, 0.1, 3.0, 1.0, 0.05),
}


def spin_box(integer: bool, low: float, high: float, value: float, step: float) -> QAbstractSpinBox:
    """A sampling-parameter field: range, step, starting value (two decimals for float fields)."""
    box = QSpinBox() if integer else QDoubleSpinBox()
    box.setRange(low, high)
    if isinstance(box, QDoubleSpinBox):
        box.setDecimals(2)
    box.setSingleStep(step)
    box.setValue(value)
    return box


class SamplingForm(QWidget):
    """`fields` (FIELDS' names, in that order on the form) and a seed, which counts only while "Seed" is ticked.
    Each field is an attribute of its name (form.temperature); `max_tokens` is that field's default."""

    temperature: QDoubleSpinBox
    top_p: QDoubleSpinBox
    top_k: QSpinBox
    min_p: QDoubleSpinBox
    max_tokens: QSpinBox
    presence_penalty: QDoubleSpinBox
    frequency_penalty: QDoubleSpinBox
    repetition_penalty: QDoubleSpinBox

    def __init__(self, fields: Iterable[str], max_tokens: int = 512, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        layout = QFormLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.fields: dict[str, QAbstractSpinBox] = {}
        for name in fields:
            label, integer, low, high, default, step = FIELDS[name]
            box = spin_box(integer, low, high, max_tokens if name == "max_tokens" else default, step)
            self.fields[name] = box
            setattr(self, name, box)
            layout.addRow(label, box)
        self.use_seed = QCheckBox("Seed")
        self.seed = spin_box(True, 0, 2**31 - 1, 0, 1)
        self.seed.setEnabled(False)
        self.use_seed.toggled.connect(self.seed.setEnabled)
        layout.addRow(self.use_seed, self.seed)

    @property
    def form(self) -> FormWidgets:
        """What the settings file keeps of these fields between runs (ui/widgets/form_state.py), by name."""
        return {**self.fields, "use_seed": self.use_seed, "seed": self.seed}

    def params(self) -> dict:
        """The fields as SamplingParams keyword arguments; seed None unless it is ticked."""
        return {name: box.value() for name, box in self.fields.items()} | {
            "seed": self.seed.value() if self.use_seed.isChecked() else None
        }
