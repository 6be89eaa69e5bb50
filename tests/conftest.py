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
    """The Hub routes huggingface_hub and app/library's pulls call, over repos given as {repo_id: {filename: bytes}}.

    Every request is logged as (method, path, Range header). "repo/file" keys in drop_halfway break their next
    GET off mid-body, exactly half of it delivered; in stall_halfway they send half, then wait for `release`; in
    corrupt they arrive with one byte changed (the listing still gives the true sha256). A search answers only the
    fields its `expand` asks for and only the repos of its library `filter`, as the Hub does: a repo holding a
    .gguf file is a gguf repo, one holding .safetensors (or neither) a safetensors one."""

    repos: dict[str, dict[str, bytes]]
    downloads: dict[str, int] = field(default_factory=dict)  # for search ordering
    num_params: dict[str, int] = field(default_factory=dict)  # the parameter count a search or listing reports
    drop_halfway: set[str] = field(default_factory=set)
    stall_halfway: set[str] = field(default_factory=set)
    corrupt: set[str] = field(default_factory=set)
    release: threading.Event = field(default_factory=threading.Event)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    url: str = ""
    commit: str = HUB_COMMIT  # every repo's one revision

    @property
    def ranges(self) -> list[str | None]:
        """Range headers of the GETs of weights files (.safetensors, .gguf), in order."""
        return [r for _, path, r in self.requests if "/resolve/" in path and path.endswith((".safetensors", ".gguf"))]

    def libraries(self, repo_id: str) -> set[str]:
        names = self.repos[repo_id]
        gguf = any(n.endswith(".gguf") for n in names)
        safetensors = any(n.endswith(".safetensors") for n in names) or not gguf
        return {name for name, holds in (("gguf", gguf), ("safetensors", safetensors)) if holds}

    def params_fields(self, repo_id: str) -> dict:
        if repo_id not in self.num_params:
            return {}
        n = self.num_params[repo_id]
        return {"safetensors": {"parameters": {"F32": n}, "total": n}, "gguf": {"total": n, "architecture": "llama"}}

    async def search(self, request):
        from aiohttp import web

        query = request.query.get("search", "")
        expand = set(request.query.getall("expand", []))
        library = request.query.get("filter")
        found = sorted(
            (r for r in self.repos if query.lower() in r.lower() and (library is None or library in self.libraries(r))),
            key=lambda r: -self.downloads.get(r, 0),
        )
        items = []
        for r in found:
            fields = {
                "downloads": self.downloads.get(r, 0),
                "likes": len(r),
                "usedStorage": sum(map(len, self.repos[r].values())),
                **self.params_fields(r),
            }
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
            if name.endswith((".safetensors", ".bin", ".onnx", ".gguf")):  # stored in LFS on the real Hub
                sibling["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
            siblings.append(sibling)
        info = {"id": repo_id, "modelId": repo_id, "sha": HUB_COMMIT, "siblings": siblings}
        if "safetensors" in self.libraries(repo_id):
            info.update({k: v for k, v in self.params_fields(repo_id).items() if k == "safetensors"})
        return web.json_response(info)

    async def resolve(self, request):
        import asyncio

        from aiohttp import web

        repo_id = f"{request.match_info['org']}/{request.match_info['name']}"
        filename = request.match_info["file"]
        self.requests.append((request.method, request.path, request.headers.get("Range")))
        data = self.repos.get(repo_id, {}).get(filename)
        if data is None or request.match_info["rev"] != HUB_COMMIT:
            return web.Response(status=404, headers={"X-Error-Code": "EntryNotFound"})
        key = f"{repo_id}/{filename}"
        if key in self.corrupt:
            data = data[:-1] + bytes([data[-1] ^ 0xFF])
        first, _, last = request.headers.get("Range", "bytes=0-").removeprefix("bytes=").partition("-")
        start, end = int(first), min(int(last) + 1 if last else len(data), len(data))
        body = data[start:end]
        ranged = "Range" in request.headers
        response = web.StreamResponse(
            status=206 if ranged else 200,
            headers={
                "Content-Length": str(len(body)),
                "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                "X-Repo-Commit": HUB_COMMIT,
            },
        )
        if ranged:
            response.headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        await response.prepare(request)
        if key in self.drop_halfway | self.stall_halfway and start + len(body) == len(data):
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


# Where each kind of block keeps its float16 scales (byte offsets in a block): random blocks get a sane value
# there, so that a weight the engine keeps quantized holds no inf or NaN.
_SCALE_OFFSETS = {
    "Q4_0": (0,),
    "Q4_1": (0, 2),
    "Q5_0": (0,),
    "Q5_1": (0, 2),
    "Q8_0": (0,),
    "Q2_K": (80, 82),
    "Q3_K": (108,),
    "Q4_K": (0, 2),
    "Q5_K": (0, 2),
    "Q6_K": (208,),
    "IQ4_XS": (0,),
    "IQ4_NL": (0,),
}
TINY_GGUF_SHAPES = {  # GGUF name -> (rows, columns): one Llama layer, hidden 256, 4 heads of 64 (2 for k/v)
    "token_embd.weight": (64, 256),
    "blk.0.attn_q.weight": (256, 256),
    "blk.0.attn_k.weight": (128, 256),
    "blk.0.attn_v.weight": (128, 256),
    "blk.0.attn_output.weight": (256, 256),
    "blk.0.ffn_gate.weight": (512, 256),
    "blk.0.ffn_up.weight": (512, 256),
    "blk.0.ffn_down.weight": (256, 512),
}


def tiny_gguf(label: str, types: dict[str, str] | None = None, seed: int = 0) -> bytes:
    """A tiny Llama GGUF file (one layer, hidden 256, a 64-token vocabulary, context 2048, no tokenizer) labelled
    `label` (general.file_type, e.g. "Q4_K_M"), its matrices in types[GGUF name] or else `label`'s main type
    (random blocks with sane scales), its norms in F32: what a listing and a memory estimate read, not a model to
    generate with."""
    import tempfile

    import gguf
    import numpy as np

    from app.library.quant_types import quant_type

    rng = np.random.default_rng(seed)
    main = quant_type(label).ggml
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tiny.gguf"
        writer = gguf.GGUFWriter(path, "llama")
        writer.add_name("tiny")
        writer.add_block_count(1)
        writer.add_context_length(2048)
        writer.add_embedding_length(256)
        writer.add_feed_forward_length(512)
        writer.add_head_count(4)
        writer.add_head_count_kv(2)
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32 if label == "F32" else gguf.LlamaFileType[f"MOSTLY_{label}"])
        for name in ("output_norm.weight", "blk.0.attn_norm.weight", "blk.0.ffn_norm.weight"):
            writer.add_tensor(name, np.ones(256, dtype=np.float32))
        for name, (rows, cols) in TINY_GGUF_SHAPES.items():
            kind = (types or {}).get(name, main)
            if kind in ("F32", "F16"):
                array = rng.standard_normal((rows, cols)).astype(np.float32 if kind == "F32" else np.float16)
                writer.add_tensor(name, array)
                continue
            qtype = gguf.GGMLQuantizationType[kind]
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            blocks = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
            for offset in _SCALE_OFFSETS[kind]:
                blocks[:, offset : offset + 2] = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
            writer.add_tensor(name, blocks.reshape(rows, -1), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path.read_bytes()


@pytest.fixture(scope="session")
def make_gguf():
    """tiny_gguf, for tests to write GGUF files of the types they need."""
    return tiny_gguf


@pytest.fixture(scope="session")
def gguf_repo() -> dict[str, bytes]:
    """A Hub repo of quantizations of one tiny model, as bartowski's and unsloth's look: a K-quant mix, Q8_0, an
    i-quant kvstudio cannot keep quantized, F16, a model split in two parts, a vision projector and a README."""
    q2 = tiny_gguf("Q2_K")
    return {
        "README.md": b"# tiny GGUF\n",
        "tiny-Q4_K_M.gguf": tiny_gguf("Q4_K_M", {"blk.0.attn_v.weight": "Q6_K", "blk.0.ffn_down.weight": "Q6_K"}),
        "tiny-Q8_0.gguf": tiny_gguf("Q8_0"),
        "tiny-IQ4_XS.gguf": tiny_gguf("IQ4_XS"),
        "tiny-F16.gguf": tiny_gguf("F16"),
        "tiny-Q2_K-00001-of-00002.gguf": q2[: len(q2) // 2],
        "tiny-Q2_K-00002-of-00002.gguf": q2[len(q2) // 2 :],
        "mmproj-tiny-F16.gguf": tiny_gguf("F16", seed=1),
    }


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
