"""Chat and Batch on a remote OpenAI-compatible endpoint (kvstudio's own server on loopback, with a key): the
Connection dialog checks it and says why it cannot connect, replies stream in the same pages, and the window
reconnects after a restart. Also the window's keyboard shortcuts and the page fields it remembers.

Waits end on what they wait for, never on the clock: a loaded machine only makes them slower. A hang is caught by
the module's pytest-timeout mark."""

from __future__ import annotations

import json
import math

import openai
import pytest
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QApplication

from app.history import ChatHistory
from app.remote_client import Endpoint
from app.settings import Settings, load_settings
from engine import SamplingParams
from ui.bridge import EngineBridge
from ui.main_window import MainWindow
from ui.pages.batch import BatchPage
from ui.pages.chat import ChatPage
from ui.widgets.batch_table import DONE
from ui.widgets.connection_dialog import ConnectionDialog

pytestmark = pytest.mark.timeout(600)
UNTIL_DONE = math.inf  # qtbot.waitUntil's timeout: none


def connected_bridge(qtbot, endpoint) -> EngineBridge:
    bridge = EngineBridge()
    with qtbot.waitSignal(bridge.connection_changed, timeout=None) as changed:
        bridge.connect_remote(Endpoint(endpoint.base_url, endpoint.api_key))
    assert changed.args[0] == Endpoint(endpoint.base_url, endpoint.api_key, "tiny")  # the model filled in
    return bridge


def test_a_chat_reply_streams_from_the_endpoint_and_is_kept(qtbot, tmp_path, openai_endpoint):
    bridge = connected_bridge(qtbot, openai_endpoint)
    assert bridge.engine_thread is None and bridge.ready() and bridge.chat_templated()
    page = ChatPage(bridge, ChatHistory(tmp_path / "h.sqlite3"))
    qtbot.addWidget(page)
    page.sampling.temperature.setValue(0.0)
    page.sampling.max_tokens.setValue(10)
    page.system_prompt.setPlainText("Be brief.")
    updates = []
    bridge.request_update.connect(updates.append)
    page.input.setPlainText("Say hello")
    page.send_button.click()
    qtbot.waitUntil(lambda: page.reply is None, timeout=UNTIL_DONE)
    expected = openai.OpenAI(
        base_url=openai_endpoint.base_url, api_key=openai_endpoint.api_key, max_retries=0
    ).chat.completions.create(
        model="tiny",
        max_tokens=10,
        temperature=0,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}],
    )
    reply = page.history.messages(page.conversation_id)[-1]
    assert reply.finished and reply.content == expected.choices[0].message.content
    assert reply.stats["tokens"] == 10 and reply.stats["finish_reason"] == "length"
    assert len(updates) > 2 and not any(u.finished for u in updates[:-1])  # it streamed
    # the endpoint says nothing of its context or KV blocks: the meter says so rather than guess
    assert page.meter.tokens is None and page.meter.blocks is None and page.meter.kv.text() == ""
    assert page.meter.figure.text() == "Context use is not known for a remote endpoint"
    bridge.shutdown()


def test_a_batch_runs_on_the_endpoint(qtbot, openai_endpoint):
    bridge = connected_bridge(qtbot, openai_endpoint)
    page = BatchPage(bridge)
    qtbot.addWidget(page)
    assert page.mode.text() == "Chat · tiny" and openai_endpoint.base_url in page.run_button.toolTip()
    page.input.setPlainText("\n".join(f"Prompt {i}" for i in range(6)))
    page.sampling.max_tokens.setValue(5)
    page.run_button.click()
    qtbot.waitUntil(lambda: not page.running, timeout=UNTIL_DONE)
    assert [item.status for item in page.model.items] == [DONE] * 6
    assert all(item.tokens == 5 and item.output and item.finish_reason == "length" for item in page.model.items)
    bridge.shutdown()


def test_an_endpoint_that_stops_answering_fails_the_reply_in_words(qtbot, tmp_path, openai_endpoint):
    bridge = connected_bridge(qtbot, openai_endpoint)
    page = ChatPage(bridge, ChatHistory(tmp_path / "h.sqlite3"))
    qtbot.addWidget(page)
    # The same endpoint behind a port nothing listens on: what a server that went away looks like.
    bridge._remote.endpoint = Endpoint("http://127.0.0.1:9/v1", model="tiny")
    page.input.setPlainText("hello?")
    page.send_button.click()
    qtbot.waitUntil(lambda: page.reply is None, timeout=UNTIL_DONE)
    assert page.status.text().startswith("Stopped: cannot reach http://127.0.0.1:9/v1")
    assert page.history.messages(page.conversation_id)[-1].stats["finish_reason"] == "error"
    bridge.shutdown()


