"""The chat transcript as bubbles: a streamed reply fills a bubble on the left under the user's on the right, its
tokens/s and time to first token under it (the real engine on the tiny model); fenced code coloured by Pygments in
the light and the dark theme; Copy on a message copies that message's markdown.

Waits end on what they wait for, never on the clock."""

from __future__ import annotations

import math
import re

import pytest
from pygments.styles import get_style_by_name
from pygments.token import Keyword, Name
from PySide6.QtCore import QPoint, Qt
from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import QApplication

from app.history import ChatHistory
from ui.bridge import EngineBridge
from ui.pages.chat import ChatPage
from ui.theme import palette_for
from ui.widgets.highlight import DARK_STYLE, LIGHT_STYLE

pytestmark = pytest.mark.timeout(600)
UNTIL_DONE = math.inf  # qtbot.waitUntil's timeout: none


@pytest.fixture
def page(qtbot, loaded_bridge, tmp_path):
    p = ChatPage(loaded_bridge, ChatHistory(tmp_path / "history.sqlite3"))
    p.sampling.temperature.setValue(1.0)  # sampled, seeded: a random model's greedy reply is often newlines only
    p.sampling.use_seed.setChecked(True)
    p.sampling.max_tokens.setValue(12)
    qtbot.addWidget(p)
    p.resize(1200, 700)
    p.show()
    qtbot.waitExposed(p)
    return p


@pytest.fixture
def idle_page(qtbot, tmp_path):
    """A chat page over a history alone (no reply is asked for)."""
    bridge = EngineBridge()
    p = ChatPage(bridge, ChatHistory(tmp_path / "history.sqlite3"))
    qtbot.addWidget(p)
    p.resize(1200, 700)
    yield p
    bridge.shutdown()


def card_span(page: ChatPage, bubble) -> tuple[int, int]:
    """The left and right edges of a bubble's card in the transcript's viewport."""
    QApplication.sendPostedEvents()  # the layouts settle in posted events
    left = bubble.card.mapTo(page.transcript.viewport(), QPoint(0, 0)).x()
    return left, left + bubble.card.width()


def test_a_streamed_reply_fills_a_bubble_on_the_left_under_the_users_on_the_right(qtbot, page, screenshots):
    streamed: list[tuple[str, str]] = []  # (the text streamed in, the reply's bubble text then) at each redraw
    stream = page.transcript.stream

    def recorded(message_id: int, text: str) -> None:
        stream(message_id, text)
        bubble = page.transcript.bubble(message_id)
        streamed.append((text, bubble.view.toPlainText()))
        assert not bubble.copy_button.isEnabled()  # nothing to copy until the reply is whole

    page.transcript.stream = recorded
    page.sampling.max_tokens.setValue(60)  # long enough to be redrawn several times on a fast machine
    try:
        page.input.setPlainText("Write a haiku about the sea.")
        page.send_button.click()
        qtbot.waitUntil(lambda: page.reply is None, timeout=UNTIL_DONE)
    finally:
        del page.transcript.stream  # `recorded` holds the page: left in place, the two would form a cycle
    user, reply = page.history.messages(page.conversation_id)
    assert [b.message.role for b in page.transcript.bubbles()] == ["user", "assistant"]
    assert len([text for text, _ in streamed if text]) > 1  # it streamed: several redraws with text
    words = [re.findall(r"[A-Za-z]{3,}", text) for text, _ in streamed]
    for (_, shown), w in zip(streamed, words):
        assert shown.endswith("▍") and (not w or max(w, key=len) in shown)  # markdown may restyle the rest
    word = max(re.findall(r"[A-Za-z]{3,}", reply.content), key=len)
    assert word in page.transcript.bubble(reply.id).view.toPlainText()
    assert page.transcript.bubble(user.id).view.toPlainText() == "Write a haiku about the sea."
    assert page.transcript.bubble(reply.id).copy_button.isEnabled()

    width = page.transcript.viewport().width()
    user_left, user_right = card_span(page, page.transcript.bubble(user.id))
    reply_left, _ = card_span(page, page.transcript.bubble(reply.id))
    assert width - 30 < user_right <= width and user_left > width / 3  # a short message hugs the right edge
    assert 0 <= reply_left < 30
    user_view = page.transcript.bubble(user.id).view
    assert user_view.document().size().height() < 2 * user_view.fontMetrics().lineSpacing()  # on one line
    page.grab().save(str(screenshots / "chat-bubbles.png"))


