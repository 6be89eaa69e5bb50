"""The models page's Hugging Face Hub card: search (with whether each result fits this machine's memory), download
with progress, speed and cancel, and the downloads an earlier run or a failure left unfinished, to resume or discard.

Searching and downloading touch the network, so they run on worker threads and never on the UI thread. A worker
reports through the panel's signals with dataclass payloads; Qt queues each emission to the UI thread. Every
failure (no network, no such repo, a download breaking off, a full disk) is said through `say`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from PySide6.QtCore import Qt, Signal, Slot
from PySide6.QtWidgets import QHBoxLayout, QLabel, QLineEdit, QProgressBar, QPushButton, QVBoxLayout, QWidget

from app.library import hub_models, machine
from app.library.hub_models import HubError, InterruptedPull, human_size
from app.library.hub_search import HubModel, HubOffline, search_hub
from ui.widgets.cards import card, muted
from ui.widgets.rows_table import results_model, rows_table

SEARCH_LIMIT = 30
PROGRESS_INTERVAL_S = 0.1  # at most this often a download's progress crosses to the UI thread (and at its end)
OFFLINE = "Offline: the Hub cannot be reached. The library still works."

Say = Callable[[str, str | None], None]  # (sentence, tone: "ok" | "warn" | "error" | None)


# ---- worker payloads ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchDone:
    query: str
    results: list[HubModel]


@dataclass(frozen=True)
class SearchFailed:
    query: str
    message: str
    offline: bool


@dataclass(frozen=True)
class DownloadProgress:
    model: str
    done: int  # bytes
    total: int
    bytes_per_s: float


@dataclass(frozen=True)
class DownloadDone:
    model: str
    path: str  # the snapshot directory


@dataclass(frozen=True)
class DownloadFailed:
    model: str
    message: str
    cancelled: bool


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
    # emitted on worker threads, received on the UI thread
    search_done = Signal(object)  # SearchDone
    search_failed = Signal(object)  # SearchFailed
    download_progress = Signal(object)  # DownloadProgress
    download_done = Signal(object)  # DownloadDone
    download_failed = Signal(object)  # DownloadFailed

    def __init__(self, say: Say, endpoint: str | None = None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.say = say
        self.endpoint = endpoint  # None: huggingface_hub's (HF_ENDPOINT or the public Hub)
        self._cancel: threading.Event | None = None  # set while a download runs
        self._downloading = ""
        self._searching = False
        self.engine_options: dict = {}  # LLM keyword arguments loads will use: the fit verdicts count them
        self._memory = machine.memory_for(self.engine_options)  # taken again with each search's results
        self.interrupted: list[InterruptedRow] = []
        self._build()
        self.search_done.connect(self._on_search_done)
        self.search_failed.connect(self._on_search_failed)
        self.download_progress.connect(self._on_progress)
        self.download_done.connect(self._on_download_done)
        self.download_failed.connect(self._on_download_failed)
        self.refresh_interrupted()

    def _build(self) -> None:
        hub_card, hub = card("Hugging Face Hub")
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
        hub.addSpacing(6)
        hub.addLayout(search_row)
        hub.addSpacing(4)
        hub.addWidget(self.results_view, 1)
        hub.addSpacing(4)
        hub.addLayout(download_row)
        hub.addWidget(self.progress_text)
        hub.addLayout(self.interrupted_box)
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
        """Search the Hub for the query box's text on a worker thread; results arrive as search_done."""
        query = self.query.text().strip()
        self._searching = True
        self.sync()
        self.say(f"Searching the Hub for {query!r}…" if query else "Listing the most downloaded models…", None)
        worker = threading.Thread(target=self._search, args=(query,), name="kvstudio-hub-search", daemon=True)
        worker.start()
        return worker

    def _search(self, query: str) -> None:
        try:
            self.search_done.emit(SearchDone(query, search_hub(query, SEARCH_LIMIT, self.endpoint)))
        except HubOffline as e:
            self.search_failed.emit(SearchFailed(query, str(e), offline=True))
        except Exception as e:
            self.search_failed.emit(SearchFailed(query, str(e) or type(e).__name__, offline=False))

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
        """Pull `model` on a worker thread (one at a time; None while another runs); an interrupted earlier pull
        of it resumes. Progress arrives as download_progress, the end as download_done or download_failed."""
        if self._cancel is not None:
            return None
        self._cancel = threading.Event()
        self._downloading = model
        self.progress.setValue(0)
        self.progress.setTextVisible(True)
        self.progress_text.setText(f"{model}: starting…")
        self.progress_text.show()
        self.say(f"Downloading {model}…", None)
        worker = threading.Thread(
            target=self._download, args=(model, self._cancel), name="kvstudio-hub-pull", daemon=True
        )
        worker.start()
        self.refresh_interrupted()  # the one now running is no longer offered for resuming
        return worker

    def _download(self, model: str, cancel: threading.Event) -> None:
        start = time.monotonic()
        last = 0.0
        first_done: int | None = None  # bytes already there (a resumed pull): not counted in the speed

        def progress(done: int, total: int) -> None:
            nonlocal last, first_done
            now = time.monotonic()
            if first_done is None:
                first_done = done
            if now - last < PROGRESS_INTERVAL_S and done < total:
                return
            last = now
            speed = (done - first_done) / max(now - start, 1e-6)
            self.download_progress.emit(DownloadProgress(model, done, total, speed))

        try:
            path = hub_models.pull(model, progress=progress, endpoint=self.endpoint, cancel=cancel)
        except HubError as e:
            self.download_failed.emit(DownloadFailed(model, str(e), cancelled=cancel.is_set()))
        except Exception as e:
            self.download_failed.emit(DownloadFailed(model, str(e) or type(e).__name__, cancelled=False))
        else:
            self.download_done.emit(DownloadDone(model, str(path)))

    @Slot()
    def cancel_download(self) -> None:
        """Stop the running download between two chunks; what arrived is kept, and it can be resumed."""
        if self._cancel is not None:
            self._cancel.set()
            self.progress_text.setText(f"{self._downloading}: cancelling…")

    @Slot(object)
    def _on_progress(self, p: DownloadProgress) -> None:
        self.progress.setValue(100 if p.total == 0 else int(100 * p.done / p.total))
        self.progress_text.setText(
            f"{p.model}: {human_size(p.done)} of {human_size(p.total)}, {human_size(p.bytes_per_s)}/s"
        )

    @Slot(object)
    def _on_download_done(self, done: DownloadDone) -> None:
        self._finish_download()
        self.progress.setValue(100)
        self.say(f"Downloaded {done.model}; it is in the library.", "ok")
        self.progress_text.setText(f"{done.model}: done.")

    @Slot(object)
    def _on_download_failed(self, failed: DownloadFailed) -> None:
        self._finish_download()
        if failed.cancelled:
            self.say(f"Download of {failed.model} cancelled; Resume below continues where it stopped.", None)
            self.progress_text.setText(f"{failed.model}: cancelled.")
        else:
            self.say(f"Download of {failed.model} failed: {failed.message}", "error")
            self.progress_text.setText(f"{failed.model}: failed.")

    def _finish_download(self) -> None:
        self._cancel = None
        self._downloading = ""
        self.refresh_interrupted()

    # ---- interrupted downloads ----------------------------------------------------------------------------
    @Slot()
    def refresh_interrupted(self) -> None:
        """List again the downloads left unfinished (by a failure, a cancel, or an earlier run of the app)."""
        for row in self.interrupted:
            self.interrupted_box.removeWidget(row)
            row.hide()  # deleteLater waits for the event loop; until then it would still paint where it was
            row.deleteLater()
        running = self._downloading.partition("@")[0]
        self.interrupted = [InterruptedRow(p) for p in hub_models.list_interrupted() if p.repo_id != running]
        for row in self.interrupted:
            row.resume_button.clicked.connect(lambda _=False, p=row.pull: self.download(p.model))
            row.discard_button.clicked.connect(lambda _=False, p=row.pull: self.discard(p.repo_id))
            self.interrupted_box.addWidget(row)
        self.sync()

    def interrupted_row(self, repo_id: str) -> InterruptedRow:
        """The row of `repo_id`'s unfinished download (ValueError when there is none)."""
        for row in self.interrupted:
            if row.pull.repo_id == repo_id:
                return row
        raise ValueError(f"repo_id: no interrupted download of {repo_id!r}")

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
        downloading = self._cancel is not None
        self.download_button.setEnabled(not downloading and self.selected_result() is not None)
        self.cancel_button.setEnabled(downloading)
        self.search_button.setEnabled(not self._searching)
        for row in self.interrupted:
            row.resume_button.setEnabled(not downloading)