def test_the_dialog_says_why_it_cannot_connect_and_the_window_remembers_the_endpoint(qtbot, tmp_path, openai_endpoint):
    settings_path = tmp_path / "settings.json"
    window = MainWindow(EngineBridge(), ChatHistory(tmp_path / "h.sqlite3"), Settings(), settings_path)
    qtbot.addWidget(window)
    assert window.connection_status.text() == "Chat & Batch: this computer"
    dialog = ConnectionDialog(window.bridge, parent=window)
    dialog.remote.setChecked(True)
    dialog.url.setText("gpu-box:8000")
    dialog.apply()
    assert dialog.message.text().startswith("The endpoint URL must start with http") and not dialog.result()
    dialog.url.setText(openai_endpoint.base_url)
    dialog.api_key.setText("wrong")
    with qtbot.waitSignal(window.bridge.connection_failed, timeout=None):
        dialog.apply()
    assert "answered 401" in dialog.message.text() and dialog.result() == 0
    dialog.api_key.setText(openai_endpoint.api_key)
    dialog.model.setEditText("nope")
    with qtbot.waitSignal(window.bridge.connection_failed, timeout=None):
        dialog.apply()
    assert "does not serve 'nope'; it serves tiny" in dialog.message.text()
    dialog.model.setEditText("")
    with qtbot.waitSignal(dialog.finished, timeout=None) as finished:  # closed (and deleted) once connected
        dialog.apply()
    assert finished.args == [ConnectionDialog.Accepted]
    assert window.connection_status.text() == f"Chat & Batch: tiny at {openai_endpoint.base_url}"
    assert not window.monitor.remote_note.isHidden() and openai_endpoint.base_url in window.monitor.remote_note.text()
    saved = load_settings(settings_path)
    assert (saved.use_remote, saved.remote_url, saved.remote_model) == (True, openai_endpoint.base_url, "tiny")
    window.close()

    # A restart reconnects (the local model load fails here: there is none, and that is said apart).
    again = MainWindow(EngineBridge(), ChatHistory(tmp_path / "h.sqlite3"), load_settings(settings_path), settings_path)
    qtbot.addWidget(again)
    again.settings.last_model = str(tmp_path / "none.gguf")
    with qtbot.waitSignal(again.bridge.connection_changed, timeout=None):
        again.start()
    assert again.bridge.remote.model == "tiny" and again.connection_status.text().startswith("Chat & Batch: tiny")
    back = ConnectionDialog(again.bridge, parent=again)
    assert back.remote.isChecked() and back.url.text() == openai_endpoint.base_url
    back.local.setChecked(True)
    with qtbot.waitSignal(again.bridge.connection_changed, timeout=None):
        back.apply()
    assert again.bridge.remote is None and not load_settings(settings_path).use_remote
    assert again.monitor.remote_note.isHidden()
    again.close()


def test_every_shortcut_is_unique_and_acts(qtbot, tmp_path):
    window = MainWindow(EngineBridge(), ChatHistory(tmp_path / "h.sqlite3"), Settings(), tmp_path / "s.json")
    qtbot.addWidget(window)
    with qtbot.waitActive(window):  # window shortcuts reach the active window only
        window.show()
        window.activateWindow()
    keys = [a.shortcut().toString() for a in window.actions]
    assert all(keys) and len(set(keys)) == len(keys)  # a key bound twice would fire neither action
    qtbot.keyClick(window, Qt.Key_2, Qt.ControlModifier)
    assert window.pages.currentWidget() is window.batch
    qtbot.keyClick(window, Qt.Key_N, Qt.ControlModifier)
    assert window.pages.currentWidget() is window.chat and window.chat.conversation_id is not None
    assert [c.title for c in window.chat.history.list_conversations()] == ["New chat"]
    window.nav.setCurrentRow(2)
    qtbot.keyClick(window, Qt.Key_F, Qt.ControlModifier)
    assert window.pages.currentWidget() is window.chat and window.chat.conversation_list.search.hasFocus()
    window.close()


def test_page_fields_and_the_page_come_back_after_a_restart(qtbot, tmp_path):
    path = tmp_path / "settings.json"
    window = MainWindow(EngineBridge(), ChatHistory(tmp_path / "h.sqlite3"), Settings(), path)
    qtbot.addWidget(window)
    window.chat.sampling.temperature.setValue(0.35)
    window.chat.sampling.use_seed.setChecked(True)
    window.chat.sampling.seed.setValue(1234)
    window.batch.sampling.max_tokens.setValue(64)
    window.server.port.setValue(8123)
    window.server.lan.setChecked(True)
    window.nav.setCurrentRow(4)
    window.close()
    saved = json.loads(path.read_text())
    assert saved["last_page"] == 4 and saved["pages"]["server"] == {"port": 8123, "api_key": "", "lan": True}

    again = MainWindow(EngineBridge(), ChatHistory(tmp_path / "h.sqlite3"), load_settings(path), path)
    qtbot.addWidget(again)
    assert again.pages.currentWidget() is again.server
    assert (
        again.chat.sampling.temperature.value(),
        again.chat.sampling.use_seed.isChecked(),
        again.chat.sampling.seed.value(),
    ) == (
        0.35,
        True,
        1234,
    )
    assert (
        again.batch.sampling.max_tokens.value() == 64
        and again.server.port.value() == 8123
        and again.server.lan.isChecked()
    )
    again.close()


