"""The batch page's "Saved runs" button: its menu lists the named runs (newest first) to reopen, and a Delete
submenu. The list is read from the folder each time the menu opens, so a run saved meanwhile shows too."""

from __future__ import annotations

import time

from PySide6.QtCore import Signal
from PySide6.QtWidgets import QMenu, QToolButton, QWidget

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
            delete.addAction(run.name.replace("&", "&&"), lambda n=run.name: self.delete_requested.emit(n))
