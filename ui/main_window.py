"""The main window: a page list on the left (Chat, Batch, Models, Monitor, Server), the model's state, the memory
it takes and where chat and batch requests go in the status bar, menus with a shortcut for each common action
(ui/menus.py).

The window appears at once; the last used model (or the default one) loads in the background through the
bridge, with a busy indicator, and a failure or a cancel (the chat's load card, the Models page) is said in the
status bar (the model loaded before serves on); a remote endpoint chosen last time is reconnected beside it. Each
page's main control has the focus when the page is shown. If the engine thread dies, a banner says so and offers
to load the same model again. The pages' fields, the page shown and the connection come back from the settings
file, with the window's size, position and splitters (ui/window_state.py); closing the window stops the engine and
saves them. A settings file that cannot be written (a full disk) is said in the status bar, the old file kept.
"""

from __future__ import annotations

import logging
from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtGui import QCloseEvent, QShowEvent
from PySide6.QtWidgets import (
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QMainWindow,
    QProgressBar,
    QStackedWidget,
    QStyle,
    QVBoxLayout,
    QWidget,
)

from app.engine_thread import EngineSnapshot
from app.history import ChatHistory
from app.library import model_store
from app.library.hub_models import shown_name
from app.remote_client import Endpoint
from app.settings import Settings, SettingsError, save_settings
from ui.bridge import ConnectionFailed, EngineBridge, EngineDied, ModelLoadCancelled, ModelLoaded, ModelLoadFailed
from ui.menus import install_menus
from ui.pages.batch import BatchPage
from ui.pages.chat import ChatPage
from ui.pages.models import ModelsPage
from ui.pages.monitor import MonitorPage
from ui.pages.server import ServerPage
from ui.widgets.connection_dialog import ConnectionDialog
from ui.widgets.engine_banner import EngineBanner
from ui.widgets.first_run import FIND_MODEL, START_DEFAULT, FirstRunDialog
from ui.widgets.form_state import form_values, restore_form
from ui.window_state import encode, fit_on_screen, restore_geometry, restore_splitters, splitter_states

logger = logging.getLogger(__name__)


