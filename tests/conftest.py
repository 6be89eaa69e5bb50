"""Fixtures shared by the whole suite: the default model, its tokenizer, and the environment the suite runs in."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
# Idle OpenMP threads sleep instead of spinning: a test that shares the cores with anything else (another
# process, a Qt thread) would otherwise crawl. Set before torch starts its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

# Triton kernels run on its interpreter when there is no GPU (on one, the GPU-marked tests run them compiled);
# this must be set before any @triton.jit runs.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import hashlib
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# Both cores for each test's matmuls; the suite runs tests one at a time.
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from app.library.model_store import default_model_path

    path = default_model_path()
    if not path.is_file():
        pytest.fail(f"the default model is missing at {path}: run `make setup` (it fetches it)")
    return path


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf):
    from engine.models.loader import open_model

    return open_model(str(smollm2_gguf)).tokenizer


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A tiny random Llama (2 layers, hidden 64) with SmolLM2's tokenizer and chat template, saved like a
    downloaded model: fast enough for tests that need a real engine behind an API, not exact outputs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = smollm2_tokenizer
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-chat")
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


# ---- a fake Hugging Face Hub ------------------------------------------------------------------------------------

HUB_COMMIT = hashlib.sha1(b"the one commit").hexdigest()


@dataclass
class FakeHub:
    """The Hub routes huggingface_hub and app/hub_models.py call, over repos given as {repo_id: {filename: bytes}}.

    Every request is logged as (method, path, Range header). "repo/file" keys in drop_halfway break their next
    GET off mid-body, exactly half of it delivered; in stall_halfway they send half, then wait for `release`. A
    search answers only the fields its `expand` asks for, as the Hub does."""

    repos: dict[str, dict[str, bytes]]
    downloads: dict[str, int] = field(default_factory=dict)  # for search ordering
    num_params: dict[str, int] = field(default_factory=dict)  # the safetensors parameter count a search reports
    drop_halfway: set[str] = field(default_factory=set)
    stall_halfway: set[str] = field(default_factory=set)
    release: threading.Event = field(default_factory=threading.Event)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    url: str = ""
    commit: str = HUB_COMMIT  # every repo's one revision

    @property
    def ranges(self) -> list[str | None]:
        """Range headers of the GETs of weights files, in order."""
        return [r for _, path, r in self.requests if "/resolve/" in path and path.endswith(".safetensors")]

    async def search(self, request):
        from aiohttp import web

        query = request.query.get("search", "")
        expand = set(request.query.getall("expand", []))
        found = sorted((r for r in self.repos if query.lower() in r.lower()), key=lambda r: -self.downloads.get(r, 0))
        items = []
        for r in found:
            fields = {
                "downloads": self.downloads.get(r, 0),
                "likes": len(r),
                "usedStorage": sum(map(len, self.repos[r].values())),
            }
            if r in self.num_params:
                fields["safetensors"] = {"parameters": {"F32": self.num_params[r]}, "total": self.num_params[r]}
            items.append({"id": r, **{k: v for k, v in fields.items() if k in expand}})
        return web.json_response(items)

    async def info(self, request):
        from aiohttp import web

        repo_id = f"{request.match_info['org']}/{request.match_info['name']}"
        self.requests.append((request.method, request.path, None))
        if repo_id not in self.repos:
            return web.json_response(
                {"error": "Repository not found"}, status=404, headers={"X-Error-Code": "RepoNotFound"}
            )
        siblings = []
        for name, data in self.repos[repo_id].items():
            sibling = {
                "rfilename": name,
                "size": len(data),
                "blobId": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(),
            }
            if name.endswith((".safetensors", ".bin", ".onnx")):  # stored in LFS on the real Hub
                sibling["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
            siblings.append(sibling)
        return web.json_response({"id": repo_id, "modelId": repo_id, "sha": HUB_COMMIT, "siblings": siblings})

    async def resolve(self, request):
        import asyncio

        from aiohttp import web

        repo_id = f"{request.match_info['org']}/{request.match_info['name']}"
        filename = request.match_info["file"]
        self.requests.append((request.method, request.path, request.headers.get("Range")))
        data = self.repos.get(repo_id, {}).get(filename)
        if data is None or request.match_info["rev"] != HUB_COMMIT:
            return web.Response(status=404, headers={"X-Error-Code": "EntryNotFound"})
        start = int(request.headers.get("Range", "bytes=0-").removeprefix("bytes=").removesuffix("-"))
        body = data[start:]
        response = web.StreamResponse(
            status=206 if start else 200,
            headers={
                "Content-Length": str(len(body)),
                "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                "X-Repo-Commit": HUB_COMMIT,
            },
        )
        if start:
            response.headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        await response.prepare(request)
        key = f"{repo_id}/{filename}"
        if key in self.drop_halfway | self.stall_halfway:
            await response.write(body[: len(body) // 2])
            if key in self.drop_halfway:
                self.drop_halfway.discard(key)
                # The connection ends with half of the promised bytes sent. close(), not abort(): abort() threw
                # away what still sat in the send buffer, so a client that read slowly got less than half and
                # resumed from an offset no test could predict.
                request.transport.close()
                return response
            self.stall_halfway.discard(key)
            # No deadline: a test releases it when it is ready, however slow the machine (teardown does too).
            await asyncio.get_running_loop().run_in_executor(None, self.release.wait)
            body = body[len(body) // 2 :]
        await response.write(body)
        await response.write_eof()
        return response


@pytest.fixture
def serve_hub(tmp_path, monkeypatch):
    """serve_hub(repos, downloads=None, num_params=None) -> FakeHub on loopback, with huggingface_hub pointed at
    it, the HF cache in tmp_path/hf-cache and kvstudio's data dir in tmp_path/kvstudio."""
    import asyncio

    from aiohttp import web
    from huggingface_hub import constants

    from app.library import model_store

    running = []

    def serve(
        repos: dict[str, dict[str, bytes]],
        downloads: dict[str, int] | None = None,
        num_params: dict[str, int] | None = None,
    ) -> FakeHub:
        hub = FakeHub(repos, dict(downloads or {}), dict(num_params or {}))
        app = web.Application()
        app.router.add_get("/api/models", hub.search)
        app.router.add_get("/api/models/{org}/{name}", hub.info)
        app.router.add_get("/api/models/{org}/{name}/revision/{rev}", hub.info)
        app.router.add_get("/{org}/{name}/resolve/{rev}/{file:.+}", hub.resolve)
        loop = asyncio.new_event_loop()
        runner = web.AppRunner(app)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        running.append((hub, runner, loop, thread))
        hub.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.setenv(model_store.DATA_DIR_ENV, str(tmp_path / "kvstudio"))
        return hub

    yield serve
    for hub, runner, loop, thread in running:
        hub.release.set()
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


# ---- an OpenAI-compatible endpoint to point clients at ------------------------------------------------------------


@dataclass
class OpenAIEndpoint:
    base_url: str  # http://127.0.0.1:port/v1
    api_key: str
    model: str  # the one model it serves
    engine: object  # its LLMEngine, to check what the server did


@pytest.fixture(scope="module")
def openai_endpoint(tiny_chat_model):
    """kvstudio's own server over the tiny chat model, on a free loopback port, with an API key: a remote
    endpoint for the clients under test."""
    from app.engine_thread import EngineThread
    from app.server.app import ServerConfig
    from app.server.run import BackgroundServer, model_info
    from engine import LLM

    engine = LLM(str(tiny_chat_model), max_model_len=256, kv_cache_memory=0.02).llm_engine
    thread = EngineThread(engine).start()
    server = BackgroundServer(thread, model_info(engine, "tiny"), ServerConfig(port=0, api_key="sk-test")).start()
    yield OpenAIEndpoint(server.url + "/v1", "sk-test", "tiny", engine)
    server.stop()
    thread.stop()
