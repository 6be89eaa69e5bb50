"""The chat page on a tiny model: a reply streams in and is saved as it grows (each redraw shows what the history
file holds, and a kill -9 mid-reply loses nothing drawn), comes back after a restart, stops when asked (freeing its
blocks), regenerates, edits the last message, and the list searches (and highlights a new chat). A refused send
leaves no empty reply, a message sent before a model is loaded stays in the box unsaved, the buttons act only on
what the conversation holds, and a full disk is said in words with the saved conversation intact.

Waits end on what they wait for, never on the clock: a loaded machine only makes them slower. A hang is caught by
the module's pytest-timeout mark."""

from __future__ import annotations

import json
import math
import re
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QApplication

from app.engine_thread import QueueFullError
from app.history import ChatHistory
from engine import LLM
from ui.bridge import EngineBridge, RequestUpdate
from ui.pages.chat import ChatPage

pytestmark = pytest.mark.timeout(600)
UNTIL_DONE = math.inf  # qtbot.waitUntil's timeout: none


@pytest.fixture
def page(qtbot, loaded_bridge, tmp_path):
    history = ChatHistory(tmp_path / "history.sqlite3")
    p = ChatPage(loaded_bridge, history)
    p.sampling.temperature.setValue(0.0)
    p.sampling.max_tokens.setValue(12)
    qtbot.addWidget(p)
    p.resize(1200, 700)
    return p


def send_and_wait(qtbot, page, text: str) -> None:
    page.input.setPlainText(text)
    page.send_button.click()
    qtbot.waitUntil(lambda: page.reply is None, timeout=UNTIL_DONE)


def stored_rows(path: Path) -> list[tuple]:
    """Every conversation and message in the history file, read through a connection of its own."""
    raw = sqlite3.connect(path)
    try:
        return raw.execute("SELECT * FROM conversations").fetchall() + raw.execute("SELECT * FROM messages").fetchall()
    finally:
        raw.close()


def test_a_reply_streams_in_and_survives_a_restart(qtbot, page, loaded_bridge, tmp_path, screenshots):
    updates: list[RequestUpdate] = []
    loaded_bridge.request_update.connect(updates.append)
    # Sampled, seeded: a random model's greedy choice is often a run of newlines, which shows nothing.
    page.sampling.temperature.setValue(1.0)
    page.sampling.use_seed.setChecked(True)
    page.input.setPlainText("Write a haiku about the sea.")
    page.send_button.click()
    rid = page.reply.request_id
    # The page and this list each get every update as a queued call of their own: wait for both to have the last.
    qtbot.waitUntil(
        lambda: page.reply is None and any(u.finished for u in updates if u.request_id == rid), timeout=UNTIL_DONE
    )
    seen = [u.text for u in updates if u.request_id == rid]
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
    assert again.conversation_list.view.count() == 1
    assert again.conversation_list.view.item(0).text() == "Write a haiku about the sea."
    again.open_conversation(again.conversation_list.view.item(0).data(0x0100))
    assert word in again.transcript.toPlainText()


def test_stop_ends_the_reply_and_frees_its_blocks(qtbot, page, loaded_bridge):
    page.sampling.max_tokens.setValue(400)
    page.input.setPlainText("Tell me a long story.")
    page.send_button.click()
    qtbot.waitUntil(lambda: page.reply is not None and page.reply.tokens >= 3, timeout=UNTIL_DONE)
    page.stop_button.click()
    reply = page.history.messages(page.conversation_id)[-1]
    assert reply.finished and reply.stats["finish_reason"] == "abort" and reply.stats["tokens"] < 400
    engine = loaded_bridge.engine_thread.engine
    qtbot.waitUntil(lambda: engine.get_stats().num_blocks_used == 0, timeout=UNTIL_DONE)


def test_regenerate_replaces_the_last_reply_and_edit_last_takes_the_message_back(qtbot, page):
    page.sampling.use_seed.setChecked(True)
    page.sampling.temperature.setValue(1.0)
    send_and_wait(qtbot, page, "Pick a number.")
    first = page.history.messages(page.conversation_id)[-1]
    page.sampling.seed.setValue(page.sampling.seed.value() + 1)
    page.regenerate_button.click()
    qtbot.waitUntil(lambda: page.reply is None, timeout=UNTIL_DONE)
    messages = page.history.messages(page.conversation_id)
    assert [m.role for m in messages] == ["user", "assistant"] and messages[1].id != first.id
    page.edit_button.click()
    assert page.input.toPlainText() == "Pick a number." and page.history.messages(page.conversation_id) == []


