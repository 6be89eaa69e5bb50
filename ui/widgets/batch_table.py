"""The batch page's results table: one BatchItem per row and a QAbstractTableModel over them, testable without a
window. Roles are compared as plain ints: PySide6's enum look-ups in data() cost microseconds per call, which a
repaint of thousands of cells turns into visible stalls."""

from __future__ import annotations

from dataclasses import dataclass

from PySide6.QtCore import QAbstractTableModel, QModelIndex, QPersistentModelIndex, Qt

from app.batch_io import BatchResult, BatchRow
from ui.theme import BATCH_STATUS_COLORS

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
SHOWN_CHARS = 300  # of a prompt or output in a table cell (the tooltip and detail pane show it all)
DISPLAY, TOOLTIP, FOREGROUND, ALIGNMENT = (
    int(r)
    for r in (
        Qt.ItemDataRole.DisplayRole,
        Qt.ItemDataRole.ToolTipRole,
        Qt.ItemDataRole.ForegroundRole,
        Qt.ItemDataRole.TextAlignmentRole,
    )
)
_ROLES = frozenset((DISPLAY, TOOLTIP, FOREGROUND, ALIGNMENT))
_RIGHT = int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)

# The invisible root index: the parent Qt passes for a flat table's rows (built once, not per call).
_ROOT = QModelIndex()


@dataclass
class BatchItem:
    """A row and what became of it in the latest run."""

    row: BatchRow
    status: str = QUEUED
    output: str = ""
    tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    submitted: float | None = None  # time.perf_counter() at submission
    seconds: float | None = None  # submission to the last token
    budget: int = 0  # the tokens this row may generate in the run: its max_tokens

    @classmethod
    def restored(cls, row: BatchRow, result: BatchResult) -> BatchItem:
        """A row of a saved (so finished) run: an error made it fail; a row with no reason to finish was cancelled
        before it did (in the engine, "abort"; or before it was submitted)."""
        if result.error:
            status = FAILED
        elif result.finish_reason in (None, "abort"):
            status = CANCELLED
        else:
            status = DONE
        return cls(row, status, result.output, result.tokens, result.finish_reason, result.error, None, result.seconds)

    def result(self) -> BatchResult:
        return BatchResult(
            self.row.text,
            self.output,
            self.finish_reason,
            self.tokens,
            None if self.seconds is None else round(self.seconds, 3),
            self.error,
            self.row.messages,
        )


class BatchTableModel(QAbstractTableModel):
    """The batch as a table: #, prompt, status, tokens, output. The page changes items in place and calls
    rows_changed to repaint them."""

    COLUMNS = ("#", "Prompt", "Status", "Tokens", "Output")

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.items: list[BatchItem] = []

    def set_rows(self, rows: list[BatchRow]) -> None:
        self.set_items([BatchItem(row) for row in rows])

    def set_items(self, items: list[BatchItem]) -> None:
        self.beginResetModel()
        self.items = items
        self.endResetModel()

    def reset_results(self) -> None:
        """Every row back to queued, for a new run."""
        self.items = [BatchItem(item.row) for item in self.items]
        self.rows_changed(0, len(self.items) - 1)

    def rows_changed(self, first: int, last: int) -> None:
        if self.items and first <= last:
            self.dataChanged.emit(self.index(first, 0), self.index(last, len(self.COLUMNS) - 1))

    def results(self) -> list[BatchResult]:
        return [item.result() for item in self.items]

    def count(self, *statuses: str) -> int:
        return sum(item.status in statuses for item in self.items)

    def token_progress(self) -> tuple[int, int]:
        """(tokens spent, tokens budgeted) in the run. A finished row has spent its whole budget, however early it
        stopped: what it did not use will never be generated, so the remaining work only shrinks."""
        spent = total = 0
        for item in self.items:
            total += item.budget
            finished = item.status in (DONE, FAILED, CANCELLED)
            spent += item.budget if finished else min(item.tokens, item.budget)
        return spent, total

    def matches(self, row: int, needle: str) -> bool:
        """Whether the row's prompt or its Output cell's text (the reply, or the error shown in its place) holds
        `needle`, which the caller has casefolded."""
        item = self.items[row]
        return needle in item.row.text.casefold() or needle in (item.error or item.output).casefold()

    # ---- QAbstractTableModel ----------------------------------------------------------------------------------
    def rowCount(self, parent: QModelIndex | QPersistentModelIndex = _ROOT) -> int:
        return 0 if parent.isValid() else len(self.items)

    def columnCount(self, parent: QModelIndex | QPersistentModelIndex = _ROOT) -> int:
        return 0 if parent.isValid() else len(self.COLUMNS)

    def headerData(self, section: int, orientation: Qt.Orientation, role: int = DISPLAY):
        if orientation != Qt.Orientation.Horizontal:
            return None
        if role == DISPLAY:
            return self.COLUMNS[section]
        if role == ALIGNMENT:  # numbers' headers over the numbers
            return _RIGHT if section in (0, 3) else int(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter)
        return None

    def data(self, index: QModelIndex | QPersistentModelIndex, role: int = DISPLAY):
        # Called for every visible cell and role on each repaint: roles are compared with plain ints, since
        # looking up a Qt enum member costs microseconds in PySide6 and a repaint makes hundreds of these calls.
        if role not in _ROLES or not index.isValid():
            return None
        item, column = self.items[index.row()], index.column()
        if role == DISPLAY:
            if column == 0:
                return index.row() + 1
            if column == 1:
                return ("{ } " if item.row.response_format is not None else "") + _one_line(item.row.text)
            if column == 2:
                return item.status
            if column == 3:
                return item.tokens if item.status != QUEUED else ""
            return _one_line(item.error if item.error else item.output)
        if role == TOOLTIP:
            if column == 1:
                keeps = "\n\n(the reply keeps to a JSON format)" if item.row.response_format is not None else ""
                return _tooltip(item.row.text) + keeps
            if column == 4 and (item.error or item.output):
                return _tooltip(item.error or item.output)
            if column == 2 and item.finish_reason:
                return f"finish reason: {item.finish_reason}" + (
                    f" · {item.seconds:.2f} s" if item.seconds is not None else ""
                )
            return None
        if role == FOREGROUND:
            if column == 2 or (column == 4 and item.error):
                return BATCH_STATUS_COLORS.get(FAILED if item.error else item.status)
            return None
        return _RIGHT if column in (0, 3) else None


def _one_line(text: str) -> str:
    short = text[:SHOWN_CHARS]
    return " ".join(short.split()) + ("…" if len(text) > SHOWN_CHARS else "")


def _tooltip(text: str) -> str:
    return text if len(text) <= 2000 else text[:2000] + "…"
