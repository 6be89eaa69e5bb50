"""The chat page's top bar: which model answers, switched in one click, and the engine options that matter most.

The list is the local library (app/library/hub_models.py, as the Models page lists it; the window hands it over
after each of that page's refreshes: a download done, a model deleted) and shows the model loaded here as the
current one. Choosing another loads it through the bridge, as the Models page does; the chat's load card shows the
stages meanwhile. While it loads the picker shows the model being loaded and can be used again: the model chosen
last wins (the bridge drops the loads it supersedes). A load that fails or is cancelled leaves the picker on the model
still loaded; the chat page says why.

"Engine options…" sets the context length and the KV cache dtype and reloads the model with them. The options
every load here uses are the window's settings; once a load made here succeeds with other options, they are
announced (engine_options_changed) for the window to keep, so a refused option (fp8 without a GPU) is never saved.
A chosen model whose own context is shorter than the remembered max_model_len is loaded with its own context, and
that length is kept: the settings always hold options the last model loads with on the next start.

While chat goes to a connected OpenAI endpoint the picker names that endpoint's model and is disabled: the model
there is the endpoint's to choose (File › Connection…).
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QComboBox, QDialog, QHBoxLayout, QLabel, QPushButton, QSizePolicy, QWidget

from app.library.hub_models import LocalModel, options_for
from app.remote_client import Endpoint
from ui.bridge import EngineBridge, ModelLoadCancelled, ModelLoaded, ModelLoadFailed
from ui.widgets.cards import muted
from ui.widgets.engine_options_dialog import EngineOptionsDialog


class ModelPicker(QWidget):
    engine_options_changed = Signal(dict)  # LLM keyword arguments a load made here succeeded with

    def __init__(self, bridge: EngineBridge, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.bridge = bridge
        self.engine_options: dict = {}  # LLM keyword arguments for loads: the window passes its settings'
        self.models: list[LocalModel] = []
        self._names: dict[str, str] = {}  # library names by path, kept for a model deleted while it runs
        self.shown: str | None = bridge.loaded_model  # the path loaded, or being loaded
        self.loading = False
        # the context and KV dtype the loaded model runs with, once a load is heard
        self.max_model_len: int | None = None
        self.kv_dtype = ""
        self._remote: Endpoint | None = bridge.remote
        self._issuing: dict | None = None  # the options of the load this picker is handing the bridge
        self._trying: dict | None = None  # those of the load under way, when this picker started it
        self.dialog: EngineOptionsDialog | None = None

        self.combo = QComboBox(placeholderText="No model loaded")
        # Long library names are elided instead of widening the page past a small window.
        self.combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.combo.setMinimumContentsLength(24)
        self.combo.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.combo.setMaximumWidth(460)
        self.combo.currentIndexChanged.connect(self._on_chosen)
        self.state = muted()  # "loading…", or the loaded model's context and KV dtype
        self.options_button = QPushButton("Engine options…")
        self.options_button.setToolTip("Context length and KV cache dtype: applying reloads the model")
        self.options_button.clicked.connect(self.ask_options)
        self.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Fixed)  # a bar: the page's rest grows
        layout = QHBoxLayout(self)
        layout.setContentsMargins(8, 6, 8, 0)
        layout.addWidget(QLabel("Model"))
        layout.addWidget(self.combo, 1)
        layout.addWidget(self.options_button)
        layout.addWidget(self.state)
        layout.addStretch(0)

        bridge.model_loading.connect(self._on_loading)
        bridge.model_loaded.connect(self._on_loaded)
        bridge.model_load_failed.connect(self._on_ended_unloaded)
        bridge.model_load_cancelled.connect(self._on_ended_unloaded)
        bridge.connection_changed.connect(self._on_connection_changed)
        self._fill()

    # ---- the list ---------------------------------------------------------------------------------------------
    def set_models(self, models: list[LocalModel]) -> None:
        """The library as listed now (the Models page's rows)."""
        self.models = list(models)
        self._names.update((str(m.path), m.name) for m in models)
        self._fill()

    def _model(self, path: str | None) -> LocalModel | None:
        return next((m for m in self.models if str(m.path) == path), None)

    def _fill(self) -> None:
        """The items and the current one, from the library, the model shown and the connection; emits nothing."""
        self.combo.blockSignals(True)
        self.combo.clear()
        if self._remote is not None:
            self.combo.addItem(f"{self._remote.model} at {self._remote.base_url}")
            self.combo.setToolTip("Chat goes to this OpenAI-compatible endpoint (File › Connection… to change)")
        else:
            for model in self.models:
                self.combo.addItem(model.name, str(model.path))
                if model.problem is not None:
                    self.combo.setItemData(self.combo.count() - 1, model.problem, Qt.ItemDataRole.ToolTipRole)
            if self.shown is not None and self._model(self.shown) is None:  # a file elsewhere, or deleted since
                self.combo.addItem(self._names.get(self.shown, Path(self.shown).name), self.shown)
            self.combo.setCurrentIndex(self.combo.findData(self.shown) if self.shown is not None else -1)
            self.combo.setToolTip("" if self.shown is None else self.shown)
        self.combo.blockSignals(False)
        self._sync()

    def _sync(self) -> None:
        local = self._remote is None
        self.combo.setEnabled(local and self.combo.count() > 0)
        self.options_button.setEnabled(local and self.shown is not None)
        if not local:
            self.state.setText("")
        elif self.loading:
            self.state.setText("loading…")
        elif self.shown is not None and self.max_model_len is not None:
            self.state.setText(f"context {self.max_model_len:,} · KV {self.kv_dtype}")
        else:
            self.state.setText("")

    def current_model(self) -> str | None:
        """The path of the model the picker shows: the one loaded, or the one being loaded."""
        return self.shown

    # ---- loading ----------------------------------------------------------------------------------------------
    def choose(self, path: str) -> None:
        """Load the model at `path` (a library model's path) with the remembered options."""
        self._load(path, self.engine_options)

    def _on_chosen(self, index: int) -> None:
        if index >= 0:
            self.choose(self.combo.itemData(index))

    def _load(self, path: str, options: dict) -> None:
        model = self._model(path)
        if model is not None:
            options = options_for(model, options)
        self._issuing = options
        self.bridge.load_model(path, options)  # emits model_loading at once, on this thread

    def _on_loading(self, model: str) -> None:
        self._trying, self._issuing = self._issuing, None  # None: another page or the window started it
        self.shown, self.loading = model, True
        self._fill()

    def _on_loaded(self, loaded: ModelLoaded) -> None:
        self.shown, self.loading, self.max_model_len = loaded.model, False, loaded.max_model_len
        thread = self.bridge.engine_thread
        if thread is not None:  # "auto" resolved: float16 for a GGUF kept quantized on the CPU, else the model's
            self.kv_dtype = str(thread.engine.model_config.kv_cache_dtype).removeprefix("torch.")
        if self._trying is not None and self._trying != self.engine_options:
            self.engine_options = self._trying
            self.engine_options_changed.emit(dict(self._trying))
        self._trying = None
        self._fill()

    def _on_ended_unloaded(self, outcome: ModelLoadFailed | ModelLoadCancelled) -> None:
        """The load failed or was cancelled: the model loaded before serves on (if any), the picker goes back to
        it."""
        self.shown, self.loading, self._trying = self.bridge.loaded_model, False, None
        self._fill()

    def _on_connection_changed(self, endpoint: Endpoint | None) -> None:
        self._remote = endpoint
        self._fill()

    # ---- engine options ---------------------------------------------------------------------------------------
    def ask_options(self) -> None:
        """Open the engine options for the model shown; applying them reloads it."""
        if self.shown is None:
            return
        model = self._model(self.shown)
        context = None if model is None else model.context_length
        length = self.engine_options.get("max_model_len") or self.max_model_len or context or 0
        if context is not None:
            length = min(length, context)
        name = self._names.get(self.shown, Path(self.shown).name)
        self.dialog = EngineOptionsDialog(
            name, context, length, self.engine_options.get("kv_cache_dtype", "auto"), parent=self
        )
        self.dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        self.dialog.finished.connect(self._on_dialog_finished)
        self.dialog.open()

    def _on_dialog_finished(self, result: int) -> None:
        dialog, self.dialog = self.dialog, None
        if result == QDialog.DialogCode.Accepted and self.shown is not None:
            self.apply_options(dialog.options())

    def apply_options(self, options: dict) -> None:
        """Reload the model shown with `options` over the remembered ones; they are remembered once it loads."""
        self._load(self.shown, {**self.engine_options, **options})
