"""Named batch runs: saved under the data dir and read back row for row (chats, overrides and formats
included), listed newest first, deleted; a save that cannot be written says why and leaves nothing behind."""

from __future__ import annotations

import os

import pytest

from app import batch_runs
from app.batch_io import BatchFileError, BatchResult, BatchRow, response_format
from app.batch_runs import delete_run, list_runs, load_run, runs_dir, save_run
from app.library import model_store

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(autouse=True)
def data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv(model_store.DATA_DIR_ENV, str(tmp_path / "data"))
    return tmp_path / "data"


def rows_and_results():
    rows = [
        BatchRow("first prompt", max_tokens=3, stop=["."]),
        BatchRow(messages=CHAT, temperature=0.5, seed=7),
        BatchRow("as JSON", response_format=response_format({"type": "object"})),
        BatchRow("too long"),
    ]
    results = [
        BatchResult("first prompt", "one two", "length", 3, 0.25),
        BatchResult("Name a colour.", "Blue", "stop", 1, 0.5, messages=CHAT),
        BatchResult("as JSON", "{}", "stop", 2, 0.125),
        BatchResult("too long", error="longer than 512 tokens"),
    ]
    return rows, results


def test_a_saved_run_reads_back_row_for_row(data_dir):
    rows, results = rows_and_results()
    save_run("  colours / shapes  ", rows, results)
    assert runs_dir() == data_dir / "batch-runs"
    assert [r.name for r in list_runs()] == ["colours / shapes"]
    run = load_run("colours / shapes")
    assert run.name == "colours / shapes" and run.rows == rows and run.results == results


def test_runs_are_listed_newest_first_and_replaced_and_deleted_by_name():
    rows, results = rows_and_results()
    save_run("older", rows, results)
    save_run(".hidden-looking", rows[:1], results[:1])
    os.utime(batch_runs._path("older"), (1, 1))
    assert [r.name for r in list_runs()] == [".hidden-looking", "older"]
    save_run("older", rows[:2], results[:2])  # the same name: replaced, not added
    assert len(load_run("older").rows) == 2 and len(list_runs()) == 2
    delete_run("older")
    assert [r.name for r in list_runs()] == [".hidden-looking"]
    with pytest.raises(BatchFileError, match="cannot delete the saved run 'older'"):
        delete_run("older")
    with pytest.raises(BatchFileError, match="saved run 'older': cannot read"):
        load_run("older")


def test_a_save_that_cannot_be_written_says_why_and_leaves_nothing(monkeypatch, tmp_path):
    rows, results = rows_and_results()
    blocker = tmp_path / "a file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(model_store.DATA_DIR_ENV, str(blocker / "data"))
    with pytest.raises(BatchFileError, match=r"cannot create the folder .*a file/data/batch-runs"):
        save_run("run", rows, results)
    assert blocker.read_text() == "not a folder" and list_runs() == []

    monkeypatch.setenv(model_store.DATA_DIR_ENV, str(tmp_path / "data"))
    save_run("run", rows[:1], results[:1])

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(BatchFileError, match="cannot write the file: No space left on device"):
        save_run("run", rows, results)
    assert [p.name for p in runs_dir().iterdir()] == ["run.json"]  # no temporary file left
    assert len(load_run("run").rows) == 1  # the earlier save is intact


def test_a_nameless_save_and_a_damaged_file_are_said_in_words():
    rows, results = rows_and_results()
    with pytest.raises(BatchFileError, match="needs a name"):
        save_run("   ", rows, results)
    runs_dir().mkdir(parents=True)
    (runs_dir() / "broken.json").write_text('{"rows": [')
    with pytest.raises(BatchFileError, match=r"saved run .broken.: broken\.json is not a saved run"):
        load_run("broken")
    (runs_dir() / "odd.json").write_text('{"rows": [{"prompt": "hi", "tokens": "many"}]}')
    with pytest.raises(BatchFileError, match="saved run 'odd' row 1: tokens has the wrong type"):
        load_run("odd")
