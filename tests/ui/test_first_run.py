"""The first run: with no model chosen yet, the window welcomes the user, says what this computer can run, and
offers the default model (already fetched, or fetched now) or the Models page."""

from __future__ import annotations

import pytest
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QApplication

from app.history import ChatHistory
from app.library import model_store
from app.library.machine import GIB, MachineMemory
from app.settings import Settings
from ui.bridge import EngineBridge
from ui.main_window import MainWindow
from ui.widgets import first_run
from ui.widgets.first_run import FIND_MODEL, SKIP, START_DEFAULT, FirstRunDialog, machine_summary

CPU_8_FREE = MachineMemory("cpu", 16 * GIB, 8 * GIB, 4, int(2.5 * GIB))


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv(model_store.DATA_DIR_ENV, str(tmp_path / "data"))
    monkeypatch.setattr(first_run, "machine_memory", lambda: CPU_8_FREE)
    return tmp_path


def welcome(qtbot, store) -> tuple[MainWindow, list[str]]:
    window = MainWindow(EngineBridge(), ChatHistory(store / "h.sqlite3"), Settings(), store / "settings.json")
    qtbot.addWidget(window)
    loads: list[str] = []
    window.load_model = loads.append
    window.start()
    assert isinstance(window.welcome, FirstRunDialog) and window.welcome.isVisible() and not loads
    return window, loads


def test_the_machine_summary_says_what_fits():
    # float32 weights plus a 2.5 GiB reserve: 5.5 GiB of 8 free holds 1.48B weights, 3.5 GiB (3/4 of it) 940M.
    text = machine_summary(CPU_8_FREE)
    assert "the CPU (no NVIDIA GPU found)" in text and "16.0 GiB of RAM (8.0 GiB free)" in text
    assert "up to about <b>940M</b> parameters fit comfortably (1.5B at most)." in text
    full = MachineMemory("cpu", 4 * GIB, 2 * GIB, 4, int(2.5 * GIB))
    assert "not enough memory is free" in machine_summary(full)


def test_without_the_default_model_it_offers_to_download_it(qtbot, store):
    window, loads = welcome(qtbot, store)
    dialog = window.welcome
    assert dialog.start_button.text() == "Download and start" and dialog.availability.text().startswith("Downloaded")
    dialog.start_button.click()
    assert loads == [str(model_store.default_model_path())]
    window.close()


def test_with_the_default_model_fetched_it_starts_with_it(qtbot, store, smollm2_gguf, screenshots):
    path = model_store.default_model_path()
    path.parent.mkdir(parents=True)
    path.symlink_to(smollm2_gguf)
    window, loads = welcome(qtbot, store)
    assert window.welcome.start_button.text() == "Start with SmolLM2"
    assert window.welcome.availability.text().startswith("Already on this computer")
    window.welcome.grab().save(str(screenshots / "first-run.png"))
    window.welcome.done(START_DEFAULT)
    assert loads == [str(path)]
    window.close()


def test_find_a_model_opens_the_models_page_and_skip_says_how_to_load_one(qtbot, store):
    window, loads = welcome(qtbot, store)
    window.welcome.done(FIND_MODEL)
    assert window.pages.currentWidget() is window.models and not loads
    window.welcome.done(SKIP)
    assert window.model_status.text().startswith("No model: load one with File › Load model…") and not loads
    window.close()


def test_a_chosen_model_skips_the_welcome(qtbot, store):
    window = MainWindow(
        EngineBridge(), ChatHistory(store / "h.sqlite3"), Settings(last_model="/m.gguf"), store / "settings.json"
    )
    qtbot.addWidget(window)
    loads: list[str] = []
    window.load_model = loads.append
    window.start()
    assert window.welcome is None and loads == ["/m.gguf"]
    window.close()


@pytest.mark.parametrize("choice", [START_DEFAULT, SKIP])
def test_after_the_welcome_the_message_box_has_the_focus_and_ctrl_enter_sends(qtbot, store, choice):
    window = MainWindow(EngineBridge(), ChatHistory(store / "h.sqlite3"), Settings(), store / "settings.json")
    qtbot.addWidget(window)
    window.load_model = lambda model: None
    with qtbot.waitActive(window):  # window shortcuts reach the active window only
        window.show()
        window.activateWindow()
    window.start()
    window.welcome.done(choice)
    chat = window.chat
    qtbot.waitUntil(chat.input.hasFocus)
    qtbot.keyClicks(QApplication.focusWidget(), "Hello?")
    assert chat.input.toPlainText() == "Hello?"
    sends: list[int] = []
    chat.send_button.clicked.connect(lambda: sends.append(1))
    qtbot.keyClick(QApplication.focusWidget(), Qt.Key_Return, Qt.ControlModifier)
    qtbot.keyClick(QApplication.focusWidget(), Qt.Key_Enter, Qt.ControlModifier | Qt.KeypadModifier)  # the keypad's
    assert len(sends) == 2 and chat.status.text().startswith("No model is loaded yet")  # the load is faked here
    window.close()
