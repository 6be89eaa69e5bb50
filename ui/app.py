"""`kvstudio` with a display: the desktop window on the last used (or default) model."""
from __future__ import annotations

import sys
from pathlib import Path

from PySide6.QtGui import QIcon
from PySide6.QtWidgets import QApplication

from app import model_store
from app.history import ChatHistory
from app.settings import load_settings
from engine import LLM
from ui.bridge import EngineBridge
from ui.main_window import MainWindow
from ui.theme import follow_system_scheme

# resources/ installs beside ui/ (pyproject's package data), in the repository, the wheel and the bundle alike.
ICON = Path(__file__).resolve().parent.parent / "resources" / "icons" / "kvstudio.svg"


def make_llm(model: str, options: dict) -> LLM:
    """The bridge's loader: the default model is fetched into the store first when it is not there yet."""
    if Path(model) == model_store.default_model_path():
        model = str(model_store.ensure_default_model())
    return LLM(model, **options)


def run(argv: list[str] | None = None) -> int:
    app = QApplication.instance() or QApplication(argv or sys.argv[:1])
    app.setApplicationName("kvstudio")
    # The desktop entry (packaging/kvstudio.desktop) is named after it, so docks group the window under its icon.
    app.setDesktopFileName("kvstudio")
    app.setWindowIcon(QIcon(str(ICON)))
    follow_system_scheme(app)
    bridge = EngineBridge(make_llm)
    window = MainWindow(bridge, ChatHistory(), load_settings())
    window.show()
    window.start()
    return app.exec()
