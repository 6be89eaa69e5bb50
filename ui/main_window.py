"""The main window: a page list on the left (Chat, Batch, Models, Monitor, Server), the model's state in the
status bar.

The window appears at once; the last used model (or the default one) loads in the background through the
bridge, with a busy indicator, and a failure is said in the status bar. Closing the window stops the engine
and saves the settings.
"""
from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtGui import QAction, QCloseEvent, QKeySequence
from PySide6.QtWidgets import (
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QMainWindow,
    QProgressBar,
    QStackedWidget,
    QWidget,
)

from app import model_store
from app.history import ChatHistory
from app.settings import Settings, save_settings
from ui.bridge import EngineBridge, ModelLoaded, ModelLoadFailed
from ui.pages.batch import BatchPage
from ui.pages.chat import ChatPage
from ui.pages.models import ModelsPage
from ui.pages.monitor import MonitorPage
from ui.pages.server import ServerPage


class MainWindow(QMainWindow):
    def __init__(self, bridge: EngineBridge, history: ChatHistory, settings: Settings,
                 settings_path: Path | None = None) -> None:
        super().__init__()
        self.bridge, self.settings, self.settings_path = bridge, settings, settings_path
        self.setWindowTitle("kvstudio")
        self.resize(1280, 800)
        self.chat = ChatPage(bridge, history)
        self.batch = BatchPage(bridge)
        self.models = ModelsPage(bridge)
        self.monitor = MonitorPage()
        self.server = ServerPage(bridge)
        self.pages = QStackedWidget()
        self.nav = QListWidget()
        self.nav.setFixedWidth(130)
        self.nav.setSpacing(4)
        font = self.nav.font()
        font.setPointSizeF(font.pointSizeF() * 1.15)
        self.nav.setFont(font)
        self.page_names = ("Chat", "Batch", "Models", "Monitor", "Server")
        for page in (self.chat, self.batch, self.models, self.monitor, self.server):
            self.pages.addWidget(page)
        self.nav.addItems(self.page_names)
        self.nav.currentRowChanged.connect(self.pages.setCurrentIndex)
        self.nav.setCurrentRow(0)
        central = QWidget()
        layout = QHBoxLayout(central)
        layout.addWidget(self.nav)
        layout.addWidget(self.pages, 1)
        self.setCentralWidget(central)

        self.model_status = QLabel("No model")
        self.busy = QProgressBar()
        self.busy.setRange(0, 0)          # indeterminate: a load reports no fraction
        self.busy.setMaximumWidth(120)
        self.busy.hide()
        self.statusBar().addWidget(self.model_status, 1)
        self.statusBar().addPermanentWidget(self.busy)
        self._menus()

        bridge.model_loading.connect(self._on_loading)
        bridge.model_loaded.connect(self._on_loaded)
        bridge.model_load_failed.connect(self._on_failed)
        bridge.snapshot.connect(self.monitor.show_snapshot, Qt.QueuedConnection)

    def _menus(self) -> None:
        file_menu = self.menuBar().addMenu("&File")
        load = QAction("&Load model…", self, shortcut=QKeySequence.Open, triggered=self._choose_model)
        quit_ = QAction("&Quit", self, shortcut=QKeySequence.Quit, triggered=self.close)
        file_menu.addActions([load, quit_])
        view = self.menuBar().addMenu("&View")
        for row, name in enumerate(self.page_names):
            view.addAction(QAction(name, self, shortcut=QKeySequence(f"Ctrl+{row + 1}"),
                                   triggered=lambda _=False, r=row: self.nav.setCurrentRow(r)))

    def start(self) -> None:
        """Load the last used model, or the default one (fetched into the store first if needed)."""
        model = self.settings.last_model or str(model_store.default_model_path())
        self.load_model(model)

    def load_model(self, model: str) -> None:
        self.bridge.load_model(model, self.settings.engine_options)

    def _choose_model(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load a model", str(model_store.data_dir()),
                                              "GGUF models (*.gguf);;Model config (config.json)")
        if path:
            self.load_model(str(Path(path).parent) if path.endswith("config.json") else path)

    def _on_loading(self, model: str) -> None:
        self.model_status.setText(f"Loading {Path(model).name}…")
        self.busy.show()

    def _on_loaded(self, loaded: ModelLoaded) -> None:
        self.busy.hide()
        self.model_status.setText(f"{Path(loaded.model).name} · context {loaded.max_model_len} tokens · "
                                  f"loaded in {loaded.seconds:.1f} s")
        self.settings.last_model = loaded.model
        save_settings(self.settings, self.settings_path)

    def _on_failed(self, failure: ModelLoadFailed) -> None:
        self.busy.hide()
        self.model_status.setText(f"Could not load {Path(failure.model).name}: {failure.message}")

    def closeEvent(self, event: QCloseEvent) -> None:   # noqa: N802 (Qt's name)
        self.chat.stop()
        self.batch.cancel()
        self.models.shutdown()
        self.server.shutdown()
        self.bridge.shutdown()
        save_settings(self.settings, self.settings_path)
        super().closeEvent(event)