def test_conversations_can_be_searched_renamed_and_deleted(qtbot, page):
    send_and_wait(qtbot, page, "About whales")
    page.new_conversation()
    send_and_wait(qtbot, page, "About trains")
    listed = page.conversation_list
    assert listed.view.count() == 2
    listed.search.setText("whale")
    assert [listed.view.item(i).text() for i in range(listed.view.count())] == ["About whales"]
    listed.search.setText("")
    listed.rename("Railways")
    assert "Railways" in [listed.view.item(i).text() for i in range(listed.view.count())]
    page.delete_conversation()
    assert page.conversation_list.view.count() == 1 and page.conversation_id is None


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
    page.conversation_list.refresh()
    page.open_conversation(conv.id)
    html = page.transcript.toHtml()
    assert html.count("Copy code") == 2 and f"copy:{reply.id}/1" in html
    code = [
        b
        for b in iter_blocks(page.transcript.bubble(reply.id).view.document())
        if b.blockFormat().hasProperty(QTextFormat.Property.BlockCodeFence)
    ]
    shade = page.palette().color(QPalette.ColorRole.AlternateBase)
    assert [b.text() for b in code] == ["print('a')", "ls -l", "echo ```"]
    assert all(b.blockFormat().background().color() == shade for b in code)
    page.transcript.anchorClicked.emit(QUrl(f"copy:{reply.id}/1"))
    assert QGuiApplication.clipboard().text() == "ls -l\necho ```\n" and page.status.text() == "Code copied."
    page.transcript.anchorClicked.emit(QUrl(f"copy:{reply.id}/0"))
    assert QGuiApplication.clipboard().text() == "print('a')\n"


def test_each_redraw_of_a_streaming_reply_shows_what_the_history_file_holds(qtbot, page, tmp_path):
    raw = sqlite3.connect(tmp_path / "history.sqlite3")  # a connection of its own, as a restart reads the file
    draws: list[tuple[str, str]] = []  # (the reply in the file, its bubble's markdown) at each streaming redraw
    draw = page.transcript.stream
    bubbles = set()  # the bubble of each redraw: the reply's own, kept through the reply (no other is rebuilt)

    def checked(message_id: int, text: str) -> None:
        draw(message_id, text)
        [(stored,)] = raw.execute("SELECT content FROM messages WHERE id = ?", (message_id,))
        bubble = page.transcript.bubble(message_id)
        draws.append((stored, bubble.markdown))
        bubbles.add(id(bubble))

    page.transcript.stream = checked
    try:
        page.sampling.temperature.setValue(1.0)
        page.sampling.use_seed.setChecked(True)
        page.sampling.max_tokens.setValue(60)
        send_and_wait(qtbot, page, "Tell me about lighthouses.")
    finally:
        del page.transcript.stream  # `checked` holds the page: left in place, the two would form a cycle
        raw.close()
    assert len([stored for stored, _ in draws if stored]) > 1 and len(bubbles) == 1  # several redraws with text
    for stored, markdown in draws:
        assert markdown == f"{stored} ▍"  # the streaming reply, exactly as stored


def test_kill_9_mid_reply_loses_nothing_that_was_drawn(qtbot, loaded_bridge, tiny_chat_model, tmp_path):
    history_file = tmp_path / "history.sqlite3"
    child = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("chat_child.py")), str(tiny_chat_model), str(history_file)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=(tmp_path / "child.err").open("w"),
        text=True,
    )
    drawn: list[str] = []
    try:
        # Killed as soon as some text is on screen: the engine goes on meanwhile, the page saving and drawing
        # more, so the kill lands wherever it lands (how far it got depends on the machine's load, not the test).
        for line in child.stdout:
            drawn.append(json.loads(line.removeprefix("drawn ")))
            if drawn[-1]:
                break
    finally:
        child.kill()  # SIGKILL: no handler, no flush, no clean close of the history
        child.wait()
    drawn += [json.loads(line.removeprefix("drawn ")) for line in child.stdout]  # reported before it died
    child.stdout.close()
    assert drawn and drawn[-1], (tmp_path / "child.err").read_text()

    again = ChatPage(loaded_bridge, ChatHistory(history_file))  # the restart
    qtbot.addWidget(again)
    assert again.conversation_list.view.count() == 1
    again.open_conversation(again.conversation_list.view.item(0).data(0x0100))
    user, reply = again.history.messages(again.conversation_id)
    assert user.content == "Tell me a long story." and not reply.finished
    # Everything drawn is kept: the last text reported, or a later one saved just before the kill.
    assert reply.content.startswith(drawn[-1])
    word = max(re.findall(r"[A-Za-z]{3,}", reply.content), key=len)  # markdown may restyle the rest
    assert word in again.transcript.toPlainText()


