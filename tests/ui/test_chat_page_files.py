"""The chat page's Export… and Import… buttons: the open conversation goes to the file the user picks (Markdown or
JSON, by the filter chosen when no suffix is typed), comes back from JSON as a new conversation that opens, and a
malformed file is refused in the status line with nothing saved. The file dialogs are replaced by the path a user
would pick; no reply is asked for, so no model is loaded."""

from __future__ import annotations

import pytest
from PySide6.QtWidgets import QFileDialog, QInputDialog

from app.history import ChatHistory
from ui.bridge import EngineBridge
from ui.pages.chat import ChatPage


@pytest.fixture
def page(qtbot, tmp_path):
    history = ChatHistory(tmp_path / "history.sqlite3")
    conv = history.create_conversation("Sea haiku", system_prompt="Answer in verse.")
    history.add_message(conv.id, "user", "Write a haiku about the sea.")
    history.add_message(conv.id, "assistant", "Waves fold into foam.", stats={"tokens": 6})
    p = ChatPage(EngineBridge(), history)
    qtbot.addWidget(p)
    p.conversation_list.view.setCurrentRow(0)
    assert p.conversation_id == conv.id
    return p


def pick(monkeypatch, dialog: str, path, chosen_filter: str = "") -> None:
    monkeypatch.setattr(QFileDialog, dialog, staticmethod(lambda *args, **kwargs: (str(path), chosen_filter)))


def test_export_then_import_brings_the_conversation_back_as_a_new_one(page, monkeypatch, tmp_path):
    first = page.conversation_id
    # no suffix typed, the JSON filter chosen: JSON it is
    pick(monkeypatch, "getSaveFileName", tmp_path / "sea", "JSON, to import again (*.json)")
    page.conversation_list.export_button.click()
    assert (tmp_path / "sea.json").exists() and not (tmp_path / "sea").exists()

    pick(monkeypatch, "getOpenFileName", tmp_path / "sea.json")
    page.conversation_list.import_button.click()
    assert page.conversation_id != first  # the copy is the one open
    copy = page.history.conversation(page.conversation_id)
    assert (copy.title, copy.system_prompt) == ("Sea haiku", "Answer in verse.")
    assert [(m.role, m.content, m.stats) for m in page.history.messages(copy.id)] == [
        (m.role, m.content, m.stats) for m in page.history.messages(first)
    ]
    assert page.conversation_list.view.count() == 2
    assert page.system_prompt.toPlainText() == "Answer in verse."
    assert "Imported" in page.status.text()


def test_export_to_markdown_writes_each_message_under_its_role(page, monkeypatch, tmp_path):
    pick(monkeypatch, "getSaveFileName", tmp_path / "sea.md", "Markdown (*.md)")
    page.conversation_list.export_button.click()
    text = (tmp_path / "sea.md").read_text(encoding="utf-8")
    assert "## User\n\nWrite a haiku about the sea." in text
    assert "## Assistant\n\nWaves fold into foam." in text
    assert "sea.md" in page.status.text()


def test_a_malformed_file_is_refused_in_words_and_nothing_is_saved(page, monkeypatch, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "kvstudio-conversation", "version": 1, "title": "t", "messages": [{"role": "bot"}]}')
    opened = page.conversation_id
    pick(monkeypatch, "getOpenFileName", bad)
    page.conversation_list.import_button.click()
    assert "Could not import" in page.status.text() and "messages[0].role" in page.status.text()
    assert page.conversation_id == opened
    assert len(page.history.list_conversations()) == 1


def test_branch_opens_a_new_chat_ending_on_the_chosen_message(page, monkeypatch):
    first = page.conversation_id
    chosen = []

    def choose_the_first(parent, title, label, items, current, editable):
        chosen.append(items[current])  # the last message is offered first
        return items[0], True

    monkeypatch.setattr(QInputDialog, "getItem", staticmethod(choose_the_first))
    page.conversation_list.branch_button.click()
    assert chosen == ["2. assistant: Waves fold into foam."]
    assert page.conversation_id != first
    assert [(m.role, m.content) for m in page.history.messages(page.conversation_id)] == [
        ("user", "Write a haiku about the sea.")
    ]
    assert page.conversation_list.view.currentItem().text() == "Sea haiku (branch)"
    assert len(page.history.messages(first)) == 2
