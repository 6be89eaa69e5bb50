"""The models page: the local library (load, delete with the space freed, refresh; each model's quantization,
whether it fits this machine's memory, and a corrupt one said as such) beside the Hugging Face Hub card
(ui/widgets/hub_panel.py over ui/hub_bridge.py: search, a GGUF repo's files, download, and the downloads left
unfinished); the library refreshes when a download completes.

A load is checked against the memory free first: a model too big for it is refused in words here instead of
ending in the kernel's out-of-memory killer. While a model loads (from here or elsewhere) the status line says the
stage under way and Cancel load stops it, the model loaded before serving on. Every failure is said in the status
line; the page keeps working.
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Signal, Slot
from PySide6.QtWidgets import QHBoxLayout, QLabel, QPushButton, QVBoxLayout, QWidget

from app.library import hub_models, machine
from app.library.hub_models import HubError, LocalModel, options_for, shown_name
from app.units import byte_size
from ui.bridge import EngineBridge, ModelLoadCancelled, ModelLoaded, ModelLoadFailed, ModelLoadStage
from ui.hub_bridge import DownloadDone, HubBridge
from ui.widgets.cards import card, muted, section
from ui.widgets.hub_panel import HubPanel
from ui.widgets.rows_table import RowsView, library_model
from ui.widgets.status_line import StatusLine


class ModelsPage(QWidget):
    library_changed = Signal(object)  # the library's LocalModels, after each refresh (a download done, a deletion)

    def __init__(self, bridge: EngineBridge, endpoint: str | None = None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.bridge = bridge
        self._engine_options: dict = {}
        self._pending_delete: LocalModel | None = None
        self._loading = ""  # the name of the model being loaded, as the status line says it
        self._memory: machine.MachineMemory  # what the library's verdicts are against: taken by each refresh()
        self._build(endpoint)
        self.hub.bridge.download_done.connect(self._on_download_done)
        bridge.model_loading.connect(self._on_model_loading)
        bridge.model_load_stage.connect(self._on_model_load_stage)
        bridge.model_loaded.connect(self._on_model_loaded)
        bridge.model_load_failed.connect(self._on_model_load_failed)
        bridge.model_load_cancelled.connect(self._on_model_load_cancelled)
        self.refresh()
        if self.hub.interrupted:  # left by an earlier run: say so, the rows alone are easy to miss
            n = len(self.hub.interrupted)
            self.status.say(
                f"{'A download' if n == 1 else f'{n} downloads'} did not finish last time: Resume continues "
                "where it stopped, Discard deletes what arrived.",
                "warn",
            )

    # ---- layout -------------------------------------------------------------------------------------------
    def _build(self, endpoint: str | None) -> None:
        self.status = StatusLine()

        library_card, library = card("Library")
        self.library = library_model(self._fit, self)
        self.library_view = RowsView(self.library, whole_names=True)
        self.library_view.selectionModel().selectionChanged.connect(self._sync)
        self.library_view.doubleClicked.connect(lambda _: self.load_selected())
        self.library_summary = muted()
        self.library_summary.setWordWrap(True)  # a long summary wraps instead of widening the card
        self.load_button = QPushButton("Load")
        self.load_button.clicked.connect(self.load_selected)
        self.cancel_load_button = QPushButton("Cancel load")
        self.cancel_load_button.setToolTip("Stop the load under way; the model loaded before keeps answering")
        self.cancel_load_button.clicked.connect(self.cancel_load)
        self.cancel_load_button.hide()  # shown while a model loads
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
        # The summary on a line of its own: beside the buttons it kept the page wider than an 800 px window allows.
        library_buttons = QHBoxLayout()
        library_buttons.addStretch(1)
        library_buttons.addWidget(refresh)
        library_buttons.addWidget(self.delete_button)
        library_buttons.addWidget(self.load_button)
        library_buttons.addWidget(self.cancel_load_button)
        library.addSpacing(6)
        library.addWidget(self.library_view, 1)
        library.addSpacing(4)
        library.addWidget(self.confirm_bar)
        library.addWidget(self.library_summary)
        library.addLayout(library_buttons)

        self.hub = HubPanel(HubBridge(endpoint, self), self.status.say)

        cards = QHBoxLayout()
        cards.setSpacing(12)
        # The library takes the width that shows its names whole (its table's size hint) where the page has it;
        # the Hub card, empty until a search and eliding long repo ids, takes the rest.
        cards.addWidget(library_card, 0)
        cards.addWidget(self.hub, 1)

        layout = QVBoxLayout(self)
        layout.setContentsMargins(24, 20, 24, 20)
        layout.setSpacing(12)
        layout.addWidget(section("Models"))
        layout.addWidget(self.status)
        layout.addLayout(cards, 1)

    def _fit(self, model: LocalModel) -> machine.ModelFit | None:
        if model.weights is None:
            return None
        return machine.check_weights(model.weights, self._memory, self.engine_options)

    @property
    def engine_options(self) -> dict:
        """LLM keyword arguments for loads (the window passes its settings'); the Memory columns count them."""
        return self._engine_options

    @engine_options.setter
    def engine_options(self, options: dict) -> None:
        self._engine_options = self.hub.engine_options = options
        self.refresh()

    # ---- library ------------------------------------------------------------------------------------------
    @Slot()
    def refresh(self) -> None:
        """Read the library again (the default GGUF and the runnable models in the Hugging Face cache), the memory
        free for them, and the unfinished downloads."""
        self._memory = machine.memory_for(self.engine_options)
        self.library.set_rows(hub_models.list_local_models())
        models = self.library.rows()
        total = sum(m.size for m in models)
        broken = sum(m.problem is not None for m in models)
        self.library_summary.setText(
            "No models yet: download one from the Hub."
            if not models
            else f"{len(models)} model{'s' if len(models) != 1 else ''}, {byte_size(total)} on disk"
            + (f"; {broken} cannot be loaded (hover it for why)" if broken else "")
        )
        self._cancel_delete()
        self.hub.refresh_interrupted()
        self._sync()
        self.library_changed.emit(models)

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

    def load(self, name: str) -> bool:
        """Load a library model into the engine (on the bridge's loader thread). A corrupt model, or one too big
        for the memory free now, is refused in words instead; returns whether the load started."""
        model = self.library.row(self._library_row(name))
        if model.problem is not None:
            self.status.say(f"Could not load {model.name}: {_sentence(model.problem)}", "error")
            return False
        options = options_for(model, self.engine_options)
        try:
            fit = self.bridge.check_fit(str(model.path), options)
        except ValueError as e:  # a weights file went bad since the listing
            self.status.say(f"Could not load {model.name}: {_sentence(str(e))}", "error")
            return False
        if fit is not None and not fit.fits:
            self.status.say(f"Not loading {model.name}: {fit.message}", "error")
            return False
        tight = fit is not None and fit.verdict == "tight"
        self.status.say(f"Loading {model.name}…" + (f" {fit.message}" if tight else ""), "warn" if tight else None)
        self.bridge.load_model(str(model.path), options)
        return True

    def _shown_name(self, model: str) -> str:
        """A loaded path as the library names it (a snapshot's folder is a commit hash), else its file name."""
        return next((m.name for m in self.library.rows() if str(m.path) == model), shown_name(model))

    @Slot()
    def cancel_load(self) -> None:
        """Stop the load under way (at its next stage); the outcome arrives as model_load_cancelled."""
        if self.bridge.cancel_load():
            self.cancel_load_button.setEnabled(False)
            self.status.say(f"Cancelling the load of {self._loading}: it stops once the stage under way ends.", "warn")

    @Slot(str)
    def _on_model_loading(self, model: str) -> None:
        self._loading = self._shown_name(model)
        self.cancel_load_button.setEnabled(True)
        self.cancel_load_button.show()

    @Slot(object)
    def _on_model_load_stage(self, stage: ModelLoadStage) -> None:
        if self.cancel_load_button.isEnabled():  # a cancelled load's last stages are no news
            self.status.say(f"Loading {self._loading}: {stage.stage[0].lower()}{stage.stage[1:]}…")

    def _load_ended(self) -> None:
        self.cancel_load_button.hide()

    @Slot(object)
    def _on_model_load_cancelled(self, cancelled: ModelLoadCancelled) -> None:
        self._load_ended()
        serving = cancelled.serving
        still = "no model is loaded" if serving is None else f"still running {self._shown_name(serving)}"
        self.status.say(f"Cancelled loading {self._shown_name(cancelled.model)}: {still}.", "warn")

    @Slot(object)
    def _on_model_loaded(self, loaded: ModelLoaded) -> None:
        self._load_ended()
        self.status.say(
            f"Loaded {self._shown_name(loaded.model)} ({loaded.seconds:.1f} s, context {loaded.max_model_len:,}).", "ok"
        )

    @Slot(object)
    def _on_model_load_failed(self, failed: ModelLoadFailed) -> None:
        self._load_ended()
        self.status.say(f"Could not load {self._shown_name(failed.model)}: {_sentence(failed.message)}", "error")

    @Slot(object)
    def _on_download_done(self, done: DownloadDone) -> None:
        self.refresh()
        # a completed pull is always listed: the snapshot of a transformers model, a GGUF file in one
        [name] = [m.name for m in self.library.rows() if m.path.resolve() == Path(done.path).resolve()]
        self.select_model(name)

    @Slot()
    def ask_delete(self) -> None:
        """Show the confirmation for the selected model under the table."""
        model = self.selected_model()
        if model is None:
            return
        self._pending_delete = model
        if model.is_default:
            self.confirm_text.setText(
                f"{model.name} is the default model: kvstudio fetches it again on next use. "
                f"Delete it anyway and free {byte_size(model.size)}?"
            )
        else:
            self.confirm_text.setText(f"Delete {model.name} and free {byte_size(model.size)}?")
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
            self.status.say(f"{name} is the default model; it is kept unless you confirm deleting it anyway.", "error")
            return None
        try:
            freed = hub_models.remove(name, force=force)
        except (HubError, OSError) as e:
            self.status.say(f"Could not delete {name}: {e}", "error")
            return None
        self.refresh()
        self.status.say(f"Deleted {name}, freed {byte_size(freed)}.", "ok")
        return freed

    # ---- state --------------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """The window is closing: stop a running download (it can be resumed on the next start)."""
        self.hub.shutdown()

    @Slot()
    def _sync(self) -> None:
        """Load and Delete act on the chosen model; their tooltips say which, or (grey) that one is to be chosen."""
        model = self.selected_model()
        self.load_button.setEnabled(model is not None)
        self.delete_button.setEnabled(model is not None)
        if model is None:
            self.load_button.setToolTip("Choose a model in the list to load it")
            self.delete_button.setToolTip("Choose a model in the list to delete it")
        else:
            self.load_button.setToolTip(f"Load {model.name} (or double-click it)")
            self.delete_button.setToolTip(f"Delete {model.name} from this computer")


def _sentence(message: str) -> str:
    """A message as the end of a sentence: "…/x.gguf is truncated" -> "…/x.gguf is truncated."."""
    return message if message.endswith((".", "!", "?")) else message + "."
