"""Keyboard focus on every page of the window: the control a page is used from first has the focus when the page
is shown (the message box on Chat, the prompts on Batch, the search on Models), and Tab walks the page's controls
in reading order, top to bottom and left to right, through the page list and back.

No model is loaded: the controls that need one are disabled, and Tab passes them by."""

from __future__ import annotations

import pytest
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QApplication, QWidget

from app.history import ChatHistory
from app.settings import Settings
from ui.bridge import EngineBridge
from ui.main_window import MainWindow

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def window(qtbot, tmp_path):
    w = MainWindow(EngineBridge(), ChatHistory(tmp_path / "history.sqlite3"), Settings(), tmp_path / "s.json")
    qtbot.addWidget(w)
    w.resize(1280, 800)
    w.show()
    w.activateWindow()
    qtbot.waitActive(w)
    return w


def walk(qtbot, start: QWidget) -> list[QWidget]:
    """Press Tab from `start` until the focus comes back to it: the widgets it visits, in order."""
    seen = [start]
    for _ in range(100):
        qtbot.keyClick(QApplication.focusWidget(), Qt.Key.Key_Tab)
        widget = QApplication.focusWidget()
        if widget is start:
            return seen
        seen.append(widget)
    raise AssertionError("Tab never came back to where it started")


def visits_in_order(seen: list[QWidget], expected: list[QWidget]) -> bool:
    return [w for w in seen if any(w is e for e in expected)] == expected


def test_chat_starts_in_the_message_box_and_tabs_through_send_the_settings_and_the_conversations(qtbot, window):
    chat = window.chat
    window.show_page(chat)
    assert chat.input.hasFocus()
    chat.input.setPlainText("Hello")  # Send is enabled by a message; Tab must still leave the box, not indent
    expected = [
        chat.input,
        chat.send_button,
        chat.system_prompt,
        chat.sampling.temperature,
        chat.sampling.max_tokens,
        chat.sampling.use_seed,
        window.nav,
        chat.conversation_list.new_button,
        chat.conversation_list.search,
        chat.conversation_list.view,
        chat.transcript,
    ]
    assert visits_in_order(walk(qtbot, chat.input), expected)
    assert chat.input.toPlainText() == "Hello"


def test_batch_starts_in_the_prompts_and_tabs_through_import_sampling_run_and_the_results(qtbot, window):
    batch = window.batch
    window.show_page(batch)
    assert batch.input.hasFocus()
    batch.input.setPlainText("one\ntwo")  # rows to run: Run is enabled
    expected = [
        batch.input,
        batch.import_button,
        batch.sampling.temperature,
        batch.sampling.max_tokens,
        batch.run_button,
        batch.filter,
        batch.table,
        batch.detail,
        window.nav,
    ]
    assert visits_in_order(walk(qtbot, batch.input), expected)
    assert batch.input.toPlainText() == "one\ntwo"


def test_models_starts_in_the_hub_search_and_tabs_through_the_results_and_the_library(qtbot, window):
    models = window.models
    window.show_page(models)
    assert models.hub.query.hasFocus()
    expected = [models.hub.query, models.hub.search_button, models.hub.results_view, window.nav, models.library_view]
    assert visits_in_order(walk(qtbot, models.hub.query), expected)


def test_monitor_and_server_start_on_their_one_control_and_tab_in_reading_order(qtbot, window):
    monitor, server = window.monitor, window.server
    window.show_page(monitor)
    assert monitor.export_button.hasFocus()
    assert visits_in_order(walk(qtbot, monitor.export_button), [monitor.export_button, window.nav, monitor.chart])
    window.show_page(server)
    assert not server.switch.isEnabled() and server.port.hasFocus()  # the switch waits for a model
    expected = [server.port, server.api_key, server.generate_key, server.lan, server.url, server.copy_url, server.log]
    assert visits_in_order(walk(qtbot, server.port), expected)


def test_a_click_on_a_page_name_focuses_the_page_and_arrow_keys_stay_in_the_list(qtbot, window):
    nav = window.nav
    qtbot.mouseClick(nav.viewport(), Qt.MouseButton.LeftButton, pos=nav.visualItemRect(nav.item(1)).center())
    assert window.pages.currentWidget() is window.batch and window.batch.input.hasFocus()
    nav.setFocus(Qt.FocusReason.TabFocusReason)  # as Tab brings the focus to the list
    qtbot.keyClick(nav, Qt.Key.Key_Down)
    assert window.pages.currentWidget() is window.models and nav.hasFocus()
