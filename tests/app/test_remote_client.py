"""The remote client against a real OpenAI-compatible endpoint: kvstudio's own server in-process on port 0, with
an API key, over a tiny model whose greedy replies the `openai` client confirms; and against a scripted endpoint
whose streams are malformed.

Waits end on what they wait for, never on the clock: a loaded machine only makes them slower. A hang is caught by
the module's pytest-timeout mark."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

import openai
import pytest

from app.engine_thread import EngineThread
from app.remote_client import Endpoint, RemoteClient, RemoteError, TextUpdate, list_models, request_body
from engine import LLMEngine, SamplingParams

pytestmark = pytest.mark.timeout(600)
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
# A reply that only an abort ends early: no EOS, and most of the tiny model's 256-token context.
LONG = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)


@pytest.fixture(scope="module")
def served(openai_endpoint):
    return openai_endpoint.base_url, openai_endpoint.engine


@pytest.fixture(scope="module")
def key(openai_endpoint):
    return openai_endpoint.api_key


@pytest.fixture
def client(openai_endpoint):
    c = RemoteClient(Endpoint(openai_endpoint.base_url, openai_endpoint.api_key, "tiny"))
    yield c
    c.close()


class Collector:
    """A request's callback: every update, and an event set once it ends (finished or failed)."""

    def __init__(self) -> None:
        self.items: list[TextUpdate | BaseException] = []
        self.done = threading.Event()

    def __call__(self, item: TextUpdate | BaseException) -> None:
        self.items.append(item)
        if isinstance(item, BaseException) or item.finished:
            self.done.set()

    def wait(self) -> TextUpdate | BaseException:
        self.done.wait()
        return self.items[-1]


def test_an_endpoint_url_is_checked_and_gets_v1_when_it_has_no_path():
    assert Endpoint("http://gpu-box:8000/").base_url == "http://gpu-box:8000/v1"
    assert Endpoint(" https://api.example.com/openai/v1 ").base_url == "https://api.example.com/openai/v1"
    assert Endpoint("http://h", "k").headers() == {"Authorization": "Bearer k"} and Endpoint("http://h").headers() == {}
    for bad in ("gpu-box:8000", "ftp://host/v1", "http://"):
        with pytest.raises(ValueError, match="must start with http"):
            Endpoint(bad)


def test_sampling_params_become_openai_fields_with_vllm_extras_only_when_set():
    assert request_body(SamplingParams(temperature=0.5, max_tokens=7)) == {
        "temperature": 0.5,
        "top_p": 1.0,
        "max_tokens": 7,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
    }
    body = request_body(
        SamplingParams(top_k=40, min_p=0.1, repetition_penalty=1.2, seed=3, stop=["\n\n"], ignore_eos=True)
    )
    assert (body["top_k"], body["min_p"], body["repetition_penalty"], body["seed"], body["stop"]) == (
        40,
        0.1,
        1.2,
        3,
        ["\n\n"],
    )
    assert body["ignore_eos"] is True
    with pytest.raises(ValueError, match="n=1"):
        request_body(SamplingParams(n=2))


def test_list_models_checks_the_key_and_says_what_went_wrong(served, key):
    url = served[0]
    assert list_models(Endpoint(url, key)) == ["tiny"]
    with pytest.raises(RemoteError, match=r"answered 401: .*API key"):
        list_models(Endpoint(url, "wrong"))
    with pytest.raises(RemoteError, match=r"cannot reach http://127.0.0.1:9/v1"):
        list_models(Endpoint("http://127.0.0.1:9"), timeout=2)


def test_a_chat_streams_the_same_reply_the_openai_client_gets(served, client, key):
    url, _ = served
    messages = [{"role": "user", "content": "Say hello"}]
    expected = openai.OpenAI(base_url=url, api_key=key, max_retries=0).chat.completions.create(
        model="tiny", messages=messages, max_tokens=12, temperature=0
    )
    got = Collector()
    client.submit_chat(messages, GREEDY, got, "r1")
    last = got.wait()
    assert isinstance(last, TextUpdate) and last.finished and last.finish_reason == "length"
    assert last.text == expected.choices[0].message.content and last.num_tokens == 12
    partial = got.items[:-1]
    assert partial and not any(u.finished for u in partial)
    assert all(b.text.startswith(a.text) and b.num_tokens >= a.num_tokens for a, b in zip(got.items, got.items[1:]))


def test_a_completion_streams_raw_text(served, client, key):
    url, _ = served
    expected = openai.OpenAI(base_url=url, api_key=key, max_retries=0).completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0
    )
    got = Collector()
    client.submit_completion("Once upon a time", GREEDY, got, "r2")
    last = got.wait()
    assert last.text == expected.choices[0].text and last.finish_reason == "length"


