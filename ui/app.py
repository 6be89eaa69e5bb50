"""`kvstudio` with a display: the desktop window on the last used (or default) model.

A splash with the icon is on screen within half a second; the window's modules come after it, because they
import torch, transformers and the engine, which takes seconds on a cold start (3 to 4 s on two cores). Only Qt
and the standard library are imported above run()'s splash.
"""

from __future__ import annotations

import sys
from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtGui import QColor, QIcon, QPainter, QPixmap
from PySide6.QtWidgets import QApplication, QSplashScreen

# resources/ installs beside ui/ (pyproject's package data), in the repository, the wheel and the bundle alike.
ICON = Path(__file__).resolve().parent.parent / "resources" / "icons" / "kvstudio.svg"
SPLASH_BACKGROUND, SPLASH_TEXT = "#26282c", "#e8eaed"


def make_llm(model: str, options: dict, on_load_stage):
    """The bridge's loader (ui/bridge.py MakeLLM): the default model is fetched into the store first when it is not
    there yet."""
    from app.library import model_store
    from engine import LLM

    if Path(model) == model_store.default_model_path():
        if not Path(model).is_file():
            on_load_stage("Downloading the default model")
        model = str(model_store.ensure_default_model())
    return LLM(model, on_load_stage=on_load_stage, **options)


def splash(app: QApplication) -> QSplashScreen:
    """The icon over the app's name on a dark card: no palette exists yet to take colours from."""
    card = QPixmap(320, 240)
    card.fill(QColor(SPLASH_BACKGROUND))
    painter = QPainter(card)
    painter.drawPixmap(96, 36, QIcon(str(ICON)).pixmap(128, 128))
    painter.end()
    screen = QSplashScreen(card)
    screen.showMessage("Starting kvstudio…", Qt.AlignBottom | Qt.AlignHCenter, QColor(SPLASH_TEXT))
    screen.show()
    app.processEvents()  # painted now, before the imports below hold the thread
    return screen


def run(argv: list[str] | None = None) -> int:
    app = QApplication.instance() or QApplication(argv or sys.argv[:1])
    app.setApplicationName("kvstudio")
    # The desktop entry (packaging/kvstudio.desktop) is named after it, so docks group the window under its icon.
    app.setDesktopFileName("kvstudio")
    app.setWindowIcon(QIcon(str(ICON)))
    starting = splash(app)

    from app.history import ChatHistory
    from app.settings import load_settings
    from ui.bridge import EngineBridge
    from ui.main_window import MainWindow
    from ui.theme import follow_system_scheme

    follow_system_scheme(app)
    window = MainWindow(EngineBridge(make_llm), ChatHistory(), load_settings())
    window.show()
    starting.finish(window)
    window.start()
    return app.exec()
