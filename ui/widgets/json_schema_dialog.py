"""The JSON schema a chat's replies keep to: a dialog to paste or edit it, checked as it is typed (JSON, an object,
and a schema the grammar engine compiles), the badge that marks a conversation holding one, and the chat page's
box that shows it and opens the dialog."""

from __future__ import annotations

import json

from PySide6.QtCore import QRectF, Qt, Signal
from PySide6.QtGui import QFont, QFontDatabase, QIcon, QPainter, QPalette, QPixmap
from PySide6.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from engine.structured_output import StructuredOutputsParams, grammar_error
from ui.theme import tone_color
from ui.widgets.cards import muted

EXAMPLE = """{
  "type": "object",
  "properties": {
    "answer": {"type": "string"},
    "confidence": {"type": "number", "minimum": 0, "maximum": 1}
  },
  "required": ["answer", "confidence"]
}"""


def schema_problem(text: str) -> str | None:
    """What is wrong with `text` as a JSON schema, in words, or None when a reply can be kept to it."""
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as e:
        return f"Not JSON: {e.msg} (line {e.lineno}, column {e.colno})."
    if not isinstance(schema, dict):
        return f"A JSON schema is an object ({{...}}), not {type(schema).__name__}."
    error = grammar_error(StructuredOutputsParams(json=schema))
    return None if error is None else f"Not a schema the grammar engine can use: {error}"


def schema_summary(text: str) -> str:
    """A few words on a schema: the properties of an object schema, else its type."""
    schema = json.loads(text)
    props = list(schema.get("properties") or {})
    if props:
        shown = ", ".join(props[:4]) + (f" +{len(props) - 4}" if len(props) > 4 else "")
        return f"JSON object: {shown}"
    return f"JSON {schema.get('type', 'value')}"


class JsonSchemaDialog(QDialog):
    """Paste or edit a schema; Use keeps it (only once it is valid), Remove goes back to free text."""

    REMOVED = 2  # the dialog's result when Remove was chosen (Accepted is 1, Rejected 0)

    def __init__(self, schema: str = "", parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("JSON schema for replies")
        self.resize(560, 480)
        intro = QLabel(
            "Every reply in this conversation will be JSON that keeps to this schema: the engine allows, token by "
            "token, only what the schema does. Bound free text (maxLength) and lists (maxItems) for small models."
        )
        intro.setWordWrap(True)
        self.editor = QPlainTextEdit(schema or EXAMPLE)
        self.editor.setFont(QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont))
        self.editor.textChanged.connect(self._check)
        self.problem = QLabel()
        self.problem.setWordWrap(True)
        self.problem.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.buttons = QDialogButtonBox(QDialogButtonBox.Cancel)
        self.use_button = self.buttons.addButton("Use schema", QDialogButtonBox.AcceptRole)
        self.format_button = QPushButton("Format")
        self.format_button.clicked.connect(self._format)
        self.buttons.addButton(self.format_button, QDialogButtonBox.ActionRole)
        self.remove_button = self.buttons.addButton("Remove", QDialogButtonBox.DestructiveRole)
        self.remove_button.setEnabled(bool(schema))
        self.remove_button.clicked.connect(lambda: self.done(self.REMOVED))
        self.buttons.accepted.connect(self.accept)
        self.buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addWidget(intro)
        layout.addWidget(self.editor, 1)
        layout.addWidget(self.problem)
        layout.addWidget(self.buttons)
        self._check()

    @property
    def schema(self) -> str:
        """The schema as compact JSON text (what the conversation keeps), once valid."""
        return json.dumps(json.loads(self.editor.toPlainText()), ensure_ascii=False)

    def _check(self) -> None:
        problem = schema_problem(self.editor.toPlainText())
        self.use_button.setEnabled(problem is None)
        self.format_button.setEnabled(problem is None)
        text = f"✓ {schema_summary(self.editor.toPlainText())}" if problem is None else problem
        self.problem.setText(text)
        self.problem.setStyleSheet(f"color: {tone_color('ok' if problem is None else 'error').name()}")

    def _format(self) -> None:
        self.editor.setPlainText(json.dumps(json.loads(self.editor.toPlainText()), indent=2, ensure_ascii=False))


def badge_icon(palette: QPalette, text: str = "JSON") -> QIcon:
    """A small pill with `text`, in the palette's highlight colour: the mark of a conversation with a schema."""
    font = QFont()
    font.setPointSizeF(max(font.pointSizeF() - 2, 6))
    font.setWeight(QFont.Weight.DemiBold)
    pixmap = QPixmap(34, 16)
    pixmap.fill(Qt.transparent)
    painter = QPainter(pixmap)
    painter.setRenderHint(QPainter.RenderHint.Antialiasing)
    painter.setPen(Qt.NoPen)
    painter.setBrush(palette.color(QPalette.ColorRole.Highlight))
    painter.drawRoundedRect(QRectF(pixmap.rect()).adjusted(0.5, 0.5, -0.5, -0.5), 7, 7)
    painter.setFont(font)
    painter.setPen(palette.color(QPalette.ColorRole.HighlightedText))
    painter.drawText(pixmap.rect(), Qt.AlignCenter, text)
    painter.end()
    return QIcon(pixmap)


class ReplyFormatBox(QWidget):
    """What a conversation's replies keep to (the badge and a summary, or "Free text"), and the button that opens
    JsonSchemaDialog; `chosen` carries the schema picked there, or "" when it was removed."""

    chosen = Signal(str)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._schema = ""
        self.badge = QLabel()
        self.state = muted("Free text")
        self.state.setWordWrap(True)
        self.button = QPushButton("JSON schema…")
        self.button.setToolTip("Keep this conversation's replies to a JSON schema")
        self.button.clicked.connect(self.ask)
        row = QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.badge)
        row.addWidget(self.state, 1)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(row)
        layout.addWidget(self.button)
        self.show_schema("")

    def show_schema(self, schema: str) -> None:
        self._schema = schema
        self.badge.setPixmap(badge_icon(self.palette()).pixmap(34, 16) if schema else QPixmap())
        self.badge.setVisible(bool(schema))
        self.state.setText(schema_summary(schema) if schema else "Free text")
        self.button.setText("Edit JSON schema…" if schema else "JSON schema…")

    def ask(self) -> None:
        dialog = JsonSchemaDialog(json.dumps(json.loads(self._schema), indent=2) if self._schema else "", self)
        result = dialog.exec()
        if result == QDialog.Accepted:
            self.chosen.emit(dialog.schema)
        elif result == JsonSchemaDialog.REMOVED:
            self.chosen.emit("")