def test_tokens_per_s_and_time_to_first_token_show_under_the_reply(qtbot, page):
    page.input.setPlainText("Write a haiku about the sea.")  # 12 tokens with this seed: a rate to show
    page.send_button.click()
    qtbot.waitUntil(lambda: page.reply is None, timeout=UNTIL_DONE)
    reply = page.history.messages(page.conversation_id)[-1]
    stats = reply.stats
    bubble = page.transcript.bubble(reply.id)
    assert bubble.stats.isVisible()
    assert bubble.stats.text().startswith(
        f"{stats['tokens']} tokens · {stats['tokens_per_s']} tok/s · first token {stats['ttft_s'] * 1000:.0f} ms"
    )
    QApplication.sendPostedEvents()
    under = bubble.stats.mapTo(bubble, QPoint(0, 0)).y()
    assert under >= bubble.card.geometry().bottom()  # under the reply, not beside or in it


def test_a_fenced_code_block_is_coloured_by_pygments_in_light_and_dark(qtbot, idle_page, screenshots):
    history = idle_page.history
    conv = history.create_conversation("Code")
    history.add_message(conv.id, "user", "A function, please.")
    reply = history.add_message(
        conv.id, "assistant", "Here:\n\n```python\ndef answer():\n    return 42\n```\n", finished=True
    )
    idle_page.open_conversation(conv.id)

    def colour(style: str, token) -> str:
        return f"#{get_style_by_name(style).style_for_token(token)['color']}".lower()

    def coloured(word: str, hue: str) -> bool:
        html = idle_page.transcript.bubble(reply.id).view.toHtml()
        return re.search(rf'<span style="[^"]*color:{hue};[^"]*">{word}</span>', html) is not None

    app = QApplication.instance()
    before = app.palette()
    try:
        for scheme, style in ((Qt.ColorScheme.Light, LIGHT_STYLE), (Qt.ColorScheme.Dark, DARK_STYLE)):
            app.setPalette(palette_for(scheme))  # reaches the widgets in posted events
            qtbot.waitUntil(lambda: coloured("def", colour(style, Keyword)))  # noqa: B023 (waited on here)
            assert coloured("answer", colour(style, Name.Function))
            idle_page.show()
            qtbot.waitExposed(idle_page)
            idle_page.grab().save(str(screenshots / f"chat-code-{scheme.name.lower()}.png"))
        # the styles differ, so the dark check above tells that the switch recoloured the code
        assert colour(LIGHT_STYLE, Keyword) != colour(DARK_STYLE, Keyword)
    finally:
        app.setPalette(before)
    assert "Here:" in idle_page.transcript.bubble(reply.id).view.toPlainText()  # the prose stays as it was


def test_copy_on_a_message_puts_that_messages_markdown_on_the_clipboard(qtbot, idle_page):
    history = idle_page.history
    conv = history.create_conversation("Copy")
    question = history.add_message(conv.id, "user", "Say **hello** in `bash`.")
    answer = "Like this:\n\n```bash\necho hello\n```\n"
    reply = history.add_message(conv.id, "assistant", f"<think>\nEasy.\n</think>\n\n{answer}", finished=True)
    history.add_message(conv.id, "user", "Thanks.")
    idle_page.open_conversation(conv.id)
    idle_page.transcript.bubble(question.id).copy_button.click()
    assert QGuiApplication.clipboard().text() == "Say **hello** in `bash`."  # as written, not as rendered
    assert idle_page.status.text() == "Message copied."
    idle_page.transcript.bubble(reply.id).copy_button.click()
    assert QGuiApplication.clipboard().text() == answer  # the reasoning left out, as Copy reply does


def test_the_transcript_follows_a_growing_reply_only_while_scrolled_to_the_end(qtbot, idle_page):
    history = idle_page.history
    conv = history.create_conversation("Long")
    for i in range(6):
        history.add_message(conv.id, "user", f"Question {i}?")
        history.add_message(conv.id, "assistant", f"Answer {i}.\n\n" + "A line.\n\n" * 6, finished=True)
    reply = history.add_message(conv.id, "assistant", "", finished=False)
    idle_page.show()
    qtbot.waitExposed(idle_page)
    idle_page.open_conversation(conv.id)
    bar = idle_page.transcript.verticalScrollBar()
    qtbot.waitUntil(lambda: bar.maximum() > 0 and bar.value() == bar.maximum())  # opened at its end
    text = ""
    for i in range(8):
        text += f"Line {i}.\n\n"
        before = bar.maximum()
        idle_page.transcript.stream(reply.id, text)
        qtbot.waitUntil(lambda: bar.maximum() > before)  # noqa: B023 (waited on here)
        assert bar.value() == bar.maximum()
    bar.setValue(bar.maximum() // 2)  # the user scrolls up to read: the reply grows below
    before = bar.maximum()
    idle_page.transcript.stream(reply.id, text + "More.\n\n")
    qtbot.waitUntil(lambda: bar.maximum() > before)
    assert bar.value() == before // 2
