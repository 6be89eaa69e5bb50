"""The models page against a fake Hub on loopback and a tmp Hugging Face cache: the library (with the default
model), delete, search, download with progress, a failing and a cancelled download resumed, a missing repo and a
full disk said in words, offline search, load."""
from __future__ import annotations

import asyncio
import hashlib
import socket
import threading
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from huggingface_hub import constants
from PySide6.QtCore import Qt

from app import hub_models, model_store
from app.hub_models import human_size
from ui.bridge import EngineBridge
from ui.pages.models import OFFLINE, ModelsPage

COMMIT = hashlib.sha1(b"the one commit").hexdigest()


@dataclass
class FakeHub:
    """Repos as {repo_id: {filename: bytes}}, with download counts for the search; "repo/file" keys in
    drop_halfway break off their next GET mid-body, and in stall_halfway wait for `release` after half."""

    repos: dict[str, dict[str, bytes]]
    downloads: dict[str, int]
    drop_halfway: set[str] = field(default_factory=set)
    stall_halfway: set[str] = field(default_factory=set)
    release: threading.Event = field(default_factory=threading.Event)
    ranges: list[str | None] = field(default_factory=list)  # Range headers of the weights' GETs
    url: str = ""

    async def search(self, request: web.Request) -> web.Response:
        query = request.query.get("search", "")
        found = sorted((r for r in self.repos if query.lower() in r.lower()), key=lambda r: -self.downloads[r])
        return web.json_response([{"id": r, "downloads": self.downloads[r], "likes": len(r),
                                   "usedStorage": sum(map(len, self.repos[r].values()))} for r in found])

    async def info(self, request: web.Request) -> web.Response:
        repo_id = f"{request.match_info['org']}/{request.match_info['name']}"
        if repo_id not in self.repos:
            return web.json_response({"error": "Repository not found"}, status=404,
                                     headers={"X-Error-Code": "RepoNotFound"})
        siblings = []
        for name, data in self.repos[repo_id].items():
            sibling = {"rfilename": name, "size": len(data),
                       "blobId": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()}
            if name.endswith(".safetensors"):
                sibling["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
            siblings.append(sibling)
        return web.json_response({"id": repo_id, "modelId": repo_id, "sha": COMMIT, "siblings": siblings})

    async def resolve(self, request: web.Request) -> web.StreamResponse:
        repo_id = f"{request.match_info['org']}/{request.match_info['name']}"
        filename = request.match_info["file"]
        data = self.repos[repo_id][filename]
        start = int(request.headers.get("Range", "bytes=0-").removeprefix("bytes=").removesuffix("-"))
        if filename.endswith(".safetensors"):
            self.ranges.append(request.headers.get("Range"))
        body = data[start:]
        response = web.StreamResponse(status=206 if start else 200, headers={"Content-Length": str(len(body))})
        await response.prepare(request)
        key = f"{repo_id}/{filename}"
        if key in self.drop_halfway | self.stall_halfway:
            await response.write(body[: len(body) // 2])
            if key in self.drop_halfway:
                self.drop_halfway.discard(key)
                request.transport.abort()  # the connection dies with half of the promised bytes sent
                return response
            self.stall_halfway.discard(key)
            await asyncio.get_running_loop().run_in_executor(None, self.release.wait, 10)
            body = body[len(body) // 2:]
        await response.write(body)
        await response.write_eof()
        return response


@pytest.fixture
def hub(tiny_chat_model, tmp_path, monkeypatch):
    tiny = {p.name: p.read_bytes() for p in sorted(tiny_chat_model.iterdir()) if p.is_file()}
    fake = FakeHub({"org/tiny": tiny, "org/tiny-instruct": tiny}, {"org/tiny": 1200, "org/tiny-instruct": 3400})
    app = web.Application()
    app.router.add_get("/api/models", fake.search)
    app.router.add_get("/api/models/{org}/{name}", fake.info)
    app.router.add_get("/api/models/{org}/{name}/revision/{rev}", fake.info)
    app.router.add_get("/{org}/{name}/resolve/{rev}/{file:.+}", fake.resolve)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    monkeypatch.setattr(constants, "ENDPOINT", fake.url)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv(model_store.DATA_DIR_ENV, str(tmp_path / "kvstudio"))
    yield fake
    fake.release.set()
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


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
