"""JSON replies and reasoning in the window, on the tiny model through the real engine: a chat given a JSON schema
(from the dialog, which checks it as it is typed) is marked with a badge and every reply keeps to the schema; a
reply's thinking is folded under it, unfolded on a click; batch rows with a response_format each return
parseable JSON. Waits end on what they wait for, never on the clock."""

from __future__ import annotations

import json
import math

import jsonschema
import pytest

from app.history import ChatHistory
from app.remote_client import Endpoint
from engine.structured_output import StructuredOutputsParams
from ui.bridge import EngineBridge
from ui.pages.batch import BatchPage
from ui.pages.chat import ChatPage
from ui.widgets.batch_table import DONE
from ui.widgets.json_schema_dialog import JsonSchemaDialog

pytestmark = pytest.mark.timeout(600)
UNTIL_DONE = math.inf

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 3},
    },
    "required": ["name", "age", "pets"],
    "additionalProperties": False,
}


@pytest.fixture
def page(qtbot, loaded_bridge, tmp_path):
    p = ChatPage(loaded_bridge, ChatHistory(tmp_path / "history.sqlite3"))
    p.sampling.temperature.setValue(1.0)
    p.sampling.use_seed.setChecked(True)
    p.sampling.max_tokens.setValue(160)
    qtbot.addWidget(p)
    p.resize(1200, 700)
    return p


def send_and_wait(qtbot, page, text: str) -> None:
    page.input.setPlainText(text)
    page.send_button.click()
    qtbot.waitUntil(lambda: page.reply is None, timeout=UNTIL_DONE)


def test_the_dialog_checks_the_schema_as_it_is_typed(qtbot, screenshots):
    dialog = JsonSchemaDialog()
    qtbot.addWidget(dialog)
    assert dialog.use_button.isEnabled() and not dialog.remove_button.isEnabled()  # the example is valid
    for text, words in (
        ("{not json", "Not JSON"),
        ("[1, 2]", "is an object"),
        ('{"type": "strung"}', "strung"),
        ('{"type": "string", "pattern": "(("}', "unclosed group"),
    ):
        dialog.editor.setPlainText(text)
        assert not dialog.use_button.isEnabled() and words in dialog.problem.text(), text
    dialog.editor.setPlainText(json.dumps(PERSON))
    assert dialog.use_button.isEnabled() and dialog.problem.text() == "✓ JSON object: name, age, pets"
    dialog.format_button.click()
    assert dialog.editor.toPlainText().startswith('{\n  "type": "object"')
    dialog.grab().save(str(screenshots / "json-schema-dialog.png"))
    dialog.use_button.click()
    assert dialog.result() == JsonSchemaDialog.Accepted and json.loads(dialog.schema) == PERSON
    again = JsonSchemaDialog(dialog.schema)
    qtbot.addWidget(again)
    again.remove_button.click()
    assert again.result() == JsonSchemaDialog.REMOVED


def test_a_chat_with_a_schema_gets_a_badge_and_replies_that_keep_to_it(qtbot, page, tmp_path, screenshots):
    page.set_json_schema(json.dumps(PERSON))
    item = page.conversation_list.view.item(0)
    assert not item.icon().isNull() and "JSON schema" in item.toolTip()
    assert page.reply_format.badge.isVisible() or not page.isVisible()
    assert page.reply_format.state.text() == "JSON object: name, age, pets"
    for question in ("Who are you?", "And your pets?"):
        send_and_wait(qtbot, page, question)
        reply = page.history.messages(page.conversation_id)[-1]
        assert reply.stats["finish_reason"] == "stop", reply.content
        jsonschema.validate(json.loads(reply.content), PERSON)
    # Each reply shows as a JSON code block, its Copy code link copying the JSON.
    from PySide6.QtCore import QUrl
    from PySide6.QtGui import QGuiApplication

    assert page.transcript.toHtml().count("Copy code") == 2
    page.transcript.anchorClicked.emit(QUrl(f"copy:{reply.id}/0"))
    assert json.loads(QGuiApplication.clipboard().text()) == json.loads(reply.content)
    page.show()
    qtbot.waitExposed(page)
    page.grab().save(str(screenshots / "chat-json-schema.png"))
    reopened = ChatPage(page.bridge, ChatHistory(tmp_path / "history.sqlite3"))
    qtbot.addWidget(reopened)
    assert json.loads(reopened.history.list_conversations()[0].json_schema) == PERSON
    page.set_json_schema("")  # free text again: no badge
    assert page.conversation_list.view.item(0).icon().isNull() and page.reply_format.state.text() == "Free text"