def test_a_refused_send_leaves_no_empty_reply_behind(qtbot, page, loaded_bridge, monkeypatch):
    # refused by the engine, after the send: a prompt longer than the model's 512-token context (the page takes the
    # context to be longer, so that its own check before sending lets it through)
    with monkeypatch.context() as patch:
        patch.setattr(loaded_bridge, "context_length", lambda: 10**6)
        page.send("word " * 600)
    qtbot.waitUntil(lambda: page.reply is None, timeout=UNTIL_DONE)
    assert page.status.text().startswith("Could not send: the prompt has ")
    assert [m.role for m in page.history.messages(page.conversation_id)] == ["user"]
    assert "Assistant" not in page.transcript.toPlainText()

    # refused at once: a full queue
    def full(chat, params):
        raise QueueFullError("4 requests are already queued (limit 4)")

    page.new_conversation()
    with monkeypatch.context() as patch:
        patch.setattr(loaded_bridge, "submit_chat", full)
        page.send("Hello?")
    assert page.status.text() == "Could not send: 4 requests are already queued (limit 4)"
    assert [m.role for m in page.history.messages(page.conversation_id)] == ["user"]
    assert "Assistant" not in page.transcript.toPlainText()
    # Regenerate asks again for the message left without a reply, once the engine takes requests
    page.regenerate_button.click()
    qtbot.waitUntil(lambda: page.reply is None, timeout=UNTIL_DONE)
    messages = page.history.messages(page.conversation_id)
    assert [(m.role, m.finished) for m in messages] == [("user", True), ("assistant", True)]
    assert messages[1].stats["finish_reason"] in ("stop", "length") and page.status.text() == ""


def fill_the_disk(history: ChatHistory) -> None:
    """SQLite's own full-disk error from here on for any write that grows the file by a page."""
    pages = history._db.execute("PRAGMA page_count").fetchone()[0]
    history._db.execute(f"PRAGMA max_page_count = {pages}")


def test_a_full_disk_is_said_in_words_and_the_saved_conversation_stays(
    qtbot, page, loaded_bridge, monkeypatch, screenshots
):
    send_and_wait(qtbot, page, "Hello")
    path = page.history.path
    before = stored_rows(path)
    full = f"cannot save to the chat history {path}: the disk is full; it keeps what it held before"

    fill_the_disk(page.history)
    long_message = "many words " * 10_000  # far more than a page (and than the context, which the page is told
    page.input.setPlainText(long_message)  # is longer: its check before sending would stop it first)
    with monkeypatch.context() as patch:
        patch.setattr(loaded_bridge, "context_length", lambda: 10**6)
        page.send_button.click()
    assert page.status.text() == f"Could not save your message: {full}"
    assert page.input.toPlainText() == long_message and page.reply is None  # kept, to send again later
    assert stored_rows(path) == before

    # The disk fills while a reply streams: it stops, says why, and only what was saved is shown.
    page.history._db.execute("PRAGMA max_page_count = 1073741823")
    monkeypatch.setattr(loaded_bridge, "submit_chat", lambda chat, params: "ui-streams-onto-a-full-disk")
    page.send("Go on")
    saved = stored_rows(path)
    fill_the_disk(page.history)
    loaded_bridge.request_update.emit(RequestUpdate("ui-streams-onto-a-full-disk", "lost " * 20_000, 5, False))
    qtbot.waitUntil(lambda: page.reply is None, timeout=UNTIL_DONE)
    assert page.status.text() == f"Could not save the reply: {full}"
    assert "lost" not in page.transcript.toPlainText()
    assert stored_rows(path) == saved
    user, reply = page.history.messages(page.conversation_id)[-2:]
    assert (user.content, reply.content, reply.finished) == ("Go on", "", False)
    QApplication.sendPostedEvents()  # the layout follows the status text in posted events
    page.grab().save(str(screenshots / "chat-disk-full.png"))


