"""Read-only tables of dataclass rows (the models page's library and Hub results): a QAbstractTableModel over
columns that say how to show each row, testable without a window, and the view that shows one."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from PySide6.QtCore import QAbstractTableModel, QModelIndex, QObject, Qt
from PySide6.QtWidgets import QAbstractItemView, QHeaderView, QTableView

from app.hub_models import human_size


@dataclass(frozen=True)
class Column:
    title: str
    text: Callable[[Any], str]
    numeric: bool = False  # right-aligned


class RowsModel(QAbstractTableModel):
    """Read-only rows of dataclasses shown through `columns`; row(i) gives the dataclass back."""

    def __init__(self, columns: Sequence[Column], parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.columns = tuple(columns)
        self._rows: list = []

    def set_rows(self, rows: Sequence) -> None:
        self.beginResetModel()
        self._rows = list(rows)
        self.endResetModel()

    def row(self, i: int):
        return self._rows[i]

    def rows(self) -> list:
        return list(self._rows)

    def rowCount(self, parent: QModelIndex = QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self._rows)

    def columnCount(self, parent: QModelIndex = QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self.columns)

    def data(self, index: QModelIndex, role: int = Qt.DisplayRole):
        if not index.isValid():
            return None
        column = self.columns[index.column()]
        if role == Qt.DisplayRole:
            return column.text(self._rows[index.row()])
        if role == Qt.TextAlignmentRole and column.numeric:
            return int(Qt.AlignRight | Qt.AlignVCenter)
        return None

    def headerData(self, section: int, orientation: Qt.Orientation, role: int = Qt.DisplayRole):
        if orientation != Qt.Horizontal:
            return None
        if role == Qt.DisplayRole:
            return self.columns[section].title
        if role == Qt.TextAlignmentRole:  # headings line up with their column's figures
            return int((Qt.AlignRight if self.columns[section].numeric else Qt.AlignLeft) | Qt.AlignVCenter)
        return None


def library_model(parent: QObject | None = None) -> RowsModel:
    """Rows of LocalModel."""
    return RowsModel([
        Column("Name", lambda m: m.name),
        Column("Size", lambda m: human_size(m.size), numeric=True),
        Column("Family", lambda m: m.family),
        Column("Context", lambda m: "—" if m.context_length is None else f"{m.context_length:,}", numeric=True),
        Column("", lambda m: "default" if m.is_default else ""),
    ], parent)


def results_model(parent: QObject | None = None) -> RowsModel:
    """Rows of HubModel."""
    return RowsModel([
        Column("Name", lambda m: m.name),
        Column("Downloads", lambda m: f"{m.downloads:,}", numeric=True),
        Column("Likes", lambda m: f"{m.likes:,}", numeric=True),
        Column("Size on the Hub", lambda m: "—" if m.size is None else human_size(m.size), numeric=True),
    ], parent)


def rows_table(model: RowsModel) -> QTableView:
    """A read-only table of whole rows, one selected at a time; the name column takes the spare width."""
    view = QTableView()
    view.setModel(model)
    view.verticalHeader().hide()
    view.setEditTriggers(QAbstractItemView.NoEditTriggers)
    view.setSelectionBehavior(QAbstractItemView.SelectRows)
    view.setSelectionMode(QAbstractItemView.SingleSelection)
    view.setAlternatingRowColors(True)
    view.setShowGrid(False)
    header = view.horizontalHeader()
    header.setSectionResizeMode(QHeaderView.ResizeToContents)
    header.setMinimumSectionSize(72)
    # room between a right-aligned figure and the next column's left-aligned text
    view.setStyleSheet("QTableView::item { padding: 0 6px; } QHeaderView::section { padding: 0 6px; }")
    header.setSectionResizeMode(0, QHeaderView.Stretch)
    return view
