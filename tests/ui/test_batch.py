"""The batch page on a tiny model: pasted prompts run together and finish with the tokens asked, per-row
overrides and chats from a file, a rejected row fails in words, cancel frees the pool, a bad import changes
nothing, exports read back, and the UI thread keeps turning through a 64-prompt run. The table model is also
tested alone, without a window.

Waits end on what they wait for, never on the clock: a loaded machine only makes them slower. A hang is caught by
the module's pytest-timeout mark."""

from __future__ import annotations

import csv
import itertools
import json
import math
import threading
import time

import pytest
from PySide6.QtCore import QEvent, QMimeData, QModelIndex, QPointF, Qt, QTimer, QUrl
from PySide6.QtGui import QDragEnterEvent, QDropEvent
from PySide6.QtWidgets import QApplication, QMessageBox

from app.batch_io import BatchRow
from app.library import model_store
from ui.bridge import EngineBridge
from ui.pages import batch
from ui.pages.batch import BatchPage
from ui.widgets.batch_table import CANCELLED, DONE, FAILED, QUEUED, RUNNING, BatchItem, BatchTableModel

pytestmark = pytest.mark.timeout(600)
UNTIL_DONE = math.inf  # qtbot.waitUntil's timeout: none


@pytest.fixture
def page(qtbot, loaded_bridge):
    p = BatchPage(loaded_bridge)
    # Sampled, seeded: a random model's greedy choice can be end-of-text, which would end a row early.
    p.sampling.temperature.setValue(1.0)
    p.sampling.use_seed.setChecked(True)
    qtbot.addWidget(p)
    p.resize(1200, 720)
    return p


def run_and_wait(qtbot, page: BatchPage) -> None:
    page.run_button.click()
    assert page.running
    qtbot.waitUntil(lambda: not page.running, timeout=UNTIL_DONE)


def texts(page: BatchPage) -> list[str]:
    return [item.row.text for item in page.model.items]


def test_sixteen_pasted_prompts_run_together_to_completion_and_export(
    qtbot, page, loaded_bridge, tmp_path, monkeypatch, screenshots
):
    monkeypatch.setattr(batch, "SUBMIT_SLICE", 5)  # rows go in over four turns of the event loop
    final: dict[str, object] = {}
    most_running = []
    loaded_bridge.request_update.connect(lambda u: u.finished and final.__setitem__(u.request_id, u))
    loaded_bridge.snapshot.connect(lambda s: most_running.append(s.stats.num_running))
    engine_prompts = {}  # what reached the engine, by request id
    thread = loaded_bridge.engine_thread
    engine_submit = thread.submit
    monkeypatch.setattr(
        thread,
        "submit",
        lambda prompt, params, callback, rid, *rest: (
            engine_prompts.__setitem__(rid, prompt) or engine_submit(prompt, params, callback, rid, *rest)
        ),
    )
    prompts = [f"Prompt {i}: say something about number {i}, please." for i in range(16)]
    page.input.setPlainText("\n".join(prompts[:8]) + "\n\n   \n" + "\n".join(prompts[8:]))
    assert texts(page) == prompts and page.source.text() == "16 pasted prompts"
    assert not page.export_csv_button.isEnabled()
    page.sampling.max_tokens.setValue(8)
    page.sampling.use_seed.setChecked(False)  # one seed for all would give this random model's rows one output
    page.show()
    run_and_wait(qtbot, page)

    items = page.model.items
    assert [item.status for item in items] == [DONE] * 16
    assert all(item.tokens == 8 and item.finish_reason == "length" and item.output for item in items)
    assert page.progress.value() == page.progress.maximum() == 16 * 8  # the bar counts tokens of the budget
    assert page.progress.text() == "16 / 16 rows · 100%"
    assert page.status.text().startswith("16 done in ")
    # Each row holds its own request's final text, and the model's chat template wrapped each line.
    outputs = sorted(final.values(), key=lambda o: int(o.request_id.rsplit("-", 1)[1]))
    assert [u.text for u in outputs] == [item.output for item in items]
    sent = [engine_prompts[o.request_id]["prompt"] for o in outputs]
    assert all(s.startswith("<|im_start|>") and f"user\n{p}<|im_end|>" in s for s, p in zip(sent, prompts))
    assert page.mode.text() == "Chat template" and "chat template" in page.input.toolTip()
    assert max(most_running) > 1  # the rows ran side by side, not one after another
    assert page.model.data(page.model.index(3, 2)) == "done" and page.model.data(page.model.index(3, 3)) == 8

    page.table.selectRow(2)
    page.grab().save(str(screenshots / "batch.png"))

    assert page.export(tmp_path / "out.jsonl") and page.export(tmp_path / "out.csv")
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    with (tmp_path / "out.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for item, record, row in zip(items, records, rows, strict=True):
        assert record["prompt"] == row["prompt"] == item.row.text
        assert record["output"] == row["output"] == item.output
        assert record["finish_reason"] == row["finish_reason"] == "length"
        assert record["tokens"] == int(row["tokens"]) == 8
        assert record["seconds"] == float(row["seconds"]) > 0
        assert record["error"] is None and row["error"] == ""
    assert page.status.text() == f"Exported 16 results to {tmp_path / 'out.csv'}."


def test_file_rows_override_the_shared_setup_and_a_rejected_row_fails_in_words(qtbot, page, tmp_path):
    path = tmp_path / "rows.jsonl"
    chat = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    path.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"prompt": "short one", "max_tokens": 3},
                {"messages": chat, "max_tokens": 5},
                {"prompt": "word " * 600},  # longer than max_model_len (512): the engine refuses it
                {"prompt": "shared setup"},
            ]
        )
    )
    assert page.import_file(path)
    assert page.source.text() == "4 prompts from rows.jsonl" and page.input.toPlainText() == ""
    page.sampling.max_tokens.setValue(4)
    run_and_wait(qtbot, page)
    items = page.model.items
    assert [item.status for item in items] == [DONE, DONE, FAILED, DONE]
    assert [items[i].tokens for i in (0, 1, 3)] == [3, 5, 4]
    assert items[1].row.text == "Name a colour."
    assert "512" in items[2].error and page.model.data(page.model.index(2, 4)) == items[2].error.split("\n")[0]
    assert page.status.text().startswith("3 done, 1 failed in ") and items[2].error in page.status.text()


