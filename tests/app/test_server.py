"""The OpenAI-compatible endpoint, in-process on port 0 with a tiny model, driven by the official `openai`
client (sync and async) and by raw HTTP where the client would hide what is checked (status codes, headers)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import openai
import pytest

from app.engine_thread import EngineThread
from app.server.app import ServerConfig
from app.server.run import BackgroundServer, default_model_id, model_info
from engine import LLM, LLMEngine

MODEL = "tiny"
MAX_LEN = 256
GATE_TIMEOUT_S = 60.0  # what a gate below waits at most for an event that should come in milliseconds


@dataclass
class Server:
    url: str  # http://127.0.0.1:port
    engine: LLMEngine
    thread: EngineThread

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=kw.pop("api_key", "unused"), max_retries=0, **kw)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base_url, api_key="unused", max_retries=0)


def http(method: str, url: str, body=None, headers: dict | None = None) -> tuple[int, dict, bytes]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def run_server(engine: LLMEngine, config: ServerConfig, max_queue: int | None = None):
    """Start the app on its own event loop thread; returns (Server, stop function)."""
    thread = EngineThread(engine, max_queue=max_queue).start()
    background = BackgroundServer(thread, model_info(engine, MODEL), config).start()

    def stop() -> None:
        background.stop()
        thread.stop()

    return Server(background.url, engine, thread), stop


@pytest.fixture(scope="module")
def engine(tiny_chat_model) -> LLMEngine:
    return LLM(str(tiny_chat_model), max_model_len=MAX_LEN, kv_cache_memory=0.02).llm_engine


@pytest.fixture(scope="module")
def server(engine):
    srv, stop = run_server(engine, ServerConfig(port=0), max_queue=64)
    yield srv
    stop()


def wait_all_free(engine: LLMEngine, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if engine.get_stats().num_blocks_used == 0 and not engine.has_unfinished_requests():
            return
        time.sleep(0.02)
    raise AssertionError(f"blocks still used: {engine.get_stats()}")


def generated_tokens(engine: LLMEngine) -> int:
    """Tokens the engine has generated so far (read while it is idle)."""
    return engine.get_stats().generation_tokens_total


class AbortGate:
    """Makes "a client that leaves has its request aborted" checkable whatever the machine's speed: before each
    step, the engine thread waits until the server has asked to abort as many requests as the test said clients
    would leave (expect()). A request whose client left so generates a step or two more before the abort, where
    one the server failed to abort runs on to max_tokens once the gate gives up (GATE_TIMEOUT_S, then no more)."""

    def __init__(self, thread: EngineThread, monkeypatch) -> None:
        self._changed = threading.Condition()
        self._expected = self._aborted = 0
        self.gave_up = False
        abort, step = thread.abort, thread.engine.step

        def counted_abort(request_id: str) -> None:
            abort(request_id)  # queued first: the step the gate lets through is followed by the abort
            with self._changed:
                self._aborted += 1
                self._changed.notify_all()

        def gated_step():
            with self._changed:
                if not self.gave_up and not self._changed.wait_for(
                    lambda: self._aborted >= self._expected, GATE_TIMEOUT_S
                ):
                    self.gave_up = True
            return step()

        monkeypatch.setattr(thread, "abort", counted_abort)
        monkeypatch.setattr(thread.engine, "step", gated_step)

    def expect(self) -> None:
        """A client is about to leave."""
        with self._changed:
            self._expected += 1


# ---- the happy paths ------------------------------------------------------------------------------------------


def test_models_list_and_card(server):
    client = server.client()
    cards = client.models.list().data
    assert [c.id for c in cards] == [MODEL]
    card = client.models.retrieve(MODEL)
    assert card.object == "model" and card.model_extra["max_model_len"] == MAX_LEN
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_completion_plain_and_streamed_greedy_text_agree(server):
    client = server.client()
    plain = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0)
    assert plain.id.startswith("cmpl-") and plain.object == "text_completion"
    assert plain.choices[0].finish_reason == "length" and plain.usage.completion_tokens == 12
    chunks = list(
        client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_plain_and_streamed_with_usage(server):
    client = server.client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert plain.object == "chat.completion" and plain.choices[0].message.role == "assistant"
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0] is [c for c in chunks if c.choices][-1]


def test_n2_with_a_seed_is_reproducible(server):
    client = server.client()
    kw = dict(model=MODEL, prompt="The quick brown fox", max_tokens=8, temperature=1.0, seed=5, n=2)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.choices[0].text != a.choices[1].text
    assert a.usage.completion_tokens == 16


def test_a_stop_string_cuts_the_text_and_finishes_with_stop(server):
    client = server.client()
    full = client.completions.create(model=MODEL, prompt="Hello", max_tokens=30, temperature=0).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), f"choose another prompt: {full!r}"
    cut = client.completions.create(model=MODEL, prompt="Hello", max_tokens=30, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == full[: full.index(stop)]


def test_async_client_streams_concurrently(server):
    async def one(client, i):
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Count to {i}"}],
            max_tokens=6,
            temperature=0,
            stream=True,
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def main():
        client = server.async_client()
        return await asyncio.gather(*(one(client, i) for i in range(6)))

    texts = asyncio.run(main())
    assert len(texts) == 6 and all(isinstance(t, str) for t in texts)
    wait_all_free(server.engine)


def test_tokenize_detokenize_health_version_metrics(server):
    status, _, body = http("POST", server.url + "/tokenize", {"model": MODEL, "prompt": "Hello world"})
    tokens = json.loads(body)["tokens"]
    assert status == 200 and tokens
    status, _, body = http("POST", server.url + "/detokenize", {"model": MODEL, "tokens": tokens})
    assert status == 200 and json.loads(body)["prompt"].endswith("Hello world")
    assert http("GET", server.url + "/health")[0] == 200
    assert "version" in json.loads(http("GET", server.url + "/version")[2])
    server.client().completions.create(model=MODEL, prompt="x", max_tokens=2)
    status, headers, body = http("GET", server.url + "/metrics")
    text = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    for name in (
        "kvstudio_num_requests_running",
        "kvstudio_num_requests_waiting",
        "kvstudio_num_sequences_running",
        "kvstudio_num_sequences_swapped",
        "kvstudio_kv_cache_usage_perc",
        "kvstudio_prefix_cache_hits",
        "kvstudio_generation_tokens_total",
        "kvstudio_time_to_first_token_seconds_bucket",
        "kvstudio_inter_token_latency_seconds_bucket",
        "kvstudio_num_preemptions",
    ):
        assert name in text, name


def metric(url: str, name: str) -> float:
    text = http("GET", url + "/metrics")[2].decode()
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + "{"))


def wait_for_metric(url: str, name: str, value: float) -> None:
    deadline = time.monotonic() + GATE_TIMEOUT_S
    while metric(url, name) != value:
        assert time.monotonic() < deadline, f"{name} never reached {value}"
        time.sleep(0.01)


def test_metrics_count_requests_running_and_waiting_not_sequences(engine, monkeypatch):
    srv, stop = run_server(engine, ServerConfig(port=0))
    gate = AbortGate(srv.thread, monkeypatch)
    try:
        client = srv.client()
        # Three samples of one prompt: three sequences, one request.
        three = client.completions.create(
            model=MODEL, prompt="Once", n=3, max_tokens=200, stream=True, extra_body={"ignore_eos": True}
        )
        next(c for c in three if c.choices)
        gate.expect()  # the engine now holds before its next step, until `three` is aborted
        queued = threading.Thread(target=lambda: client.completions.create(model=MODEL, prompt="x", max_tokens=2))
        queued.start()
        wait_for_metric(srv.url, "kvstudio_num_requests_waiting", 1)  # submitted; the held engine cannot take it
        assert metric(srv.url, "kvstudio_num_requests_running") == 1
        three.close()
        queued.join(GATE_TIMEOUT_S)
        wait_all_free(engine)
        assert metric(srv.url, "kvstudio_num_requests_running") == metric(srv.url, "kvstudio_num_requests_waiting") == 0
    finally:
        stop()


# ---- long prompts -------------------------------------------------------------------------------------------------


def record_encodes(monkeypatch, tokenizer, before=None) -> list[int]:
    """The lengths of the texts the tokenizer encodes from now on; before(text) runs ahead of each encode."""
    lengths, encode = [], tokenizer.encode

    def recording(text, *args, **kwargs):
        lengths.append(len(text))
        if before is not None:
            before(text)
        return encode(text, *args, **kwargs)

    monkeypatch.setattr(tokenizer, "encode", recording)
    return lengths


def test_a_prompt_of_megabytes_is_refused_without_being_tokenized(server, monkeypatch):
    lengths = record_encodes(monkeypatch, server.engine.tokenizer)
    huge = "word " * 1_000_000  # 5 MB, under the 8 MiB body limit
    for path, body, param in (
        ("/v1/completions", {"model": MODEL, "prompt": huge}, "prompt"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": huge}]}, "messages"),
    ):
        status, _, raw = http("POST", server.url + path, body)
        error = json.loads(raw)["error"]
        assert status == 400 and error["param"] == param and error["code"] == "context_length_exceeded"
        assert f"context of {MAX_LEN} tokens" in error["message"] and "5,000," in error["message"]  # characters
    assert all(n < len(huge) for n in lengths)


def test_streams_flow_while_a_long_prompt_is_being_tokenized(server, monkeypatch):
    """The tokenizer holds the long prompt until a stream started after it has delivered a token: only an event
    loop left free during tokenization lets that happen."""
    long_prompt = "lorem ipsum " * 1500  # short enough to be tokenized, too many tokens for the context
    tokenizing, streamed, held = threading.Event(), threading.Event(), []

    def hold(text: str) -> None:
        if text == long_prompt:
            tokenizing.set()
            held.append(streamed.wait(GATE_TIMEOUT_S))

    record_encodes(monkeypatch, server.engine.tokenizer, hold)
    answer = {}
    long_request = threading.Thread(
        target=lambda: answer.update(status=http("POST", server.url + "/v1/completions", {"prompt": long_prompt})[0])
    )
    long_request.start()
    assert tokenizing.wait(GATE_TIMEOUT_S)
    stream = server.client().completions.create(model=MODEL, prompt="Hello", max_tokens=8, stream=True)
    first = next(c for c in stream if c.choices)
    assert first.choices[0].text or first.choices[0].finish_reason
    streamed.set()
    stream.close()
    long_request.join(GATE_TIMEOUT_S)
    assert held == [True], "the stream waited for the long prompt's tokenization"
    assert answer["status"] == 400
    wait_all_free(server.engine)


# ---- errors -----------------------------------------------------------------------------------------------------

LONG = "word " * 400

BAD_REQUESTS = [
    ("/v1/chat/completions", b"{not json", 400, None),
    ("/v1/chat/completions", [1, 2], 400, None),
    ("/v1/chat/completions", {"model": MODEL}, 400, "messages"),
    ("/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": 3}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "presence_penalty": 5}, 400, "presence_penalty"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logit_bias": {"99999999": 1}}, 400, "logit_bias"),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
        400,
        "top_logprobs",
    ),
    (
        "/v1/completions",
        {"model": MODEL, "prompt": "x", "stream_options": {"include_usage": True}},
        400,
        "stream_options",
    ),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"model": MODEL, "prompt": LONG}, 400, "prompt"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": LONG}]}, 400, "messages"),
    ("/v1/completions", {"model": MODEL, "prompt": "word " * 100, "max_tokens": 200}, 400, "max_tokens"),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tool_choice": "auto"},
        400,
        "tool_choice",
    ),
    (
        "/v1/chat/completions",
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "x"}},
        },
        400,
        "response_format",
    ),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "suffix": "y"}, 400, "suffix"),
    ("/v1/completions", {"model": "other", "prompt": "x"}, 404, "model"),
]


@pytest.mark.parametrize(
    "path, body, status, param",
    BAD_REQUESTS,
    ids=[f"{p.rsplit('/', 1)[-1]}-{s}-{param}-{i}" for i, (p, b, s, param) in enumerate(BAD_REQUESTS)],
)
def test_bad_input_gets_the_openai_error_and_the_server_serves_on(server, path, body, status, param):
    got, _, raw = http("POST", server.url + path, body)
    error = json.loads(raw)["error"]
    assert got == status, raw
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]
    if param == "max_tokens":
        assert error["code"] == "context_length_exceeded"
    if status == 404:
        assert error["code"] == "model_not_found"
    ok = server.client().completions.create(model=MODEL, prompt="still there?", max_tokens=2)
    assert ok.usage.completion_tokens == 2


def test_unknown_paths_and_oversized_bodies_answer_in_json(server):
    status, _, raw = http("GET", server.url + "/v1/nothing")
    assert status == 404 and json.loads(raw)["error"]["type"] == "invalid_request_error"
    status, _, raw = http("POST", server.url + "/v1/completions", b"{" + b" " * (9 * 2**20) + b"}")
    assert status == 413 and json.loads(raw)["error"]["message"]


def test_unknown_fields_are_ignored(server):
    status, _, raw = http(
        "POST",
        server.url + "/v1/completions",
        {"model": MODEL, "prompt": "x", "max_tokens": 2, "best_of": 1, "user": "me", "xyz": 1},
    )
    assert status == 200, raw


def test_a_full_queue_answers_503_with_retry_after(engine):
    srv, stop = run_server(engine, ServerConfig(port=0), max_queue=1)
    try:
        holder = threading.Thread(
            target=lambda: srv.client().completions.create(
                model=MODEL, prompt="hold", max_tokens=150, temperature=0, extra_body={"ignore_eos": True}
            )
        )
        holder.start()
        deadline = time.monotonic() + 30
        while srv.thread.num_unfinished == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        status, headers, raw = http("POST", srv.url + "/v1/completions", {"model": MODEL, "prompt": "x"})
        assert status == 503 and headers["Retry-After"] == "1" and json.loads(raw)["error"]["message"]
        holder.join()
    finally:
        stop()


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
