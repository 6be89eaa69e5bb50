"""The batch page: prompts pasted or imported (.txt / .jsonl / .csv), one sampling setup for all rows (a file's
rows may override it), every row submitted at once so the engine batches them continuously, per-row status
and progress, cancel, and the results exported to JSONL or CSV.

Outputs arrive as request_update signals, up to one per running row per engine step. A slot only records
them; a timer repaints the changed rows a few times a second, so a large batch never floods the UI thread.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path

from PySide6.QtCore import QAbstractTableModel, QModelIndex, QPersistentModelIndex, Qt, QTimer
from PySide6.QtGui import QColor, QPalette
from PySide6.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QSplitter,
    QTableView,
    QVBoxLayout,
    QWidget,
)

from app.batch_io import BatchFileError, BatchResult, BatchRow, export_results, load_rows, parse_text
from app.conversation import chat_prompt
from engine import SamplingParams
from ui.bridge import EngineBridge, RequestFailed, RequestUpdate

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
REPAINT_INTERVAL_MS = 100
SHOWN_CHARS = 300          # of a prompt or output in a table cell (the tooltip and detail pane show it all)
STATUS_COLORS = {RUNNING: QColor("#2d7ff9"), DONE: QColor("#2e9d57"), FAILED: QColor("#d64541")}
_runs = itertools.count()  # request ids stay unique across pages sharing one bridge
DISPLAY, TOOLTIP, FOREGROUND, ALIGNMENT = (int(r) for r in (
    Qt.ItemDataRole.DisplayRole, Qt.ItemDataRole.ToolTipRole, Qt.ItemDataRole.ForegroundRole,
    Qt.ItemDataRole.TextAlignmentRole))
_ROLES = frozenset((DISPLAY, TOOLTIP, FOREGROUND, ALIGNMENT))
_RIGHT = int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)


@dataclass
class BatchItem:
    """A row and what became of it in the latest run."""
    row: BatchRow
    status: str = QUEUED
    output: str = ""
    tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    submitted: float | None = None    # time.perf_counter() at submission
    seconds: float | None = None      # submission to the last token

    def result(self) -> BatchResult:
        return BatchResult(self.row.text, self.output, self.finish_reason, self.tokens,
                           None if self.seconds is None else round(self.seconds, 3), self.error, self.row.messages)


class BatchTableModel(QAbstractTableModel):
    """The batch as a table: #, prompt, status, tokens, output. The page changes items in place and calls
    rows_changed to repaint them."""
    COLUMNS = ("#", "Prompt", "Status", "Tokens", "Output")

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.items: list[BatchItem] = []

    def set_rows(self, rows: list[BatchRow]) -> None:
        self.beginResetModel()
        self.items = [BatchItem(row) for row in rows]
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

    # ---- QAbstractTableModel ----------------------------------------------------------------------------------
    def rowCount(self, parent: QModelIndex | QPersistentModelIndex = QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self.items)

    def columnCount(self, parent: QModelIndex | QPersistentModelIndex = QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self.COLUMNS)

    def headerData(self, section: int, orientation: Qt.Orientation, role: int = DISPLAY):
        if orientation == Qt.Orientation.Horizontal and role == DISPLAY:
            return self.COLUMNS[section]
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
                return _one_line(item.row.text)
            if column == 2:
                return item.status
            if column == 3:
                return item.tokens if item.status != QUEUED else ""
            return _one_line(item.error if item.error else item.output)
        if role == TOOLTIP:
            if column == 1:
                return _tooltip(item.row.text)
            if column == 4 and (item.error or item.output):
                return _tooltip(item.error or item.output)
            if column == 2 and item.finish_reason:
                return f"finish reason: {item.finish_reason}" + (
                    f" · {item.seconds:.2f} s" if item.seconds is not None else "")
            return None
        if role == FOREGROUND:
            if column == 2 or (column == 4 and item.error):
                return STATUS_COLORS.get(FAILED if item.error else item.status)
            return None
        return _RIGHT if column in (0, 3) else None


def _one_line(text: str) -> str:
    short = text[:SHOWN_CHARS]
    return " ".join(short.split()) + ("…" if len(text) > SHOWN_CHARS else "")


def _tooltip(text: str) -> str:
    return text if len(text) <= 2000 else text[:2000] + "…"


class BatchPage(QWidget):
    def __init__(self, bridge: EngineBridge, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.bridge = bridge
        self.model = BatchTableModel(self)
        self._requests: dict[str, int] = {}   # request id -> row, for the rows still running
        self._dirty: set[int] = set()         # rows changed since the last repaint
        self._started = 0.0
        self._repaint = QTimer(self, interval=REPAINT_INTERVAL_MS, timeout=self._flush)
        self._build()
        bridge.request_update.connect(self._on_update)
        bridge.request_failed.connect(self._on_failed)
        bridge.model_loaded.connect(lambda _: self._describe_prompts())
        self._describe_prompts()

    @property
    def running(self) -> bool:
        return bool(self._requests)

    # ---- layout -------------------------------------------------------------------------------------------
    def _build(self) -> None:
        self.input = QPlainTextEdit(placeholderText="Paste prompts here, one per line — or import a .txt, .jsonl "
                                                    "or .csv file")
        self.input.textChanged.connect(self._on_pasted)
        self.import_button = QPushButton("Import…")
        self.import_button.clicked.connect(self._choose_import)
        self.source = _muted("No prompts yet")
        self.mode = _muted()
        prompts = QGroupBox("Prompts")
        pv = QVBoxLayout(prompts)
        pv.addWidget(self.input, 1)
        row = QHBoxLayout()
        row.addWidget(self.import_button)
        row.addWidget(self.source, 1)
        row.addWidget(self.mode)
        pv.addLayout(row)

        self.temperature = _spin(QDoubleSpinBox(), 0.0, 2.0, 0.7, 0.05)
        self.top_p = _spin(QDoubleSpinBox(), 0.01, 1.0, 1.0, 0.05)
        self.max_tokens = _spin(QSpinBox(), 1, 32768, 256, 16)
        self.use_seed = QCheckBox("Seed")
        self.seed = _spin(QSpinBox(), 0, 2**31 - 1, 0, 1)
        self.seed.setEnabled(False)
        self.use_seed.toggled.connect(self.seed.setEnabled)
        sampling = QGroupBox("Sampling")
        sampling.setToolTip("One setup for every row. A row from a .jsonl or .csv file may set its own "
                            "temperature, top_p, top_k, max_tokens, seed or stop, which win over these.")
        form = QFormLayout(sampling)
        form.addRow("Temperature", self.temperature)
        form.addRow("Top p", self.top_p)
        form.addRow("Max tokens", self.max_tokens)
        form.addRow(self.use_seed, self.seed)
        sampling.setFixedWidth(260)

        top = QWidget()
        th = QHBoxLayout(top)
        th.setContentsMargins(0, 0, 0, 0)
        th.addWidget(prompts, 1)
        th.addWidget(sampling)

        self.run_button = QPushButton("Run")
        self.run_button.setDefault(True)
        self.run_button.clicked.connect(self.run)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(self.cancel)
        self.progress = QProgressBar()
        self.progress.setFormat("%v / %m done")
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.export_jsonl_button = QPushButton("Export JSONL…")
        self.export_jsonl_button.clicked.connect(lambda: self._choose_export(".jsonl", "JSON Lines (*.jsonl)"))
        self.export_csv_button = QPushButton("Export CSV…")
        self.export_csv_button.clicked.connect(lambda: self._choose_export(".csv", "CSV (*.csv)"))
        actions = QHBoxLayout()
        actions.addWidget(self.run_button)
        actions.addWidget(self.cancel_button)
        actions.addWidget(self.progress, 1)
        actions.addWidget(self.export_jsonl_button)
        actions.addWidget(self.export_csv_button)

        self.table = QTableView()
        self.table.setModel(self.model)
        self.table.setAlternatingRowColors(True)
        self.table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SingleSelection)
        self.table.setWordWrap(False)
        self.table.verticalHeader().hide()
        self.table.verticalHeader().setDefaultSectionSize(self.fontMetrics().height() + 8)
        header = self.table.horizontalHeader()
        header.setHighlightSections(False)
        header.setDefaultAlignment(Qt.AlignLeft | Qt.AlignVCenter)
        # Fixed widths, not ResizeToContents: measuring every row on each repaint would cost a big batch dearly.
        for column, width in ((0, 44), (1, 300), (2, 88), (3, 64)):
            header.setSectionResizeMode(column, QHeaderView.Interactive)
            header.resizeSection(column, width)
        header.setSectionResizeMode(4, QHeaderView.Stretch)
        self.table.selectionModel().currentRowChanged.connect(lambda *_: self._show_detail())
        self.detail = QPlainTextEdit(readOnly=True, placeholderText="Select a row to read its prompt and output")

        results = QSplitter(Qt.Horizontal)
        results.addWidget(self.table)
        results.addWidget(self.detail)
        results.setStretchFactor(0, 3)
        results.setStretchFactor(1, 1)
        bottom = QWidget()
        bv = QVBoxLayout(bottom)
        bv.setContentsMargins(0, 0, 0, 0)
        bv.addLayout(actions)
        bv.addWidget(results, 1)

        splitter = QSplitter(Qt.Vertical)
        splitter.addWidget(top)
        splitter.addWidget(bottom)
        splitter.setStretchFactor(1, 1)
        splitter.setSizes([200, 500])
        self.status = QLabel()
        self.status.setWordWrap(True)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(12, 12, 12, 12)
        layout.addWidget(splitter, 1)
        layout.addWidget(self.status)
        self._sync_buttons()

    # ---- the rows ---------------------------------------------------------------------------------------------
    def _on_pasted(self) -> None:
        rows = parse_text(self.input.toPlainText())
        self.model.set_rows(rows)
        self.source.setText(f"{len(rows)} pasted prompt{'s' * (len(rows) != 1)}" if rows else "No prompts yet")
        self._after_new_rows()

    def import_file(self, path: str | Path) -> bool:
        """Replace the rows with a file's; a bad file is said in the status line and changes nothing."""
        if self.running:
            return False
        try:
            rows = load_rows(path)
        except BatchFileError as e:
            self.status.setText(f"Could not import: {e}")
            return False
        self.input.blockSignals(True)   # the file's rows replace the pasted ones; typing again replaces them back
        self.input.clear()
        self.input.blockSignals(False)
        self.model.set_rows(rows)
        self.source.setText(f"{len(rows)} prompt{'s' * (len(rows) != 1)} from {Path(path).name}")
        self._after_new_rows()
        self.status.setText(f"Imported {len(rows)} prompts from {Path(path).name}.")
        return True

    def _choose_import(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Import prompts", "",
                                              "Prompts (*.txt *.jsonl *.csv);;All files (*)")
        if path:
            self.import_file(path)

    def _after_new_rows(self) -> None:
        self.progress.setRange(0, max(len(self.model.items), 1))
        self.progress.setValue(0)
        self.status.clear()
        self._show_detail()
        self._sync_buttons()

    def _describe_prompts(self) -> None:
        """Say (in a tooltip) whether prompts go through the chat template: the same text means different things
        to the model either way."""
        if self._tokenizer() is None:
            text, hint = "", "No model is loaded yet."
        elif self._templated():
            text, hint = "Chat template", ("Each line is sent as a user message through the model's chat "
                                           "template; .jsonl rows may give whole conversations as \"messages\".")
        else:
            text, hint = "Raw text", ("The model has no chat template: each line is sent as raw text, and rows "
                                      "given as \"messages\" fail.")
        self.mode.setText(text)
        for widget in (self.input, self.mode, self.run_button):
            widget.setToolTip(hint)

    def _tokenizer(self):
        thread = self.bridge.engine_thread
        return None if thread is None else thread.engine.tokenizer

    def _templated(self) -> bool:
        return bool(getattr(self._tokenizer(), "chat_template", None))

    # ---- running ----------------------------------------------------------------------------------------------
    def sampling(self) -> dict:
        """The shared sampling setup, as SamplingParams keyword arguments."""
        return {"temperature": self.temperature.value(), "top_p": self.top_p.value(),
                "max_tokens": self.max_tokens.value(), "seed": self.seed.value() if self.use_seed.isChecked() else None}

    def run(self) -> None:
        """Submit every row at once: the engine's scheduler batches them, step by step."""
        if self.running:
            return
        if not self.model.items:
            self.status.setText("Nothing to run: paste prompts (one per line) or import a file.")
            return
        tokenizer = self._tokenizer()
        if tokenizer is None:
            self.status.setText("No model is loaded yet.")
            return
        templated, shared, run = self._templated(), self.sampling(), next(_runs)
        self.model.reset_results()
        self._started = time.perf_counter()
        # Every prompt is rendered before the first is submitted: once the engine thread wakes it competes for
        # the GIL, and rendering templates against it would hold up the UI thread for longer.
        ready = []
        for i, item in enumerate(self.model.items):
            try:
                ready.append((i, _prompt(item.row, tokenizer, templated),
                              SamplingParams(**(shared | item.row.overrides()))))
            except Exception as e:   # a template error, a bad override: this row fails, in words
                item.status, item.error = FAILED, str(e) or type(e).__name__
        for i, prompt, params in ready:
            item = self.model.items[i]
            try:
                item.submitted = time.perf_counter()
                self._requests[self.bridge.submit(prompt, params, f"batch-{run}-{i}")] = i
            except Exception as e:   # a full queue, an engine that is stopping
                item.status, item.error = FAILED, str(e) or type(e).__name__
        self._dirty.update(range(len(self.model.items)))
        if self.running:
            self._repaint.start()
            self._flush()
            self._sync_buttons()
        else:
            self._end_run()

    def cancel(self) -> None:
        """Abort every unfinished row; the engine frees their blocks."""
        if not self.running:
            return
        for rid, i in self._requests.items():
            self.bridge.abort(rid)
            self.model.items[i].status = CANCELLED
        self._requests.clear()
        self._end_run()

    def _on_update(self, update: RequestUpdate) -> None:
        i = self._requests.get(update.request_id)
        if i is None:
            return
        item, completion = self.model.items[i], update.output.outputs[0]
        item.output, item.tokens, item.status = completion.text, len(completion.token_ids), RUNNING
        if update.output.finished:
            item.status, item.finish_reason = DONE, completion.finish_reason
            item.seconds = time.perf_counter() - item.submitted
            del self._requests[update.request_id]
        self._dirty.add(i)
        if not self._requests:
            self._end_run()

    def _on_failed(self, failure: RequestFailed) -> None:
        i = self._requests.pop(failure.request_id, None)
        if i is None:
            return
        item = self.model.items[i]
        item.status, item.error = FAILED, failure.message
        self._dirty.add(i)
        if not self._requests:
            self._end_run()

    def _flush(self) -> None:
        """Repaint the rows changed since the last call; show progress and throughput."""
        if self._dirty:
            self.model.rows_changed(min(self._dirty), max(self._dirty))
            if self.table.currentIndex().row() in self._dirty:
                self._show_detail()
            self._dirty.clear()
        items = self.model.items
        self.progress.setValue(self.model.count(DONE, FAILED, CANCELLED))
        if self.running:
            elapsed = time.perf_counter() - self._started
            tokens = sum(item.tokens for item in items)
            self.status.setText(f"Running {len(items)} prompts: {self.model.count(RUNNING)} generating, "
                                f"{self.model.count(QUEUED)} queued · {tokens:,} tokens, "
                                f"{tokens / max(elapsed, 1e-3):,.0f} tokens/s")

    def _end_run(self) -> None:
        self._repaint.stop()
        self._dirty.update(range(len(self.model.items)))
        self._flush()
        elapsed = time.perf_counter() - self._started
        parts = [f"{n} {what}" for what in (DONE, FAILED, CANCELLED) if (n := self.model.count(what))]
        first_error = next((item.error for item in self.model.items if item.error), None)
        tokens = sum(item.tokens for item in self.model.items)
        self.status.setText(f"{', '.join(parts)} in {elapsed:.1f} s · {tokens:,} tokens"
                            + (f" · first error: {first_error}" if first_error else ""))
        self._sync_buttons()

    # ---- export -----------------------------------------------------------------------------------------------
    def export(self, path: str | Path) -> bool:
        """Write the results to `path`, as JSONL or CSV by its suffix; a failure is said in the status line."""
        try:
            export_results(self.model.results(), path)
        except BatchFileError as e:
            self.status.setText(f"Could not export: {e}")
            return False
        self.status.setText(f"Exported {len(self.model.items)} results to {path}.")
        return True

    def _choose_export(self, suffix: str, file_filter: str) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export results", f"batch-results{suffix}", file_filter)
        if path:
            self.export(path if Path(path).suffix.lower() == suffix else path + suffix)

    # ---- small helpers ----------------------------------------------------------------------------------------
    def _show_detail(self) -> None:
        row = self.table.currentIndex().row()
        if not 0 <= row < len(self.model.items):
            self.detail.clear()
            return
        item = self.model.items[row]
        prompt = item.row.text if item.row.messages is None else "\n\n".join(
            f"[{m['role']}] {m['content']}" for m in item.row.messages)
        output = f"Error: {item.error}" if item.error else item.output
        self.detail.setPlainText(f"PROMPT\n{prompt}\n\nOUTPUT ({item.status}, {item.tokens} tokens)\n{output}")

    def _sync_buttons(self) -> None:
        busy, has_rows = self.running, bool(self.model.items)
        ran = any(item.status != QUEUED for item in self.model.items)
        self.run_button.setEnabled(not busy and has_rows)
        self.cancel_button.setEnabled(busy)
        self.import_button.setEnabled(not busy)
        self.input.setReadOnly(busy)
        for button in (self.export_jsonl_button, self.export_csv_button):
            button.setEnabled(not busy and ran)


def _prompt(row: BatchRow, tokenizer, templated: bool) -> str | dict:
    """What the engine gets for a row: the chat template's rendering when the model has one (a plain prompt as
    one user message), else the plain text."""
    if not templated:
        if row.messages is not None:
            raise ValueError("the model has no chat template, so a row of chat messages cannot be sent")
        return row.prompt
    return chat_prompt(tokenizer, row.messages or [{"role": "user", "content": row.prompt}])


def _muted(text: str = "") -> QLabel:
    label = QLabel(text)
    label.setForegroundRole(QPalette.ColorRole.PlaceholderText)
    return label


def _spin(box, low, high, value, step):
    box.setRange(low, high)
    if isinstance(box, QDoubleSpinBox):
        box.setDecimals(2)
    box.setSingleStep(step)
    box.setValue(value)
    return box
