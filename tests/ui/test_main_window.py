"""The main window on a tiny model: it appears before the model is ready, loads it in the background, chats
through the Chat page while the Monitor page follows the KV pool, says in words when a model cannot load, and
remembers the last model."""

from __future__ import annotations

from app.history import ChatHistory
from app.settings import Settings, load_settings
from ui.bridge import EngineBridge
from ui.main_window import MainWindow

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
    with qtbot.waitSignal(window.bridge.model_loaded, timeout=60_000):
        window.start()
        assert window.busy.isVisible() and window.model_status.text().startswith("Loading")
    assert not window.busy.isVisible() and "context 512 tokens" in window.model_status.text()
    assert load_settings(tmp_path / "settings.json").last_model == str(tiny_chat_model)

    snapshots = []
    window.bridge.snapshot.connect(snapshots.append)
    chat = window.chat
    chat.temperature.setValue(1.0)
    chat.use_seed.setChecked(True)
    chat.max_tokens.setValue(40)
    chat.input.setPlainText("Describe the ocean in one sentence.")
    chat.send_button.click()
    qtbot.waitUntil(lambda: chat.reply is None, timeout=30_000)
    qtbot.waitUntil(lambda: bool(snapshots) and snapshots[-1].stats.num_blocks_used == 0, timeout=10_000)
    assert any(s.stats.num_blocks_used for s in snapshots)
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
    with qtbot.waitSignal(window.bridge.model_load_failed, timeout=30_000):
        window.start()
    assert window.model_status.text().startswith("Could not load broken.gguf:")
    assert not window.busy.isVisible()
    window.chat.input.setPlainText("hello?")
    window.chat.send_button.click()
    assert window.chat.status.text() == "No model is loaded yet."
    window.close()
