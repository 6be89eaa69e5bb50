"""Text files attached to a chat message on the tiny model: picked with Attach… or dropped on the page (several at
once), each shown with its token count as the model's tokenizer counts it (an estimate, said so, without a model),
refused in the status line when they cannot go in (the typed message kept), and sent with the message: the engine
gets the file's text."""

from __future__ import annotations

import math

import pytest
from PySide6.QtCore import QEvent, QMimeData, QPointF, Qt, QUrl
from PySide6.QtGui import QDragEnterEvent, QDropEvent
from PySide6.QtWidgets import QApplication, QFileDialog

from app.attachments import as_block
from app.history import ChatHistory
from ui.bridge import EngineBridge
from ui.pages.chat import ChatPage
from ui.theme import palette_for

pytestmark = pytest.mark.timeout(600)
UNTIL_DONE = math.inf


@pytest.fixture
def page(qtbot, loaded_bridge, tmp_path):
    p = ChatPage(loaded_bridge, ChatHistory(tmp_path / "history.sqlite3"))
    p.sampling.temperature.setValue(0.0)
    p.sampling.max_tokens.setValue(4)
    qtbot.addWidget(p)
    p.resize(1200, 700)
    return p


def tokens(bridge: EngineBridge, text: str) -> int:
    return len(bridge.engine_thread.engine.tokenizer.encode(text, add_special_tokens=False))


def chips(page: ChatPage) -> list[str]:
    layout = page.attachments.chips_layout
    return [layout.itemAt(i).widget().label.text() for i in range(layout.count())]


def drop(target, *paths) -> QDropEvent:
    """Drop local files on `target` as a window system would: an enter, then the drop."""
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(p)) for p in paths])
    enter = QDragEnterEvent(QPointF(5, 5), Qt.CopyAction, mime, Qt.LeftButton, Qt.NoModifier)
    QApplication.sendEvent(target, enter)
    assert enter.isAccepted()
    event = QDropEvent(QPointF(5, 5), Qt.CopyAction, mime, Qt.LeftButton, Qt.NoModifier, QEvent.Type.Drop)
    QApplication.sendEvent(target, event)
    return event


def test_attach_picks_several_files_each_counted_by_the_models_tokenizer(page, loaded_bridge, tmp_path, monkeypatch):
    one, two = tmp_path / "notes.md", tmp_path / "main.py"
    one.write_text("# Notes\nThe sea is wide.\n")
    two.write_text("print('hello')\n")
    monkeypatch.setattr(QFileDialog, "getOpenFileNames", staticmethod(lambda *a, **k: ([str(one), str(two)], "")))
    page.attachments.attach_button.click()
    counts = [tokens(loaded_bridge, as_block(p.name, p.read_text())) for p in (one, two)]
    assert [a.tokens for a in page.attachments.attachments] == counts
    assert chips(page) == [f"<b>notes.md</b> · {counts[0]} tokens", f"<b>main.py</b> · {counts[1]} tokens"]
    assert page.status.text() == f"Attached notes.md ({counts[0]} tokens), main.py ({counts[1]} tokens)."

    page.attachments.chips_layout.itemAt(0).widget().remove_button.click()
    assert chips(page) == [f"<b>main.py</b> · {counts[1]} tokens"]


def test_files_dropped_on_the_page_or_the_message_box_are_attached_not_pasted(page, tmp_path):
    one, two = tmp_path / "a.txt", tmp_path / "b.txt"
    one.write_text("alpha")
    two.write_text("beta")
    page.input.setPlainText("Compare these.")
    drop(page, one, two)
    drop(page.input.viewport(), one)
    assert [a.name for a in page.attachments.attachments] == ["a.txt", "b.txt", "a.txt"]
    assert page.input.toPlainText() == "Compare these."  # no path pasted in
    # Dragged text still goes into the box as text.
    mime = QMimeData()
    mime.setText("dragged words")
    enter = QDragEnterEvent(QPointF(5, 5), Qt.CopyAction, mime, Qt.LeftButton, Qt.NoModifier)
    QApplication.sendEvent(page.input.viewport(), enter)
    assert enter.isAccepted() and len(page.attachments.attachments) == 3


