"""The models page against a fake Hub on loopback and a tmp Hugging Face cache: the library (with the default
model), delete, search, download with progress, a failing and a cancelled download resumed, a download interrupted
in an earlier run resumed or discarded (also one whose app was killed with SIGKILL), a missing repo and a full disk
said in words, offline search, load, a model too big for memory and a corrupt one refused in words.

Waits end on what they wait for, never on the clock: a loaded machine only makes them slower. A hang is caught by
the module's pytest-timeout mark."""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from PySide6.QtCore import Qt
from PySide6.QtGui import QColor, QPalette
from PySide6.QtWidgets import QApplication

from app.library import gguf_files, hub_files, hub_models, machine, model_store, pulls
from app.library.machine import GIB, MachineMemory
from app.units import byte_size
from engine import LLM, SamplingParams
from ui.bridge import EngineBridge
from ui.pages.models import ModelsPage
from ui.widgets.first_run import FirstRunDialog
from ui.widgets.hub_panel import OFFLINE
from ui.widgets.rows_table import tone_color

pytestmark = pytest.mark.timeout(600)
UNTIL_DONE = math.inf  # qtbot.waitUntil's timeout: none
HUGE = 70_000_000_000  # parameters: too big for any machine this runs on


@pytest.fixture
def hub(serve_hub, tiny_chat_model):
    tiny = {p.name: p.read_bytes() for p in sorted(tiny_chat_model.iterdir()) if p.is_file()}
    return serve_hub(
        {"org/tiny": tiny, "org/tiny-instruct": tiny, "org/huge": {"config.json": tiny["config.json"]}},
        {"org/tiny": 1200, "org/tiny-instruct": 3400, "org/huge": 10},
        {"org/tiny": tiny_params(tiny_chat_model), "org/huge": HUGE},
    )


def tiny_params(tiny_chat_model) -> int:
    from safetensors import safe_open

    with safe_open(tiny_chat_model / "model.safetensors", framework="pt") as f:
        return sum(f.get_tensor(name).numel() for name in f.keys())  # noqa: SIM118 - not iterable


class RecordingLoader:
    """make_llm for the bridge: records what it was asked to load and fails, so no engine starts."""

    def __init__(self) -> None:
        self.loaded: list[str] = []
        self.options: list[dict] = []

    def __call__(self, model: str, options: dict, on_load_stage):
        self.loaded.append(model)
        self.options.append(options)
        raise RuntimeError("no engine in this test")


@pytest.fixture
def page(qtbot, hub):
    p = ModelsPage(EngineBridge(make_llm=RecordingLoader()))
    qtbot.addWidget(p)
    p.resize(1200, 640)
    yield p
    p.shutdown()


def cells(model, role=Qt.DisplayRole) -> list[list]:
    return [[model.data(model.index(r, c), role) for c in range(model.columnCount())] for r in range(model.rowCount())]


def library(page: ModelsPage) -> list[list[str]]:
    return cells(page.library)


def names(page: ModelsPage) -> list[str]:
    return [m.name for m in page.library.rows()]


def results(page: ModelsPage) -> list[list[str]]:
    return cells(page.hub.results)


def search(qtbot, page: ModelsPage, query: str) -> None:
    page.hub.query.setText(query)
    page.hub.search_button.click()  # disabled until the worker's answer arrives
    qtbot.waitUntil(page.hub.search_button.isEnabled, timeout=UNTIL_DONE)


def download(qtbot, page: ModelsPage, name: str, signal: str) -> None:
    row = [r[0] for r in results(page)].index(name)
    page.hub.results_view.selectRow(row)
    with qtbot.waitSignal(getattr(page.hub.bridge, signal), timeout=None):
        page.hub.download_button.click()


def interrupted_row(page: ModelsPage, repo_id: str):
    """The Hub card's row offering to resume or discard `repo_id`'s unfinished download."""
    [row] = [row for row in page.hub.interrupted if row.pull.repo_id == repo_id]
    return row