def test_a_refused_request_fails_with_the_servers_message(client):
    got = Collector()
    client.submit_completion("hi", SamplingParams(max_tokens=100_000), got, "r3")
    error = got.wait()
    assert isinstance(error, RemoteError) and "answered 400" in str(error) and "max_tokens" in str(error)


def test_as_a_request_target_the_endpoint_applies_its_own_template_and_takes_text(client, openai_endpoint):
    """What the desktop app's pages ask of a request target (ui/request_target.py)."""
    messages = [{"role": "user", "content": "hi"}]
    assert client.chat_templated() and client.prepare_chat(messages) == messages
    assert client.chat_route() == ("Chat · tiny", f"to {openai_endpoint.base_url}")
    with pytest.raises(ValueError, match="text prompts"):
        client.submit_completion({"prompt_token_ids": [1, 2]}, GREEDY, Collector(), "r11")


def test_an_unreachable_endpoint_fails_in_words():
    c = RemoteClient(Endpoint("http://127.0.0.1:9", model="m"))
    try:
        got = Collector()
        c.submit_chat([{"role": "user", "content": "hi"}], GREEDY, got, "r4")
        error = got.wait()
        assert isinstance(error, RemoteError) and str(error).startswith("cannot reach http://127.0.0.1:9/v1")
    finally:
        c.close()


@dataclass
class Gate:
    """Holds the endpoint's engine after GATE_TOKENS generated tokens until the server aborts a request."""

    engine: LLMEngine
    tokens_before: int  # the engine's generation_tokens_total when the gate was set up
    reached: threading.Event = field(default_factory=threading.Event)  # the engine waits at the gate
    server_aborted: threading.Event = field(default_factory=threading.Event)  # the server told the engine thread
    engine_aborted: threading.Event = field(default_factory=threading.Event)  # the engine dropped the request

    def generated(self) -> int:
        return self.engine.stats.generation_tokens_total - self.tokens_before


GATE_TOKENS = 4


@pytest.fixture
def gate(served, monkeypatch):
    """Once the (idle) endpoint engine has generated GATE_TOKENS tokens, its next step waits until the server asks
    the engine thread to abort a request. The abort is queued before the gate opens, and the engine thread takes
    its queue before each step: an abort that comes stops the request after exactly GATE_TOKENS + 1 tokens
    whatever the machine's speed. A test without an abort opens the gate by hand; the fixture opens it at the
    end, so a failed test leaves no engine waiting."""
    _, engine = served
    assert not engine.has_unfinished_requests()  # the earlier tests' requests have ended
    g = Gate(engine, engine.stats.generation_tokens_total)
    step, abort_request, thread_abort = engine.step, engine.abort_request, EngineThread.abort

    def gated_step():
        if g.generated() >= GATE_TOKENS and not g.server_aborted.is_set():
            g.reached.set()
            g.server_aborted.wait()
        return step()

    def server_abort(self, request_id):
        thread_abort(self, request_id)
        g.server_aborted.set()

    def engine_abort(request_id):
        abort_request(request_id)
        g.engine_aborted.set()

    monkeypatch.setattr(engine, "step", gated_step)
    monkeypatch.setattr(engine, "abort_request", engine_abort)
    monkeypatch.setattr(EngineThread, "abort", server_abort)
    yield g
    g.server_aborted.set()  # a failed test must not leave the engine thread waiting


def assert_the_server_stopped_generating(gate: Gate) -> None:
    """The server saw the client go away and aborted the request long before max_tokens, and freed its blocks."""
    gate.engine_aborted.wait()  # the server aborts the request
    assert gate.generated() == GATE_TOKENS + 1, f"{gate.generated()} tokens generated of {LONG.max_tokens} asked"
    stats = gate.engine.get_stats()  # read on this thread: the engine thread is idle now
    assert not gate.engine.has_unfinished_requests() and stats.num_blocks_used == 0


def test_the_gate_lets_an_unaborted_reply_run_to_max_tokens(gate, client):
    """The control for the two tests below: without an abort, the reply is all max_tokens tokens long."""
    got = Collector()
    client.submit_completion("Count", SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True), got, "r5")
    gate.reached.wait()
    gate.server_aborted.set()  # open the gate by hand
    last = got.wait()
    assert isinstance(last, TextUpdate) and last.finish_reason == "length" and last.num_tokens == 20
    assert gate.generated() == 20 and not gate.engine_aborted.is_set()