def test_what_cannot_be_attached_is_refused_in_words_and_the_typed_message_is_kept(page, loaded_bridge, tmp_path):
    page.input.setPlainText("Please summarise.")
    binary = tmp_path / "picture.png"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")
    latin = tmp_path / "old.txt"
    latin.write_bytes(b"caf\xe9\n")
    folder = tmp_path / "folder"
    folder.mkdir()
    long = tmp_path / "long.txt"
    long.write_text("word " * 600)
    fine = tmp_path / "fine.txt"
    fine.write_text("short")

    drop(page.input.viewport(), binary, latin, folder, long, fine)
    count = tokens(loaded_bridge, as_block("long.txt", long.read_text()))
    fine_count = tokens(loaded_bridge, as_block("fine.txt", "short"))
    assert page.status.text() == (
        f"Attached fine.txt ({fine_count} tokens). Could not attach picture.png: a binary file, not text. "
        "Could not attach old.txt: not UTF-8 text (byte 0xe9 on line 1). "
        "Could not attach folder: a folder; attach the files in it. "
        f"Could not attach long.txt: {count:,} tokens, more than the model's context of 512 tokens."
    )
    assert page.input.toPlainText() == "Please summarise."
    assert [a.name for a in page.attachments.attachments] == ["fine.txt"]

    drop(page, tmp_path / "gone.txt")
    assert page.status.text() == "Could not attach gone.txt: cannot read the file: No such file or directory."
    assert page.input.toPlainText() == "Please summarise." and len(page.attachments.attachments) == 1


def test_a_message_with_an_attachment_reaches_the_engine_with_the_files_text(
    qtbot, page, loaded_bridge, tmp_path, monkeypatch
):
    path = tmp_path / "poem.txt"
    path.write_text("Roses are red,\nviolets are blue.\n")
    page.attachments.add_files([path])
    page.input.setPlainText("What rhymes here?")
    prompts = []
    engine = loaded_bridge.engine_thread.engine
    add_request = engine.add_request

    def recording(request_id, prompt, *args, **kwargs):
        prompts.append(prompt)
        return add_request(request_id, prompt, *args, **kwargs)

    monkeypatch.setattr(engine, "add_request", recording)
    page.send_button.click()
    qtbot.waitUntil(lambda: page.reply is None, timeout=UNTIL_DONE)
    user, reply = page.history.messages(page.conversation_id)
    assert user.content == f"{as_block('poem.txt', path.read_text())}\n\nWhat rhymes here?"
    assert reply.finished and reply.stats["finish_reason"] in ("stop", "length")
    [prompt] = prompts  # the token ids the engine ran, read back as text
    text = engine.tokenizer.decode(prompt["prompt_token_ids"])
    assert "Roses are red,\nviolets are blue." in text and "File: poem.txt" in text
    assert page.input.toPlainText() == "" and page.attachments.attachments == [] and chips(page) == []


def test_without_a_model_the_count_is_an_estimate_and_a_refused_send_keeps_the_files(qtbot, tmp_path):
    bridge = EngineBridge()  # nothing loaded: no tokenizer, no context to check against
    page = ChatPage(bridge, ChatHistory(tmp_path / "history.sqlite3"))
    qtbot.addWidget(page)
    path = tmp_path / "long.txt"
    path.write_text("word " * 600)  # past the tiny model's context, but no context is known here
    page.attachments.add_files([path])
    estimate = math.ceil(len(as_block("long.txt", path.read_text())) / 4)
    assert chips(page) == [f"<b>long.txt</b> · ~{estimate:,} tokens (estimate)"]
    page.input.setPlainText("Summarise.")
    page.send_button.click()
    assert page.status.text().startswith("No model is loaded yet")
    assert page.input.toPlainText() == "Summarise." and [a.name for a in page.attachments.attachments] == ["long.txt"]
    bridge.shutdown()


def test_screenshots_with_an_attachment_pending(qtbot, page, tmp_path, screenshots):
    path = tmp_path / "report.md"
    path.write_text("# Quarterly report\n\nSales rose.\n")
    page.attachments.add_files([path])
    page.input.setPlainText("Summarise the report in one line.")
    page.presets.choose("Concise assistant")
    page.show()
    app = QApplication.instance()
    light = app.palette()
    try:
        for scheme, palette in (("", light), ("-dark", palette_for(Qt.ColorScheme.Dark))):
            app.setPalette(palette)
            for width, height in ((800, 600), (1600, 1000)):
                page.resize(width, height)
                QApplication.sendPostedEvents()
                QApplication.processEvents()
                assert page.minimumSizeHint().height() <= 600
                page.grab().save(str(screenshots / f"chat-attachment-{width}x{height}{scheme}.png"))
    finally:
        app.setPalette(light)
