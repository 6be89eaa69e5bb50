"""The main window on a tiny model: it appears before the model is ready, loads it in the background, chats
through the Chat page while the Monitor page follows the KV pool, says in words when a model cannot load (the one
loaded before serving on), remembers the last model, says when the engine thread dies and loads the model again on
Reload, and says when the settings cannot be saved.

Waits end on what they wait for, never on the clock: a loaded machine only makes them slower. A hang is caught by
the module's pytest-timeout mark."""

from __future__ import annotations

import errno
import logging
import math
import os
import threading

import pytest
from PySide6.QtWidgets import QApplication

from app import settings as settings_module
from app.history import ChatHistory
from app.settings import Settings, load_settings, save_settings
from app.units import byte_size
from engine import LLM
from ui.bridge import EngineBridge
from ui.main_window import MainWindow

pytestmark = pytest.mark.timeout(600)
UNTIL_DONE = math.inf  # qtbot.waitUntil's timeout: none
OPTIONS = {"max_model_len": 512, "kv_cache_memory": 0.02}


def make_window(qtbot, tmp_path, model: str) -> MainWindow:
    window = MainWindow(
        EngineBridge(),
        ChatHistory(tmp_path / "history.sqlite3"),
        Settings(last_model=model, engine_options=dict(OPTIONS)),
        tmp_path / "settings.json",
    )
    qtbot.addWidget(window)
    window.show()
    return window


def test_the_window_loads_chats_monitors_and_remembers(qtbot, tmp_path, tiny_chat_model, screenshots):
    window = make_window(qtbot, tmp_path, str(tiny_chat_model))
    with qtbot.waitSignal(window.bridge.model_loaded, timeout=None):
        window.start()
        assert window.busy.isVisible() and window.model_status.text().startswith("Loading")
    assert not window.busy.isVisible() and "context 512 tokens" in window.model_status.text()
    assert load_settings(tmp_path / "settings.json").last_model == str(tiny_chat_model)

    snapshots = []
    window.bridge.snapshot.connect(snapshots.append)
    chat = window.chat
    chat.sampling.temperature.setValue(1.0)
    chat.sampling.use_seed.setChecked(True)
    chat.sampling.max_tokens.setValue(40)
    chat.input.setPlainText("Describe the ocean in one sentence.")
    chat.send_button.click()
    qtbot.waitUntil(lambda: chat.reply is None, timeout=UNTIL_DONE)
    qtbot.waitUntil(lambda: bool(snapshots) and snapshots[-1].stats.num_blocks_used == 0, timeout=UNTIL_DONE)
    assert any(s.stats.num_blocks_used for s in snapshots)
    # The status bar says the memory the last snapshot measured: this process's, and the engine's part of it.
    engine = window.bridge.engine_thread.engine
    qtbot.waitUntil(lambda: window.memory_status.text() == str(snapshots[-1].memory), timeout=UNTIL_DONE)
    memory = snapshots[-1].memory
    assert (memory.weights, memory.kv_pool) == (engine.weight_bytes, engine.runner.kv_cache.nbytes)
    assert memory.rss >= engine.weight_bytes > 0
    assert window.memory_status.text().endswith(f"(weights {byte_size(engine.weight_bytes)}, KV 20 MiB)")
    assert window.monitor.memory_label.text() == window.memory_status.text()
    assert window.monitor.speculation_label.text() == "Speculation off"
    window.grab().save(str(screenshots / "window-chat.png"))
    window.nav.setCurrentRow(3)
    assert window.pages.currentWidget() is window.monitor
    window.grab().save(str(screenshots / "window-monitor.png"))
    window.nav.setCurrentRow(4)
    assert window.pages.currentWidget() is window.server and window.server.switch.isEnabled()
    window.server.port.setValue(0)
    assert window.server.set_serving(True)
    window.close()
    assert not window.server.switch.isChecked()
    assert window.bridge.engine_thread is None


def test_a_model_that_cannot_load_is_said_in_the_status_bar(qtbot, tmp_path):
    window = make_window(qtbot, tmp_path, str(tmp_path / "broken.gguf"))
    (tmp_path / "broken.gguf").write_bytes(b"GGUF but not really")
    with qtbot.waitSignal(window.bridge.model_load_failed, timeout=None):
        window.start()
    assert window.model_status.text().startswith("Could not load broken.gguf:")
    assert not window.busy.isVisible()
    window.chat.input.setPlainText("hello?")
    window.chat.send_button.click()
    assert window.chat.status.text().startswith("No model is loaded yet: load one on the Models page")
    assert window.chat.input.toPlainText() == "hello?"  # kept, to send once a model is loaded
    window.close()


def start(qtbot, window: MainWindow) -> None:
    with qtbot.waitSignal(window.bridge.model_loaded, timeout=None):
        window.start()


def chat_and_wait(qtbot, window: MainWindow, text: str) -> None:
    window.chat.send(text)
    qtbot.waitUntil(lambda: window.chat.reply is None, timeout=UNTIL_DONE)


