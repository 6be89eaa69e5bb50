"""The models page's Hugging Face Hub card: search (with whether each result fits this machine's memory), download
with progress, speed and cancel, and the downloads an earlier run or a failure left unfinished, to resume or discard.

The card only reacts: searching and downloading run in its HubBridge (ui/hub_bridge.py), whose signals it shows.
Every failure (no network, no such repo, a download breaking off, a full disk) is said through `say`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from PySide6.QtCore import Qt, Slot
from PySide6.QtWidgets import QHBoxLayout, QLabel, QLineEdit, QProgressBar, QPushButton, QVBoxLayout, QWidget

from app.library import hub_models, machine
from app.library.hub_models import HubError, InterruptedPull, human_size
from app.library.hub_search import HubModel
from ui.hub_bridge import DownloadDone, DownloadFailed, DownloadProgress, HubBridge, SearchDone, SearchFailed
from ui.widgets.cards import card, muted
from ui.widgets.rows_table import results_model, rows_table

OFFLINE = "Offline: the Hub cannot be reached. The library still works."

Say = Callable[[str, str | None], None]  # (sentence, tone: "ok" | "warn" | "error" | None)


def interrupted_text(pull: InterruptedPull) -> str:
    if pull.total is None:
        return f"{pull.model}: interrupted, {human_size(pull.done)} downloaded"
    percent = 100 * pull.done // max(pull.total, 1)
    return f"{pull.model}: interrupted at {percent}% ({human_size(pull.done)} of {human_size(pull.total)})"


class InterruptedRow(QWidget):
    """One unfinished download: what it is, how far it got, Resume and Discard."""

    def __init__(self, pull: InterruptedPull) -> None:
        super().__init__()
        self.pull = pull
        self.text = QLabel(interrupted_text(pull))
        self.resume_button = QPushButton("Resume")
        self.discard_button = QPushButton("Discard")
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.text, 1)
        row.addWidget(self.resume_button)
        row.addWidget(self.discard_button)


class HubPanel(QWidget):
    def __init__(self, bridge: HubBridge, say: Say, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.bridge = bridge
        self.say = say
        self._searching = False
        self.engine_options: dict = {}  # LLM keyword arguments loads will use: the fit verdicts count them
        self._memory = machine.memory_for(self.engine_options)  # taken again with each search's results
        self.interrupted: list[InterruptedRow] = []
        self._build()
        bridge.search_done.connect(self._on_search_done)
        bridge.search_failed.connect(self._on_search_failed)
        bridge.download_progress.connect(self._on_progress)
        bridge.download_done.connect(self._on_download_done)
        bridge.download_failed.connect(self._on_download_failed)
        self.refresh_interrupted()

    def _build(self) -> None:
        hub_card, box = card("Hugging Face Hub")
        self.query = QLineEdit(placeholderText="Search text-generation models, e.g. SmolLM2")
        self.query.setClearButtonEnabled(True)
        self.query.returnPressed.connect(self.search)
        self.search_button = QPushButton("Search")
        self.search_button.clicked.connect(self.search)
        search_row = QHBoxLayout()
        search_row.addWidget(self.query, 1)
        search_row.addWidget(self.search_button)
        self.results = results_model(self._fit, self)
        self.results_view = rows_table(self.results)
        self.results_view.selectionModel().selectionChanged.connect(self.sync)
        self.results_view.doubleClicked.connect(lambda _: self.download_selected())
        self.progress = QProgressBar()
        self.progress.setRange(0, 100)
        self.progress.setValue(0)
        self.progress.setTextVisible(False)  # no "0%" before any download
        self.progress_text = muted()
        self.progress_text.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.progress_text.hide()  # shown from the first download on
        self.download_button = QPushButton("Download")
        self.download_button.clicked.connect(self.download_selected)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(self.cancel_download)
        download_row = QHBoxLayout()
        download_row.addWidget(self.progress, 1)
        download_row.addWidget(self.cancel_button)
        download_row.addWidget(self.download_button)
        self.interrupted_box = QVBoxLayout()
        self.interrupted_box.setSpacing(4)
        box.addSpacing(6)
        box.addLayout(search_row)
        box.addSpacing(4)
        box.addWidget(self.results_view, 1)
        box.addSpacing(4)
        box.addLayout(download_row)
        box.addWidget(self.progress_text)
        box.addLayout(self.interrupted_box)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(hub_card)

    def _fit(self, model: HubModel) -> machine.ModelFit | None:
        if model.num_params is None:
            return None
        return machine.check_fit(model.num_params, self._memory, self.engine_options.get("dtype", "auto"))

    # ---- search -------------------------------------------------------------------------------------------
    @Slot()
    def search(self) -> threading.Thread:
        """Search the Hub for the query box's text; the results arrive as the bridge's search_done."""
        query = self.query.text().strip()
        self._searching = True
        self.sync()
        self.say(f"Searching the Hub for {query!r}…" if query else "Listing the most downloaded models…", None)
        return self.bridge.search(query)

    @Slot(object)
    def _on_search_done(self, done: SearchDone) -> None:
        self._searching = False
        self._memory = machine.memory_for(self.engine_options)
        self.results.set_rows(done.results)
        n = len(done.results)
        self.say(
            f"{n} model{'s' if n != 1 else ''} on the Hub" + (f" for {done.query!r}." if done.query else ".")
            if n
            else f"No text-generation model on the Hub matches {done.query!r}.",
            None,
        )
        self.sync()

    @Slot(object)
    def _on_search_failed(self, failed: SearchFailed) -> None:
        self._searching = False
        self.say(OFFLINE if failed.offline else f"Search failed: {failed.message}", "error")
        self.sync()

    # ---- download -----------------------------------------------------------------------------------------
    def selected_result(self) -> HubModel | None:
        rows = self.results_view.selectionModel().selectedRows()
        return self.results.row(rows[0].row()) if rows else None

    @Slot()
    def download_selected(self) -> None:
        result = self.selected_result()
        if result is not None:
            self.download(result.name)

    def download(self, model: str) -> threading.Thread | None:
        """Pull `model` (one at a time; None while another runs); an interrupted earlier pull of it resumes.
        Progress arrives as the bridge's download_progress, the end as download_done or download_failed."""
        worker = self.bridge.download(model)
        if worker is None:
            return None
        self.progress.setValue(0)
        self.progress.setTextVisible(True)
        self.progress_text.setText(f"{model}: starting…")
        self.progress_text.show()
        self.say(f"Downloading {model}…", None)
        self.refresh_interrupted()  # the one now running is no longer offered for resuming
        return worker

    @Slot()
    def cancel_download(self) -> None:
        """Stop the running download between two chunks; what arrived is kept, and it can be resumed."""
        if self.bridge.downloading is not None:
            self.bridge.cancel_download()
            self.progress_text.setText(f"{self.bridge.downloading}: cancelling…")

    @Slot(object)
    def _on_progress(self, p: DownloadProgress) -> None:
        self.progress.setValue(100 if p.total == 0 else int(100 * p.done / p.total))
        self.progress_text.setText(
            f"{p.model}: {human_size(p.done)} of {human_size(p.total)}, {human_size(p.bytes_per_s)}/s"
        )

    @Slot(object)
    def _on_download_done(self, done: DownloadDone) -> None:
        self.refresh_interrupted()
        self.progress.setValue(100)
        self.say(f"Downloaded {done.model}; it is in the library.", "ok")
        self.progress_text.setText(f"{done.model}: done.")

    @Slot(object)
    def _on_download_failed(self, failed: DownloadFailed) -> None:
        self.refresh_interrupted()  # the bridge has ended it: offered for resuming now
        if failed.cancelled:
            self.say(f"Download of {failed.model} cancelled; Resume below continues where it stopped.", None)
            self.progress_text.setText(f"{failed.model}: cancelled.")
        else:
            self.say(f"Download of {failed.model} failed: {failed.message}", "error")
            self.progress_text.setText(f"{failed.model}: failed.")

    # ---- interrupted downloads ----------------------------------------------------------------------------
    @Slot()
    def refresh_interrupted(self) -> None:
        """List again the downloads left unfinished (by a failure, a cancel, or an earlier run of the app)."""
        for row in self.interrupted:
            self.interrupted_box.removeWidget(row)
            row.hide()  # deleteLater waits for the event loop; until then it would still paint where it was
            row.deleteLater()
        running = (self.bridge.downloading or "").partition("@")[0]
        self.interrupted = [InterruptedRow(p) for p in hub_models.list_interrupted() if p.repo_id != running]
        for row in self.interrupted:
            row.resume_button.clicked.connect(lambda _=False, p=row.pull: self.download(p.model))
            row.discard_button.clicked.connect(lambda _=False, p=row.pull: self.discard(p.repo_id))
            self.interrupted_box.addWidget(row)
        self.sync()

    def discard(self, repo_id: str) -> int | None:
        """Delete what an unfinished download left; returns the bytes freed, or None when it failed (said)."""
        try:
            freed = hub_models.discard_interrupted(repo_id)
        except (HubError, OSError) as e:
            self.say(f"Could not discard the download of {repo_id}: {e}", "error")
            return None
        finally:
            self.refresh_interrupted()
        self.say(f"Discarded the unfinished download of {repo_id}, freed {human_size(freed)}.", "ok")
        return freed

    # ---- state --------------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """The window is closing: stop a running download (it can be resumed on the next start)."""
        self.cancel_download()

    @Slot()
    def sync(self) -> None:
        downloading = self.bridge.downloading is not None
        self.download_button.setEnabled(not downloading and self.selected_result() is not None)
        self.cancel_button.setEnabled(downloading)
        self.search_button.setEnabled(not self._searching)
        for row in self.interrupted:
            row.resume_button.setEnabled(not downloading)
