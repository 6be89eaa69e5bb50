"""The models page's Hugging Face Hub card: search (safetensors models and repos of GGUF files, with whether each
fits this machine's memory), a GGUF repo's files (size, quantization, how the engine holds it, whether it fits),
download with progress, speed and cancel, and the downloads an earlier run or a failure left unfinished, to resume
or discard.

The card only reacts: searching and downloading run in its HubBridge (ui/hub_bridge.py), whose signals it shows.
Every failure (no network, no such repo, a download breaking off, a full disk) is said through `say`. Whether the
Hub can be reached is asked when the card is first shown (and on each later showing while it could not be), and
said on the card until a search or a check reaches it: nobody has to search first to learn the Hub is offline.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from PySide6.QtCore import Qt, Slot
from PySide6.QtGui import QShowEvent
from PySide6.QtWidgets import QHBoxLayout, QLabel, QLineEdit, QProgressBar, QPushButton, QVBoxLayout, QWidget

from app.library import machine, pulls
from app.library.footprint import QUANTIZED_AT_LOAD
from app.library.gguf_files import GGUFChoice
from app.library.hub_files import HubError
from app.library.hub_search import HubModel
from app.library.pulls import InterruptedPull
from app.library.quant_types import dtype_name, kept_bits, quant_type
from app.units import byte_size
from ui.hub_bridge import (
    DownloadDone,
    DownloadFailed,
    DownloadProgress,
    FilesDone,
    FilesFailed,
    HubBridge,
    HubChecked,
    SearchDone,
    SearchFailed,
)
from ui.widgets.cards import card, muted
from ui.widgets.rows_table import RowsView, files_model, results_model
from ui.widgets.status_line import StatusLine

OFFLINE = "Offline: the Hub cannot be reached. The library still works."

Say = Callable[[str, str | None], None]  # (sentence, tone: "ok" | "warn" | "error" | None)


def interrupted_text(pull: InterruptedPull) -> str:
    if pull.total is None:
        return f"{pull.model}: interrupted, {byte_size(pull.done)} downloaded"
    percent = 100 * pull.done // max(pull.total, 1)
    return f"{pull.model}: interrupted at {percent}% ({byte_size(pull.done)} of {byte_size(pull.total)})"


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
        self._files_repo: str | None = None  # the GGUF repo whose files the files table shows (or is asking for)
        self._reachable: bool | None = None  # what the last contact with the Hub found; None: not asked yet
        self._checking = False
        self.engine_options: dict = {}  # LLM keyword arguments loads will use: the fit verdicts count them
        self._memory = machine.memory_for(self.engine_options)  # taken again with each search's results
        self.interrupted: list[InterruptedRow] = []
        self._build()
        bridge.hub_checked.connect(self._on_hub_checked)
        bridge.search_done.connect(self._on_search_done)
        bridge.search_failed.connect(self._on_search_failed)
        bridge.files_done.connect(self._on_files_done)
        bridge.files_failed.connect(self._on_files_failed)
        bridge.download_progress.connect(self._on_progress)
        bridge.download_done.connect(self._on_download_done)
        bridge.download_failed.connect(self._on_download_failed)
        self.refresh_interrupted()

    def _build(self) -> None:
        hub_card, box = card("Hugging Face Hub")
        self.query = QLineEdit(placeholderText="Search text-generation models and GGUF files, e.g. SmolLM2")
        self.query.setClearButtonEnabled(True)
        self.query.returnPressed.connect(self.search)
        self.search_button = QPushButton("Search")
        self.search_button.clicked.connect(self.search)
        search_row = QHBoxLayout()
        search_row.addWidget(self.query, 1)
        search_row.addWidget(self.search_button)
        self.offline_note = StatusLine()
        self.offline_note.hide()  # until a check or a search finds the Hub out of reach
        self.results = results_model(self._fit, self)
        self.results_view = RowsView(self.results)
        self.results_view.selectionModel().selectionChanged.connect(self._on_result_selected)
        self.results_view.doubleClicked.connect(lambda _: self.download_selected())
        # a GGUF repo's files, under the results while one is selected
        self.files = files_model(self._file_fit, self._file_kind, self)
        self.files_view = RowsView(self.files)
        self.files_view.selectionModel().selectionChanged.connect(self.sync)
        self.files_view.doubleClicked.connect(lambda _: self.download_selected())
        self.files_text = muted()
        self.files_text.setWordWrap(True)
        self.files_box = QWidget()
        files_layout = QVBoxLayout(self.files_box)
        files_layout.setContentsMargins(0, 0, 0, 0)
        files_layout.addWidget(self.files_text)
        files_layout.addWidget(self.files_view, 1)
        self.files_box.hide()
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
        box.addWidget(self.offline_note)
        box.addSpacing(4)
        box.addWidget(self.results_view, 1)
        box.addWidget(self.files_box, 1)
        box.addSpacing(4)
        box.addLayout(download_row)
        box.addWidget(self.progress_text)
        box.addLayout(self.interrupted_box)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(hub_card)

    def _fit(self, model: HubModel) -> machine.ModelFit | None:
        if model.num_params is None or "safetensors" not in model.formats:
            return None  # a repo of GGUF files: its files table says what each one needs
        return machine.check_fit(model.num_params, self._memory, self.engine_options)

    def _file_fit(self, choice: GGUFChoice) -> machine.ModelFit | None:
        if choice.problem is not None:
            return None
        return machine.check_gguf_file(choice.size, choice.label, self._memory, self.engine_options)

    def _file_kind(self, choice: GGUFChoice) -> tuple[str, str | None, bool]:
        """How the engine will hold a file's weights with the loads' options: (a few words, a sentence, whether
        kvstudio cannot keep its quantized type quantized)."""
        dtype_bytes, quantization = machine.load_format(self._memory, self.engine_options)
        if quantization in QUANTIZED_AT_LOAD:
            fmt = QUANTIZED_AT_LOAD[quantization]
            return f"{kept_bits(fmt):g}-bit ({fmt})", f"Quantized to {quantization} at load", False
        kind = None if choice.label is None else quant_type(choice.label)
        if kind is None or kind.ggml is None:
            return "?", "Its name says no quantization kvstudio knows", False
        if quantization == "none":
            return dtype_name(dtype_bytes), f"{kind.label} dequantized (quantization none)", False
        return kind.loads_as(dtype_bytes), kind.note(dtype_bytes), kind.kept is None and not kind.is_float

    # ---- reaching the Hub ---------------------------------------------------------------------------------
    def showEvent(self, event: QShowEvent) -> None:
        super().showEvent(event)
        if self._reachable is not True and not self._checking:  # never asked, or offline last time: ask again
            self.check_hub()

    def check_hub(self) -> threading.Thread:
        """Ask whether the Hub can be reached; the answer arrives as the bridge's hub_checked."""
        self._checking = True
        return self.bridge.check_hub()

    @Slot(object)
    def _on_hub_checked(self, checked: HubChecked) -> None:
        self._checking = False
        self._set_reachable(checked.reachable)

    def _set_reachable(self, reachable: bool) -> None:
        self._reachable = reachable
        self.offline_note.say("" if reachable else OFFLINE, None if reachable else "error")
        self.offline_note.setVisible(not reachable)

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
        self._set_reachable(True)
        self._memory = machine.memory_for(self.engine_options)
        self.results.set_rows(done.results)
        self._show_files(None)
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
        if failed.offline:
            self._set_reachable(False)
        self.say(OFFLINE if failed.offline else f"Search failed: {failed.message}", "error")
        self.sync()

    # ---- a GGUF repo's files ------------------------------------------------------------------------------
    @Slot()
    def _on_result_selected(self) -> None:
        result = self.selected_result()
        self._show_files(result.name if result is not None and result.is_gguf else None)
        self.sync()

    def _show_files(self, repo: str | None) -> threading.Thread | None:
        """Show `repo`'s GGUF files under the results (asking the Hub for them), or hide the table (None)."""
        self._files_repo = repo
        self.files.set_rows([])
        self.files_box.setVisible(repo is not None)
        if repo is None:
            return None
        self.files_text.setText(f"Listing the GGUF files of {repo}…")
        return self.bridge.list_files(repo)

    @Slot(object)
    def _on_files_done(self, done: FilesDone) -> None:
        if done.repo != self._files_repo:  # another repo was chosen meanwhile
            return
        self._memory = machine.memory_for(self.engine_options)
        choices = done.files.choices
        self.files.set_rows(choices)
        text = f"{len(choices)} GGUF file{'s' if len(choices) != 1 else ''} in {done.repo}: choose one to download"
        if done.files.model_files:
            text += ", or none for its safetensors model"
        self.files_text.setText(text + ". Memory is what it would occupy here, with its KV cache.")
        self.sync()

    @Slot(object)
    def _on_files_failed(self, failed: FilesFailed) -> None:
        if failed.repo != self._files_repo:
            return
        self.files_text.setText(f"The files of {failed.repo} could not be listed.")
        self.say(OFFLINE if failed.offline else f"Could not list the files of {failed.repo}: {failed.message}", "error")

    def selected_file(self) -> GGUFChoice | None:
        rows = self.files_view.selectionModel().selectedRows()
        return self.files.row(rows[0].row()) if rows and self.files_box.isVisibleTo(self) else None

    # ---- download -----------------------------------------------------------------------------------------
    def selected_result(self) -> HubModel | None:
        rows = self.results_view.selectionModel().selectedRows()
        return self.results.row(rows[0].row()) if rows else None

    def _selected_download(self) -> str | None:
        """What Download fetches now: the GGUF file chosen, else a safetensors model chosen; None: nothing yet."""
        result = self.selected_result()
        if result is None:
            return None
        choice = self.selected_file()
        if choice is not None:
            return None if choice.problem is not None else f"{result.name}:{choice.ref}"
        return result.name if "safetensors" in result.formats else None

    @Slot()
    def download_selected(self) -> None:
        choice = self.selected_file()
        if choice is not None and choice.problem is not None:
            self.say(f"Cannot download {choice.name}: it {choice.problem}.", "error")
            return
        model = self._selected_download()
        if model is not None:
            self.download(model)

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
            f"{p.model}: {byte_size(p.done)} of {byte_size(p.total)}, {byte_size(p.bytes_per_s)}/s"
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
        running = self.bridge.downloading
        self.interrupted = [InterruptedRow(p) for p in pulls.list_interrupted() if p.model != running]
        for row in self.interrupted:
            row.resume_button.clicked.connect(lambda _=False, p=row.pull: self.download(p.model))
            row.discard_button.clicked.connect(lambda _=False, p=row.pull: self.discard(p.model))
            self.interrupted_box.addWidget(row)
        self.sync()

    def discard(self, model: str) -> int | None:
        """Delete what the unfinished download of `model` left; returns the bytes freed, or None when it failed
        (said)."""
        try:
            freed = pulls.discard_interrupted(model)
        except (HubError, OSError) as e:
            self.say(f"Could not discard the download of {model}: {e}", "error")
            return None
        finally:
            self.refresh_interrupted()
        self.say(f"Discarded the unfinished download of {model}, freed {byte_size(freed)}.", "ok")
        return freed

    # ---- state --------------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """The window is closing: stop a running download (it can be resumed on the next start)."""
        self.cancel_download()

    @Slot()
    def sync(self) -> None:
        downloading = self.bridge.downloading is not None
        self.download_button.setEnabled(not downloading and self._selected_download() is not None)
        self.cancel_button.setEnabled(downloading)
        self.search_button.setEnabled(not self._searching)
        for row in self.interrupted:
            row.resume_button.setEnabled(not downloading)
