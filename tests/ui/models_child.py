"""The Models page in a process of its own, for test_models_downloads.py to kill -9 mid-download: it downloads ORG/NAME
from the Hub at $HF_ENDPOINT into $HF_HUB_CACHE and runs until it is killed.

Usage: python models_child.py ORG/NAME
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6.QtWidgets import QApplication  # after the platform is chosen

from ui.bridge import EngineBridge
from ui.pages.models import ModelsPage


def main(model: str) -> int:
    app = QApplication([])
    page = ModelsPage(EngineBridge())
    page.hub.download(model)
    return app.exec()


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
