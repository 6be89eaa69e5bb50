"""The Models page's library and Hub search against a fake Hub on loopback and a tmp Hugging Face cache: the
library (with the default model) and how it lays out, delete, search and which results fit this machine, offline
search and the offline note, the welcome's size of the default model, load (and cancelling a load), a model too big
for memory and a corrupt one refused in words, and what Load and Delete say while no model is chosen. Downloads are
in test_models_downloads.py, a repo of GGUF files in test_models_page_gguf.py; the `hub` and `page` fixtures are in
conftest.py.

Waits end on what they wait for, never on the clock: a loaded machine only makes them slower. A hang is caught by
the module's pytest-timeout mark."""

from __future__ import annotations

import itertools
import socket
import threading

import pytest
from models_page_harness import (
    UNTIL_DONE,
    RecordingLoader,
    cells,
    library,
    names,
    results,
    search,
    small_machine,
    tiny_params,
)
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QApplication

from app.library import hub_files, machine, model_store, pulls
from app.library.machine import GIB
from app.units import byte_size
from engine import LLM, SamplingParams
from ui.bridge import EngineBridge
from ui.pages.models import ModelsPage
from ui.widgets.first_run import FirstRunDialog
from ui.widgets.hub_panel import OFFLINE
from ui.widgets.rows_table import tone_color

pytestmark = pytest.mark.timeout(600)


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
