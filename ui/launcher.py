"""The `kvstudio` command: the desktop window when it is run alone on a display, else the command line.

It lives in ui/ because it is the one entry point that may open the window: app/ never imports Qt.
"""

from __future__ import annotations

import sys

from app.cli import main as cli
from app.cli.options import has_display


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv and has_display():
        from ui.app import run

        return run()
    return cli.main(argv, window_benchmarks={"ui-heartbeat": _ui_heartbeat})


def _ui_heartbeat(args) -> int:
    from ui import heartbeat_bench  # Qt and the window, imported only when this benchmark runs

    return heartbeat_bench.run(args)


if __name__ == "__main__":
    sys.exit(main())
