"""The Hugging Face Hub's work for the window: search, a repo's files and download on worker threads, reported as Qt
signals with dataclass payloads; the models page's Hub card only reacts to them.

All touch the network, so they never run on the UI thread. Each worker emits from its own thread, and Qt queues
the emission to the receivers' thread. Every failure (no network, no such repo, a download breaking off, a full
disk) arrives as a payload that says why in words. A worker that ends after its bridge was deleted (the page
closed meanwhile) emits nothing.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from PySide6.QtCore import QObject, Signal, Slot

from app.library import pulls
from app.library.hub_files import HubError, HubOffline
from app.library.hub_search import HubModel, hub_reachable, search_hub

SEARCH_LIMIT = 30
PROGRESS_INTERVAL_S = 0.1  # at most this often a download's progress crosses to the UI thread (and at its end)


@dataclass(frozen=True)
class HubChecked:
    reachable: bool  # False: the Hub could not be reached (no network, DNS, a proxy refusing)


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
class FilesDone:
    repo: str  # as list_files() was given it
    files: pulls.RepoFiles


@dataclass(frozen=True)
class FilesFailed:
    repo: str
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
    path: str  # the snapshot directory, or the GGUF file in it


@dataclass(frozen=True)
class DownloadFailed:
    model: str
    message: str
    cancelled: bool


@dataclass
class _Lifetime:
    """Whether the bridge's C++ object still exists, under a lock a worker holds while it emits: the UI thread
    deletes the bridge with its page, and a signal emitted on a deleted QObject raises in the worker."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    alive: bool = True

    def end(self) -> None:
        with self.lock:
            self.alive = False


class HubBridge(QObject):
    # emitted on worker threads, received on the receivers' (the UI) thread
    hub_checked = Signal(object)  # HubChecked
    search_done = Signal(object)  # SearchDone
    search_failed = Signal(object)  # SearchFailed
    files_done = Signal(object)  # FilesDone
    files_failed = Signal(object)  # FilesFailed
    download_progress = Signal(object)  # DownloadProgress
    download_done = Signal(object)  # DownloadDone
    download_failed = Signal(object)  # DownloadFailed

    def __init__(self, endpoint: str | None = None, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.endpoint = endpoint  # None: huggingface_hub's (HF_ENDPOINT or the public Hub)
        self._cancel: threading.Event | None = None  # set while a download runs
        self._downloading: str | None = None
        self._lifetime = _Lifetime()
        self.destroyed.connect(self._lifetime.end)  # a plain callable: the bridge's own slots are gone by then
        # Connected first, so the download is over for every later receiver of the same signals.
        self.download_done.connect(self._download_ended)
        self.download_failed.connect(self._download_ended)

    @property
    def downloading(self) -> str | None:
        """The model being downloaded (as download() was given it), or None."""
        return self._downloading

    def _emit(self, signal: str, payload: object) -> None:
        """Emit `signal` from a worker, unless the bridge has been deleted meanwhile."""
        with self._lifetime.lock:
            if self._lifetime.alive:
                getattr(self, signal).emit(payload)

    def check_hub(self) -> threading.Thread:
        """Ask whether the Hub can be reached at all; the answer arrives as hub_checked."""
        worker = threading.Thread(target=self._check_hub, name="kvstudio-hub-check", daemon=True)
        worker.start()
        return worker

    def _check_hub(self) -> None:
        self._emit("hub_checked", HubChecked(hub_reachable(self.endpoint)))

    def search(self, query: str) -> threading.Thread:
        """Search the Hub's text-generation models for `query` ("" lists the most downloaded); the answer arrives
        as search_done or search_failed."""
        worker = threading.Thread(target=self._search, args=(query,), name="kvstudio-hub-search", daemon=True)
        worker.start()
        return worker

    def _search(self, query: str) -> None:
        try:
            self._emit("search_done", SearchDone(query, search_hub(query, SEARCH_LIMIT, self.endpoint)))
        except HubOffline as e:
            self._emit("search_failed", SearchFailed(query, str(e), offline=True))
        except Exception as e:
            self._emit("search_failed", SearchFailed(query, str(e) or type(e).__name__, offline=False))

    def list_files(self, repo: str) -> threading.Thread:
        """Ask the Hub what `repo` offers (its GGUF files, or the files a pull fetches); the answer arrives as
        files_done or files_failed."""
        worker = threading.Thread(target=self._list_files, args=(repo,), name="kvstudio-hub-files", daemon=True)
        worker.start()
        return worker

    def _list_files(self, repo: str) -> None:
        try:
            self._emit("files_done", FilesDone(repo, pulls.list_files(repo, self.endpoint)))
        except HubOffline as e:
            self._emit("files_failed", FilesFailed(repo, str(e), offline=True))
        except Exception as e:
            self._emit("files_failed", FilesFailed(repo, str(e) or type(e).__name__, offline=False))

    def download(self, model: str) -> threading.Thread | None:
        """Pull `model` (ORG/NAME[@REV][:QUANT], see pulls.pull; one at a time, None while another runs); an
        interrupted earlier pull of it resumes.
        Progress arrives as download_progress, the end as download_done or download_failed."""
        if self._cancel is not None:
            return None
        self._cancel = threading.Event()
        self._downloading = model
        worker = threading.Thread(
            target=self._download, args=(model, self._cancel), name="kvstudio-hub-pull", daemon=True
        )
        worker.start()
        return worker

    def cancel_download(self) -> None:
        """Stop the running download between two chunks; what arrived is kept, and it can be resumed."""
        if self._cancel is not None:
            self._cancel.set()

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
            path = pulls.pull(model, progress=progress, endpoint=self.endpoint, cancel=cancel)
        except HubError as e:
            self.download_failed.emit(DownloadFailed(model, str(e), cancelled=cancel.is_set()))
        except Exception as e:
            self.download_failed.emit(DownloadFailed(model, str(e) or type(e).__name__, cancelled=False))
        else:
            self.download_done.emit(DownloadDone(model, str(path)))

    @Slot(object)
    def _download_ended(self, _: DownloadDone | DownloadFailed) -> None:
        self._cancel = None
        self._downloading = None