def test_a_schema_is_not_sent_to_a_remote_endpoint_that_would_ignore_it(qtbot, page, monkeypatch):
    page.set_json_schema(json.dumps(PERSON))
    monkeypatch.setattr(EngineBridge, "remote", property(lambda self: Endpoint("http://127.0.0.1:9/v1")))
    page.input.setPlainText("Who are you?")
    page.send_button.click()
    assert page.reply is None and "this computer's engine" in page.status.text()
    # refused before anything is saved: the message stays in the box, to send once disconnected
    assert page.history.messages(page.conversation_id) == [] and page.input.toPlainText() == "Who are you?"


def test_thinking_is_folded_under_the_reply_and_unfolds_on_a_click(qtbot, page, monkeypatch, screenshots):
    from PySide6.QtCore import QUrl
    from PySide6.QtGui import QGuiApplication

    # The tiny model thinks as a reasoning model does, kept to a grammar: a think block, then the answer.
    thinks = (
        'start: "<think>\\nThe user greets me. " WORD " " WORD ".\\n</think>\\n\\nHello " WORD "!"\nWORD: /[a-z]{2,6}/'
    )
    params = page.sampling.params
    monkeypatch.setattr(
        page.sampling, "params", lambda: {**params(), "structured_outputs": StructuredOutputsParams(grammar=thinks)}
    )
    send_and_wait(qtbot, page, "Hi!")
    reply = page.history.messages(page.conversation_id)[-1]
    assert reply.content.startswith("<think>")  # kept whole: the template gets it back as the model wrote it
    shown = page.transcript.toPlainText()
    assert "▸ Reasoning (6 words)" in shown and "The user greets me" not in shown and "Hello " in shown
    assert "<think>" not in shown
    page.transcript.anchorClicked.emit(QUrl(f"think:{reply.id}"))
    assert "▾ Reasoning" in page.transcript.toPlainText() and "The user greets me" in page.transcript.toPlainText()
    page.show()
    qtbot.waitExposed(page)
    page.grab().save(str(screenshots / "chat-reasoning.png"))
    page.transcript.anchorClicked.emit(QUrl(f"think:{reply.id}"))
    assert "The user greets me" not in page.transcript.toPlainText()
    page.copy_last_reply()
    assert QGuiApplication.clipboard().text().startswith("Hello ")


@pytest.fixture
def batch_page(qtbot, loaded_bridge):
    p = BatchPage(loaded_bridge)
    p.sampling.temperature.setValue(1.0)
    p.sampling.max_tokens.setValue(200)
    qtbot.addWidget(p)
    p.resize(1200, 700)
    return p


def test_batch_rows_with_a_response_format_return_json(qtbot, batch_page, tmp_path, screenshots):
    path = tmp_path / "rows.jsonl"
    rows = [{"prompt": f"Person number {i}", "response_format": PERSON, "seed": i} for i in range(6)]
    rows.append({"prompt": "Just talk", "max_tokens": 8})
    path.write_text("\n".join(json.dumps(r) for r in rows))
    assert batch_page.import_file(path)
    assert batch_page.model.data(batch_page.model.index(0, 1)).startswith("{ } ")
    batch_page.run_button.click()
    qtbot.waitUntil(lambda: not batch_page.running, timeout=UNTIL_DONE)
    items = batch_page.model.items
    assert all(item.status == DONE for item in items)
    for item in items[:6]:
        assert item.finish_reason == "stop", item.output
        jsonschema.validate(json.loads(item.output), PERSON)
    batch_page.table.selectRow(0)
    assert "Reply keeps to" in batch_page.detail.toPlainText()
    batch_page.grab().save(str(screenshots / "batch-json.png"))
    out = tmp_path / "results.jsonl"
    assert batch_page.export(out)
    exported = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(isinstance(json.loads(r["output"]), dict) for r in exported[:6])