def test_without_a_chat_template_lines_go_as_raw_text_and_chats_fail(qtbot, loaded_bridge, tmp_path, monkeypatch):
    monkeypatch.setattr(loaded_bridge.engine_thread.engine.tokenizer, "chat_template", None)
    page = BatchPage(loaded_bridge)
    qtbot.addWidget(page)
    assert page.mode.text() == "Raw text" and "no chat template" in page.run_button.toolTip()
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "Once upon a time"}\n{"messages": [{"role": "user", "content": "Hi"}]}\n')
    assert page.import_file(path)
    sent = []
    submit = loaded_bridge.submit
    monkeypatch.setattr(loaded_bridge, "submit", lambda prompt, params: sent.append(prompt) or submit(prompt, params))
    monkeypatch.setattr(loaded_bridge, "submit_chat", lambda *args: pytest.fail("a chat was sent"))
    page.sampling.max_tokens.setValue(4)
    run_and_wait(qtbot, page)
    items = page.model.items
    assert [item.status for item in items] == [DONE, FAILED] and sent == ["Once upon a time"]
    assert items[1].error == "the model has no chat template, so a row of chat messages cannot be sent"


def test_cancel_stops_every_unfinished_row_and_frees_the_pool(qtbot, page, loaded_bridge):
    page.input.setPlainText("\n".join(f"Tell me a very long story number {i}." for i in range(16)))
    page.sampling.max_tokens.setValue(400)
    page.run_button.click()
    qtbot.waitUntil(lambda: any(item.tokens >= 3 for item in page.model.items), timeout=UNTIL_DONE)
    assert page.cancel_button.isEnabled()
    page.cancel_button.click()
    statuses = [item.status for item in page.model.items]
    assert not page.running and CANCELLED in statuses and QUEUED not in statuses and RUNNING not in statuses
    assert page.run_button.isEnabled() and not page.cancel_button.isEnabled()
    engine = loaded_bridge.engine_thread.engine
    qtbot.waitUntil(lambda: engine.get_stats().num_blocks_used == 0, timeout=UNTIL_DONE)
    assert [item.status for item in page.model.items] == statuses  # nothing came in after the cancel


