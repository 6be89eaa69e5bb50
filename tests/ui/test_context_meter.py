"""The chat's context meter and overflow card on the tiny model (a 512-token context, 16-token KV blocks): the
meter shows the reply's tokens and the engine's own block counts for the request as the reply grows, blocks shared
through the prefix cache on a later turn, and the conversation's count between replies; a conversation too long
for the context is said before anything is sent or saved, and can be sent with its oldest turns left out (the
history keeping them), sent anyway, or kept in the box.

Waits end on what they wait for, never on the clock. A hang is caught by the module's pytest-timeout mark."""

from __future__ import annotations

import math

import pytest
from PySide6.QtWidgets import QApplication

from app.history import ChatHistory
from engine import RequestBlocks
from ui.bridge import EngineBridge, RequestUpdate
from ui.pages.chat import ChatPage

pytestmark = pytest.mark.timeout(600)
UNTIL_DONE = math.inf
BLOCK_SIZE = 16  # the engine's default, which LOAD_OPTIONS keep
SYSTEM = "You are a helpful assistant. Answer every question in one short sentence, plainly and politely."


@pytest.fixture
def page(qtbot, loaded_bridge, tmp_path):
    p = ChatPage(loaded_bridge, ChatHistory(tmp_path / "history.sqlite3"))
    p.sampling.temperature.setValue(0.0)
    p.sampling.max_tokens.setValue(12)
    qtbot.addWidget(p)
    p.resize(1200, 700)
    p.show()
    return p


@pytest.fixture
def seen(page, loaded_bridge):
    """Each update with what the meter showed once the page had it (this slot is connected after the page's)."""
    log: list[tuple[RequestUpdate, RequestBlocks | None, int | None, str]] = []

    def record(update: RequestUpdate) -> None:
        log.append((update, page.meter.blocks, page.meter.tokens, page.meter.kv.text()))

    loaded_bridge.request_update.connect(record)
    yield log
    loaded_bridge.request_update.disconnect(record)


def send_and_wait(qtbot, page, seen, text: str) -> list[tuple]:
    """Send `text` from the box; the log entries of its reply, once the page and the log both have the last."""
    page.input.setPlainText(text)
    page.send_button.click()
    assert page.reply is not None, page.status.text()
    rid = page.reply.request_id
    qtbot.waitUntil(lambda: page.reply is None and any(u.finished for u, *_ in seen if u.request_id == rid))
    return [entry for entry in seen if entry[0].request_id == rid]


def blocks_text(b: RequestBlocks) -> str:
    return f"KV: {b.num_blocks} blocks, {b.num_blocks - b.num_shared} own, {b.num_shared} shared"


def idle_count(page) -> int:
    return page.bridge.count_chat_tokens(page._request_messages())


def test_the_meter_shows_the_engines_blocks_for_the_request_as_the_reply_grows(qtbot, page, seen, screenshots):
    page.system_prompt.setPlainText(SYSTEM)
    prompt = page.bridge.count_chat_tokens(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Where is Paris?"}]
    )
    page.input.setPlainText("Where is Paris?")
    page.send_button.click()
    # at once: the prompt, before any update
    assert page.meter.live and page.meter.tokens == prompt and page.meter.figure.text() == f"{prompt} / 512 tokens"
    rid = page.reply.request_id
    qtbot.waitUntil(lambda: page.reply is None and any(u.finished for u, *_ in seen if u.request_id == rid))
    growing = [entry for entry in seen if entry[0].request_id == rid and not entry[0].finished]
    assert len(growing) > 1
    for update, shown_blocks, shown_tokens, shown_text in growing:
        b = update.blocks  # the engine's count for this request after the step that made the update
        assert b is not None and shown_blocks == b and shown_text == blocks_text(b)
        assert shown_tokens == update.num_prompt_tokens + update.num_tokens == prompt + update.num_tokens
        # alone in the engine, first turn: every block its own; they hold the prompt and the reply's KV so far
        assert b.num_shared == b.num_prefix_cached == 0
        assert b.num_blocks == math.ceil((prompt + update.num_tokens - 1) / BLOCK_SIZE)

    # between replies: the last reply's blocks as at its end, and the conversation counted as its next prompt
    last = growing[-1][1]
    assert not page.meter.live and page.meter.kv.text() == f"Last reply: {blocks_text(last)}"
    qtbot.waitUntil(lambda: page.meter.tokens == idle_count(page))
    assert page.meter.figure.text() == f"{idle_count(page)} / 512 tokens"
    assert page.meter.bar.maximum() == 512 and page.meter.bar.value() == idle_count(page)
    QApplication.sendPostedEvents()
    page.grab().save(str(screenshots / "chat-context-meter.png"))

    page.new_conversation()  # another conversation: nothing of the last one's reply
    qtbot.waitUntil(lambda: page.meter.tokens == idle_count(page))
    assert page.meter.kv.text() == "" and page.meter.blocks is None


