"""The models page against a fake Hub on loopback and a tmp Hugging Face cache: the library (with the default
model), delete, search, download with progress, a failing and a cancelled download resumed, a missing repo and a
full disk said in words, offline search, load."""
from __future__ import annotations

import socket

import pytest
from PySide6.QtCore import Qt

from app import hub_models, model_store
from app.hub_models import human_size
from ui.bridge import EngineBridge
from ui.pages.models import OFFLINE, ModelsPage


@pytest.fixture
def hub(serve_hub, tiny_chat_model):
    tiny = {p.name: p.read_bytes() for p in sorted(tiny_chat_model.iterdir()) if p.is_file()}
    return serve_hub({"org/tiny": tiny, "org/tiny-instruct": tiny}, {"org/tiny": 1200, "org/tiny-instruct": 3400})


class RecordingLoader:
    """make_llm for the bridge: records what it was asked to load and fails, so no engine starts."""

    def __init__(self) -> None:
        self.loaded: list[str] = []

    def __call__(self, model: str, options: dict):
        self.loaded.append(model)
        raise RuntimeError("no engine in this test")


@pytest.fixture
def page(qtbot, hub):
    p = ModelsPage(EngineBridge(make_llm=RecordingLoader()))
    qtbot.addWidget(p)
    p.resize(1200, 640)
    yield p
    p.shutdown()


def library(page: ModelsPage) -> list[list[str]]:
    m = page.library
    return [[m.data(m.index(r, c)) for c in range(m.columnCount())] for r in range(m.rowCount())]


def results(page: ModelsPage) -> list[list[str]]:
    m = page.results
    return [[m.data(m.index(r, c)) for c in range(m.columnCount())] for r in range(m.rowCount())]


def search(qtbot, page: ModelsPage, query: str) -> None:
    page.query.setText(query)
    page.search_button.click()  # disabled until the worker's answer arrives
    qtbot.waitUntil(page.search_button.isEnabled, timeout=10_000)


def download(qtbot, page: ModelsPage, name: str, signal: str) -> None:
    row = [r[0] for r in results(page)].index(name)
    page.results_view.selectRow(row)
    with qtbot.waitSignal(getattr(page, signal), timeout=20_000):
        page.download_button.click()


def weights_size(tiny_chat_model) -> int:
    return (tiny_chat_model / "model.safetensors").stat().st_size


def test_the_library_lists_a_pulled_model_and_the_default(qtbot, hub, smollm2_gguf, tiny_chat_model):
    default = model_store.default_model_path()
    default.parent.mkdir(parents=True)
    default.symlink_to(smollm2_gguf)  # removing the link leaves the suite's copy alone
    hub_models.pull("org/tiny")
    size = sum(p.stat().st_size for p in tiny_chat_model.iterdir() if p.is_file())
    page = ModelsPage(EngineBridge(make_llm=RecordingLoader()))
    qtbot.addWidget(page)
    assert [page.library.headerData(c, Qt.Horizontal) for c in range(page.library.columnCount())] == [
        "Name", "Size", "Family", "Context", ""]
    assert library(page) == [
        [default.name, human_size(model_store.DEFAULT_MODEL.size), "llama", "8,192", "default"],
        ["org/tiny", human_size(size), "LlamaForCausalLM", "512", ""],
    ]
    assert page.library_summary.text() == f"2 models, {human_size(size + model_store.DEFAULT_MODEL.size)} on disk"


def test_delete_frees_the_model_and_refuses_the_default_unless_forced(page, hub, smollm2_gguf):
    default = model_store.default_model_path()
    default.parent.mkdir(parents=True)
    default.symlink_to(smollm2_gguf)
    hub_models.pull("org/tiny")
    page.refresh()
    [tiny] = [m for m in page.library.rows() if m.name == "org/tiny"]

    page.select_model("org/tiny")
    page.delete_button.click()  # the confirmation shows under the table; nothing is deleted yet
    assert page.confirm_bar.isVisibleTo(page) and f"free {human_size(tiny.size)}" in page.confirm_text.text()
    assert [r[0] for r in library(page)] == [default.name, "org/tiny"]
    page.confirm_button.click()
    assert [r[0] for r in library(page)] == [default.name]
    assert page.status.text() == f"Deleted org/tiny, freed {human_size(tiny.size)}."
    assert not (hub_models._cache_dir() / "models--org--tiny").exists()

    assert page.delete(default.name) is None
    assert "default model" in page.status.text() and default.exists()
    assert page.delete(default.name, force=True) == model_store.DEFAULT_MODEL.size
    assert library(page) == [] and smollm2_gguf.is_file()
    assert page.library_summary.text() == "No models yet: download one from the Hub."