def test_cancel_keeps_the_finished_rows_outputs_and_marks_the_rest_cancelled(qtbot, page, tmp_path):
    """Rows that finished before the cancel keep their outputs (and export with them); every other row, running
    or queued, is marked cancelled."""
    path = tmp_path / "rows.jsonl"
    short = [{"prompt": f"Say hi {i}.", "max_tokens": 2} for i in range(4)]
    long = [{"prompt": f"Tell me a very long story number {i}.", "max_tokens": 400} for i in range(12)]
    path.write_text("\n".join(json.dumps(r) for r in short + long))
    assert page.import_file(path)
    page.run_button.click()
    items = page.model.items
    qtbot.waitUntil(lambda: all(item.status == DONE for item in items[:4]), timeout=UNTIL_DONE)
    assert page.running
    done = [(item.output, item.tokens) for item in items[:4]]
    page.cancel_button.click()
    assert not page.running and [item.status for item in items] == [DONE] * 4 + [CANCELLED] * 12
    assert [(item.output, item.tokens) for item in items[:4]] == done and all(t == 2 and o for o, t in done)
    assert page.status.text().startswith("4 done, 12 cancelled in ")
    out = tmp_path / "results.jsonl"
    assert page.export(out)
    exported = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["output"], r["tokens"]) for r in exported[:4]] == done


def test_cancel_before_every_row_is_submitted_submits_no_more(qtbot, page, loaded_bridge, monkeypatch):
    monkeypatch.setattr(batch, "SUBMIT_SLICE", 4)
    submitted, submit = [], loaded_bridge.submit_chat

    def counting_submit(*args):
        submitted.append(submit(*args))
        return submitted[-1]

    monkeypatch.setattr(loaded_bridge, "submit_chat", counting_submit)
    page.input.setPlainText("\n".join(f"Prompt {i}" for i in range(16)))
    page.sampling.max_tokens.setValue(400)
    page.run_button.click()  # the first slice goes in at once, the rest on later turns of the event loop
    page.cancel_button.click()
    assert [item.status for item in page.model.items] == [CANCELLED] * 16 and not page.running
    QApplication.processEvents()  # the next slice's turn comes, and must find the run cancelled
    assert len(submitted) == 4
    engine = loaded_bridge.engine_thread.engine
    qtbot.waitUntil(
        lambda: engine.get_stats().num_blocks_used == 0 and not engine.has_unfinished_requests(), timeout=UNTIL_DONE
    )


def test_a_bad_import_is_said_and_changes_no_rows(qtbot, page, tmp_path):
    page.input.setPlainText("kept one\nkept two")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": 5}\n')
    assert not page.import_file(bad)
    assert page.status.text().startswith("Could not import: bad.jsonl line 2:")
    assert not page.import_file(tmp_path / "missing.csv")
    assert page.status.text().startswith("Could not import: missing.csv: cannot read the file")
    assert texts(page) == ["kept one", "kept two"] and page.source.text() == "2 pasted prompts"


def test_run_without_a_model_or_prompts_says_so(qtbot):
    page = BatchPage(EngineBridge())
    qtbot.addWidget(page)
    page.run()
    assert page.status.text().startswith("Nothing to run")
    page.input.setPlainText("hello")
    page.run()
    assert page.status.text() == "No model is loaded yet." and page.model.items[0].status == QUEUED


def test_the_selected_rows_whole_output_shows_under_the_table(qtbot):
    page = BatchPage(EngineBridge())  # the outputs are set here: no engine needed
    qtbot.addWidget(page)
    page.input.setPlainText("first\nsecond")
    long_output = " ".join(f"word{i}" for i in range(400))  # past what the Output column shows on one line
    page.model.items[0] = BatchItem(page.model.items[0].row, DONE, "short reply", 2, "stop")
    page.model.items[1] = BatchItem(page.model.items[1].row, DONE, long_output, 400, "length")
    page.model.rows_changed(0, 1)
    page.resize(1200, 720)
    page.show()
    qtbot.waitExposed(page)
    assert page.model.data(page.model.index(1, 4)).endswith("…")  # the cell cuts it

    page.table.selectRow(1)
    assert long_output in page.detail.toPlainText()
    table, detail = (w.geometry() for w in (page.table, page.detail))
    assert detail.top() > table.bottom() and detail.width() == table.width()  # below it, as wide as it
    page.table.selectRow(0)  # it follows the selection
    assert "short reply" in page.detail.toPlainText() and long_output not in page.detail.toPlainText()
    page.table.clearSelection()
    assert page.detail.toPlainText() == ""


