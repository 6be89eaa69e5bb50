"""The chat page on a tiny model: a reply streams in and is saved as it grows, comes back after a restart,
stops when asked (freeing its blocks), regenerates, edits the last message, and the list searches."""

from __future__ import annotations

import re

import pytest

from app.history import ChatHistory
from ui.pages.chat import ChatPage


@pytest.fixture
def page(qtbot, loaded_bridge, tmp_path):
    history = ChatHistory(tmp_path / "history.sqlite3")
    p = ChatPage(loaded_bridge, history)
    p.temperature.setValue(0.0)
    p.max_tokens.setValue(12)
    qtbot.addWidget(p)
    p.resize(1200, 700)
    return p


def send_and_wait(qtbot, page, text: str) -> None:
    page.input.setPlainText(text)
    page.send_button.click()
    qtbot.waitUntil(lambda: page.reply is None, timeout=30_000)


def test_a_reply_streams_in_and_survives_a_restart(qtbot, page, loaded_bridge, tmp_path, screenshots):
    seen: list[str] = []
    loaded_bridge.request_update.connect(lambda u: seen.append(u.text))
    # Sampled, seeded: a random model's greedy choice is often a run of newlines, which shows nothing.
    page.temperature.setValue(1.0)
    page.use_seed.setChecked(True)
    send_and_wait(qtbot, page, "Write a haiku about the sea.")
    messages = page.history.messages(page.conversation_id)
    assert [m.role for m in messages] == ["user", "assistant"]
    reply = messages[1]
    assert reply.finished and reply.content == seen[-1] and len(seen) > 1
    assert reply.stats["tokens"] == 12 and reply.stats["finish_reason"] == "length"
    assert "tokens_per_s" in reply.stats and "ttft_s" in reply.stats
    word = max(re.findall(r"[A-Za-z]{3,}", reply.content), key=len)  # markdown may restyle the rest
    assert word in page.transcript.toPlainText()
    page.grab().save(str(screenshots / "chat.png"))

    again = ChatPage(loaded_bridge, ChatHistory(tmp_path / "history.sqlite3"))
    qtbot.addWidget(again)
    assert again.conversations.count() == 1
    assert again.conversations.item(0).text() == "Write a haiku about the sea."
    again.open_conversation(again.conversations.item(0).data(0x0100))
    assert word in again.transcript.toPlainText()


def test_stop_ends_the_reply_and_frees_its_blocks(qtbot, page, loaded_bridge):
    page.max_tokens.setValue(400)
    page.input.setPlainText("Tell me a long story.")
    page.send_button.click()
    qtbot.waitUntil(lambda: page.reply is not None and page.reply.tokens >= 3, timeout=30_000)
    page.stop_button.click()
    reply = page.history.messages(page.conversation_id)[-1]
    assert reply.finished and reply.stats["finish_reason"] == "abort" and reply.stats["tokens"] < 400
    engine = loaded_bridge.engine_thread.engine
    qtbot.waitUntil(lambda: engine.get_stats().num_blocks_used == 0, timeout=10_000)


def test_regenerate_replaces_the_last_reply_and_edit_last_takes_the_message_back(qtbot, page):
    page.use_seed.setChecked(True)
    page.temperature.setValue(1.0)
    send_and_wait(qtbot, page, "Pick a number.")
    first = page.history.messages(page.conversation_id)[-1]
    page.seed.setValue(page.seed.value() + 1)
    page.regenerate_button.click()
    qtbot.waitUntil(lambda: page.reply is None, timeout=30_000)
    messages = page.history.messages(page.conversation_id)
    assert [m.role for m in messages] == ["user", "assistant"] and messages[1].id != first.id
    page.edit_button.click()
    assert page.input.toPlainText() == "Pick a number." and page.history.messages(page.conversation_id) == []


def test_conversations_can_be_searched_renamed_and_deleted(qtbot, page):
    send_and_wait(qtbot, page, "About whales")
    page.new_conversation()
    send_and_wait(qtbot, page, "About trains")
    assert page.conversations.count() == 2
    page.search.setText("whale")
    assert [page.conversations.item(i).text() for i in range(page.conversations.count())] == ["About whales"]
    page.search.setText("")
    page.rename_conversation("Railways")
    assert "Railways" in [page.conversations.item(i).text() for i in range(page.conversations.count())]
    page.delete_conversation()
    assert page.conversations.count() == 1 and page.conversation_id is None


def test_code_blocks_in_a_reply_render_with_a_copy_link_each(qtbot, page):
    from PySide6.QtCore import QUrl
    from PySide6.QtGui import QGuiApplication, QPalette, QTextFormat

    def iter_blocks(document):
        block = document.begin()
        while block.isValid():
            yield block
            block = block.next()

    conv = page.history.create_conversation("Code")
    page.history.add_message(conv.id, "user", "Two snippets, please.")
    reply = page.history.add_message(
        conv.id,
        "assistant",
        "First:\n\n```python\nprint('a')\n```\n\nThen:\n\n~~~\nls -l\necho ```\n~~~\n",
        finished=True,
    )
    page.refresh_conversations()
    page.open_conversation(conv.id)
    html = page.transcript.toHtml()
    assert html.count("Copy code") == 2 and f"copy:{reply.id}/1" in html
    code = [
        b
        for b in iter_blocks(page.transcript.document())
        if b.blockFormat().hasProperty(QTextFormat.Property.BlockCodeFence)
    ]
    shade = page.palette().color(QPalette.ColorRole.AlternateBase)
    assert [b.text() for b in code] == ["print('a')", "ls -l", "echo ```"]
    assert all(b.blockFormat().background().color() == shade for b in code)
    page.transcript.anchorClicked.emit(QUrl(f"copy:{reply.id}/1"))
    assert QGuiApplication.clipboard().text() == "ls -l\necho ```\n" and page.status.text() == "Code copied."
    page.transcript.anchorClicked.emit(QUrl(f"copy:{reply.id}/0"))
    assert QGuiApplication.clipboard().text() == "print('a')\n"
