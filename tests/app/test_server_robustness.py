"""The OpenAI-compatible endpoint under stress and attack: who may call it (bind address, Host header, origins,
API key), clients that leave mid-stream or before the answer, SIGTERM draining, one log line per request, errors
after the stream started, an engine that refuses or dies, and a server that cannot bind."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import openai
import pytest
from server_harness import (
    GATE_TIMEOUT_S,
    MAX_LEN,
    MODEL,
    AbortGate,
    generated_tokens,
    http,
    run_server,
    wait_all_free,
)

from app.engine_thread import EngineThread
from app.server.app import ServerConfig
from app.server.run import BackgroundServer, default_model_id, model_info
from engine import LLM

# ---- security ---------------------------------------------------------------------------------------------------


def test_the_default_bind_is_loopback():
    assert ServerConfig().host == "127.0.0.1" and ServerConfig().loopback


@pytest.mark.parametrize(
    "host, status",
    [
        ("[::1]", 200),
        ("[::1]:8000", 200),
        ("localhost", 200),
        ("LocalHost:8000", 200),
        ("127.0.0.1", 200),
        ("127.0.0.1:8000", 200),
        ("evil.example", 403),
        ("evil.example:8000", 403),
        ("localhost.evil.example", 403),
        ("[::1].evil.example", 403),
        ("::1", 403),  # an IPv6 address must be bracketed: "::1:8000" could be either
        ("localhost:80:80", 403),
        ("", 403),
    ],
)
def test_only_a_host_header_naming_this_machine_is_served(server, host, status):
    got, _, raw = http("GET", server.url + "/v1/models", headers={"Host": host})
    assert got == status, raw
    if status == 403:
        assert json.loads(raw)["error"]["message"]


def test_a_foreign_origin_is_not_echoed(server):
    status, headers, _ = http("GET", server.url + "/v1/models", headers={"Origin": "https://evil.example"})
    assert status == 200 and "Access-Control-Allow-Origin" not in headers


def test_an_allowed_origin_gets_cors_headers(engine):
    srv, stop = run_server(engine, ServerConfig(port=0, cors_origins=("http://localhost:3000",)))
    try:
        status, headers, _ = http(
            "OPTIONS",
            srv.url + "/v1/chat/completions",
            headers={"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"},
        )
        assert status == 204 and headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
        status, headers, _ = http("GET", srv.url + "/v1/models", headers={"Origin": "http://localhost:3000"})
        assert headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    finally:
        stop()


def test_an_api_key_guards_every_route_but_health(engine):
    srv, stop = run_server(engine, ServerConfig(port=0, api_key="s3cret"))
    try:
        for method, path in (
            ("GET", "/v1/models"),
            ("POST", "/v1/completions"),
            ("POST", "/v1/chat/completions"),
            ("POST", "/tokenize"),
            ("GET", "/metrics"),
            ("GET", "/version"),
        ):
            for auth in ({}, {"Authorization": "Bearer wrong"}):
                status, _, raw = http(method, srv.url + path, {} if method == "POST" else None, auth)
                assert status == 401 and json.loads(raw)["error"]["type"] == "authentication_error", path
        assert http("GET", srv.url + "/health")[0] == 200
        with pytest.raises(openai.AuthenticationError):
            srv.client(api_key="wrong").models.list()
        assert srv.client(api_key="s3cret").models.list().data[0].id == MODEL
    finally:
        stop()


# ---- disconnects and load ---------------------------------------------------------------------------------------


def test_32_streaming_clients_half_of_them_leaving_mid_stream(server, monkeypatch):
    max_tokens = MAX_LEN - 16  # close to the context: a request that is not aborted shows
    params = dict(model=MODEL, max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True})
    expected = server.client().completions.create(prompt="Tell me a story", **params).choices[0].text
    gate = AbortGate(server.thread, monkeypatch)
    before = generated_tokens(server.engine)

    async def client(i: int, api: openai.AsyncOpenAI):
        stream = await api.completions.create(prompt="Tell me a story", stream=True, **params)
        text, pieces = "", 0
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
                pieces += 1
            if i % 2 and pieces == 3:
                gate.expect()
                await stream.close()  # leave mid-stream: the server must abort the request
                return None
        return text

    async def main():
        api = server.async_client()
        return await asyncio.gather(*(client(i, api) for i in range(32)))

    texts = asyncio.run(main())
    assert [t for i, t in enumerate(texts) if i % 2 == 0] == [expected] * 16
    wait_all_free(server.engine)
    for_leavers = generated_tokens(server.engine) - before - 16 * max_tokens
    assert not gate.gave_up and for_leavers < 16 * max_tokens // 10, "the leavers' requests ran on"


def test_a_client_that_disconnects_before_the_answer_frees_its_blocks_at_once(server, monkeypatch):
    import socket

    max_tokens = MAX_LEN - 16
    body = {"model": MODEL, "prompt": "Tell me everything", "max_tokens": max_tokens, "ignore_eos": True}
    gate = AbortGate(server.thread, monkeypatch)
    gate.expect()  # the engine holds from its first step until the server has aborted the request
    before = generated_tokens(server.engine)
    payload = json.dumps(body).encode()
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload
    )
    deadline = time.monotonic() + GATE_TIMEOUT_S
    while not server.engine.has_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert server.engine.has_unfinished_requests()
    sock.close()
    wait_all_free(server.engine)
    assert not gate.gave_up and generated_tokens(server.engine) - before < max_tokens // 10


def test_sigterm_drains_in_flight_requests_and_exits_0(tiny_chat_model):
    """SIGTERM comes after the stream's first chunk; the log shows the server began shutting down before the
    request ended, and the client still gets all of it."""
    import re
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "app.cli.main",
            "serve",
            "--model",
            str(tiny_chat_model),
            "--port",
            "0",
            "--max-model-len",
            "256",
            "--kv-cache-memory",
            "0.02",
            "--drain-timeout",
            "30",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    log: list[str] = []
    listening = threading.Event()

    def read_log() -> None:
        for line in proc.stderr:
            log.append(line)
            if "serving model" in line:
                listening.set()

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    try:
        assert listening.wait(120), "the server never said where it listens: " + "".join(log)
        started = next(line for line in log if "serving model" in line)
        # The start-up line names the model by its folder, not its path: what clients type in a plugin.
        model_id, url = re.search(r'serving model "(.+)" at (http://\S+)/v1', started).groups()
        assert model_id == tiny_chat_model.name
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        stream = client.completions.create(
            model=model_id,
            prompt="Go on",
            max_tokens=240,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        chunks = iter(stream)
        first = next(chunks)
        proc.send_signal(signal.SIGTERM)
        rest = list(chunks)
        assert proc.wait(timeout=60) == 0
        reader.join(10)
        assert rest[-1].usage.completion_tokens == 240
        assert [c.choices[0].finish_reason for c in [first, *rest] if c.choices][-1] == "length"
        assert any(c.choices and c.choices[0].text for c in rest), "nothing came after the signal"
        shutdown = next(i for i, line in enumerate(log) if "shutting down" in line)
        answered = next(i for i, line in enumerate(log) if "POST /v1/completions 200" in line)
        assert shutdown < answered, "the request had ended before the signal came"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_every_request_gets_one_log_line(engine):
    entries = []
    thread = EngineThread(engine).start()
    background = BackgroundServer(thread, model_info(engine, MODEL), ServerConfig(port=0), entries.append).start()
    try:
        client = openai.OpenAI(base_url=background.url + "/v1", api_key="x", max_retries=0)
        client.completions.create(model=MODEL, prompt="x", max_tokens=3)
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=MODEL, prompt="x", temperature=5)
        client.models.list()
    finally:
        background.stop()
        thread.stop()
    assert [(e["path"], e["status"], e["completion_tokens"]) for e in entries] == [
        ("/v1/completions", 200, 3),
        ("/v1/completions", 400, 0),
        ("/v1/models", 200, 0),
    ]


def test_an_error_after_the_stream_started_is_an_event_then_done(engine, monkeypatch):
    srv, stop = run_server(engine, ServerConfig(port=0))
    calls = {"n": 0}
    sample = engine.sampler.__class__.__call__

    def failing(self, logits, batch):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("sampler exploded")
        return sample(self, logits, batch)

    monkeypatch.setattr(engine.sampler.__class__, "__call__", failing)
    try:
        status, _, raw = http(
            "POST",
            srv.url + "/v1/completions",
            {"model": MODEL, "prompt": "x", "max_tokens": 20, "stream": True, "ignore_eos": True},
        )
        events = [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]
        assert status == 200 and events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["type"] == "server_error" and "sampler exploded" in error["message"]
        assert all("choices" in json.loads(e) for e in events[:-2])
        monkeypatch.undo()
        assert srv.client().completions.create(model=MODEL, prompt="x", max_tokens=2).usage.completion_tokens == 2
    finally:
        stop()
    wait_all_free(engine)


def test_an_engine_side_rejection_is_a_400_and_spares_nothing_running(server, monkeypatch):
    """A check only the engine makes (here: a second prompt the engine refuses) answers 400, and the request's
    other prompt is aborted rather than left running."""
    original = server.engine.add_request

    def picky(request_id, prompt, params=None):
        if request_id.endswith("-1"):
            raise ValueError("the engine refuses this prompt")
        return original(request_id, prompt, params)

    monkeypatch.setattr(server.engine, "add_request", picky)
    status, _, raw = http(
        "POST",
        server.url + "/v1/completions",
        {"model": MODEL, "prompt": ["first", "second"], "max_tokens": 100, "ignore_eos": True},
    )
    monkeypatch.undo()
    assert status == 400 and "refuses" in json.loads(raw)["error"]["message"]
    wait_all_free(server.engine, timeout=10)


def test_a_server_that_cannot_bind_or_has_stopped_leaves_nothing_behind(engine):
    import socket

    thread = EngineThread(engine).start()
    try:
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        threads_before = threading.active_count()
        with pytest.raises(OSError):
            BackgroundServer(thread, model_info(engine, MODEL), ServerConfig(port=taken.getsockname()[1])).start()
        taken.close()
        assert threading.active_count() == threads_before  # no event-loop thread left running
        listeners = len(thread._listeners)
        BackgroundServer(thread, model_info(engine, MODEL), ServerConfig(port=0)).start().stop()
        assert len(thread._listeners) == listeners  # the metrics listener went with it
    finally:
        thread.stop()


def test_a_dead_engine_thread_is_said_by_health_and_by_a_503_in_words(tiny_chat_model, monkeypatch):
    engine = LLM(str(tiny_chat_model), max_model_len=MAX_LEN, kv_cache_memory=0.02).llm_engine
    srv, stop = run_server(engine, ServerConfig(port=0))  # its metrics listener has the engine thread take stats
    died = threading.Event()
    srv.thread.add_failure_listener(lambda _: died.set())
    try:
        assert http("GET", srv.url + "/health")[0] == 200

        def broken_stats():
            raise RuntimeError("the stats broke")

        monkeypatch.setattr(engine, "get_stats", broken_stats)  # the next snapshot kills the engine thread
        assert died.wait(GATE_TIMEOUT_S)
        monkeypatch.undo()
        status, _, raw = http("GET", srv.url + "/health")
        assert status == 503 and "the stats broke" in json.loads(raw)["error"]
        status, headers, raw = http(
            "POST", srv.url + "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        )
        error = json.loads(raw)["error"]
        assert status == 503 and error["type"] == "server_error" and "load the model again" in error["message"]
        assert "Retry-After" not in headers  # retrying cannot help a dead engine
    finally:
        stop()


def test_the_served_model_id_defaults_to_a_short_name(tmp_path, engine, tiny_chat_model):
    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    snapshot = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-135M-Instruct" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    assert default_model_id(str(gguf)) == "SmolLM2-135M-Instruct.Q4_1"
    assert default_model_id(str(snapshot)) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert default_model_id(str(tmp_path / "hub")) == "hub"
    assert default_model_id("Qwen/Qwen2.5-Coder-0.5B@main") == "Qwen/Qwen2.5-Coder-0.5B"
    assert model_info(engine).name == tiny_chat_model.name
    assert model_info(engine, "mine").name == "mine"
