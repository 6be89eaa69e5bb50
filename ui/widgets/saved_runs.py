"""The batch page's "Saved runs" button: its menu lists the named runs (newest first) to reopen, and a Delete
submenu that asks before deleting. The list is read from the folder each time the menu opens, so a run saved
meanwhile shows too. ask_save_name asks a name to save a run under, and before replacing a run of that name."""

from __future__ import annotations

import time

from PySide6.QtCore import Signal
from PySide6.QtWidgets import QInputDialog, QMenu, QMessageBox, QToolButton, QWidget

from app.batch_runs import list_runs


class SavedRunsButton(QToolButton):
    open_requested = Signal(str)  # a run's name
    delete_requested = Signal(str)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setText("Saved runs")
        self.setPopupMode(QToolButton.ToolButtonPopupMode.InstantPopup)
        self.setMenu(QMenu(self))
        self.menu().aboutToShow.connect(self.refresh)

    def refresh(self) -> None:
        menu = self.menu()
        menu.clear()
        runs = list_runs()
        if not runs:
            menu.addAction("No saved runs yet").setEnabled(False)
            return
        for run in runs:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(run.saved))
            # "&&": a lone "&" in a menu text marks a shortcut letter instead of showing.
            menu.addAction(f"{run.name.replace('&', '&&')}  ·  {when}", lambda n=run.name: self.open_requested.emit(n))
        menu.addSeparator()
        delete = menu.addMenu("Delete")
        for run in runs:
            delete.addAction(run.name.replace("&", "&&"), lambda n=run.name: self._ask_delete(n))

    def _ask_delete(self, name: str) -> None:
        if _confirm(self, f"Delete the saved run {name!r}? Its results cannot be brought back."):
            self.delete_requested.emit(name)


def ask_save_name(parent: QWidget, first_prompt: str) -> str | None:
    """A name to save the run under (suggested: the time and its first prompt), or None if the user backs out."""
    suggestion = f"{time.strftime('%Y-%m-%d %H:%M')} · {' '.join(first_prompt.split())[:40]}"
    name, ok = QInputDialog.getText(parent, "Save run", "Save this run as:", text=suggestion)
    name = name.strip()
    if not ok or not name:
        return None
    if any(run.name == name for run in list_runs()) and not _confirm(
        parent, f"A saved run is called {name!r}. Replace it?"
    ):
        return None
    return name


def _confirm(parent: QWidget, question: str) -> bool:
    return QMessageBox.question(parent, "Saved runs", question) == QMessageBox.StandardButton.Yes