def test_a_later_turn_shares_the_blocks_the_prefix_cache_kept_from_the_first(qtbot, page, seen):
    page.system_prompt.setPlainText(SYSTEM)
    first = send_and_wait(qtbot, page, seen, "Where is Paris?")
    first_prompt = first[0][0].num_prompt_tokens
    second = [entry for entry in send_and_wait(qtbot, page, seen, "And Rome?") if not entry[0].finished]
    assert second
    for update, shown_blocks, _, shown_text in second:
        b = update.blocks
        # the first turn's full prompt blocks, computed then and kept by the prefix cache, are taken, not computed
        assert 0 < b.num_prefix_cached <= first_prompt // BLOCK_SIZE
        assert b.num_shared >= b.num_prefix_cached and b.num_blocks > b.num_shared
        assert shown_blocks == b and shown_text == blocks_text(b) and f"{b.num_shared} shared" in shown_text


def long_conversation(page, turns: int = 8) -> list[int]:
    """A conversation of `turns` long turns (about 1,100 tokens, over twice the context) open on the page."""
    conv = page.history.create_conversation("Long", system_prompt="Answer briefly.")
    ids = []
    for i in range(turns):
        ids.append(page.history.add_message(conv.id, "user", f"Question {i}: " + "tell me about the sea " * 12).id)
        ids.append(page.history.add_message(conv.id, "assistant", f"Answer {i}: " + "the sea is wide " * 12).id)
    page.conversation_list.refresh()
    page.open_conversation(conv.id)
    return ids


def test_an_overflow_is_said_before_sending_and_the_oldest_turns_can_be_left_out(
    qtbot, page, seen, loaded_bridge, monkeypatch, screenshots
):
    sent: list[list[dict]] = []
    submit = loaded_bridge.submit_chat

    def recording(chat, params):
        sent.append(chat.messages)
        return submit(chat, params)

    monkeypatch.setattr(loaded_bridge, "submit_chat", recording)
    long_conversation(page)
    before = page.history.messages(page.conversation_id)
    qtbot.waitUntil(lambda: page.meter.tokens == idle_count(page))
    assert page.meter.tokens > 512 and page.meter.figure.text().endswith(" / 512 tokens (too long to send whole)")

    # said before sending: nothing sent or saved, the message stays in the box; Cancel keeps it there
    page.input.setPlainText("Now a short question.")
    page.send_button.click()
    card = page.overflow
    assert card.isVisible() and page.reply is None and not sent
    assert page.history.messages(page.conversation_id) == before and page.input.toPlainText() == "Now a short question."
    needed = page.bridge.count_chat_tokens(page._request_messages(extra="Now a short question."))
    assert card.text.text() == (
        f"This conversation is {needed:,} tokens; with up to 12 for the reply it needs {needed + 12:,}, more than "
        "the model's context of 512."
    )
    assert card.drop_button.isEnabled() and not card.anyway_button.isEnabled()  # the engine would refuse it whole
    QApplication.sendPostedEvents()
    page.grab().save(str(screenshots / "chat-context-overflow.png"))
    card.cancel_button.click()
    assert not card.isVisible() and page.input.toPlainText() == "Now a short question." and not sent

    # left out: the system prompt and the newest turns that fit are sent; the history keeps every message
    page.send_button.click()
    card.drop_button.click()
    assert not card.isVisible() and page.reply is not None and len(sent) == 1
    request = sent[0]
    assert request[0] == {"role": "system", "content": "Answer briefly."}
    assert request[1]["role"] == "user" and request[-1] == {"role": "user", "content": "Now a short question."}
    dropped = len(before) + 2 - len(request)  # the request adds the system prompt and the new message
    assert dropped > 0 and dropped % 2 == 0  # whole turns
    assert [m["content"] for m in request[1:-1]] == [m.content for m in before[dropped:]]
    tokens = page.bridge.count_chat_tokens(request)
    assert tokens + 12 <= 512
    # the fewest: one more turn kept would not fit
    with_one_more = request[:1] + [{"role": m.role, "content": m.content} for m in before[dropped - 2 : dropped]]
    assert page.bridge.count_chat_tokens(with_one_more + request[1:]) + 12 > 512
    assert page.meter.tokens == tokens and f"(the oldest {dropped} messages left out)" in page.meter.figure.text()
    assert f"the oldest {dropped} messages left out" in page.status.text()
    qtbot.waitUntil(lambda: page.reply is None)
    assert len(page.history.messages(page.conversation_id)) == len(before) + 2
    qtbot.waitUntil(lambda: page.meter.tokens == idle_count(page))
    assert page.meter.figure.text().endswith("(the oldest turns are left out when sending)")

    # the conversation's later sends leave its oldest turns out without asking again
    page.input.setPlainText("One more?")
    page.send_button.click()
    assert not card.isVisible() and page.reply is not None and len(sent) == 2
    assert sent[1][-1]["content"] == "One more?" and page.bridge.count_chat_tokens(sent[1]) + 12 <= 512
    qtbot.waitUntil(lambda: page.reply is None)


