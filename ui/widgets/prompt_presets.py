"""System-prompt presets by the system prompt: choose one to fill the prompt, save the prompt as one, rename or
delete the user's own (app/prompt_presets.py keeps them). The list shows the preset the prompt now holds, or
"Choose a preset" once it is edited into something else; choosing one is undone with Ctrl+Z in the prompt."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtGui import QTextCursor
from PySide6.QtWidgets import (
    QComboBox,
    QHBoxLayout,
    QInputDialog,
    QMenu,
    QMessageBox,
    QPlainTextEdit,
    QToolButton,
    QWidget,
)

from app.prompt_presets import Preset, PresetError, PresetStore
from ui.widgets.status_line import StatusLine


class PresetPicker(QWidget):
    def __init__(
        self, editor: QPlainTextEdit, store: PresetStore, status: StatusLine, parent: QWidget | None = None
    ) -> None:
        super().__init__(parent)
        self.editor, self.store, self.status = editor, store, status
        self.combo = QComboBox(placeholderText="Choose a preset")
        # As narrow as the settings column wants, whatever the names' lengths: the sampling form sets its width.
        self.combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.combo.setMinimumContentsLength(6)
        self.combo.setMinimumWidth(80)
        self.combo.activated.connect(self._chosen)
        # Tool buttons: as narrow as their text (a push button's least width would widen the column).
        self.save_button = QToolButton(text="Save…", toolTip="Save the system prompt as a preset")
        self.save_button.clicked.connect(self._ask_save)
        menu = QMenu(self)
        self.rename_action = menu.addAction("Rename…", self._ask_rename)
        self.delete_action = menu.addAction("Delete…", self._ask_delete)
        self.more_button = QToolButton(text="⋯", menu=menu, toolTip="Rename or delete the chosen preset")
        self.more_button.setPopupMode(QToolButton.ToolButtonPopupMode.InstantPopup)
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.combo, 1)
        row.addWidget(self.save_button)
        row.addWidget(self.more_button)
        editor.textChanged.connect(self._sync)
        self._fill()
        if store.problem is not None:
            self.status.say(
                f"Could not read the saved presets: {store.problem}. The file is left as it is; saving a preset "
                f"keeps it as {store.unreadable_copy.name}.",
                "warn",
            )

    @property
    def current(self) -> Preset | None:
        """The preset the system prompt holds now, if any."""
        return self.store.get(self.combo.currentData()) if self.combo.currentIndex() >= 0 else None

    def choose(self, name: str) -> None:
        """Fill the system prompt with preset `name` (an undoable edit)."""
        preset = self.store.get(name)
        cursor = self.editor.textCursor()
        cursor.select(QTextCursor.SelectionType.Document)
        cursor.insertText(preset.prompt)
        self.status.say(f"System prompt set to “{preset.name}”.")

    def save(self, name: str, replace: bool = False) -> bool:
        try:
            preset = self.store.save(name, self.editor.toPlainText(), replace)
        except PresetError as e:
            self.status.say(f"Could not save the preset: {e}.", "error")
            return False
        self._fill()
        self.status.say(f"Saved the system prompt as “{preset.name}”.")
        return True

    def rename(self, name: str, new_name: str) -> bool:
        try:
            preset = self.store.rename(name, new_name)
        except PresetError as e:
            self.status.say(f"Could not rename the preset: {e}.", "error")
            return False
        self._fill()
        self.status.say(f"Renamed the preset to “{preset.name}”.")
        return True

    def delete(self, name: str) -> bool:
        try:
            self.store.delete(name)
        except PresetError as e:
            self.status.say(f"Could not delete the preset: {e}.", "error")
            return False
        self._fill()
        self.status.say(f"Deleted the preset “{name}”.")
        return True

    # ---- dialogs ------------------------------------------------------------------------------------------------
    def _ask_save(self) -> None:
        chosen = self.current
        name, ok = QInputDialog.getText(
            self,
            "Save preset",
            "Save the system prompt as:",
            text="" if chosen is None or chosen.builtin else chosen.name,
        )
        if not ok:
            return
        existing = self.store.get(name)
        replace = existing is not None and not existing.builtin
        if replace and not _confirm(self, "Replace preset", f"Replace the preset “{existing.name}”?"):
            return
        self.save(name, replace)

    def _ask_rename(self) -> None:
        preset = self.current
        if preset is None or preset.builtin:
            return
        name, ok = QInputDialog.getText(self, "Rename preset", "New name:", text=preset.name)
        if ok:
            self.rename(preset.name, name)

    def _ask_delete(self) -> None:
        preset = self.current
        if (
            preset is not None
            and not preset.builtin
            and _confirm(self, "Delete preset", f"Delete the preset “{preset.name}”? The system prompt stays as it is.")
        ):
            self.delete(preset.name)

    # ---- the list -----------------------------------------------------------------------------------------------
    def _fill(self) -> None:
        self.combo.clear()
        for preset in self.store.presets():
            label = f"{preset.name} (built in)" if preset.builtin else preset.name
            self.combo.addItem(label, preset.name)
            self.combo.setItemData(self.combo.count() - 1, preset.prompt, Qt.ItemDataRole.ToolTipRole)
        self._sync()

    def _chosen(self, index: int) -> None:
        self.choose(self.combo.itemData(index))

    def _sync(self) -> None:
        """Show the preset the prompt holds (the first, if two hold the same text), and offer Rename and Delete
        for the user's own."""
        text = self.editor.toPlainText()
        index = next((i for i, p in enumerate(self.store.presets()) if p.prompt == text and text), -1)
        self.combo.setCurrentIndex(index)
        preset = self.current
        own = preset is not None and not preset.builtin
        self.rename_action.setEnabled(own)
        self.delete_action.setEnabled(own)


def _confirm(parent: QWidget, title: str, question: str) -> bool:
    return QMessageBox.question(parent, title, question) == QMessageBox.StandardButton.Yes
