"""The chat page's model picker in the window, over a library of two tiny models (pulled from a fake Hub) and a
truncated GGUF file: it lists the library, loads the model chosen (the chosen last wins; the load card shows
meanwhile) and the chat then answers from it, goes back to the model loaded when a load fails (saying why) or is
cancelled, reloads with the engine options applied (kept in the settings; one the engine refuses is said and not
kept), follows the library as models are downloaded and deleted, and names a connected endpoint's model, disabled.

Waits end on what they wait for, never on the clock. A hang is caught by the module's pytest-timeout mark."""

from __future__ import annotations

import math

import pytest
import torch
from PySide6.QtCore import QSize, Qt
from PySide6.QtWidgets import QApplication, QDialogButtonBox

from app.history import ChatHistory
from app.library import pulls
from app.remote_client import Endpoint
from app.settings import Settings, load_settings
from ui.bridge import EngineBridge
from ui.main_window import MainWindow
from ui.theme import palette_for
from ui.widgets.engine_options_dialog import MIN_CONTEXT

pytestmark = pytest.mark.timeout(600)
UNTIL_DONE = math.inf  # qtbot.waitUntil's timeout: none
OPTIONS = {"max_model_len": 512, "kv_cache_memory": 0.02}
CUT = "org/cut:Q4_1"  # the library's name for the GGUF file cut short


@pytest.fixture
def hub(serve_hub, tiny_chat_model, smollm2_gguf):
    """A fake Hub serving the tiny model as three repos and a GGUF cut short (its header is whole, its tensors are
    not); org/tiny, org/tiny-b and the cut one pulled."""
    tiny = {p.name: p.read_bytes() for p in sorted(tiny_chat_model.iterdir()) if p.is_file()}
    with smollm2_gguf.open("rb") as f:
        cut = f.read(5_000_000)
    hub = serve_hub({"org/tiny": tiny, "org/tiny-b": tiny, "org/tiny-c": tiny, "org/cut": {"cut-Q4_1.gguf": cut}})
    for repo in ("org/tiny", "org/tiny-b", "org/cut"):
        pulls.pull(repo)
    return hub


@pytest.fixture
def window(qtbot, hub, tmp_path):
    w = MainWindow(
        EngineBridge(),
        ChatHistory(tmp_path / "history.sqlite3"),
        Settings(engine_options=dict(OPTIONS)),
        tmp_path / "settings.json",
    )
    qtbot.addWidget(w)
    w.chat.sampling.temperature.setValue(0.0)
    w.chat.sampling.max_tokens.setValue(6)
    w.show()
    qtbot.waitExposed(w)
    yield w
    w.bridge.shutdown()


def items(window: MainWindow) -> list[str]:
    combo = window.chat.model_picker.combo
    return [combo.itemText(i) for i in range(combo.count())]


def path_of(window: MainWindow, name: str) -> str:
    return next(str(m.path) for m in window.models.library.rows() if m.name == name)


def choose(window: MainWindow, name: str) -> None:
    """Pick `name` in the picker, as a click in its list does."""
    combo = window.chat.model_picker.combo
    combo.setCurrentIndex(combo.findText(name))


def load(qtbot, window: MainWindow, name: str) -> None:
    with qtbot.waitSignal(window.bridge.model_loaded, timeout=None):
        choose(window, name)
    assert window.bridge.loaded_model == path_of(window, name)


def send_and_wait(qtbot, window: MainWindow, text: str) -> None:
    window.chat.input.setPlainText(text)
    window.chat.send_button.click()
    qtbot.waitUntil(lambda: window.chat.reply is None, timeout=UNTIL_DONE)