def test_abort_closes_the_stream_and_the_server_stops_generating(gate, client):
    got = Collector()
    client.submit_completion("Count", LONG, got, "r6")
    gate.reached.wait()  # the engine has generated the first tokens
    client.abort("r6")
    seen = len(got.items)
    assert_the_server_stopped_generating(gate)
    client.close()  # ends the client's loop, so whatever it still had to deliver would have arrived by now
    assert len(got.items) == seen and not got.done.is_set()  # nothing arrives after the abort


def test_closing_ends_every_request_in_flight_in_words_and_takes_no_more(openai_endpoint, gate):
    c = RemoteClient(Endpoint(openai_endpoint.base_url, openai_endpoint.api_key, "tiny"))
    got = Collector()
    c.submit_completion("Count", LONG, got, "r7")
    gate.reached.wait()  # the engine has generated the first tokens
    c.close()
    error = got.wait()
    assert isinstance(error, RemoteError) and str(error) == f"the connection to {openai_endpoint.base_url} was closed"
    assert sum(isinstance(item, BaseException) for item in got.items) == 1
    assert_the_server_stopped_generating(gate)
    with pytest.raises(RemoteError, match="was closed"):
        c.submit_completion("again", GREEDY, Collector(), "r8")
    c.close()  # a second close does nothing


# ---- a scripted endpoint -------------------------------------------------------------------------------------


@pytest.fixture
def scripted():
    """(url, replies): a server whose POST /v1/completions answers with the raw SSE bytes replies[prompt]."""
    from aiohttp import web

    replies: dict[str, bytes] = {}

    async def completions(request):
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(replies[(await request.json())["prompt"]])
        await response.write_eof()
        return response

    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}", replies
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result()
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.close()


def sse(*chunks: str) -> bytes:
    return b"".join(b"data: " + c.encode() + b"\n\n" for c in chunks)


WELL_FORMED = sse('{"choices": [{"text": "fine"}]}', '{"choices": [{"text": "", "finish_reason": "stop"}]}', "[DONE]")
MALFORMED = {
    "an array": (sse("[1, 2]"), "wrong shape (a list, not an object)"),
    "a number": (sse("5"), "wrong shape (a int, not an object)"),
    "choices not a list": (sse('{"choices": 3}'), "wrong shape (choices is not a list)"),
    "a null choice": (sse('{"choices": [null]}'), "wrong shape (a choice is not an object)"),
    "a string delta": (sse('{"choices": [{"delta": "hi"}]}'), "wrong shape (a delta is not an object)"),
    "a number for text": (sse('{"choices": [{"text": 5}]}'), "wrong shape (a text piece is not a string)"),
    "a number for finish_reason": (
        sse('{"choices": [{"text": "a", "finish_reason": 7}]}', "[DONE]"),
        "wrong shape (finish_reason is not a string)",
    ),
    "usage not an object": (sse('{"choices": [], "usage": [3]}'), "wrong shape (usage is not an object)"),
    "a string token count": (
        sse('{"choices": [{"text": "a", "finish_reason": "length"}]}', '{"usage": {"completion_tokens": "1"}}'),
        "wrong shape (usage.completion_tokens is not a count)",
    ),
    "not JSON": (sse("{oops"), "sent a stream that is not OpenAI's"),
    "JSON nested too deep": (sse("[" * 60_000), "sent something unexpected: RecursionError"),
    "no finish": (sse('{"choices": [{"text": "a"}]}', "[DONE]"), "ended the stream before the reply finished"),
    "an error chunk": (sse('{"error": {"message": "overloaded"}}'), "stopped the reply: overloaded"),
}


@pytest.mark.parametrize("reply, message", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_stream_ends_the_request_in_words_and_the_client_serves_on(scripted, reply, message):
    """Whatever the endpoint streams, the request ends with one RemoteError, no value of a wrong type reaches
    the caller, and the client's loop thread lives on: the next request on it completes. (An exception that
    killed a thread would fail the test: pyproject.toml turns those warnings into errors.)"""
    url, replies = scripted
    replies.update(bad=reply, good=WELL_FORMED)
    c = RemoteClient(Endpoint(url, model="m"))
    try:
        got = Collector()
        c.submit_completion("bad", GREEDY, got, "r9")
        error = got.wait()
        assert isinstance(error, RemoteError) and message in str(error), str(error)
        *updates, _ = got.items
        assert all(type(u) is TextUpdate and not u.finished for u in updates)
        assert all(type(u.text) is str and type(u.num_tokens) is int for u in updates)
        again = Collector()
        c.submit_completion("good", GREEDY, again, "r10")
        assert again.wait() == TextUpdate("fine", 1, True, "stop")
    finally:
        c.close()