def test_a_message_sent_before_a_model_is_loaded_stays_in_the_box_unsaved(qtbot, tmp_path, screenshots):
    bridge = EngineBridge()  # nothing loaded, nothing connected
    page = ChatPage(bridge, ChatHistory(tmp_path / "history.sqlite3"))
    qtbot.addWidget(page)
    page.resize(1200, 700)
    for _ in range(2):  # a second try changes nothing either
        page.input.setPlainText("Hello?")
        page.send_button.click()
        assert page.input.toPlainText() == "Hello?"
        assert page.history.list_conversations() == [] and page.conversation_id is None
        assert page.status.text().startswith("No model is loaded yet: load one on the Models page")
        assert page.status.text().endswith("Your message is kept.")
    page.grab().save(str(screenshots / "chat-no-model.png"))
    bridge.shutdown()


def test_the_list_highlights_a_new_chat_and_buttons_act_only_on_what_is_there(qtbot, tmp_path, screenshots):
    history = ChatHistory(tmp_path / "history.sqlite3")
    old = history.create_conversation("Earlier")
    history.add_message(old.id, "user", "Hello?")
    history.add_message(old.id, "assistant", "Hi.")
    bridge = EngineBridge()  # no reply is asked for here
    page = ChatPage(bridge, history)
    qtbot.addWidget(page)
    page.resize(1200, 700)
    page.conversation_list.view.setCurrentRow(0)
    assert page.conversation_id == old.id
    buttons = (page.regenerate_button, page.edit_button, page.copy_button)
    assert all(b.isEnabled() for b in buttons)

    page.conversation_list.new_button.click()
    assert page.conversation_id != old.id
    assert page.conversation_list.view.currentItem().data(Qt.UserRole) == page.conversation_id
    assert page.conversation_list.view.currentItem().text() == "New chat"
    assert not any(b.isEnabled() for b in buttons)  # an empty chat: no reply, no message
    assert page.conversation_list.rename_button.isEnabled() and page.conversation_list.delete_button.isEnabled()

    page.conversation_list.view.setCurrentRow(1)
    assert page.conversation_id == old.id and all(b.isEnabled() for b in buttons)
    page.edit_button.click()  # the message is back in the box; no reply is left to regenerate or copy
    assert page.input.toPlainText() == "Hello?" and page.history.messages(old.id) == []
    assert not any(b.isEnabled() for b in buttons)
    page.grab().save(str(screenshots / "chat-after-edit-last.png"))
    bridge.shutdown()


def test_a_model_loading_is_shown_in_the_chat_and_send_waits_for_it(
    qtbot, tmp_path, tiny_chat_model, load_options, screenshots
):
    """While the model loads, the chat area says what is being done and Send waits (the message stays in the box);
    once it is ready the message box has the focus and the message goes."""
    held, release = threading.Event(), threading.Event()

    def make_llm(model: str, options: dict, on_load_stage) -> LLM:
        on_load_stage("Building the CPU kernels")
        held.set()
        release.wait()  # as a first load's kernel build holds it
        return LLM(model, on_load_stage=on_load_stage, **options)

    bridge = EngineBridge(make_llm)
    page = ChatPage(bridge, ChatHistory(tmp_path / "history.sqlite3"))
    page.sampling.max_tokens.setValue(4)
    qtbot.addWidget(page)
    page.resize(1200, 700)
    page.show()
    qtbot.waitActive(page)
    try:
        bridge.load_model(str(tiny_chat_model), load_options)
        qtbot.waitUntil(held.is_set, timeout=UNTIL_DONE)
        qtbot.waitUntil(lambda: "Building the CPU kernels" in page.load_panel.steps.text(), timeout=UNTIL_DONE)
        assert page.load_panel.isVisible() and page.load_panel.title.text() == tiny_chat_model.name
        assert not page.send_button.isEnabled()
        page.input.setPlainText("Hello?")
        page.send()  # as Ctrl+Enter does
        assert page.input.toPlainText() == "Hello?" and page.history.list_conversations() == []
        assert page.status.text().startswith("The model is still loading: your message is kept")
        page.grab().save(str(screenshots / "chat-model-loading.png"))
        page.transcript.setFocus()
        with qtbot.waitSignal(bridge.model_loaded, timeout=None):
            release.set()
        assert not page.load_panel.isVisible() and page.send_button.isEnabled()
        assert page.load_panel.stages[-1] == "Warming up: building the fused decode step"
        assert page.input.hasFocus()
        page.send_button.click()
        qtbot.waitUntil(lambda: page.reply is None, timeout=UNTIL_DONE)
        assert [m.role for m in page.history.messages(page.conversation_id)] == ["user", "assistant"]
    finally:
        release.set()
        bridge.shutdown()