def test_the_picker_lists_the_library_and_the_model_chosen_last_loads_and_answers(qtbot, window, screenshots):
    picker, chat = window.chat.model_picker, window.chat
    assert items(window) == [CUT, "org/tiny", "org/tiny-b"]
    assert picker.combo.currentIndex() == -1 and picker.combo.placeholderText() == "No model loaded"
    assert not picker.options_button.isEnabled()  # nothing loaded to reload
    cut = picker.combo.itemData(0, Qt.ItemDataRole.ToolTipRole)
    assert cut.startswith(f"{path_of(window, CUT)} is truncated")  # the library's own words

    loaded = []
    window.bridge.model_loaded.connect(loaded.append)
    choose(window, "org/tiny-b")
    # loading: the picker shows it, the chat's load card is up, and the picker still takes another choice
    assert picker.combo.currentText() == "org/tiny-b" and picker.state.text() == "loading…"
    assert chat.load_panel.isVisible()
    assert chat.load_panel.title.text() == "org/tiny-b"  # the repo, not the snapshot's commit hash
    assert picker.combo.isEnabled()
    with qtbot.waitSignal(window.bridge.model_loaded, timeout=None):
        choose(window, "org/tiny")  # chosen last: it is the one loaded
    assert [m.model for m in loaded] == [path_of(window, "org/tiny")]
    assert picker.combo.currentText() == "org/tiny" and not chat.load_panel.isVisible()
    assert picker.state.text() == "context 512 · KV float32"
    assert window.model_status.text().startswith("org/tiny · context 512 tokens")

    load(qtbot, window, "org/tiny-b")
    assert picker.combo.currentText() == "org/tiny-b"
    send_and_wait(qtbot, window, "Hello!")
    reply = window.chat.history.messages(chat.conversation_id)[-1]
    assert reply.role == "assistant" and reply.finished and reply.stats["tokens"] > 0
    # the reply came from org/tiny-b's engine: the one loaded, which generated exactly its tokens
    thread = window.bridge.engine_thread
    qtbot.waitUntil(lambda: thread.num_unfinished == 0, timeout=UNTIL_DONE)
    assert thread.engine.config.model == path_of(window, "org/tiny-b")
    assert thread.engine.get_stats().generation_tokens_total == reply.stats["tokens"]

    light = QApplication.palette()
    try:
        for scheme in (Qt.ColorScheme.Light, Qt.ColorScheme.Dark):
            QApplication.setPalette(palette_for(scheme))
            for size in (QSize(800, 600), QSize(1600, 1000)):
                window.resize(size)
                QApplication.sendPostedEvents()
                QApplication.processEvents()
                suffix = "-dark" if scheme == Qt.ColorScheme.Dark else ""
                window.grab().save(str(screenshots / f"chat-model-picker-{size.width()}x{size.height()}{suffix}.png"))
    finally:
        QApplication.setPalette(light)


def test_a_load_that_fails_goes_back_to_the_model_loaded_and_says_why(qtbot, window):
    load(qtbot, window, "org/tiny")
    with qtbot.waitSignal(window.bridge.model_load_failed, timeout=None):
        choose(window, CUT)
        assert window.chat.model_picker.combo.currentText() == CUT  # shown while it is tried
    assert window.chat.model_picker.combo.currentText() == "org/tiny"
    assert window.bridge.loaded_model == path_of(window, "org/tiny")
    assert window.chat.status.text().startswith(f"Could not load the model: {path_of(window, CUT)} is truncated")
    send_and_wait(qtbot, window, "Still there?")  # the model loaded before answers on
    assert window.chat.history.messages(window.chat.conversation_id)[-1].finished


def test_a_cancelled_load_goes_back_to_the_model_loaded(qtbot, window):
    picker = window.chat.model_picker
    load(qtbot, window, "org/tiny")
    with qtbot.waitSignal(window.bridge.model_load_cancelled, timeout=None):
        choose(window, "org/tiny-b")
        assert picker.combo.currentText() == "org/tiny-b" and picker.state.text() == "loading…"
        assert window.bridge.cancel_load()
    assert picker.combo.currentText() == "org/tiny" and picker.state.text() == "context 512 · KV float32"
    assert window.bridge.loaded_model == path_of(window, "org/tiny")


def open_options(window: MainWindow):
    window.chat.model_picker.options_button.click()
    dialog = window.chat.model_picker.dialog
    assert dialog is not None and dialog.isVisible()
    return dialog


