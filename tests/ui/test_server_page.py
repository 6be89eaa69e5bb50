"""The server page on a tiny model: the switch waits for a model, serves the openai client at the URL the page
shows (and logs each request), guards with an API key, binds loopback unless LAN is ticked, stops serving when
switched off, says so when the port is taken, follows a model reload, and its snippets run as written.

Waits end on what they wait for, never on the clock: a loaded machine only makes them slower. A hang is caught by
the module's pytest-timeout mark."""

from __future__ import annotations

import contextlib
import io
import math
import socket
from pathlib import Path

import openai
import pytest
import yaml
from PySide6.QtGui import QFontInfo
from PySide6.QtWidgets import QApplication

from app.server.run import default_model_id
from ui.bridge import EngineBridge, ModelLoaded
from ui.pages.server import LOG_ROWS, ServerPage

pytestmark = pytest.mark.timeout(600)
UNTIL_DONE = math.inf  # qtbot.waitUntil's timeout: none


@pytest.fixture
def page(qtbot, loaded_bridge):
    p = ServerPage(loaded_bridge)
    qtbot.addWidget(p)
    p.resize(1100, 760)
    p.port.setValue(0)
    yield p
    p.shutdown()


def client(page: ServerPage, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=page.url.text(), api_key=api_key, max_retries=0, timeout=None)


def ask(page: ServerPage, api_key: str = "unused"):
    return client(page, api_key).chat.completions.create(
        model=page.served_model_name(), messages=[{"role": "user", "content": "Hi"}], max_tokens=5
    )


def log_rows(page: ServerPage) -> list[dict[str, str]]:
    columns = [page.log.horizontalHeaderItem(c).text() for c in range(page.log.columnCount())]
    return [{name: page.log.item(r, c).text() for c, name in enumerate(columns)} for r in range(page.log.rowCount())]


def test_serves_the_openai_client_at_the_shown_url_and_logs_each_request(qtbot, page, tiny_chat_model, screenshots):
    assert page.served_model_name() == Path(tiny_chat_model).name == default_model_id(str(tiny_chat_model))
    page.switch.click()
    assert page.switch.isChecked() and page.server is not None
    url = page.url.text()
    assert url.startswith("http://127.0.0.1:") and url.endswith("/v1") and not url.startswith("http://127.0.0.1:0/")
    reply = ask(page)
    assert reply.model == page.served_model_name() and reply.usage.completion_tokens == 5
    qtbot.waitUntil(lambda: page.log.rowCount() == 1, timeout=UNTIL_DONE)
    row = log_rows(page)[0]
    assert (row["Method"], row["Path"], row["Status"], row["Tokens"]) == ("POST", "/v1/chat/completions", "200", "5")
    assert row["Client"] == "127.0.0.1"
    assert url in page.status.text() and "this computer only" in page.status.text()
    assert not page.port.isEnabled() and not page.api_key.isEnabled()  # settings are fixed while serving
    page.show()
    qtbot.waitExposed(page)
    page.grab().save(str(screenshots / "server.png"))


def test_an_api_key_turns_away_clients_without_it_and_the_snippets_carry_it(qtbot, page):
    page.generate_key.click()
    key = page.api_key.text()
    page.generate_key.click()
    assert len(key) >= 32 and page.api_key.text() != key
    key = page.api_key.text()
    page.switch.click()
    with pytest.raises(openai.AuthenticationError):
        ask(page, api_key="wrong")
    # The Python snippet, run as written, is a client with the key.
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(page.python_snippet.toPlainText(), {})
    assert out.getvalue().strip()
    qtbot.waitUntil(lambda: page.log.rowCount() == 2, timeout=UNTIL_DONE)
    assert [r["Status"] for r in log_rows(page)] == ["200", "401"]  # newest first
    entry = yaml.safe_load(page.ide_snippet.toPlainText())["models"][0]
    assert entry["provider"] == "openai" and entry["apiBase"] == page.url.text()
    assert entry["model"] == page.served_model_name() and entry["apiKey"] == key


def test_snippets_follow_the_settings_and_quote_odd_names(page):
    page.port.setValue(8123)
    page.model_name.setText('my "model": v2')
    assert page.url.text() == "http://127.0.0.1:8123/v1"
    assert 'base_url="http://127.0.0.1:8123/v1"' in page.python_snippet.toPlainText()
    assert 'model="my \\"model\\": v2"' in page.python_snippet.toPlainText()
    entry = yaml.safe_load(page.ide_snippet.toPlainText())["models"][0]
    assert entry["model"] == 'my "model": v2' and entry["apiBase"] == "http://127.0.0.1:8123/v1"
    assert "apiKey" not in entry  # no key set: none to send
    page.port.setValue(0)
    assert page.url.text() == ""  # not known until the server picks one


def test_lan_access_is_opt_in_and_warns(page):
    assert page.settings().host == "127.0.0.1" and page.lan_warning.isHidden()
    page.lan.setChecked(True)
    assert page.settings().host == "0.0.0.0" and not page.lan_warning.isHidden()
    assert "Set an API key" in page.lan_warning.text()
    page.api_key.setText("secret")
    assert "Set an API key" not in page.lan_warning.text() and "network" in page.lan_warning.text()
    page.lan.setChecked(False)
    assert page.lan_warning.isHidden()