def test_a_search_lists_the_hub_results_most_downloaded_first(qtbot, page, hub, tiny_chat_model):
    search(qtbot, page, "tiny")
    stored = human_size(sum(p.stat().st_size for p in tiny_chat_model.iterdir() if p.is_file()))
    assert results(page) == [["org/tiny-instruct", "3,400", "17", stored], ["org/tiny", "1,200", "8", stored]]
    assert page.status.text() == "2 models on the Hub for 'tiny'."
    search(qtbot, page, "nothing-like-it")
    assert results(page) == [] and "No text-generation model" in page.status.text()


def test_a_download_completes_and_the_model_joins_the_library(qtbot, page, hub, screenshots):
    search(qtbot, page, "tiny")
    values = []
    page.download_progress.connect(lambda p: values.append(page.progress.value()))
    download(qtbot, page, "org/tiny", "download_done")
    assert page.progress.value() == 100 and values[-1] == 100
    assert [r[0] for r in library(page)] == ["org/tiny"]
    assert page.selected_model().name == "org/tiny"
    assert page.status.text() == "Downloaded org/tiny; it is in the library."
    assert page.download_button.isEnabled() and not page.cancel_button.isEnabled()
    page.show()
    qtbot.waitExposed(page)
    page.grab().save(str(screenshots / "models.png"))


def test_a_download_failing_halfway_says_so_and_a_retry_resumes(qtbot, page, hub, tiny_chat_model):
    search(qtbot, page, "tiny")
    hub.drop_halfway.add("org/tiny/model.safetensors")
    download(qtbot, page, "org/tiny", "download_failed")
    assert "model.safetensors broke off" in page.status.text() and "resume" in page.status.text()
    assert library(page) == [] and page.progress_text.text() == "org/tiny: failed."
    download(qtbot, page, "org/tiny", "download_done")
    assert hub.ranges == [None, f"bytes={weights_size(tiny_chat_model) // 2}-"]
    assert [r[0] for r in library(page)] == ["org/tiny"] and page.progress.value() == 100


def test_cancel_stops_between_chunks_and_downloading_again_resumes(qtbot, page, hub, tiny_chat_model, monkeypatch):
    monkeypatch.setattr(hub_models, "_CHUNK", 1024)  # several chunks, so there is a "between"
    search(qtbot, page, "tiny")
    hub.stall_halfway.add("org/tiny/model.safetensors")
    row = [r[0] for r in results(page)].index("org/tiny")
    page.results_view.selectRow(row)
    page.download_button.click()
    qtbot.waitUntil(lambda: hub.ranges == [None], timeout=10_000)  # the weights' GET has begun
    assert page.cancel_button.isEnabled() and not page.download_button.isEnabled()
    with qtbot.waitSignal(page.download_failed, timeout=10_000) as blocker:
        page.cancel_button.click()
        hub.release.set()
    assert blocker.args[0].cancelled and "cancelled" in page.status.text()
    assert library(page) == []
    partial = next((hub_models._cache_dir() / "models--org--tiny" / "blobs").glob("*.incomplete"))
    kept = partial.stat().st_size
    assert 0 < kept < weights_size(tiny_chat_model)  # the stall holds back the rest until after the cancel

    download(qtbot, page, "org/tiny", "download_done")
    assert hub.ranges == [None, f"bytes={kept}-"]
    assert [r[0] for r in library(page)] == ["org/tiny"]


def test_a_missing_repo_fails_in_words(qtbot, page, hub):
    with qtbot.waitSignal(page.download_failed, timeout=10_000):
        page.download("org/missing")
    assert page.status.text() == "Download of org/missing failed: no model org/missing on the Hub"


def test_an_offline_search_says_offline_and_the_library_still_works(qtbot, page, hub, monkeypatch):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        page.endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    with qtbot.waitSignal(page.search_failed, timeout=10_000):
        page.search()
    assert page.status.text() == OFFLINE and results(page) == []
    hub_models.pull("org/tiny", endpoint=hub.url)
    page.refresh()
    assert [r[0] for r in library(page)] == ["org/tiny"]


def test_load_hands_the_library_path_to_the_bridge(qtbot, page, hub):
    hub_models.pull("org/tiny")
    page.refresh()
    page.select_model("org/tiny")
    path = str(page.selected_model().path)
    with qtbot.waitSignal(page.bridge.model_loading, timeout=5_000) as loading:
        page.load_button.click()
    assert loading.args == [path]
    qtbot.waitUntil(lambda: page.status.text().startswith("Could not load"), timeout=5_000)
    assert page.bridge._make_llm.loaded == [path]
    assert "no engine in this test" in page.status.text()


def test_a_download_that_does_not_fit_on_disk_fails_in_words(qtbot, page, hub, monkeypatch):
    monkeypatch.setattr(hub_models.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 10})())
    with qtbot.waitSignal(page.download_failed, timeout=10_000):
        page.download("org/tiny")
    assert "not enough disk space" in page.status.text() and library(page) == []