def small_machine(available: int) -> MachineMemory:
    return MachineMemory("cpu", total=available, available=available, bytes_per_param=4, reserve=GIB // 2)


def weights_size(tiny_chat_model) -> int:
    return (tiny_chat_model / "model.safetensors").stat().st_size


def test_the_library_lists_a_pulled_model_and_the_default(qtbot, hub, smollm2_gguf, tiny_chat_model, monkeypatch):
    default = model_store.default_model_path()
    default.parent.mkdir(parents=True)
    default.symlink_to(smollm2_gguf)  # removing the link leaves the suite's copy alone
    pulls.pull("org/tiny")
    size = sum(p.stat().st_size for p in tiny_chat_model.iterdir() if p.is_file())
    # room for the tiny float32 model with a quarter to spare, and for SmolLM2's Q4_1 weights kept quantized
    # (92 MiB) beside the reserve, which its 135M parameters at 4 bytes each (513 MiB) would not have
    monkeypatch.setattr(machine, "machine_memory", lambda: small_machine(GIB * 3 // 4))
    page = ModelsPage(EngineBridge(make_llm=RecordingLoader()))
    qtbot.addWidget(page)
    assert [page.library.headerData(c, Qt.Horizontal) for c in range(page.library.columnCount())] == [
        "Name",
        "Family",
        "Quant",
        "Params",
        "Context",
        "Size",
        "Memory",
    ]
    params = tiny_params(tiny_chat_model)
    assert library(page) == [
        [default.name, "Llama", "Q4_1", "135M", "8,192", byte_size(model_store.DEFAULT_MODEL.size), "tight"],
        ["org/tiny", "Llama", "F32", f"{params / 1e6:.1f}M", "512", byte_size(size), "fits"],
    ]
    tips = cells(page.library, Qt.ToolTipRole)
    assert tips[0][0] == f"kvstudio's default model: {default}" and tips[1][0] == str(page.library.row(1).path)
    assert tips[0][3] == "134,515,008 parameters"
    assert page.library.data(page.library.index(0, 0), Qt.FontRole).bold()
    assert page.library.data(page.library.index(1, 0), Qt.FontRole) is None
    assert tips[0][6] == (
        "Tight: needs about 0.6 GiB, 0.8 GiB of RAM is free; weights 92 MiB (Q4_1 kept quantized) + 512 MiB for the "
        "KV cache and activations. Close other programs or lower the KV cache size."
    )
    colours = cells(page.library, Qt.ForegroundRole)
    assert (colours[0][6], colours[1][6], colours[1][0]) == (tone_color("warn"), tone_color("ok"), None)
    assert page.library_summary.text() == f"2 models, {byte_size(size + model_store.DEFAULT_MODEL.size)} on disk"
    # The window's engine options count as they will at load time: SmolLM2 dequantized to float32 no longer fits,
    # a 1 GiB KV pool leaves room for neither model.
    page.engine_options = {"quantization": "none"}
    assert [row[6] for row in library(page)] == ["too big", "fits"]
    assert page.hub.engine_options == {"quantization": "none"}
    page.engine_options = {"kv_cache_memory": 1.0}
    assert [row[6] for row in library(page)] == ["too big", "too big"]


def test_the_library_shows_names_whole_where_the_page_has_room_and_scrolls_where_not(qtbot, page, hub, smollm2_gguf):
    default = model_store.default_model_path()
    default.parent.mkdir(parents=True)
    default.symlink_to(smollm2_gguf)
    page.refresh()
    view = page.library_view
    page.resize(1150, 700)  # the window's default size, less the page list: room for the library beside the Hub
    page.show()
    qtbot.waitExposed(page)
    assert view.columnWidth(0) >= view.sizeHintForColumn(0) > 0  # "SmolLM2-135M-Instruct.Q4_1.gguf", not elided
    assert view.horizontalHeader().length() <= view.viewport().width()  # and every other column beside it
    page.resize(700, 700)  # no room: the name gives way down to a floor, then the table scrolls sideways
    assert view.width() < view.sizeHint().width()

    def hidden() -> int:  # px of the columns past the view's right edge
        return view.horizontalHeader().length() - view.viewport().width()

    # every column can be scrolled to (the scroll range follows the layout, which Qt does on the next turn)
    qtbot.waitUntil(lambda: hidden() > 0 and view.horizontalScrollBar().maximum() == hidden())


def test_delete_frees_the_model_and_refuses_the_default_unless_forced(page, hub, smollm2_gguf):
    default = model_store.default_model_path()
    default.parent.mkdir(parents=True)
    default.symlink_to(smollm2_gguf)
    pulls.pull("org/tiny")
    page.refresh()
    [tiny] = [m for m in page.library.rows() if m.name == "org/tiny"]

    page.select_model("org/tiny")
    page.delete_button.click()  # the confirmation shows under the table; nothing is deleted yet
    assert page.confirm_bar.isVisibleTo(page) and f"free {byte_size(tiny.size)}" in page.confirm_text.text()
    assert names(page) == [default.name, "org/tiny"]
    page.confirm_button.click()
    assert names(page) == [default.name]
    assert page.status.text() == f"Deleted org/tiny, freed {byte_size(tiny.size)}."
    assert not (hub_files.cache_dir() / "models--org--tiny").exists()

    assert page.delete(default.name) is None
    assert "default model" in page.status.text() and default.exists()
    assert page.delete(default.name, force=True) == model_store.DEFAULT_MODEL.size
    assert library(page) == [] and smollm2_gguf.is_file()
    assert page.library_summary.text() == "No models yet: download one from the Hub."


def test_a_search_lists_the_hub_results_most_downloaded_first(qtbot, page, hub, tiny_chat_model):
    search(qtbot, page, "tiny")
    stored = byte_size(sum(p.stat().st_size for p in tiny_chat_model.iterdir() if p.is_file()))
    params = f"{tiny_params(tiny_chat_model) / 1e6:.1f}M"
    assert [page.hub.results.headerData(c, Qt.Horizontal) for c in range(page.hub.results.columnCount())] == [
        "Name",
        "Format",
        "Params",
        "Downloads",
        "Likes",
        "Size",
        "Memory",
    ]
    assert results(page) == [
        ["org/tiny-instruct", "safetensors", "—", "3,400", "17", stored, "—"],  # the Hub gave no count
        ["org/tiny", "safetensors", params, "1,200", "8", stored, "fits"],
    ]
    assert page.status.text() == "2 models on the Hub for 'tiny'."
    search(qtbot, page, "nothing-like-it")
    assert results(page) == [] and "No text-generation model" in page.status.text()


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


def test_an_offline_search_says_offline_and_the_library_still_works(qtbot, page, hub, monkeypatch):
    page.hub.bridge.endpoint = closed_port_url()
    with qtbot.waitSignal(page.hub.bridge.search_failed, timeout=None):
        page.hub.search()
    assert page.status.text() == OFFLINE and results(page) == []
    assert page.hub.offline_note.isVisibleTo(page)  # the card keeps saying it after the status moves on
    pulls.pull("org/tiny", endpoint=hub.url)
    page.refresh()
    assert names(page) == ["org/tiny"]


def closed_port_url() -> str:
    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_the_page_says_the_hub_is_offline_when_it_opens_and_clears_it_once_reached(qtbot, page, hub):
    page.hub.bridge.endpoint = closed_port_url()
    assert not page.hub.offline_note.isVisibleTo(page)  # nothing said before anyone asked
    with qtbot.waitSignal(page.hub.bridge.hub_checked, timeout=None) as checked:
        page.show()  # opening the page asks; no search needed
    assert not checked.args[0].reachable
    assert page.hub.offline_note.isVisibleTo(page) and page.hub.offline_note.text() == OFFLINE
    page.hub.bridge.endpoint = hub.url  # the network is back: a search reaches the Hub and the note goes
    search(qtbot, page, "tiny")
    assert not page.hub.offline_note.isVisibleTo(page) and len(results(page)) == 2


def test_a_reachable_hub_says_nothing_when_the_page_opens(qtbot, page, hub):
    with qtbot.waitSignal(page.hub.bridge.hub_checked, timeout=None) as checked:
        page.show()
    assert checked.args[0].reachable and not page.hub.offline_note.isVisibleTo(page)
    assert page.status.text() == ""


def test_the_welcome_and_the_library_give_the_default_model_the_same_size(qtbot, page, hub, smollm2_gguf):
    default = model_store.default_model_path()
    default.parent.mkdir(parents=True)
    default.symlink_to(smollm2_gguf)
    page.refresh()
    welcome = FirstRunDialog(small_machine(GIB))
    qtbot.addWidget(welcome)
    [size] = [row[5] for row in library(page) if row[0] == default.name]
    assert welcome.availability.text() == f"Already on this computer ({size})."
    assert size == "94 MiB"


def test_the_hub_results_say_which_models_fit_this_machine(qtbot, page, hub, monkeypatch):
    monkeypatch.setattr(machine, "machine_memory", lambda: small_machine(GIB))
    search(qtbot, page, "org")
    names = [r[0] for r in results(page)]
    huge = names.index("org/huge")
    assert [r[6] for r in results(page)][huge] == "too big" and results(page)[huge][2] == "70B"
    tip = cells(page.hub.results, Qt.ToolTipRole)[huge][6]
    assert tip == (
        "Too big for this machine: needs about 261.3 GiB, 1.0 GiB of RAM is free; weights 260.8 GiB (in float32) "
        "+ 512 MiB for the KV cache and activations."
    )
    assert cells(page.hub.results, Qt.ForegroundRole)[huge][6] == tone_color("error")


def test_a_model_too_big_for_the_memory_is_refused_before_loading(qtbot, page, hub, monkeypatch):
    pulls.pull("org/tiny")
    monkeypatch.setattr(machine, "machine_memory", lambda: small_machine(GIB // 4))  # less than the reserve alone
    page.refresh()
    assert library(page)[0][6] == "too big"
    loads = []
    page.bridge.model_loading.connect(loads.append)
    page.select_model("org/tiny")
    page.load_button.click()
    assert page.status.text().startswith("Not loading org/tiny: Too big for this machine: needs about 0.5 GiB")
    QApplication.processEvents()
    assert loads == [] and page.bridge._make_llm.loaded == []


def test_a_corrupt_model_is_listed_as_such_and_load_says_why(qtbot, page, hub, smollm2_gguf, screenshots):
    default = model_store.default_model_path()
    default.parent.mkdir(parents=True)
    with smollm2_gguf.open("rb") as f:
        default.write_bytes(f.read(5_000_000))  # cut short: its header is whole, its tensors are not
    tiny_dir = pulls.pull("org/tiny")
    (tiny_dir / "config.json").unlink()  # the link into blobs; garbage in its place
    (tiny_dir / "config.json").write_text("{not json")
    page.refresh()
    assert [r[:2] for r in library(page)] == [[default.name, "can't load"], ["org/tiny", "can't load"]]
    assert cells(page.library, Qt.ForegroundRole)[0][:2] == [tone_color("error")] * 2
    assert cells(page.library, Qt.ToolTipRole)[0][1].startswith(f"Cannot be loaded: {default} is truncated")
    assert page.library_summary.text().endswith("; 2 cannot be loaded (hover it for why)")

    loads = []
    page.bridge.model_loading.connect(loads.append)
    page.select_model("org/tiny")
    page.load_button.click()
    assert page.status.text().startswith(f"Could not load org/tiny: {tiny_dir / 'config.json'} cannot be read as JSON")
    assert page.status.text().endswith(".")
    page.select_model(default.name)
    page.load_button.click()
    assert page.status.text().startswith(f"Could not load {default.name}: {default} is truncated: tensor ")
    QApplication.processEvents()
    assert loads == []
    page.show()
    qtbot.waitExposed(page)
    page.grab().save(str(screenshots / "models-corrupt.png"))


def test_a_corrupt_file_loaded_elsewhere_fails_in_words_naming_it(qtbot, hub, tmp_path, smollm2_gguf):
    # the window's File > Load goes to the bridge directly; its failure shows on the page too
    page = ModelsPage(EngineBridge())  # the real loader
    qtbot.addWidget(page)
    cut = tmp_path / "cut.gguf"
    with smollm2_gguf.open("rb") as f:
        cut.write_bytes(f.read(5_000_000))
    with qtbot.waitSignal(page.bridge.model_load_failed, timeout=None):
        page.bridge.load_model(str(cut))
    assert page.status.text().startswith(f"Could not load cut.gguf: {cut} is truncated: tensor ")
    assert page.status.text().endswith(".")


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


def test_load_hands_the_library_path_to_the_bridge(qtbot, page, hub):
    pulls.pull("org/tiny")
    page.engine_options = {"max_model_len": 128}  # the window's settings (setting them reads the library again)
    page.select_model("org/tiny")
    path = str(page.selected_model().path)
    with qtbot.waitSignal(page.bridge.model_loading, timeout=None) as loading:
        page.load_button.click()
    assert loading.args == [path]
    qtbot.waitUntil(lambda: page.status.text().startswith("Could not load"), timeout=UNTIL_DONE)
    assert page.bridge._make_llm.loaded == [path] and page.bridge._make_llm.options == [{"max_model_len": 128}]
    assert "no engine in this test" in page.status.text()


def test_a_load_says_its_stage_and_cancel_load_stops_it_while_the_model_before_serves_on(qtbot, hub, load_options):
    """While a model loads, the status line says the stage under way and Cancel load shows; cancelled, the load
    stops once that stage ends, the page says so naming the model still running, and that model answers."""
    pulls.pull("org/tiny")
    reading, release = threading.Event(), threading.Event()
    loads = itertools.count()

    def make_llm(model: str, options: dict, on_load_stage) -> LLM:
        held = next(loads) == 1  # the second load: the one cancelled

        def stage(sentence: str) -> None:
            on_load_stage(sentence)
            if held and sentence == "Loading the weights":
                reading.set()
                release.wait()

        return LLM(model, on_load_stage=stage, **options)

    bridge = EngineBridge(make_llm)
    page = ModelsPage(bridge)
    qtbot.addWidget(page)
    try:
        page.engine_options = load_options
        page.select_model("org/tiny")
        assert page.cancel_load_button.isHidden()
        with qtbot.waitSignal(bridge.model_loaded, timeout=None):
            page.load_button.click()
        assert page.cancel_load_button.isHidden() and page.status.text().startswith("Loaded org/tiny")
        serving = bridge.engine_thread
        page.load_button.click()
        qtbot.waitUntil(reading.is_set, timeout=UNTIL_DONE)
        qtbot.waitUntil(lambda: page.status.text() == "Loading org/tiny: loading the weights…", timeout=UNTIL_DONE)
        assert not page.cancel_load_button.isHidden() and page.cancel_load_button.isEnabled()
        page.cancel_load_button.click()
        assert page.status.text().startswith("Cancelling the load of org/tiny")
        assert not page.cancel_load_button.isEnabled()
        with qtbot.waitSignal(bridge.model_load_cancelled, timeout=None):
            release.set()
        assert page.status.text() == "Cancelled loading org/tiny: still running org/tiny."
        assert page.cancel_load_button.isHidden() and bridge.engine_thread is serving
        greedy = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
        rid = bridge.submit("Still there?", greedy)
        done = []
        bridge.request_update.connect(lambda u: u.request_id == rid and u.finished and done.append(u))
        qtbot.waitUntil(lambda: bool(done), timeout=UNTIL_DONE)
        assert done[0].num_tokens == 4
    finally:
        release.set()
        page.shutdown()
        bridge.shutdown()


def test_a_download_that_does_not_fit_on_disk_fails_in_words(qtbot, page, hub, monkeypatch):
    monkeypatch.setattr(hub_files.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 10})())
    with qtbot.waitSignal(page.hub.bridge.download_failed, timeout=None):
        page.hub.download("org/tiny")
    assert "not enough disk space" in page.status.text() and library(page) == []


# ---- a repo of GGUF files ---------------------------------------------------------------------------------------


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


def test_load_and_delete_say_to_choose_a_model_while_none_is_chosen(qtbot, page, hub, screenshots):
    pulls.pull("org/tiny", endpoint=hub.url)
    page.refresh()
    for button, verb in ((page.load_button, "load"), (page.delete_button, "delete")):
        assert not button.isEnabled() and button.toolTip() == f"Choose a model in the list to {verb} it"
    with qtbot.waitExposed(page):
        page.show()
    page.grab().save(str(screenshots / "models-nothing-chosen.png"))
    page.select_model("org/tiny")
    assert page.load_button.isEnabled() and page.load_button.toolTip() == "Load org/tiny (or double-click it)"
    assert page.delete_button.isEnabled() and page.delete_button.toolTip() == "Delete org/tiny from this computer"