def test_regenerate_keeps_the_reply_until_the_overflow_is_answered(qtbot, page, seen):
    ids = long_conversation(page)
    page.regenerate_button.click()
    assert page.overflow.isVisible() and page.reply is None
    assert [m.id for m in page.history.messages(page.conversation_id)] == ids  # the last reply still there
    page.overflow.drop_button.click()
    assert page.reply is not None
    qtbot.waitUntil(lambda: page.reply is None)
    messages = page.history.messages(page.conversation_id)
    assert [m.id for m in messages[:-1]] == ids[:-1] and messages[-1].id != ids[-1] and messages[-1].finished


def test_send_anyway_and_a_message_too_long_to_send_at_all(qtbot, page, seen, loaded_bridge, monkeypatch):
    # a prompt that fits but leaves less than the reply's room (the page takes the context to be that short):
    # one message cannot be cut, so only Send anyway (the reply stops at the context's end) or Cancel
    prompt = loaded_bridge.count_chat_tokens([{"role": "user", "content": "Where is Paris?"}])
    monkeypatch.setattr(loaded_bridge, "context_length", lambda: prompt + 2)
    page.input.setPlainText("Where is Paris?")
    page.send_button.click()
    card = page.overflow
    assert card.isVisible() and card.anyway_button.isEnabled() and not card.drop_button.isEnabled()
    assert card.drop_button.toolTip().startswith(f"The last message alone is {prompt} tokens")
    card.anyway_button.click()
    assert not card.isVisible() and page.reply is not None
    qtbot.waitUntil(lambda: page.reply is None)
    assert [m.role for m in page.history.messages(page.conversation_id)] == ["user", "assistant"]
    monkeypatch.undo()

    # longer than the whole context: nothing can send it; it stays in the box
    page.new_conversation()
    page.input.setPlainText("word " * 600)
    page.send_button.click()
    assert card.isVisible() and not card.anyway_button.isEnabled() and not card.drop_button.isEnabled()
    assert "The last message alone is " in card.text.text() and "Shorten it, lower Max tokens" in card.text.text()
    card.cancel_button.click()
    assert page.input.toPlainText() == "word " * 600 and page.history.messages(page.conversation_id) == []


def test_without_a_model_the_meter_says_so(qtbot, tmp_path):
    page = ChatPage(EngineBridge(), ChatHistory(tmp_path / "h.sqlite3"))
    qtbot.addWidget(page)
    assert page.meter.tokens is None and page.meter.figure.text() == "Context: no model is loaded"
    assert page.meter.kv.text() == ""