def test_the_table_model_alone(qtbot):
    model = BatchTableModel()
    model.set_rows([BatchRow("first\nprompt"), BatchRow(messages=[{"role": "user", "content": "chat"}])])
    assert (model.rowCount(), model.columnCount()) == (2, 5)
    assert model.rowCount(model.index(0, 0)) == 0  # a table: no children
    assert [model.headerData(c, Qt.Horizontal) for c in range(5)] == ["#", "Prompt", "Status", "Tokens", "Output"]
    assert [model.data(model.index(0, c)) for c in range(5)] == [1, "first prompt", "queued", "", ""]
    assert model.data(model.index(1, 1)) == "chat" and model.data(QModelIndex()) is None

    model.items[0] = BatchItem(model.items[0].row, DONE, "out\nput " + "x" * 400, 7, "length", seconds=0.25)
    model.items[1] = BatchItem(model.items[1].row, FAILED, error="too long")
    with qtbot.waitSignal(model.dataChanged) as changed:
        model.rows_changed(0, 1)
    assert changed.args[0].row() == 0 and changed.args[1].row() == 1 and changed.args[1].column() == 4
    assert model.data(model.index(0, 3)) == 7
    assert model.data(model.index(0, 4)).startswith("out put xxx") and model.data(model.index(0, 4)).endswith("…")
    assert model.data(model.index(0, 4), Qt.ToolTipRole) == "out\nput " + "x" * 400
    assert model.data(model.index(0, 2), Qt.ToolTipRole) == "finish reason: length · 0.25 s"
    assert model.data(model.index(1, 4)) == "too long" and model.data(model.index(1, 3)) == 0
    assert model.data(model.index(1, 2), Qt.ForegroundRole) == model.data(model.index(1, 4), Qt.ForegroundRole)
    assert model.count(DONE, FAILED) == 2
    results = model.results()
    assert (results[0].prompt, results[0].tokens, results[0].seconds) == ("first\nprompt", 7, 0.25)
    assert results[1].messages == [{"role": "user", "content": "chat"}] and results[1].error == "too long"
    model.reset_results()
    assert [item.status for item in model.items] == [QUEUED, QUEUED] and model.items[0].output == ""


def test_the_ui_thread_keeps_turning_through_a_64_prompt_run(qtbot, page, loaded_bridge, monkeypatch):
    """The rows go to the engine a slice per turn of the event loop, and the UI thread never waits for the engine:
    held inside a step in the middle of the run, the engine waits while the UI thread's timer ticks on and the
    page repaints its progress. Nothing here reads the clock to pass or fail."""
    monkeypatch.setattr(batch, "SUBMIT_SLICE", 16)
    submitted, submit = [], loaded_bridge.submit_chat

    def counting_submit(*args):
        submitted.append(submit(*args))
        return submitted[-1]

    monkeypatch.setattr(loaded_bridge, "submit_chat", counting_submit)
    engine = loaded_bridge.engine_thread.engine
    inside, release = threading.Event(), threading.Event()
    steps, step = itertools.count(1), engine.step

    def held_step():
        if next(steps) == 6:  # a few tokens into the run: rows are generating
            inside.set()
            release.wait()
        return step()

    monkeypatch.setattr(engine, "step", held_step)
    page.input.setPlainText("\n".join(f"Question {i}: what is {i} plus {i}?" for i in range(64)))
    page.sampling.max_tokens.setValue(16)
    page.show()
    qtbot.waitExposed(page)
    beats: list[float] = []  # only printed: how long the UI thread went without a turn depends on the machine
    heartbeat = QTimer(interval=1, timeout=lambda: beats.append(time.perf_counter()))
    heartbeat.start()
    try:
        page.run_button.click()
        assert len(submitted) == 16  # the first slice at once; the others on later turns of the event loop
        qtbot.waitUntil(inside.is_set, timeout=UNTIL_DONE)
        held_at = len(beats)
        qtbot.waitUntil(lambda: len(beats) >= held_at + 50, timeout=UNTIL_DONE)  # 50 ticks, the engine held
        qtbot.waitUntil(lambda: page.status.text().startswith("Running 64 prompts:"), timeout=UNTIL_DONE)
        assert page.running and not release.is_set()
    finally:
        release.set()
    qtbot.waitUntil(lambda: not page.running, timeout=UNTIL_DONE)
    heartbeat.stop()
    gap = max(b - a for a, b in itertools.pairwise(beats))
    print(f"\nlargest gap between 1 ms heartbeats over a 64-prompt run: {gap * 1000:.1f} ms ({len(beats)} beats)")
    assert len(submitted) == 64 and [item.status for item in page.model.items] == [DONE] * 64


