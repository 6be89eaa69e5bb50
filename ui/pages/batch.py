"""The batch page: prompts pasted, imported or dropped (.txt / .jsonl / .csv), one sampling setup for all rows (a
file's rows may override it), every row submitted at once so the engine batches them continuously, per-row status,
progress with an estimate of the time left, cancel, a filter over the results, and the results exported to JSONL
or CSV or saved as a named run to reopen later.

Outputs arrive as request_update signals, up to one per running row per engine step. A slot only records
them; a timer repaints the changed rows a few times a second, so a large batch never floods the UI thread.
Rows go to the engine in slices of SUBMIT_SLICE per turn of the event loop, for the same reason.
"""

from __future__ import annotations

import html
import itertools
import time
from pathlib import Path

from PySide6.QtCore import QEvent, QMimeData, QObject, Qt, QTimer
from PySide6.QtGui import QDragEnterEvent, QDropEvent
from PySide6.QtWidgets import (
    QAbstractItemView,
    QFileDialog,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QSplitter,
    QTableView,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

from app import batch_runs
from app.batch_io import BatchFileError, export_results, load_rows, parse_text
from engine import SamplingParams
from engine.structured_output import StructuredOutputsParams
from ui.bridge import EngineBridge, RequestFailed, RequestUpdate
from ui.widgets.batch_progress import RunProgress
from ui.widgets.batch_table import CANCELLED, DONE, FAILED, QUEUED, RUNNING, BatchItem, BatchTableModel
from ui.widgets.cards import muted
from ui.widgets.sampling_form import SamplingForm
from ui.widgets.saved_runs import SavedRunsButton, ask_save_name
from ui.widgets.status_line import StatusLine

REPAINT_INTERVAL_MS = 100
_DRAG_EVENTS = (QEvent.Type.DragEnter, QEvent.Type.DragMove, QEvent.Type.Drop)
SUBMIT_SLICE = 64  # rows rendered and submitted per turn of the event loop


class BatchPage(QWidget):
    def __init__(self, bridge: EngineBridge, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.bridge = bridge
        self.model = BatchTableModel(self)
        self._run_ids = itertools.count()  # each Run's number: slices of an older run stop submitting
        self._requests: dict[str, int] = {}  # request id -> row, for the rows still running
        self._next_row: int | None = None  # the first row not yet submitted; None once all are
        self._run = -1  # the current run's number, in its request ids
        self._shared: dict = {}  # the current run's shared sampling setup
        self._dirty: set[int] = set()  # rows changed since the last repaint
        self._started = 0.0
        self._repaint = QTimer(self, interval=REPAINT_INTERVAL_MS, timeout=self._flush)
        self._build()
        self.setAcceptDrops(True)
        # The prompt box would take a dropped file as text (its path); its viewport's drags come here instead.
        self.input.viewport().installEventFilter(self)
        bridge.request_update.connect(self._on_update)
        bridge.request_failed.connect(self._on_failed)
        # Methods, not lambdas: Qt drops the connections with the page.
        bridge.model_loaded.connect(self._describe_prompts)
        bridge.connection_changed.connect(self._describe_prompts)
        self._describe_prompts()

    @property
    def running(self) -> bool:
        return bool(self._requests) or self._next_row is not None

    # ---- layout -------------------------------------------------------------------------------------------
    def _build(self) -> None:
        self.input = QPlainTextEdit(
            placeholderText="Paste prompts here, one per line — or import a .txt, .jsonl or .csv file"
        )
        self.input.setTabChangesFocus(True)  # a prompt has no use for a tab character; Tab goes on to Import…
        self.input.textChanged.connect(self._on_pasted)
        self.import_button = QPushButton("Import…")
        self.import_button.clicked.connect(self._choose_import)
        self.source = muted("No prompts yet")
        self.mode = muted()
        prompts = QGroupBox("Prompts")
        pv = QVBoxLayout(prompts)
        pv.addWidget(self.input, 1)
        row = QHBoxLayout()
        row.addWidget(self.import_button)
        row.addWidget(self.source, 1)
        row.addWidget(self.mode)
        pv.addLayout(row)

        self.sampling = SamplingForm(("temperature", "top_p", "max_tokens"), max_tokens=256)
        note = muted(
            "For every row; a .jsonl or .csv row may set its own temperature, top_p, top_k, max_tokens, seed or "
            'stop, and a response_format ("json_object" or a JSON schema) its reply keeps to.'
        )
        note.setWordWrap(True)
        sampling = QGroupBox("Sampling")
        sv = QVBoxLayout(sampling)
        sv.addWidget(self.sampling)
        sv.addWidget(note)
        sv.addStretch(1)
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
        self.progress = RunProgress()
        self.progress.show_rows(0)
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
        self.table.setTabKeyNavigation(False)  # Tab goes on to the row's detail; the arrows move between rows
        self.table.setWordWrap(False)
        self.table.verticalHeader().hide()
        self.table.verticalHeader().setDefaultSectionSize(self.fontMetrics().height() + 8)
        header = self.table.horizontalHeader()
        header.setHighlightSections(False)
        # Fixed widths, not ResizeToContents: measuring every row on each repaint would cost a big batch dearly.
        for column, width in ((0, 44), (1, 300), (2, 88), (3, 64)):
            header.setSectionResizeMode(column, QHeaderView.Interactive)
            header.resizeSection(column, width)
        header.setSectionResizeMode(4, QHeaderView.Stretch)
        self.table.selectionModel().selectionChanged.connect(lambda *_: self._show_detail())
        self.detail = QTextBrowser(placeholderText="Select a row to read its prompt and output")
        self.filter = QLineEdit(
            placeholderText="Filter: rows whose prompt or output contains…", clearButtonEnabled=True
        )
        self.filter.textChanged.connect(lambda: self._apply_filter(range(len(self.model.items))))
        self.shown = muted()
        self.save_button = QPushButton("Save run…")
        self.save_button.clicked.connect(self._ask_save)
        self.saved_runs = SavedRunsButton()
        self.saved_runs.open_requested.connect(self.open_run)
        self.saved_runs.delete_requested.connect(self.delete_run)
        tools = QHBoxLayout()
        tools.addWidget(self.filter, 1)
        tools.addWidget(self.shown)
        tools.addWidget(self.save_button)
        tools.addWidget(self.saved_runs)

        # The selected row's whole prompt and output under the table, as wide as it: the Output column cuts a
        # reply to one line, and a pane beside the table left both narrow.
        results = QSplitter(Qt.Vertical)
        results.addWidget(self.table)
        results.addWidget(self.detail)
        results.setStretchFactor(0, 3)
        results.setStretchFactor(1, 2)
        bottom = QWidget()
        bv = QVBoxLayout(bottom)
        bv.setContentsMargins(0, 0, 0, 0)
        bv.addLayout(actions)
        bv.addLayout(tools)
        bv.addWidget(results, 1)

        splitter = QSplitter(Qt.Vertical)
        splitter.addWidget(top)
        splitter.addWidget(bottom)
        splitter.setStretchFactor(1, 1)
        splitter.setSizes([200, 500])
        self.status = StatusLine()
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
            self.status.say(f"Could not import: {e}")
            return False
        self.input.blockSignals(True)  # the file's rows replace the pasted ones; typing again replaces them back
        self.input.clear()
        self.input.blockSignals(False)
        self.model.set_rows(rows)
        self.source.setText(f"{len(rows)} prompt{'s' * (len(rows) != 1)} from {Path(path).name}")
        self._after_new_rows()
        self.status.say(f"Imported {len(rows)} prompts from {Path(path).name}.")
        return True

    def _choose_import(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Import prompts", "", "Prompts (*.txt *.jsonl *.csv);;All files (*)"
        )
        if path:
            self.import_file(path)

    def import_drop(self, mime: QMimeData) -> bool:
        """Import the one local file a drag brings; anything else is refused in words."""
        if self.running:
            self.status.say("A run is going: cancel it or let it finish before importing.")
            return False
        files = [url.toLocalFile() for url in mime.urls() if url.isLocalFile()]
        if len(mime.urls()) != 1 or not files:
            self.status.say("Drop one prompt file from this computer (.txt, .jsonl or .csv).")
            return False
        return self.import_file(files[0])

    def dragEnterEvent(self, event: QDragEnterEvent) -> None:
        if event.mimeData().hasUrls() and not self.running:
            event.acceptProposedAction()

    def dropEvent(self, event: QDropEvent) -> None:
        event.acceptProposedAction()  # taken either way: a refused file is said in the status line
        self.import_drop(event.mimeData())

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:
        if event.type() in _DRAG_EVENTS and watched is self.input.viewport() and event.mimeData().hasUrls():
            (self.dropEvent if event.type() == QEvent.Type.Drop else self.dragEnterEvent)(event)
            return True
        return super().eventFilter(watched, event)

    def _after_new_rows(self) -> None:
        self.progress.show_rows(len(self.model.items))
        self._apply_filter(range(len(self.model.items)))
        self.status.say("")
        self._show_detail()
        self._sync_buttons()

    def _describe_prompts(self, *_) -> None:
        """Say (in a tooltip) whether prompts go through a chat template: the same text means different things
        to the model either way."""
        target = self.bridge.target
        if target is None:
            text, hint = "", "No model is loaded yet."
        elif target.chat_templated():
            text, route = target.chat_route()
            hint = (
                f'Each line is sent as a user message {route}; .jsonl rows may give whole conversations as "messages".'
            )
        else:
            text, hint = (
                "Raw text",
                'The model has no chat template: each line is sent as raw text, and rows given as "messages" fail.',
            )
        self.mode.setText(text)
        for widget in (self.input, self.mode, self.run_button):
            widget.setToolTip(hint)

    # ---- running ----------------------------------------------------------------------------------------------
    def run(self) -> None:
        """Submit every row: the engine's scheduler batches them, step by step."""
        if self.running:
            return
        if not self.model.items:
            self.status.say("Nothing to run: paste prompts (one per line) or import a file.")
            return
        if not self.bridge.ready():
            self.status.say("No model is loaded yet.")
            return
        self._run = next(self._run_ids)
        self._shared = self.sampling.params()
        self._next_row = 0
        self.model.reset_results()
        default_budget = self._shared["max_tokens"]
        for item in self.model.items:
            item.budget = default_budget if item.row.max_tokens is None else item.row.max_tokens
        self._started = time.perf_counter()
        self.progress.show_run(self.model, 0.0, self.running)
        self._repaint.start()
        self._submit_slice(self._run)
        self._sync_buttons()

    def _submit_slice(self, run: int) -> None:
        """Render and submit the next SUBMIT_SLICE rows, then let the event loop turn before the next slice: a
        batch of thousands goes in within a few frames without freezing the window, and the engine takes each
        slice into its running batch as it comes."""
        if run != self._run or self._next_row is None:  # cancelled, or a newer run began
            return
        # Where rows go is looked up per slice: a model loaded (or an endpoint connected) mid-run takes the rest.
        chats, shared, remote = self.bridge.chat_templated(), self._shared, self.bridge.remote
        items = self.model.items
        first, end = self._next_row, min(self._next_row + SUBMIT_SLICE, len(items))
        # The slice's prompts are all rendered before any is submitted: once the engine thread is busy it
        # competes for the GIL, and rendering templates against it would hold up the UI thread for longer.
        ready = []
        for i in range(first, end):
            row = items[i].row
            try:
                if row.response_format is not None and remote is not None:
                    # The connected endpoint is sent sampling fields only: the reply would not keep to the format.
                    raise ValueError("a response_format is kept by this computer's engine: disconnect to run this row")
                params = SamplingParams(**(shared | row.overrides()))
                if chats:
                    ready.append(
                        (i, self.bridge.prepare_chat(row.messages or [{"role": "user", "content": row.prompt}]), params)
                    )
                elif row.messages is not None:
                    raise ValueError("the model has no chat template, so a row of chat messages cannot be sent")
                else:
                    ready.append((i, row.prompt, params))
            except Exception as e:  # a template error, a bad override: this row fails, in words
                items[i].status, items[i].error = FAILED, str(e) or type(e).__name__
        for i, prompt, params in ready:
            try:
                items[i].submitted = time.perf_counter()
                submit = self.bridge.submit if isinstance(prompt, str) else self.bridge.submit_chat
                self._requests[submit(prompt, params)] = i  # the bridge's ids are unique
            except Exception as e:  # a full queue, an engine that is stopping
                items[i].status, items[i].error = FAILED, str(e) or type(e).__name__
        self._dirty.update(range(first, end))
        self._next_row = end if end < len(items) else None
        if self._next_row is not None:
            QTimer.singleShot(0, self, lambda: self._submit_slice(run))
        elif not self._requests:  # every row failed before reaching the engine, or all have finished
            self._end_run()

    def cancel(self) -> None:
        """Abort every unfinished row (the engine frees their blocks) and submit no more."""
        if not self.running:
            return
        for rid, i in self._requests.items():
            self.bridge.abort(rid)
            self.model.items[i].status = CANCELLED
        unsubmitted = len(self.model.items) if self._next_row is None else self._next_row
        for item in self.model.items[unsubmitted:]:
            item.status = CANCELLED
        self._requests.clear()
        self._next_row = None
        self._end_run()

    def _on_update(self, update: RequestUpdate) -> None:
        i = self._requests.get(update.request_id)
        if i is None:
            return
        item = self.model.items[i]
        item.output, item.tokens, item.status = update.text, update.num_tokens, RUNNING
        if update.finished:
            item.status, item.finish_reason = DONE, update.finish_reason
            item.seconds = time.perf_counter() - item.submitted
            del self._requests[update.request_id]
        self._dirty.add(i)
        if not self.running:
            self._end_run()

    def _on_failed(self, failure: RequestFailed) -> None:
        i = self._requests.pop(failure.request_id, None)
        if i is None:
            return
        item = self.model.items[i]
        item.status, item.error = FAILED, failure.message
        self._dirty.add(i)
        if not self.running:
            self._end_run()

    def _flush(self) -> None:
        """Repaint the rows changed since the last call; show progress and throughput."""
        if self._dirty:
            self.model.rows_changed(min(self._dirty), max(self._dirty))
            if self._selected_row() in self._dirty:  # the pane under the table follows the reply as it grows
                self._show_detail()
            if self.filter.text():  # a growing reply may come to match the filter
                self._apply_filter(self._dirty)
            self._dirty.clear()
        items = self.model.items
        elapsed = time.perf_counter() - self._started
        tokens = sum(item.tokens for item in items)
        self.progress.show_run(self.model, tokens / max(elapsed, 1e-3), self.running)
        if self.running:
            self.status.say(
                f"Running {len(items)} prompts: {self.model.count(RUNNING)} generating, "
                f"{self.model.count(QUEUED)} queued · {tokens:,} tokens, "
                f"{tokens / max(elapsed, 1e-3):,.0f} tokens/s"
            )

    def _end_run(self) -> None:
        self._repaint.stop()
        self._dirty.update(range(len(self.model.items)))
        self._flush()
        elapsed = time.perf_counter() - self._started
        parts = [f"{n} {what}" for what in (DONE, FAILED, CANCELLED) if (n := self.model.count(what))]
        first_error = next((item.error for item in self.model.items if item.error), None)
        tokens = sum(item.tokens for item in self.model.items)
        self.status.say(
            f"{', '.join(parts)} in {elapsed:.1f} s · {tokens:,} tokens, "
            f"{tokens / max(elapsed, 1e-3):,.0f} tokens/s" + (f" · first error: {first_error}" if first_error else "")
        )
        self._sync_buttons()

    # ---- saved runs -------------------------------------------------------------------------------------------
    def save_run(self, name: str) -> bool:
        """Save the finished run's rows and results under `name` (replacing a run of that name)."""
        if self.running or not self._ran():
            self.status.say("Nothing to save yet: run the batch, and save it when it has finished.")
            return False
        try:
            batch_runs.save_run(name, [item.row for item in self.model.items], self.model.results())
        except BatchFileError as e:
            self.status.say(f"Could not save the run: {e}", "error")
            return False
        self.status.say(f"Saved the run as {name.strip()!r}.")
        return True

    def open_run(self, name: str) -> bool:
        """Replace the rows with a saved run's, its results included."""
        if self.running:
            self.status.say("A run is going: cancel it or let it finish before opening another.")
            return False
        try:
            saved = batch_runs.load_run(name)
        except BatchFileError as e:
            self.status.say(f"Could not open: {e}", "error")
            return False
        self.input.blockSignals(True)  # as for an imported file: typing again replaces the rows
        self.input.clear()
        self.input.blockSignals(False)
        self.model.set_items([BatchItem.restored(row, result) for row, result in zip(saved.rows, saved.results)])
        n = len(saved.rows)
        self.source.setText(f"{n} prompt{'s' * (n != 1)} from the saved run {name!r}")
        self._after_new_rows()
        self.progress.show_run(self.model, 0.0, self.running)
        self.status.say(f"Opened the saved run {name!r}.")
        return True

    def delete_run(self, name: str) -> bool:
        try:
            batch_runs.delete_run(name)
        except BatchFileError as e:
            self.status.say(f"Could not delete: {e}", "error")
            return False
        self.status.say(f"Deleted the saved run {name!r}.")
        return True

    def _ask_save(self) -> None:
        name = ask_save_name(self, self.model.items[0].row.text if self.model.items else "")
        if name:
            self.save_run(name)

    # ---- export -----------------------------------------------------------------------------------------------
    def export(self, path: str | Path) -> bool:
        """Write the results to `path`, as JSONL or CSV by its suffix; a failure is said in the status line."""
        try:
            export_results(self.model.results(), path)
        except BatchFileError as e:
            self.status.say(f"Could not export: {e}")
            return False
        self.status.say(f"Exported {len(self.model.items)} results to {path}.")
        return True

    def _choose_export(self, suffix: str, file_filter: str) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export results", f"batch-results{suffix}", file_filter)
        if path:
            self.export(path if Path(path).suffix.lower() == suffix else path + suffix)

    # ---- small helpers ----------------------------------------------------------------------------------------
    def _selected_row(self) -> int | None:
        selected = self.table.selectionModel().selectedRows()
        return selected[0].row() if selected else None

    def _show_detail(self) -> None:
        row = self._selected_row()
        if row is None:
            self.detail.clear()
            return
        item = self.model.items[row]
        turns = item.row.messages or [{"role": "prompt", "content": item.row.text}]
        parts = [_block(m["role"].capitalize(), m["content"]) for m in turns]
        if item.row.response_format is not None:
            parts.append(_block("Reply keeps to", _format_name(item.row.response_format)))
        if item.error:
            parts.append(_block("Error", item.error))
        else:
            parts.append(_block(f"Output · {item.status} · {item.tokens} tokens", item.output or "…"))
        self.detail.setHtml("".join(parts))

    def _apply_filter(self, rows) -> None:
        """Hide the given rows that do not match the filter (case-insensitive); say how many rows show."""
        needle = self.filter.text().casefold()
        for row in rows:
            self.table.setRowHidden(row, bool(needle) and not self.model.matches(row, needle))
        total = len(self.model.items)
        shown = sum(not self.table.isRowHidden(row) for row in range(total)) if needle else total
        self.shown.setText(f"{shown} of {total} rows" if needle else "")

    def _ran(self) -> bool:
        return any(item.status != QUEUED for item in self.model.items)

    def _sync_buttons(self) -> None:
        busy, has_rows = self.running, bool(self.model.items)
        ran = self._ran()
        self.run_button.setEnabled(not busy and has_rows)
        self.cancel_button.setEnabled(busy)
        self.import_button.setEnabled(not busy)
        self.input.setReadOnly(busy)
        self.saved_runs.setEnabled(not busy)
        for button in (self.export_jsonl_button, self.export_csv_button, self.save_button):
            button.setEnabled(not busy and ran)


def _format_name(fmt: StructuredOutputsParams) -> str:
    return "any JSON object" if fmt.json_object else f"the JSON schema {fmt.json}"


def _block(title: str, text: str) -> str:
    """A titled paragraph of the detail pane, the text kept as written (line breaks, spaces)."""
    return (
        f"<p style='margin-bottom: 2px'><b>{html.escape(title)}</b></p>"
        f"<p style='white-space: pre-wrap; margin-top: 0'>{html.escape(text)}</p>"
    )
