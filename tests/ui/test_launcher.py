"""`kvstudio`: the window alone on a display; the command line otherwise."""

from __future__ import annotations

import ui.app
from app.cli import main as cli
from ui import launcher


def test_alone_on_a_display_it_opens_the_window(monkeypatch):
    monkeypatch.setenv("DISPLAY", ":0")
    monkeypatch.setattr(ui.app, "run", lambda: 7)
    assert launcher.main([]) == 7


def test_commands_and_displayless_runs_go_to_the_command_line(monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "main", lambda argv, window_benchmarks: calls.append((argv, sorted(window_benchmarks))))
    monkeypatch.setattr(ui.app, "run", lambda: 7)
    monkeypatch.setenv("DISPLAY", ":0")
    assert launcher.main(["generate", "hi"]) is None  # what cli.main returned
    monkeypatch.delenv("DISPLAY")
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    assert launcher.main([]) is None
    # with the benchmark that drives the window, which the command line cannot import itself
    assert calls == [(["generate", "hi"], ["ui-heartbeat"]), ([], ["ui-heartbeat"])]


def test_the_window_icon_ships_where_the_app_looks_for_it(qapp):
    from PySide6.QtGui import QIcon

    assert ui.app.ICON.is_file() and not QIcon(str(ui.app.ICON)).pixmap(64, 64).isNull()


def test_the_splash_needs_only_qt_so_it_shows_before_the_engine_imports():
    import subprocess
    import sys

    code = "import sys, ui.app; print(sorted(m for m in ('torch', 'transformers', 'engine') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
