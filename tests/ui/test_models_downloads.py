"""Downloads on the Models page against a fake Hub on loopback and a tmp Hugging Face cache: a download with
progress that joins the library, one failing halfway and one cancelled then resumed, a missing repo and a full disk
said in words, a download interrupted in an earlier run resumed or discarded (also one whose app was killed with
SIGKILL), and a failed download offered for resuming at once. The `hub` and `page` fixtures are in conftest.py.

Waits end on what they wait for, never on the clock: a loaded machine only makes them slower. A hang is caught by
the module's pytest-timeout mark."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from models_page_harness import UNTIL_DONE, RecordingLoader, interrupted_row, library, names, results, search
from PySide6.QtGui import QColor, QPalette
from PySide6.QtWidgets import QApplication

from app.library import hub_files, hub_models, model_store, pulls
from app.units import byte_size
from ui.bridge import EngineBridge
from ui.pages.models import ModelsPage
from ui.widgets.rows_table import tone_color

pytestmark = pytest.mark.timeout(600)


def download(qtbot, page: ModelsPage, name: str, signal: str) -> None:
    row = [r[0] for r in results(page)].index(name)
    page.hub.results_view.selectRow(row)
    with qtbot.waitSignal(getattr(page.hub.bridge, signal), timeout=None):
        page.hub.download_button.click()


def weights_size(tiny_chat_model) -> int:
    return (tiny_chat_model / "model.safetensors").stat().st_size


def test_a_download_completes_and_the_model_joins_the_library(qtbot, page, hub, smollm2_gguf, screenshots):
    default = model_store.default_model_path()
    default.parent.mkdir(parents=True)
    default.symlink_to(smollm2_gguf)
    page.refresh()
    search(qtbot, page, "org")
    values = []
    page.hub.bridge.download_progress.connect(lambda p: values.append(page.hub.progress.value()))
    download(qtbot, page, "org/tiny", "download_done")
    assert page.hub.progress.value() == 100 and values[-1] == 100
    assert names(page) == [default.name, "org/tiny"]
    assert page.selected_model().name == "org/tiny"
    assert page.status.text() == "Downloaded org/tiny; it is in the library."
    assert page.hub.download_button.isEnabled() and not page.hub.cancel_button.isEnabled()
    page.show()
    qtbot.waitExposed(page)
    page.grab().save(str(screenshots / "models.png"))
    # on a dark desktop the verdict colours turn lighter, readable on the dark base
    light = QApplication.palette()
    ok = tone_color("ok")
    dark = QPalette()
    for role, color in (
        (QPalette.ColorRole.Window, "#1f2124"),
        (QPalette.ColorRole.WindowText, "#e6e6e6"),
        (QPalette.ColorRole.Base, "#2a2d31"),
        (QPalette.ColorRole.AlternateBase, "#303338"),
        (QPalette.ColorRole.Text, "#e6e6e6"),
        (QPalette.ColorRole.Button, "#2a2d31"),
        (QPalette.ColorRole.ButtonText, "#e6e6e6"),
        (QPalette.ColorRole.PlaceholderText, "#9aa0a6"),
    ):
        dark.setColor(role, QColor(color))
    QApplication.setPalette(dark)
    try:
        assert tone_color("ok").lightness() > ok.lightness()
        page.library_view.clearSelection()
        page.hub.results_view.clearSelection()
        QApplication.sendPostedEvents()  # the palette change reaches the widgets as posted events
        page.grab().save(str(screenshots / "models-dark.png"))
    finally:
        QApplication.setPalette(light)


def test_a_download_failing_halfway_says_so_and_a_retry_resumes(qtbot, page, hub, tiny_chat_model):
    search(qtbot, page, "tiny")
    hub.drop_halfway.add("org/tiny/model.safetensors")
    download(qtbot, page, "org/tiny", "download_failed")
    assert "model.safetensors broke off" in page.status.text() and "resume" in page.status.text()
    assert library(page) == [] and page.hub.progress_text.text() == "org/tiny: failed."
    download(qtbot, page, "org/tiny", "download_done")
    assert hub.ranges == [None, f"bytes={weights_size(tiny_chat_model) // 2}-"]
    assert names(page) == ["org/tiny"] and page.hub.progress.value() == 100


def test_cancel_stops_between_chunks_and_downloading_again_resumes(qtbot, page, hub, tiny_chat_model, monkeypatch):
    monkeypatch.setattr(hub_files, "_CHUNK", 1024)  # several chunks, so there is a "between"
    search(qtbot, page, "tiny")
    hub.stall_halfway.add("org/tiny/model.safetensors")
    row = [r[0] for r in results(page)].index("org/tiny")
    page.hub.results_view.selectRow(row)
    page.hub.download_button.click()
    qtbot.waitUntil(lambda: hub.ranges == [None], timeout=UNTIL_DONE)  # the weights' GET has begun
    assert page.hub.cancel_button.isEnabled() and not page.hub.download_button.isEnabled()
    with qtbot.waitSignal(page.hub.bridge.download_failed, timeout=None) as blocker:
        page.hub.cancel_button.click()
        hub.release.set()
    assert blocker.args[0].cancelled and "cancelled" in page.status.text()
    assert library(page) == []
    partial = next((hub_files.cache_dir() / "models--org--tiny" / "blobs").glob("*.incomplete"))
    kept = partial.stat().st_size
    assert 0 < kept < weights_size(tiny_chat_model)  # the stall holds back the rest until after the cancel

    download(qtbot, page, "org/tiny", "download_done")
    assert hub.ranges == [None, f"bytes={kept}-"]
    assert names(page) == ["org/tiny"]


def test_a_missing_repo_fails_in_words(qtbot, page, hub):
    with qtbot.waitSignal(page.hub.bridge.download_failed, timeout=None):
        page.hub.download("org/missing")
    assert page.status.text() == "Download of org/missing failed: no model org/missing on the Hub"


def test_a_download_interrupted_in_an_earlier_run_is_offered_and_resumes(qtbot, hub, tiny_chat_model, screenshots):
    hub.drop_halfway.add("org/tiny/model.safetensors")
    with pytest.raises(hub_models.HubError):
        pulls.pull("org/tiny")  # the earlier run: it broke off, then the app closed
    [pull] = pulls.list_interrupted()
    page = ModelsPage(EngineBridge(make_llm=RecordingLoader()))  # the app starts again
    qtbot.addWidget(page)
    page.resize(1200, 640)
    row = interrupted_row(page, "org/tiny")
    percent = 100 * pull.done // pull.total
    assert row.text.text() == (
        f"org/tiny: interrupted at {percent}% ({byte_size(pull.done)} of {byte_size(pull.total)})"
    )
    assert library(page) == []  # nothing half-downloaded in the library
    page.show()
    qtbot.waitExposed(page)
    page.grab().save(str(screenshots / "models-interrupted.png"))

    with qtbot.waitSignal(page.hub.bridge.download_done, timeout=None):
        row.resume_button.click()
    assert hub.ranges == [None, f"bytes={weights_size(tiny_chat_model) // 2}-"]
    assert names(page) == ["org/tiny"] and page.hub.interrupted == []


def test_a_download_whose_app_was_killed_lists_nothing_and_resumes_on_the_next_start(
    qtbot, hub, tiny_chat_model, tmp_path
):
    weights = (tiny_chat_model / "model.safetensors").read_bytes()
    hub.stall_halfway.add("org/tiny/model.safetensors")  # half is sent, the rest never comes
    errors = tmp_path / "child.err"
    child = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("models_child.py")), "org/tiny"],
        env={
            **os.environ,
            "HF_ENDPOINT": hub.url,
            "HF_HUB_CACHE": str(hub_files.cache_dir()),
            model_store.DATA_DIR_ENV: str(model_store.data_dir()),
        },
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=errors.open("w"),
    )
    blobs = hub_files.cache_dir() / "models--org--tiny" / "blobs"
    partial = blobs / (hashlib.sha256(weights).hexdigest() + ".incomplete")

    def arriving() -> bool:
        assert child.poll() is None, errors.read_text()
        return partial.is_file() and partial.stat().st_size > 0

    try:
        qtbot.waitUntil(arriving, timeout=UNTIL_DONE)
    finally:
        child.kill()  # SIGKILL mid-download: no handler runs, nothing is cleaned up
        child.wait()
    hub.release.set()
    kept = partial.stat().st_size
    assert 0 < kept < len(weights)

    page = ModelsPage(EngineBridge(make_llm=RecordingLoader()))  # the app starts again
    qtbot.addWidget(page)
    assert library(page) == []  # nothing half-written in the library
    hub.requests.clear()
    with qtbot.waitSignal(page.hub.bridge.download_done, timeout=None):
        interrupted_row(page, "org/tiny").resume_button.click()
    assert hub.ranges == [f"bytes={kept}-"]  # resumed where the killed download stopped
    assert names(page) == ["org/tiny"] and page.hub.interrupted == []
    assert (page.selected_model().path / "model.safetensors").read_bytes() == weights


def test_discarding_an_interrupted_download_leaves_no_partial_file(qtbot, hub, tmp_path):
    hub.drop_halfway.add("org/tiny/model.safetensors")
    with pytest.raises(hub_models.HubError):
        pulls.pull("org/tiny")
    repo_dir = tmp_path / "hf-cache" / "models--org--tiny"
    on_disk = sum(f.stat().st_size for f in repo_dir.rglob("*") if f.is_file())
    page = ModelsPage(EngineBridge(make_llm=RecordingLoader()))
    qtbot.addWidget(page)
    interrupted_row(page, "org/tiny").discard_button.click()
    assert page.status.text() == f"Discarded the unfinished download of org/tiny, freed {byte_size(on_disk)}."
    assert not repo_dir.exists() and page.hub.interrupted == [] and library(page) == []


def test_a_failed_download_is_offered_for_resuming_at_once(qtbot, page, hub):
    hub.drop_halfway.add("org/tiny/model.safetensors")
    search(qtbot, page, "tiny")
    download(qtbot, page, "org/tiny", "download_failed")
    assert interrupted_row(page, "org/tiny").resume_button.isEnabled()


def test_a_download_that_does_not_fit_on_disk_fails_in_words(qtbot, page, hub, monkeypatch):
    monkeypatch.setattr(hub_files.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 10})())
    with qtbot.waitSignal(page.hub.bridge.download_failed, timeout=None):
        page.hub.download("org/tiny")
    assert "not enough disk space" in page.status.text() and library(page) == []
