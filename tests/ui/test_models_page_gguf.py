"""A repo of GGUF files on the Models page, served by a fake Hub on loopback into a tmp Hugging Face cache: its
files listed with their quant, how each loads and whether it fits, a split one refused, the one chosen downloaded
into the library and loaded by its path, and a cancelled GGUF download offered and resumed.

Waits end on what they wait for, never on the clock: a loaded machine only makes them slower. A hang is caught by
the module's pytest-timeout mark."""

from __future__ import annotations

import hashlib

import pytest
from models_page_harness import (
    UNTIL_DONE,
    RecordingLoader,
    cells,
    interrupted_row,
    library,
    names,
    results,
    search,
    small_machine,
)
from PySide6.QtCore import Qt

from app.library import gguf_files, hub_files, machine
from app.library.machine import GIB
from app.units import byte_size
from ui.bridge import EngineBridge
from ui.pages.models import ModelsPage
from ui.widgets.rows_table import tone_color

pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def gguf_page(qtbot, serve_hub, gguf_repo, tiny_chat_model, monkeypatch):
    tiny = {p.name: p.read_bytes() for p in sorted(tiny_chat_model.iterdir()) if p.is_file()}
    hub = serve_hub(
        {"org/tiny-GGUF": gguf_repo, "org/tiny": tiny},
        {"org/tiny-GGUF": 900, "org/tiny": 500},
        {"org/tiny-GGUF": 606_976},  # the Hub reads a GGUF's parameter count from its header
    )
    # room beside the reserve for the quantized files' weights (under 1 MB), not for the float32 ones (2.4 MB)
    monkeypatch.setattr(machine, "machine_memory", lambda: small_machine(GIB // 2 + 1_000_000))
    page = ModelsPage(EngineBridge(make_llm=RecordingLoader()))
    qtbot.addWidget(page)
    page.resize(1280, 720)
    yield page, hub
    page.shutdown()


def files(page: ModelsPage) -> list[list[str]]:
    return cells(page.hub.files)


def select_file(page: ModelsPage, label: str) -> None:
    [row] = [i for i, choice in enumerate(page.hub.files.rows()) if choice.label == label]
    page.hub.files_view.selectRow(row)


def show_files(qtbot, page: ModelsPage, repo: str) -> None:
    with qtbot.waitSignal(page.hub.bridge.files_done, timeout=None):
        page.hub.results_view.selectRow([r[0] for r in results(page)].index(repo))


def test_a_gguf_repo_shows_its_files_and_downloads_the_one_chosen(qtbot, gguf_page, gguf_repo, screenshots):
    page, hub = gguf_page
    search(qtbot, page, "tiny")
    assert [r[:3] for r in results(page)] == [["org/tiny-GGUF", "GGUF", "607K"], ["org/tiny", "safetensors", "—"]]
    assert results(page)[0][6] == "—"  # each file says its own
    assert not page.hub.files_box.isVisibleTo(page)
    show_files(qtbot, page, "org/tiny-GGUF")
    assert page.hub.files_box.isVisibleTo(page)
    assert [page.hub.files.headerData(c, Qt.Horizontal) for c in range(page.hub.files.columnCount())] == [
        "File",
        "Quant",
        "Loads as",
        "Size",
        "Memory",
    ]
    size = {name: byte_size(len(data)) for name, data in gguf_repo.items()}
    split = byte_size(2 * len(gguf_repo["tiny-Q2_K-00001-of-00002.gguf"]))
    assert files(page) == [
        ["tiny-Q2_K-00001-of-00002.gguf (+1 part)", "Q2_K", "—", split, "can't load"],
        ["tiny-IQ4_XS.gguf", "IQ4_XS", "float32", size["tiny-IQ4_XS.gguf"], "too big"],
        ["tiny-Q4_K_M.gguf", "Q4_K_M", "4.625-bit (q4k)", size["tiny-Q4_K_M.gguf"], "tight"],
        ["tiny-Q8_0.gguf", "Q8_0", "8.5-bit (q8g32)", size["tiny-Q8_0.gguf"], "tight"],
        ["tiny-F16.gguf", "F16", "float32", size["tiny-F16.gguf"], "too big"],
    ]
    tips = cells(page.hub.files, Qt.ToolTipRole)
    assert tips[0][4].startswith("tiny-Q2_K-00001-of-00002.gguf is split into 2 files, and kvstudio loads a model")
    assert tips[1][2].startswith("kvstudio cannot keep IQ4_XS quantized: this file loads in float32")
    assert "(IQ4_XS loaded in float32, estimated from the file size)" in tips[1][4]
    assert tips[3][0] == f"tiny-Q8_0.gguf\nsha256 {hashlib.sha256(gguf_repo['tiny-Q8_0.gguf']).hexdigest()}"
    colours = cells(page.hub.files, Qt.ForegroundRole)
    assert (colours[1][2], colours[4][2], colours[0][4]) == (tone_color("warn"), None, tone_color("error"))

    assert not page.hub.download_button.isEnabled()  # a repo of GGUF files: nothing to download until one is chosen
    select_file(page, "Q2_K")
    assert not page.hub.download_button.isEnabled()
    page.hub.download_selected()  # as a double-click does
    assert page.status.text().startswith("Cannot download tiny-Q2_K-00001-of-00002.gguf: it is split into 2 files")
    assert page.hub.bridge.downloading is None
    select_file(page, "Q4_K_M")
    with qtbot.waitSignal(page.hub.bridge.download_done, timeout=None):
        page.hub.download_button.click()
    path = hub_files.repo_dir("org/tiny-GGUF") / "snapshots" / hub.commit / "tiny-Q4_K_M.gguf"
    assert page.status.text() == "Downloaded org/tiny-GGUF:Q4_K_M; it is in the library."
    assert page.hub.progress.value() == 100 and page.hub.progress_text.text() == "org/tiny-GGUF:Q4_K_M: done."
    assert library(page) == [
        ["org/tiny-GGUF:Q4_K_M", "Llama", "Q4_K_M", "607K", "2,048", size["tiny-Q4_K_M.gguf"], "tight"]
    ]
    assert page.selected_model().path == path
    page.show()
    qtbot.waitExposed(page)
    page.grab().save(str(screenshots / "models-gguf.png"))
    with qtbot.waitSignal(page.bridge.model_loading, timeout=None) as loading:
        page.load_button.click()  # the engine loads it by its path
    assert loading.args == [str(path)]


def test_a_cancelled_gguf_download_is_offered_and_resumes(qtbot, gguf_page, gguf_repo, monkeypatch):
    page, hub = gguf_page
    q8 = gguf_repo["tiny-Q8_0.gguf"]
    monkeypatch.setattr(hub_files, "_CHUNK", 1024)  # several chunks, so there is a "between"
    search(qtbot, page, "tiny")
    show_files(qtbot, page, "org/tiny-GGUF")
    select_file(page, "Q8_0")
    hub.stall_halfway.add("org/tiny-GGUF/tiny-Q8_0.gguf")
    page.hub.download_button.click()
    blob = hub_files.repo_dir("org/tiny-GGUF") / "blobs" / (hashlib.sha256(q8).hexdigest() + ".incomplete")
    # the head was read apart first, then more than the head's bytes of the file arrived (half of it is sent, the
    # rest waits for the release), so a resumed pull reads the architecture from what is on disk
    qtbot.waitUntil(lambda: blob.is_file() and blob.stat().st_size >= gguf_files.HEAD_BYTES, timeout=UNTIL_DONE)
    assert hub.ranges == [f"bytes=0-{gguf_files.HEAD_BYTES - 1}", None]
    with qtbot.waitSignal(page.hub.bridge.download_failed, timeout=None) as blocker:
        page.hub.cancel_button.click()
        hub.release.set()
    assert blocker.args[0].cancelled and library(page) == []
    row = interrupted_row(page, "org/tiny-GGUF")
    assert row.pull.model == "org/tiny-GGUF:Q8_0" and row.text.text().startswith("org/tiny-GGUF:Q8_0: interrupted at")
    kept = row.pull.done
    assert gguf_files.HEAD_BYTES <= kept < len(q8)
    hub.requests.clear()
    with qtbot.waitSignal(page.hub.bridge.download_done, timeout=None):
        row.resume_button.click()
    assert hub.ranges == [f"bytes={kept}-"]
    assert names(page) == ["org/tiny-GGUF:Q8_0"] and page.hub.interrupted == []