def test_switching_away_ends_a_reply_in_flight_in_words(qtbot, tmp_path, openai_endpoint):
    bridge = connected_bridge(qtbot, openai_endpoint)
    page = ChatPage(bridge, ChatHistory(tmp_path / "h.sqlite3"))
    qtbot.addWidget(page)
    page.sampling.max_tokens.setValue(200)
    page.input.setPlainText("Tell me a long story.")
    page.send_button.click()
    with qtbot.waitSignal(bridge.connection_changed, timeout=None) as changed:
        bridge.use_local()
    assert changed.args == [None]
    qtbot.waitUntil(lambda: page.reply is None, timeout=UNTIL_DONE)  # not left "Generating…"
    assert page.status.text() == f"Stopped: the connection to {openai_endpoint.base_url} was closed"
    assert page.send_button.isEnabled()
    bridge.shutdown()


def test_a_check_overtaken_by_another_choice_changes_nothing(qtbot, openai_endpoint):
    bridge = EngineBridge()
    changes = []
    bridge.connection_changed.connect(changes.append)
    bridge.connection_failed.connect(changes.append)
    worker = bridge.connect_remote(Endpoint(openai_endpoint.base_url, openai_endpoint.api_key))
    bridge.use_local()  # chosen while the check runs
    worker.join()
    QApplication.processEvents()  # whatever the check emitted would be delivered now
    assert bridge.remote is None and changes == [None]
    worker = bridge.connect_remote(Endpoint(openai_endpoint.base_url, openai_endpoint.api_key))
    bridge.cancel_connect()
    worker.join()
    QApplication.processEvents()
    assert bridge.remote is None and changes == [None]
    bridge.shutdown()


def test_cancel_while_connecting_keeps_this_computer(qtbot, tmp_path, openai_endpoint, monkeypatch):
    window = MainWindow(
        EngineBridge(),
        ChatHistory(tmp_path / "h.sqlite3"),
        Settings(use_remote=True, remote_url="http://127.0.0.1:9/v1"),
        tmp_path / "settings.json",
    )
    qtbot.addWidget(window)
    checks, connect = [], window.bridge.connect_remote
    monkeypatch.setattr(
        window.bridge, "connect_remote", lambda endpoint: checks.append(connect(endpoint)) or checks[-1]
    )
    dialog = ConnectionDialog(window.bridge, parent=window)
    dialog.remote.setChecked(True)
    dialog.url.setText(openai_endpoint.base_url)
    dialog.api_key.setText(openai_endpoint.api_key)
    dialog.apply()
    dialog.reject()
    [check] = checks
    check.join()  # the check ends (the endpoint answers) after the cancel
    QApplication.processEvents()  # whatever it emitted would be delivered now
    assert window.bridge.remote is None
    # Choosing this computer when nothing is connected still saves it: the failed endpoint is not retried.
    again = ConnectionDialog(window.bridge, parent=window)
    again.local.setChecked(True)
    again.apply()
    assert not load_settings(tmp_path / "settings.json").use_remote
    window.close()


def test_a_chat_prepared_for_this_computer_goes_to_an_endpoint_connected_since_as_messages(
    qtbot, tiny_chat_model, load_options, openai_endpoint, monkeypatch
):
    bridge = EngineBridge()
    with qtbot.waitSignal(bridge.model_loaded, timeout=None):
        bridge.load_model(str(tiny_chat_model), load_options)
    messages = [{"role": "user", "content": "Say hello"}]
    prepared = bridge.prepare_chat(messages)  # rendered through the local model's chat template
    assert prepared.target is bridge.target and prepared.prepared["prompt"].startswith("<|im_start|>")
    with qtbot.waitSignal(bridge.connection_changed, timeout=None):
        bridge.connect_remote(Endpoint(openai_endpoint.base_url, openai_endpoint.api_key))
    sent, submit = [], bridge.target.submit_chat
    monkeypatch.setattr(bridge.target, "submit_chat", lambda chat, *args: sent.append(chat) or submit(chat, *args))
    updates = []
    bridge.request_update.connect(updates.append)
    rid = bridge.submit_chat(prepared, SamplingParams(temperature=0.0, max_tokens=5))
    qtbot.waitUntil(lambda: bool(updates) and updates[-1].finished, timeout=UNTIL_DONE)
    assert sent == [messages]  # the endpoint renders them itself
    assert {u.request_id for u in updates} == {rid} and updates[-1].num_tokens == 5
    bridge.shutdown()