def test_a_truncated_model_is_refused_and_the_one_loaded_before_keeps_chatting(
    qtbot, tmp_path, tiny_chat_model, smollm2_gguf
):
    window = make_window(qtbot, tmp_path, str(tiny_chat_model))
    start(qtbot, window)
    cut = tmp_path / "cut.gguf"
    with smollm2_gguf.open("rb") as f:
        cut.write_bytes(f.read(5_000_000))
    with qtbot.waitSignal(window.bridge.model_load_failed, timeout=None):
        window.load_model(str(cut))
    assert window.model_status.text().startswith(f"Could not load cut.gguf: {cut} is truncated")
    assert window.model_status.text().endswith(f" · still running {tiny_chat_model.name}")
    chat_and_wait(qtbot, window, "Still there?")
    reply = window.chat.history.messages(window.chat.conversation_id)[-1]
    assert reply.role == "assistant" and reply.finished and "error" not in reply.stats
    window.close()


def test_an_engine_that_dies_is_said_and_reload_brings_the_model_back(
    qtbot, tmp_path, tiny_chat_model, break_engine, screenshots
):
    window = make_window(qtbot, tmp_path, str(tiny_chat_model))
    start(qtbot, window)
    chat = window.chat
    chat.sampling.max_tokens.setValue(200)
    break_engine(window.bridge.engine_thread.engine)
    with qtbot.waitSignal(window.bridge.engine_died, timeout=None):
        chat.send("Describe the ocean.")
    said = "the engine stopped after an internal error (RuntimeError: stats broke); load the model again"
    assert window.banner.isVisible()
    assert window.banner.text.text() == f"{said[0].upper()}{said[1:]}. Replies being written ended with this error."
    assert window.banner.reload_button.text() == f"Reload {tiny_chat_model.name}"
    assert window.model_status.text() == f"{tiny_chat_model.name}: {said}"
    reply = chat.history.messages(chat.conversation_id)[-1]  # the running reply ended with the error
    assert (reply.role, reply.finished, reply.stats["finish_reason"], reply.stats["error"]) == (
        "assistant",
        True,
        "error",
        said,
    )
    assert f"error: {said}" in chat.transcript.toPlainText() and chat.status.text() == f"Stopped: {said}"
    chat.send("Are you there?")  # refused in words, no empty reply left
    assert chat.status.text() == f"Could not send: {said}"
    assert chat.history.messages(chat.conversation_id)[-1].content == "Are you there?"
    QApplication.sendPostedEvents()  # the layout follows the new texts in posted events
    window.grab().save(str(screenshots / "window-engine-died.png"))

    with qtbot.waitSignal(window.bridge.model_loaded, timeout=None):
        window.banner.reload_button.click()
    assert not window.banner.isVisible() and window.bridge.loaded_model == str(tiny_chat_model)
    chat.regenerate_button.click()  # asks again for the message the dead engine refused
    qtbot.waitUntil(lambda: chat.reply is None, timeout=UNTIL_DONE)
    messages = chat.history.messages(chat.conversation_id)
    assert [m.role for m in messages[-2:]] == ["user", "assistant"] and messages[-1].finished
    assert "error" not in messages[-1].stats and messages[-1].stats["tokens"] > 0
    window.close()


def test_settings_that_cannot_be_saved_are_said_and_the_old_file_is_kept(qtbot, tmp_path, monkeypatch, caplog):
    path = tmp_path / "settings.json"
    save_settings(Settings(last_model="/models/old.gguf"), path)
    before = path.read_bytes()
    window = make_window(qtbot, tmp_path, str(tmp_path / "never-loaded.gguf"))
    real_fdopen = os.fdopen

    def full_disk(fd, *args, **kwargs):
        file = real_fdopen(fd, *args, **kwargs)

        def write(text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        file.write = write
        return file

    monkeypatch.setattr(settings_module.os, "fdopen", full_disk)
    window.bridge.use_local()  # the connection choice is saved at once
    said = f"cannot save the settings to {path}: the disk is full; it keeps the settings saved before"
    assert window.statusBar().currentMessage() == f"Could not save the settings: {said}"
    assert path.read_bytes() == before
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="ui.main_window"):
        window.close()  # saving on close fails too: the log says so, and the window still closes
    assert caplog.messages == [said] and not window.isVisible()
    assert path.read_bytes() == before


def test_a_load_cancelled_on_the_load_card_is_said_in_the_status_bar_and_the_busy_bar_goes(
    qtbot, tmp_path, tiny_chat_model
):
    reading, release = threading.Event(), threading.Event()

    def make_llm(model: str, options: dict, on_load_stage) -> LLM:
        on_load_stage("Reading the model file")
        reading.set()
        release.wait()
        on_load_stage("Loading the weights")  # cancelled by now: raises, and the load unwinds here
        return LLM(model, on_load_stage=on_load_stage, **options)

    window = MainWindow(
        EngineBridge(make_llm),
        ChatHistory(tmp_path / "history.sqlite3"),
        Settings(last_model=str(tiny_chat_model), engine_options=dict(OPTIONS)),
        tmp_path / "settings.json",
    )
    qtbot.addWidget(window)
    window.show()
    try:
        window.start()
        qtbot.waitUntil(reading.is_set, timeout=UNTIL_DONE)
        assert window.busy.isVisible() and window.chat.load_panel.isVisible()
        window.chat.load_panel.cancel_button.click()
        with qtbot.waitSignal(window.bridge.model_load_cancelled, timeout=None):
            release.set()
        assert not window.busy.isVisible() and not window.chat.load_panel.isVisible()
        assert window.model_status.text() == f"Cancelled loading {tiny_chat_model.name}: no model is loaded."
        assert window.bridge.engine_thread is None
    finally:
        release.set()
        window.close()