def drop(target, *paths, url=None) -> QDropEvent:
    """Drop local files (or one URL) on `target` (the page, or a child's viewport) as a window system would: an
    enter, then the drop; returns the drop event."""
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(p)) for p in paths] if url is None else [QUrl(url)])
    enter = QDragEnterEvent(QPointF(5, 5), Qt.CopyAction, mime, Qt.LeftButton, Qt.NoModifier)
    QApplication.sendEvent(target, enter)
    assert enter.isAccepted()
    event = QDropEvent(QPointF(5, 5), Qt.CopyAction, mime, Qt.LeftButton, Qt.NoModifier, QEvent.Type.Drop)
    QApplication.sendEvent(target, event)
    return event


def test_a_dropped_prompt_file_is_imported_and_anything_else_refused_in_words(qtbot, tmp_path):
    page = BatchPage(EngineBridge())
    qtbot.addWidget(page)
    assert page.acceptDrops()
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt,max_tokens\nfirst,3\nsecond,\n")
    drop(page, prompts)
    assert texts(page) == ["first", "second"] and page.model.items[0].row.max_tokens == 3
    assert page.source.text() == "2 prompts from prompts.csv"
    assert page.status.text() == "Imported 2 prompts from prompts.csv."

    picture = tmp_path / "picture.png"
    picture.write_bytes(b"\x89PNG")
    drop(page, picture)
    assert page.status.text() == "Could not import: picture.png: unknown file type '.png'; use .txt, .jsonl, .csv"
    drop(page, prompts, picture)
    assert page.status.text() == "Drop one prompt file from this computer (.txt, .jsonl or .csv)."
    drop(page, url="https://example.com/prompts.txt")
    assert page.status.text() == "Drop one prompt file from this computer (.txt, .jsonl or .csv)."
    assert texts(page) == ["first", "second"]  # the refused drops changed nothing

    # Dropped on the prompt box, the file is imported too, not pasted in as its path.
    lines = tmp_path / "lines.txt"
    lines.write_text("one\ntwo\nthree\n")
    drop(page.input.viewport(), lines)
    assert texts(page) == ["one", "two", "three"] and page.input.toPlainText() == ""


def test_the_progress_bar_fills_by_tokens_with_the_time_left_and_ends_at_100_percent(
    qtbot, page, loaded_bridge, monkeypatch
):
    engine = loaded_bridge.engine_thread.engine
    inside, release = threading.Event(), threading.Event()
    steps, step = itertools.count(1), engine.step

    def held_step():
        if next(steps) == 6:  # a few tokens into the run
            inside.set()
            release.wait()
        return step()

    monkeypatch.setattr(engine, "step", held_step)
    seen: list[tuple[int, str]] = []
    page.progress.valueChanged.connect(lambda v: seen.append((v, page.progress.text())))
    page.input.setPlainText("\n".join(f"Count to {i}." for i in range(6)))
    page.sampling.max_tokens.setValue(24)
    assert page.progress.text() == "0 / 6 rows"
    try:
        page.run_button.click()
        assert page.progress.maximum() == 6 * 24  # every row's max_tokens: the most the run can generate
        qtbot.waitUntil(inside.is_set, timeout=UNTIL_DONE)
        # Held mid-run, the bar shows tokens generated so far and an estimate from the rate so far.
        qtbot.waitUntil(lambda: 0 < page.progress.value() < page.progress.maximum(), timeout=UNTIL_DONE)
        qtbot.waitUntil(lambda: "left" in page.progress.text(), timeout=UNTIL_DONE)
        mid = page.progress.text()
        assert mid.startswith("0 / 6 rows · ") and " · about " in mid and mid.endswith(" s left"), mid
    finally:
        release.set()
    qtbot.waitUntil(lambda: not page.running, timeout=UNTIL_DONE)
    values = [v for v, _ in seen]
    assert values == sorted(values)  # forward only
    assert page.progress.value() == page.progress.maximum() and page.progress.text() == "6 / 6 rows · 100%"