class MainWindow(QMainWindow):
    def __init__(
        self, bridge: EngineBridge, history: ChatHistory, settings: Settings, settings_path: Path | None = None
    ) -> None:
        super().__init__()
        self.bridge, self.settings, self.settings_path = bridge, settings, settings_path
        self.setWindowTitle("kvstudio")
        self.resize(1280, 800)
        self.chat = ChatPage(bridge, history)
        self.batch = BatchPage(bridge)
        self.models = ModelsPage(bridge)
        self.models.engine_options = settings.engine_options
        # The chat's model picker lists the library as the Models page reads it and loads with the same options.
        picker = self.chat.model_picker
        picker.engine_options = settings.engine_options
        picker.set_models(self.models.library.rows())
        self.models.library_changed.connect(picker.set_models)
        picker.engine_options_changed.connect(self._on_engine_options_changed)
        self.monitor = MonitorPage()
        self.server = ServerPage(bridge)
        self.pages = QStackedWidget()
        self.nav = QListWidget()
        self.nav.setFixedWidth(130)
        self.nav.setSpacing(4)
        font = self.nav.font()
        font.setPointSizeF(font.pointSizeF() * 1.15)
        self.nav.setFont(font)
        # The list on the left, in its order; the settings file keeps the row of the page shown. The icons are
        # the style's own, drawn with their own outlines and fills, so they read on light and dark alike.
        self.named_pages = (
            ("Chat", self.chat),
            ("Batch", self.batch),
            ("Models", self.models),
            ("Monitor", self.monitor),
            ("Server", self.server),
        )
        icons = {
            "Chat": QStyle.StandardPixmap.SP_FileIcon,  # a page of text
            "Batch": QStyle.StandardPixmap.SP_FileDialogDetailedView,  # rows
            "Models": QStyle.StandardPixmap.SP_DriveHDIcon,  # the models on disk
            "Monitor": QStyle.StandardPixmap.SP_ComputerIcon,
            "Server": QStyle.StandardPixmap.SP_DriveNetIcon,  # served over the network
        }
        for name, page in self.named_pages:
            self.pages.addWidget(page)
            self.nav.addItem(QListWidgetItem(self.style().standardIcon(icons[name]), name))
        # The control each page is used from first has the focus when the page is shown (the first enabled one of
        # its list: the server's switch is off limits until a model is loaded). The list takes the focus from Tab
        # only: a click on a page's name hands the focus to that page, while arrow keys in the list stay there.
        self.main_controls: dict[QWidget, tuple[QWidget, ...]] = {
            self.chat: (self.chat.input,),
            self.batch: (self.batch.input,),
            self.models: (self.models.hub.query,),
            self.monitor: (self.monitor.export_button,),
            self.server: (self.server.switch, self.server.port),
        }
        self.nav.setFocusPolicy(Qt.FocusPolicy.TabFocus)
        self.nav.currentRowChanged.connect(self.pages.setCurrentIndex)
        self.pages.currentChanged.connect(self._focus_page)
        self.nav.setCurrentRow(min(max(settings.last_page, 0), len(self.named_pages) - 1))
        self.forms = {"chat": self.chat.sampling.form, "batch": self.batch.sampling.form, "server": self.server.form}
        for name, form in self.forms.items():
            state = settings.pages.get(name)
            if isinstance(state, dict):
                restore_form(form, state)
        self.banner = EngineBanner()
        self.banner.reload_requested.connect(lambda died: self.bridge.load_model(died.model, died.options))
        central = QWidget()
        column = QVBoxLayout(central)
        column.addWidget(self.banner)
        layout = QHBoxLayout()
        layout.addWidget(self.nav)
        layout.addWidget(self.pages, 1)
        column.addLayout(layout, 1)
        self.setCentralWidget(central)
        self.splitters = {"chat": self.chat.splitter}
        restore_splitters(self.splitters, settings.splitters)
        # Fitted onto the screen once shown: only then does the window have a frame to fit with it.
        self._fit_restored = restore_geometry(self, settings.window_geometry)

        self.model_status = QLabel("No model")
        self.welcome: FirstRunDialog | None = None  # shown by start() on the first run
        self.connection_status = QLabel()
        self.memory_status = QLabel()  # from the engine's snapshots, once a model runs
        self.memory_status.setContentsMargins(0, 0, 12, 0)  # apart from the connection beside it
        self.memory_status.setToolTip(
            "This process's resident memory; of it, the model's weights and KV cache pool (allocated)"
        )
        self.busy = QProgressBar()
        self.busy.setRange(0, 0)  # indeterminate: a load reports no fraction
        self.busy.setMaximumWidth(120)
        self.busy.hide()
        self.statusBar().addWidget(self.model_status, 1)
        self.statusBar().addPermanentWidget(self.memory_status)
        self.statusBar().addPermanentWidget(self.connection_status)
        self.statusBar().addPermanentWidget(self.busy)
        self.actions = install_menus(self)
        self._show_connection(None)

        bridge.model_loading.connect(self._on_loading)
        bridge.model_loaded.connect(self._on_loaded)
        bridge.model_load_failed.connect(self._on_failed)
        bridge.model_load_cancelled.connect(self._on_load_cancelled)
        bridge.engine_died.connect(self._on_engine_died)
        bridge.snapshot.connect(self.monitor.show_snapshot, Qt.QueuedConnection)
        bridge.snapshot.connect(self._show_memory, Qt.QueuedConnection)
        bridge.connection_changed.connect(self._on_connection_changed)
        bridge.connection_failed.connect(self._on_connection_failed)

    def start(self) -> None:
        """Load the last used model (on the first run, welcome the user and offer the default one) and reconnect
        the remote endpoint chosen last time."""
        if self.settings.last_model is None:
            self.welcome = FirstRunDialog(parent=self)
            self.welcome.finished.connect(self._on_welcome)
            self.welcome.open()
        else:
            self.load_model(self.settings.last_model)
        s = self.settings
        if s.use_remote and s.remote_url:
            try:
                self.bridge.connect_remote(Endpoint(s.remote_url, s.remote_api_key, s.remote_model))
            except ValueError as e:  # a hand-edited URL
                self._on_connection_failed(ConnectionFailed(Endpoint("http://invalid"), str(e)))

    def load_model(self, model: str) -> None:
        self.bridge.load_model(model, self.settings.engine_options)

    def _on_welcome(self, choice: int) -> None:
        """Act on the welcome's choice. The window is made active again and the field to type in next is given the
        focus: a closing dialog hands the focus back to no widget on some platforms, and keys typed (or Ctrl+Enter)
        would then go nowhere."""
        self.activateWindow()
        if choice == FIND_MODEL:
            self.show_page(self.models)
            self.models.hub.query.setFocus()
            return
        if choice == START_DEFAULT:  # fetched into the store first when setup has not (ui/app.py make_llm)
            self.load_model(str(model_store.default_model_path()))
        else:
            self.model_status.setText("No model: load one with File › Load model… or from the Models page")
        self.show_page(self.chat)
        self.chat.input.setFocus()

    def _focus_page(self) -> None:
        if self.nav.hasFocus():  # walking the list with the arrow keys
            return
        controls = self.main_controls[self.pages.currentWidget()]
        next((c for c in controls if c.isEnabled()), controls[0]).setFocus()

    def show_page(self, page: QWidget) -> None:
        """Show `page` (one of the window's pages), selecting it in the list on the left."""
        self.nav.setCurrentRow(self.pages.indexOf(page))

    def choose_connection(self) -> None:
        s = self.settings
        ConnectionDialog(self.bridge, s.remote_url, s.remote_api_key, s.remote_model, parent=self).open()

    def choose_model(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Load a model", str(model_store.data_dir()), "GGUF models (*.gguf);;Model config (config.json)"
        )
        if path:
            self.load_model(str(Path(path).parent) if path.endswith("config.json") else path)

    def _on_loading(self, model: str) -> None:
        fetch = Path(model) == model_store.default_model_path() and not Path(model).is_file()
        self.model_status.setText(
            f"Downloading and loading {shown_name(model)}…" if fetch else f"Loading {shown_name(model)}…"
        )
        self.busy.show()
        self.banner.hide()

    def _on_loaded(self, loaded: ModelLoaded) -> None:
        self.busy.hide()
        self.model_status.setText(
            f"{shown_name(loaded.model)} · context {loaded.max_model_len} tokens · loaded in {loaded.seconds:.1f} s"
        )
        self.settings.last_model = loaded.model
        self._save_settings()

    def _on_failed(self, failure: ModelLoadFailed) -> None:
        self.busy.hide()
        serving = self.bridge.loaded_model
        self.model_status.setText(
            f"Could not load {shown_name(failure.model)}: {failure.message}"
            + (f" · still running {shown_name(serving)}" if serving is not None else "")
        )

    def _on_engine_options_changed(self, options: dict) -> None:
        """A model loaded with the chat's engine options: the next start and the Models page load with them too."""
        self.settings.engine_options = options
        self.models.engine_options = options
        self._save_settings()

    def _on_load_cancelled(self, cancelled: ModelLoadCancelled) -> None:
        self.busy.hide()
        self.model_status.setText(cancelled.message)

    def _on_engine_died(self, died: EngineDied) -> None:
        self.busy.hide()
        self.model_status.setText(f"{Path(died.model).name}: {died.message}")
        self.banner.show_death(died)

    def _show_memory(self, snapshot: EngineSnapshot) -> None:
        self.memory_status.setText(str(snapshot.memory))

    def _save_settings(self) -> None:
        """Save the settings; a failure (a full disk, the old file kept) is said in the status bar, and logged:
        on closing, the window is gone before anyone could read it."""
        try:
            save_settings(self.settings, self.settings_path)
        except SettingsError as e:
            logger.error("%s", e)
            self.statusBar().showMessage(f"Could not save the settings: {e}")

    def _on_connection_changed(self, endpoint: Endpoint | None) -> None:
        s = self.settings
        s.use_remote = endpoint is not None
        if endpoint is not None:
            s.remote_url, s.remote_api_key, s.remote_model = endpoint.base_url, endpoint.api_key, endpoint.model
        self._save_settings()
        self._show_connection(endpoint)

    def _on_connection_failed(self, failure: ConnectionFailed) -> None:
        self.statusBar().showMessage(f"Could not connect: {failure.message}. Chat and Batch use this computer.", 15_000)

    def _show_connection(self, endpoint: Endpoint | None) -> None:
        self.monitor.show_remote(None if endpoint is None else f"{endpoint.model} at {endpoint.base_url}")
        if endpoint is None:
            self.connection_status.setText("Chat & Batch: this computer")
            self.connection_status.setToolTip("Requests go to the model loaded here (File › Connection… to change)")
        else:
            self.connection_status.setText(f"Chat & Batch: {endpoint.model} at {endpoint.base_url}")
            self.connection_status.setToolTip(
                "Requests go to this OpenAI-compatible endpoint (File › Connection… to change)"
            )

    def showEvent(self, event: QShowEvent) -> None:
        super().showEvent(event)
        if not event.spontaneous():  # shown by the app (not restored by the window system): the page's control
            self._focus_page()
        if self._fit_restored:
            self._fit_restored = False
            fit_on_screen(self)

    def closeEvent(self, event: QCloseEvent) -> None:
        self.chat.stop()
        self.batch.cancel()
        self.models.shutdown()
        self.server.shutdown()
        self.bridge.shutdown()
        self.settings.last_page = self.nav.currentRow()
        self.settings.pages = {name: form_values(form) for name, form in self.forms.items()}
        self.settings.window_geometry = encode(self.saveGeometry())
        self.settings.splitters = splitter_states(self.splitters)
        self._save_settings()
        super().closeEvent(event)
