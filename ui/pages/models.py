"""The models page: the local library (load, delete with the space freed, refresh) and the Hugging Face Hub
(search, download with progress, speed and cancel; the library refreshes when a download completes).

Searching and downloading touch the network, so they run on worker threads and never on the UI thread. A worker
reports through the page's signals with dataclass payloads; Qt queues each emission to the UI thread. Every
failure (no network, no such repo, a download breaking off, a full disk) is said in the status line.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from PySide6.QtCore import Qt, Signal, Slot
from PySide6.QtGui import QColor
from PySide6.QtWidgets import (
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from app import hub_models
from app.hub_models import HubError, HubModel, HubOffline, LocalModel, human_size
from ui.bridge import EngineBridge, ModelLoaded, ModelLoadFailed
from ui.widgets.cards import card, muted, section
from ui.widgets.rows_table import library_model, results_model, rows_table

SEARCH_LIMIT = 30
PROGRESS_INTERVAL_S = 0.1  # at most this often a download's progress crosses to the UI thread (and at its end)
OFFLINE = "Offline: the Hub cannot be reached. The library still works."
ERROR_COLOR = QColor("#dc2626")
OK_COLOR = QColor("#16a34a")


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


# ---- the page -----------------------------------------------------------------------------------------------

class ModelsPage(QWidget):
    # emitted on worker threads, received on the UI thread
    search_done = Signal(object)        # SearchDone
    search_failed = Signal(object)      # SearchFailed
    download_progress = Signal(object)  # DownloadProgress
    download_done = Signal(object)      # DownloadDone
    download_failed = Signal(object)    # DownloadFailed

    def __init__(self, bridge: EngineBridge, endpoint: str | None = None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.bridge = bridge
        self.endpoint = endpoint  # None: huggingface_hub's (HF_ENDPOINT or the public Hub)
        self._cancel: threading.Event | None = None  # set while a download runs
        self._downloading = ""
        self._searching = False
        self._pending_delete: LocalModel | None = None
        self._build()
        self.search_done.connect(self._on_search_done)
        self.search_failed.connect(self._on_search_failed)
        self.download_progress.connect(self._on_progress)
        self.download_done.connect(self._on_download_done)
        self.download_failed.connect(self._on_download_failed)
        bridge.model_loaded.connect(self._on_model_loaded)
        bridge.model_load_failed.connect(self._on_model_load_failed)
        self.refresh()
        self._sync()

    # ---- layout -------------------------------------------------------------------------------------------
    def _build(self) -> None:
        self.status = QLabel(wordWrap=True, textInteractionFlags=Qt.TextSelectableByMouse)

        library_card, library = card("Library")
        self.library = library_model(self)
        self.library_view = rows_table(self.library)
        self.library_view.selectionModel().selectionChanged.connect(self._sync)
        self.library_view.doubleClicked.connect(lambda _: self.load_selected())
        self.library_summary = muted()
        self.load_button = QPushButton("Load")
        self.load_button.clicked.connect(self.load_selected)
        self.delete_button = QPushButton("Delete…")
        self.delete_button.clicked.connect(self.ask_delete)
        refresh = QPushButton("Refresh")
        refresh.clicked.connect(self.refresh)
        # a non-modal confirmation under the table: the rest of the page stays usable while it is shown
        self.confirm_text = QLabel(wordWrap=True)
        self.confirm_button = QPushButton("Delete")
        self.confirm_button.clicked.connect(self._confirm_delete)
        keep = QPushButton("Keep")
        keep.clicked.connect(self._cancel_delete)
        self.confirm_bar = QWidget()
        confirm_row = QHBoxLayout(self.confirm_bar)
        confirm_row.setContentsMargins(0, 0, 0, 0)
        confirm_row.addWidget(self.confirm_text, 1)
        confirm_row.addWidget(self.confirm_button)
        confirm_row.addWidget(keep)
        self.confirm_bar.hide()
        library_buttons = QHBoxLayout()
        library_buttons.addWidget(self.library_summary, 1)
        library_buttons.addWidget(refresh)
        library_buttons.addWidget(self.delete_button)
        library_buttons.addWidget(self.load_button)
        library.addSpacing(6)
        library.addWidget(self.library_view, 1)
        library.addWidget(self.confirm_bar)
        library.addLayout(library_buttons)

        hub_card, hub = card("Hugging Face Hub")
        self.query = QLineEdit(placeholderText="Search text-generation models, e.g. SmolLM2")
        self.query.returnPressed.connect(self.search)
        self.search_button = QPushButton("Search")
        self.search_button.clicked.connect(self.search)
        search_row = QHBoxLayout()
        search_row.addWidget(self.query, 1)
        search_row.addWidget(self.search_button)
        self.results = results_model(self)
        self.results_view = rows_table(self.results)
        self.results_view.selectionModel().selectionChanged.connect(self._sync)
        self.results_view.doubleClicked.connect(lambda _: self.download_selected())
        self.progress = QProgressBar()
        self.progress.setRange(0, 100)
        self.progress.setValue(0)
        self.progress_text = muted()
        self.download_button = QPushButton("Download")
        self.download_button.clicked.connect(self.download_selected)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(self.cancel_download)
        download_row = QHBoxLayout()
        download_row.addWidget(self.progress, 1)
        download_row.addWidget(self.cancel_button)
        download_row.addWidget(self.download_button)
        hub.addSpacing(6)
        hub.addLayout(search_row)
        hub.addWidget(self.results_view, 1)
        hub.addLayout(download_row)
        hub.addWidget(self.progress_text)

        cards = QHBoxLayout()
        cards.setSpacing(12)
        cards.addWidget(library_card, 1)
        cards.addWidget(hub_card, 1)

        layout = QVBoxLayout(self)
        layout.setContentsMargins(24, 20, 24, 20)
        layout.setSpacing(12)
        layout.addWidget(section("Models"))
        layout.addWidget(self.status)
        layout.addLayout(cards, 1)

    # ---- library ------------------------------------------------------------------------------------------
    @Slot()
    def refresh(self) -> None:
        """Read the library again (the default GGUF and the runnable models in the Hugging Face cache)."""
        self.library.set_rows(hub_models.list_local_models())
        models = self.library.rows()
        total = sum(m.size for m in models)
        self.library_summary.setText(
            "No models yet: download one from the Hub." if not models else
            f"{len(models)} model{'s' if len(models) != 1 else ''}, {human_size(total)} on disk")
        self._cancel_delete()
        self._sync()

    def selected_model(self) -> LocalModel | None:
        rows = self.library_view.selectionModel().selectedRows()
        return self.library.row(rows[0].row()) if rows else None

    def select_model(self, name: str) -> None:
        """Select the library row of `name` (ValueError when it is not there)."""
        self.library_view.selectRow(self._library_row(name))

    def _library_row(self, name: str) -> int:
        for i, model in enumerate(self.library.rows()):
            if model.name == name:
                return i
        raise ValueError(f"name: no model {name!r} in the library")

    @Slot()
    def load_selected(self) -> None:
        model = self.selected_model()
        if model is not None:
            self.load(model.name)

    def load(self, name: str) -> None:
        """Load a library model into the engine (on the bridge's loader thread)."""
        model = self.library.row(self._library_row(name))
        self._say(f"Loading {model.name}…")
        self.bridge.load_model(str(model.path))

    @Slot(object)
    def _on_model_loaded(self, loaded: ModelLoaded) -> None:
        self._say(f"Loaded {loaded.model} ({loaded.seconds:.1f} s, context {loaded.max_model_len:,}).", OK_COLOR)

    @Slot(object)
    def _on_model_load_failed(self, failed: ModelLoadFailed) -> None:
        self._say(f"Could not load {failed.model}: {failed.message}", ERROR_COLOR)

    @Slot()
    def ask_delete(self) -> None:
        """Show the confirmation for the selected model under the table."""
        model = self.selected_model()
        if model is None:
            return
        self._pending_delete = model
        if model.is_default:
            self.confirm_text.setText(f"{model.name} is the default model: kvstudio fetches it again on next use. "
                                      f"Delete it anyway and free {human_size(model.size)}?")
        else:
            self.confirm_text.setText(f"Delete {model.name} and free {human_size(model.size)}?")
        self.confirm_bar.show()

    @Slot()
    def _confirm_delete(self) -> None:
        model = self._pending_delete
        if model is not None:
            self.delete(model.name, force=model.is_default)  # the confirmation named it the default

    @Slot()
    def _cancel_delete(self) -> None:
        self._pending_delete = None
        self.confirm_bar.hide()

    def delete(self, name: str, force: bool = False) -> int | None:
        """Remove a model from disk; returns the bytes freed, or None when refused or failed (said in the
        status). The default model goes only with force."""
        self._cancel_delete()
        model = next((m for m in self.library.rows() if m.name == name), None)
        if model is not None and model.is_default and not force:
            self._say(f"{name} is the default model; it is kept unless you confirm deleting it anyway.",
                      ERROR_COLOR)
            return None
        try:
            freed = hub_models.remove(name, force=force)
        except (HubError, OSError) as e:
            self._say(f"Could not delete {name}: {e}", ERROR_COLOR)
            return None
        self.refresh()
        self._say(f"Deleted {name}, freed {human_size(freed)}.", OK_COLOR)
        return freed

    # ---- hub: search --------------------------------------------------------------------------------------
    @Slot()
    def search(self) -> threading.Thread:
        """Search the Hub for the query box's text on a worker thread; results arrive as search_done."""
        query = self.query.text().strip()
        self._searching = True
        self._sync()
        self._say(f"Searching the Hub for {query!r}…" if query else "Listing the most downloaded models…")
        worker = threading.Thread(target=self._search, args=(query,), name="kvstudio-hub-search", daemon=True)
        worker.start()
        return worker

    def _search(self, query: str) -> None:
        try:
            self.search_done.emit(SearchDone(query, hub_models.search_hub(query, SEARCH_LIMIT, self.endpoint)))
        except HubOffline as e:
            self.search_failed.emit(SearchFailed(query, str(e), offline=True))
        except Exception as e:  # a Hub error or a malformed answer: said in words, never a crash
            self.search_failed.emit(SearchFailed(query, str(e) or type(e).__name__, offline=False))

    @Slot(object)
    def _on_search_done(self, done: SearchDone) -> None:
        self._searching = False
        self.results.set_rows(done.results)
        n = len(done.results)
        self._say(f"{n} model{'s' if n != 1 else ''} on the Hub" + (f" for {done.query!r}." if done.query else ".")
                  if n else f"No text-generation model on the Hub matches {done.query!r}.")
        self._sync()

    @Slot(object)
    def _on_search_failed(self, failed: SearchFailed) -> None:
        self._searching = False
        self._say(OFFLINE if failed.offline else f"Search failed: {failed.message}", ERROR_COLOR)
        self._sync()

    # ---- hub: download ------------------------------------------------------------------------------------
    def selected_result(self) -> HubModel | None:
        rows = self.results_view.selectionModel().selectedRows()
        return self.results.row(rows[0].row()) if rows else None

    @Slot()
    def download_selected(self) -> None:
        result = self.selected_result()
        if result is not None:
            self.download(result.name)

    def download(self, model: str) -> threading.Thread | None:
        """Pull `model` on a worker thread (one at a time; None while another runs). Progress arrives as
        download_progress; the library refreshes on download_done."""
        if self._cancel is not None:
            return None
        self._cancel = threading.Event()
        self._downloading = model
        self.progress.setValue(0)
        self.progress_text.setText(f"{model}: starting…")
        self._say(f"Downloading {model}…")
        worker = threading.Thread(target=self._download, args=(model, self._cancel), name="kvstudio-hub-pull",
                                  daemon=True)
        worker.start()
        self._sync()
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
        except Exception as e:  # anything else pull did not foresee: said in words, never a crash
            self.download_failed.emit(DownloadFailed(model, str(e) or type(e).__name__, cancelled=False))
        else:
            self.download_done.emit(DownloadDone(model, str(path)))

    @Slot()
    def cancel_download(self) -> None:
        """Stop the running download between two chunks; what arrived is kept, and downloading again resumes."""
        if self._cancel is not None:
            self._cancel.set()
            self.progress_text.setText(f"{self._downloading}: cancelling…")

    def shutdown(self) -> None:
        """The window is closing: stop a running download (it resumes next time)."""
        self.cancel_download()

    @Slot(object)
    def _on_progress(self, p: DownloadProgress) -> None:
        self.progress.setValue(100 if p.total == 0 else int(100 * p.done / p.total))
        self.progress_text.setText(f"{p.model}: {human_size(p.done)} of {human_size(p.total)}, "
                                   f"{human_size(p.bytes_per_s)}/s")

    @Slot(object)
    def _on_download_done(self, done: DownloadDone) -> None:
        self._finish_download()
        self.progress.setValue(100)
        self.refresh()
        self._say(f"Downloaded {done.model}; it is in the library.", OK_COLOR)
        self.progress_text.setText(f"{done.model}: done.")
        self.select_model(done.model)  # a completed pull is always runnable, so it is listed

    @Slot(object)
    def _on_download_failed(self, failed: DownloadFailed) -> None:
        self._finish_download()
        if failed.cancelled:
            self._say(f"Download of {failed.model} cancelled; downloading it again resumes where it stopped.")
            self.progress_text.setText(f"{failed.model}: cancelled.")
        else:
            self._say(f"Download of {failed.model} failed: {failed.message}", ERROR_COLOR)
            self.progress_text.setText(f"{failed.model}: failed.")

    def _finish_download(self) -> None:
        self._cancel = None
        self._downloading = ""
        self._sync()

    # ---- state --------------------------------------------------------------------------------------------
    def _say(self, text: str, color: QColor | None = None) -> None:
        self.status.setStyleSheet(f"color: {color.name()};" if color is not None else "")
        self.status.setText(text)

    @Slot()
    def _sync(self) -> None:
        has_model = self.selected_model() is not None
        self.load_button.setEnabled(has_model)
        self.delete_button.setEnabled(has_model)
        downloading = self._cancel is not None
        self.download_button.setEnabled(not downloading and self.selected_result() is not None)
        self.cancel_button.setEnabled(downloading)
        self.search_button.setEnabled(not self._searching)