def test_switching_off_stops_serving(qtbot, page):
    page.switch.click()
    ask(page)
    url = page.url.text()
    page.switch.click()
    assert not page.switch.isChecked() and page.server is None and page.port.isEnabled()
    with pytest.raises(openai.APIConnectionError):
        openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=5).models.list()


def test_a_port_in_use_is_said_on_the_page_and_the_switch_returns_to_off(page):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        page.port.setValue(port)
        page.switch.click()
        assert not page.switch.isChecked() and page.server is None
        assert f"Port {port} is already in use" in page.status.text()
    page.switch.click()  # the port is free again
    assert page.switch.isChecked() and page.url.text() == f"http://127.0.0.1:{port}/v1"


def test_the_log_keeps_the_newest_rows(qtbot, page):
    for i in range(LOG_ROWS + 3):
        page.request_logged.emit(
            {
                "time": 0.0,
                "method": "GET",
                "path": f"/v1/models/{i}",
                "status": 404,
                "seconds": 0.001,
                "completion_tokens": 0,
                "remote": "127.0.0.1",
            }
        )
    qtbot.waitUntil(
        lambda: page.log.rowCount() == LOG_ROWS and page.log.item(0, 2).text() == f"/v1/models/{LOG_ROWS + 2}",
        timeout=UNTIL_DONE,
    )
    assert page.log.item(LOG_ROWS - 1, 2).text() == "/v1/models/3"


def test_the_switch_waits_for_a_model_and_follows_a_reload(qtbot, tiny_chat_model, load_options):
    bridge = EngineBridge()
    page = ServerPage(bridge)
    qtbot.addWidget(page)
    try:
        assert not page.switch.isEnabled() and "Load a model" in page.status.text()
        page.port.setValue(0)
        with qtbot.waitSignal(bridge.model_loaded, timeout=None):
            bridge.load_model(str(tiny_chat_model), load_options)
        assert page.switch.isEnabled()
        page.switch.click()
        first_thread, url = bridge.engine_thread, page.url.text()
        ask(page)
        with qtbot.waitSignal(bridge.model_loaded, timeout=None):
            bridge.load_model(str(tiny_chat_model), load_options)
        # Served from the new engine thread (the old one is stopped and would answer 503), at the same URL.
        assert bridge.engine_thread is not first_thread
        assert page.switch.isChecked() and page.url.text() == url
        assert ask(page).usage.completion_tokens == 5
    finally:
        page.shutdown()
        bridge.shutdown()


def test_the_default_model_name_is_the_one_kvstudio_serve_gives(qtbot, tmp_path):
    page = ServerPage(EngineBridge())
    qtbot.addWidget(page)
    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    page.bridge.model_loaded.emit(ModelLoaded(str(gguf), 512, 0.1))
    assert page.served_model_name() == default_model_id(str(gguf)) == "SmolLM2-135M-Instruct.Q4_1"
    assert page.model_name.placeholderText() == "SmolLM2-135M-Instruct.Q4_1"
    assert 'model="SmolLM2-135M-Instruct.Q4_1"' in page.python_snippet.toPlainText()


def test_each_copy_button_says_what_it_copies(qtbot, screenshots):
    p = ServerPage(EngineBridge())  # no model: only the buttons are looked at
    qtbot.addWidget(p)
    p.resize(1100, 760)
    p.port.setValue(8123)
    assert p.copy_url.toolTip() == "Copy the base URL"
    assert p.copy_snippet.text() == "Copy snippet"
    assert p.copy_snippet.toolTip() == "Copy the Python (openai) snippet"
    p.copy_snippet.click()
    assert QApplication.clipboard().text() == p.python_snippet.toPlainText()
    p.snippets.setCurrentWidget(p.ide_snippet)
    assert p.copy_snippet.toolTip() == "Copy the IDE plugin (Continue) snippet"
    with qtbot.waitExposed(p):  # a tab widget lays out its tabs and corner once shown
        p.show()
    p.grab().save(str(screenshots / "server-copy-buttons.png"))
    p.shutdown()


def laid_out_lines(box) -> list[int]:
    """How many lines of the box each line of its text takes (0: not laid out yet)."""
    document = box.document()
    return [document.findBlockByNumber(i).layout().lineCount() for i in range(document.blockCount())]


def test_a_snippet_keeps_its_lines_in_a_narrow_window_and_scrolls_sideways(qtbot):
    p = ServerPage(EngineBridge())
    qtbot.addWidget(p)
    p.api_key.setText("sk-" + "k" * 60)  # a long line: the key's string in the snippet
    p.resize(700, 600)
    with qtbot.waitExposed(p):
        p.show()
    for box in (p.python_snippet, p.ide_snippet):
        p.snippets.setCurrentWidget(box)
        qtbot.waitUntil(lambda b=box: 0 not in laid_out_lines(b))  # a tab shown first lays its text out on a turn
        assert laid_out_lines(box) == [1] * box.document().blockCount()  # no line broken inside a string
        assert box.horizontalScrollBar().maximum() > 0  # the long line is reached by scrolling
        assert QFontInfo(box.font()).fixedPitch()
    p.shutdown()
