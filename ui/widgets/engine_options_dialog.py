"""The engine options that matter most in a chat, for the model loaded: its context length (max_model_len, at most
the model's own context) and the KV cache's dtype. The spin box's bounds keep an invalid length from being typed;
what the engine still refuses (fp8 without a GPU) is said when the reload fails.
"""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QComboBox, QDialog, QDialogButtonBox, QFormLayout, QSpinBox, QVBoxLayout, QWidget

from engine.config import KV_CACHE_DTYPES
from ui.widgets.cards import muted

# Shorter than this holds hardly a system prompt and a question: a context that small is a typo, not a choice.
MIN_CONTEXT = 256
# The bound for a model whose own context is not known here (one loaded from a file outside the library): the
# engine then refuses a length beyond it in words.
UNKNOWN_CONTEXT_BOUND = 2**31 - 1

KV_DTYPE_HINTS = {
    "auto": "the model's dtype (float16 for weights kept quantized on the CPU)",
    "float32": "exact, twice float16's memory",
    "float16": "half of float32's memory",
    "bfloat16": "half of float32's memory, float32's range",
    "fp8": "a quarter of float32's memory; needs a GPU",
}


class EngineOptionsDialog(QDialog):
    """Asks for max_model_len and kv_cache_dtype; options() gives them as LLM keyword arguments once accepted."""

    def __init__(
        self, model: str, context: int | None, max_model_len: int, kv_cache_dtype: str, parent: QWidget | None = None
    ) -> None:
        super().__init__(parent)
        self.setWindowTitle("Engine options")
        self.context = QSpinBox(suffix=" tokens", singleStep=512, groupSeparatorShown=True)
        self.context.setRange(MIN_CONTEXT, max(MIN_CONTEXT, context or UNKNOWN_CONTEXT_BOUND))
        self.context.setValue(max_model_len)
        self.kv_dtype = QComboBox()
        for dtype in KV_CACHE_DTYPES:
            self.kv_dtype.addItem(dtype, dtype)
            self.kv_dtype.setItemData(self.kv_dtype.count() - 1, KV_DTYPE_HINTS[dtype], Qt.ItemDataRole.ToolTipRole)
        self.kv_dtype.setCurrentIndex(max(0, self.kv_dtype.findData(kv_cache_dtype)))
        self.kv_hint = muted()
        self.kv_hint.setWordWrap(True)
        self.kv_dtype.currentIndexChanged.connect(lambda _: self.kv_hint.setText(KV_DTYPE_HINTS[self.kv_dtype_value]))
        self.kv_hint.setText(KV_DTYPE_HINTS[self.kv_dtype_value])
        form = QFormLayout()
        form.addRow("Context length", self.context)
        form.addRow("KV cache dtype", self.kv_dtype)
        form.addRow("", self.kv_hint)
        bound = f"up to {context:,} tokens, the model's own context" if context else "its own context is not known"
        note = muted(f"{model}: {bound}. Applying reloads the model with these options; they are kept for next time.")
        note.setWordWrap(True)
        self.buttons = QDialogButtonBox(QDialogButtonBox.Ok | QDialogButtonBox.Cancel)
        self.buttons.button(QDialogButtonBox.Ok).setText("Apply and reload")
        self.buttons.accepted.connect(self.accept)
        self.buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(note)
        layout.addWidget(self.buttons)
        self.setMinimumWidth(420)

    @property
    def kv_dtype_value(self) -> str:
        return self.kv_dtype.currentData()

    def options(self) -> dict:
        return {"max_model_len": self.context.value(), "kv_cache_dtype": self.kv_dtype_value}