def test_the_filter_hides_rows_that_do_not_match_and_shows_them_when_cleared(qtbot):
    page = BatchPage(EngineBridge())
    qtbot.addWidget(page)
    page.input.setPlainText("Name a colour\nName a fruit\nCount to three")
    items = page.model.items
    items[0] = BatchItem(items[0].row, DONE, "Blue, like the SKY", 5, "stop")
    items[1] = BatchItem(items[1].row, DONE, "An apple", 3, "stop")
    items[2] = BatchItem(items[2].row, FAILED, error="the sky fell")
    page.model.rows_changed(0, 2)

    def visible():
        return [i for i in range(page.model.rowCount()) if not page.table.isRowHidden(i)]

    page.filter.setText("sky")  # case-insensitive, in outputs (and the error shown in place of one)
    assert visible() == [0, 2] and page.shown.text() == "2 of 3 rows"
    page.filter.setText("NAME A")  # in prompts
    assert visible() == [0, 1]
    page.filter.setText("nowhere")
    assert visible() == [] and page.shown.text() == "0 of 3 rows"
    page.filter.clear()
    assert visible() == [0, 1, 2] and page.shown.text() == ""
    page.filter.setText("count")  # new rows are filtered as they come
    page.input.setPlainText("count me\nnot me")
    assert visible() == [0]


def test_a_finished_run_saved_by_name_reopens_with_its_prompts_and_outputs(qtbot, page, monkeypatch, tmp_path):
    monkeypatch.setenv(model_store.DATA_DIR_ENV, str(tmp_path / "data"))
    page.input.setPlainText("Name a colour.\nName a fruit.\nName a city.")
    assert not page.save_run("too early") and page.status.text().startswith("Nothing to save yet")
    page.sampling.max_tokens.setValue(4)
    run_and_wait(qtbot, page)
    before = [(item.row, item.status, item.output, item.tokens, item.finish_reason) for item in page.model.items]
    assert page.save_button.isEnabled() and page.save_run("three names")
    assert page.status.text() == "Saved the run as 'three names'."

    page.input.setPlainText("something else")
    page.saved_runs.refresh()
    actions = page.saved_runs.menu().actions()
    assert actions[0].text().startswith("three names  ·  ")
    actions[0].trigger()  # the menu's entry reopens it
    after = [(item.row, item.status, item.output, item.tokens, item.finish_reason) for item in page.model.items]
    assert after == before and all(output for _, _, output, _, _ in after)
    assert page.source.text() == "3 prompts from the saved run 'three names'" and page.input.toPlainText() == ""
    assert page.progress.text() == "3 / 3 rows · 100%" and page.export_csv_button.isEnabled()

    # Deleting from the menu asks first: "No" keeps the run, "Yes" deletes it.
    answers = iter([QMessageBox.StandardButton.No, QMessageBox.StandardButton.Yes])
    monkeypatch.setattr(QMessageBox, "question", lambda *args: next(answers))
    for _ in range(2):
        page.saved_runs.refresh()
        delete_menu = page.saved_runs.menu().actions()[-1].menu()
        assert [a.text() for a in delete_menu.actions()] == ["three names"]
        delete_menu.actions()[0].trigger()
    assert page.status.text() == "Deleted the saved run 'three names'."
    page.saved_runs.refresh()
    assert [a.text() for a in page.saved_runs.menu().actions()] == ["No saved runs yet"]
    assert not page.open_run("three names") and page.status.text().startswith("Could not open: saved run 'three names'")


def test_a_save_that_cannot_be_written_is_said_and_leaves_nothing(qtbot, monkeypatch, tmp_path):
    page = BatchPage(EngineBridge())
    qtbot.addWidget(page)
    page.input.setPlainText("only row")
    page.model.items[0] = BatchItem(page.model.items[0].row, DONE, "reply", 1, "stop")
    blocker = tmp_path / "not a folder"
    blocker.write_text("")
    monkeypatch.setenv(model_store.DATA_DIR_ENV, str(blocker / "data"))
    assert not page.save_run("mine")
    assert page.status.text().startswith(f"Could not save the run: cannot create the folder {blocker / 'data'}")
    assert [p.name for p in tmp_path.iterdir()] == ["not a folder"] and blocker.read_text() == ""
    page.saved_runs.refresh()
    assert [a.text() for a in page.saved_runs.menu().actions()] == ["No saved runs yet"]