def test_engine_options_reload_the_model_and_are_kept_unless_the_engine_refuses_them(qtbot, window, tmp_path):
    load(qtbot, window, "org/tiny")
    dialog = open_options(window)
    # bounded by the model's own context (512) and a useful least length
    assert (dialog.context.minimum(), dialog.context.maximum(), dialog.context.value()) == (MIN_CONTEXT, 512, 512)
    dialog.context.setValue(100_000)
    assert dialog.context.value() == 512
    dialog.context.setValue(300)
    dialog.kv_dtype.setCurrentIndex(dialog.kv_dtype.findData("float16"))
    with qtbot.waitSignal(window.bridge.model_loaded, timeout=None):
        dialog.buttons.button(QDialogButtonBox.Ok).click()
    engine = window.bridge.engine_thread.engine
    assert (engine.config.max_model_len, engine.config.kv_cache_dtype) == (300, "float16")
    assert engine.model_config.kv_cache_dtype == torch.float16
    assert window.bridge.loaded_model == path_of(window, "org/tiny")
    kept = {**OPTIONS, "max_model_len": 300, "kv_cache_dtype": "float16"}
    assert load_settings(tmp_path / "settings.json").engine_options == kept
    assert window.models.engine_options == kept and window.settings.engine_options == kept
    assert window.chat.model_picker.state.text() == "context 300 · KV float16"

    dialog = open_options(window)
    assert (dialog.context.value(), dialog.kv_dtype.currentData()) == (300, "float16")
    dialog.kv_dtype.setCurrentIndex(dialog.kv_dtype.findData("fp8"))
    with qtbot.waitSignal(window.bridge.model_load_failed, timeout=None):
        dialog.buttons.button(QDialogButtonBox.Ok).click()
    assert window.chat.status.text() == (
        "Could not load the model: kv_cache_dtype fp8 needs the triton attention backend (a CUDA device)"
    )
    assert window.bridge.engine_thread.engine is engine  # the model as it ran serves on
    assert load_settings(tmp_path / "settings.json").engine_options == kept
    assert window.chat.model_picker.combo.currentText() == "org/tiny"


def test_a_model_with_a_shorter_context_loads_with_its_own_and_that_is_kept(qtbot, window, tmp_path):
    """The remembered max_model_len is longer than the chosen model's context: it loads with its own context (the
    engine would refuse the longer one), and the settings keep what it loaded with for the next start."""
    window.chat.model_picker.engine_options = window.settings.engine_options = {**OPTIONS, "max_model_len": 4096}
    load(qtbot, window, "org/tiny")
    assert window.bridge.engine_thread.engine.config.max_model_len == 512
    assert load_settings(tmp_path / "settings.json").engine_options == OPTIONS


def test_the_models_page_loads_a_model_with_a_shorter_context_at_its_own(qtbot, window):
    """The same rule from the Models page's Load: the remembered 4,096 tokens would be refused by the engine."""
    window.models.engine_options = {**OPTIONS, "max_model_len": 4096}
    with qtbot.waitSignal(window.bridge.model_loaded, timeout=300_000):  # a refused load never emits it
        assert window.models.load("org/tiny")
    assert window.bridge.engine_thread.engine.config.max_model_len == 512


def test_the_picker_follows_the_library_as_models_are_downloaded_and_deleted(qtbot, window):
    picker = window.chat.model_picker
    load(qtbot, window, "org/tiny")
    window.models.delete(CUT)
    assert items(window) == ["org/tiny", "org/tiny-b"]
    hub = window.models.hub
    hub.query.setText("tiny-c")
    hub.search_button.click()
    qtbot.waitUntil(hub.search_button.isEnabled, timeout=UNTIL_DONE)
    hub.results_view.selectRow(0)
    with qtbot.waitSignal(hub.bridge.download_done, timeout=None):
        hub.download_button.click()
    assert items(window) == ["org/tiny", "org/tiny-b", "org/tiny-c"]
    assert picker.combo.currentText() == "org/tiny"  # the model loaded stays current
    loaded = window.bridge.loaded_model
    window.models.delete("org/tiny")  # deleted while it runs: the engine still has it, the picker still names it
    assert "org/tiny" not in [m.name for m in window.models.library.rows()]
    assert picker.combo.currentText() == "org/tiny" and picker.current_model() == loaded


def test_with_an_endpoint_connected_the_picker_names_its_model_and_is_disabled(qtbot, window, openai_endpoint):
    picker = window.chat.model_picker
    endpoint = Endpoint(openai_endpoint.base_url, openai_endpoint.api_key, "")
    with qtbot.waitSignal(window.bridge.connection_changed, timeout=None):
        window.bridge.connect_remote(endpoint)
    assert items(window) == [f"tiny at {openai_endpoint.base_url}"]
    assert not picker.combo.isEnabled() and not picker.options_button.isEnabled()
    assert "File › Connection…" in picker.combo.toolTip()
    with qtbot.waitSignal(window.bridge.connection_changed, timeout=None):
        window.bridge.use_local()
    assert picker.combo.isEnabled() and items(window) == [CUT, "org/tiny", "org/tiny-b"]