def test_cancel_on_the_load_card_stops_the_load_and_the_model_before_answers_on(
    qtbot, tmp_path, tiny_chat_model, load_options, screenshots
):
    """The load card's Cancel stops a second load between two stages: the card says it is stopping, then goes;
    the status line names the model still running, and a message sent then is answered by it."""
    reading, release = threading.Event(), threading.Event()
    loads = iter(range(2))

    def make_llm(model: str, options: dict, on_load_stage) -> LLM:
        held = next(loads) == 1

        def stage(sentence: str) -> None:
            on_load_stage(sentence)
            if held and sentence == "Loading the weights":
                reading.set()
                release.wait()

        return LLM(model, on_load_stage=stage, **options)

    bridge = EngineBridge(make_llm)
    page = ChatPage(bridge, ChatHistory(tmp_path / "history.sqlite3"))
    page.sampling.max_tokens.setValue(4)
    qtbot.addWidget(page)
    page.resize(1200, 700)
    page.show()
    try:
        with qtbot.waitSignal(bridge.model_loaded, timeout=None):
            bridge.load_model(str(tiny_chat_model), load_options)
        serving = bridge.engine_thread
        bridge.load_model(str(tiny_chat_model), load_options)
        qtbot.waitUntil(reading.is_set, timeout=UNTIL_DONE)
        qtbot.waitUntil(lambda: "Loading the weights" in page.load_panel.steps.text(), timeout=UNTIL_DONE)
        assert page.load_panel.isVisible() and page.load_panel.cancel_button.isEnabled()
        page.load_panel.cancel_button.click()
        assert not page.load_panel.cancel_button.isEnabled() and page.load_panel.note.text().startswith("Stopping")
        page.grab().save(str(screenshots / "chat-load-cancelling.png"))
        with qtbot.waitSignal(bridge.model_load_cancelled, timeout=None):
            release.set()
        assert not page.load_panel.isVisible() and page.send_button.isEnabled()
        name = tiny_chat_model.name
        assert page.status.text() == f"Cancelled loading {name}: still running {name}."
        assert bridge.engine_thread is serving
        send_and_wait(qtbot, page, "Still there?")
        [_, reply] = page.history.messages(page.conversation_id)
        assert reply.role == "assistant" and reply.content
    finally:
        release.set()
        bridge.shutdown()


def test_no_reference_cycle_runs_through_the_page(qtbot, tmp_path):
    """The bridge's loader thread runs the cyclic collector after each load (ui/bridge.py): a page that only the
    collector could free would be deleted on that thread, and a QWidget deleted off the UI thread crashes the
    process. So nothing the page's Python attributes reach may lead back to it (a callback held by a child widget
    did, and a full run died in a segfault)."""
    import gc
    import types

    page = ChatPage(EngineBridge(), ChatHistory(tmp_path / "history.db"))  # no model: a small graph to walk
    qtbot.addWidget(page)
    seen, frontier = {id(page)}, gc.get_referents(page)
    for _ in range(8):
        following = []
        for obj in frontier:
            if id(obj) in seen or isinstance(obj, type | types.ModuleType):
                continue
            seen.add(id(obj))
            referents = gc.get_referents(obj)
            assert not any(r is page for r in referents), f"{type(obj).__name__} refers back to the page"
            following += referents
        frontier = following
