"""The remote client against a real OpenAI-compatible endpoint: kvstudio's own server in-process on port 0, with
an API key, over a tiny model whose greedy replies the `openai` client confirms."""

from __future__ import annotations

import threading
import time

import openai
import pytest

from app.remote_client import Endpoint, RemoteClient, RemoteError, TextUpdate, list_models, request_body
from engine import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


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
        assert self.done.wait(30), "the request never ended"
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
    body = request_body(SamplingParams(top_k=40, min_p=0.1, repetition_penalty=1.2, seed=3, stop=["\n\n"]))
    assert (body["top_k"], body["min_p"], body["repetition_penalty"], body["seed"], body["stop"]) == (
        40,
        0.1,
        1.2,
        3,
        ["\n\n"],
    )
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


def test_an_unreachable_endpoint_fails_in_words():
    c = RemoteClient(Endpoint("http://127.0.0.1:9", model="m"))
    try:
        got = Collector()
        c.submit_chat([{"role": "user", "content": "hi"}], GREEDY, got, "r4")
        error = got.wait()
        assert isinstance(error, RemoteError) and str(error).startswith("cannot reach http://127.0.0.1:9/v1")
    finally:
        c.close()


def test_abort_closes_the_stream_and_the_server_frees_the_request(served, client):
    _, engine = served
    got = Collector()
    client.submit_completion("Count", SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True), got, "r5")
    deadline = time.monotonic() + 30
    while not got.items and time.monotonic() < deadline:
        time.sleep(0.01)
    client.abort("r5")
    seen = len(got.items)
    while engine.has_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not engine.has_unfinished_requests() and engine.get_stats().num_blocks_used == 0
    time.sleep(0.2)
    assert len(got.items) == seen and not got.done.is_set()  # nothing arrives after the abort


def test_closing_ends_every_request_in_flight_in_words_and_takes_no_more(openai_endpoint):
    c = RemoteClient(Endpoint(openai_endpoint.base_url, openai_endpoint.api_key, "tiny"))
    got = Collector()
    c.submit_completion("Count", SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True), got, "r6")
    c.close()
    error = got.wait()
    assert isinstance(error, RemoteError) and str(error) == f"the connection to {openai_endpoint.base_url} was closed"
    assert sum(isinstance(item, BaseException) for item in got.items) == 1
    with pytest.raises(RemoteError, match="was closed"):
        c.submit_completion("again", GREEDY, Collector(), "r7")


def test_a_stream_of_the_wrong_shape_ends_the_request_in_words():
    from aiohttp import web

    async def odd_stream(request):
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: [1, 2]\n\n")
        return response

    import asyncio
    import threading as th

    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_post("/v1/completions", odd_stream)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = runner.addresses[0][1]
    thread = th.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    c = RemoteClient(Endpoint(f"http://127.0.0.1:{port}", model="m"))
    try:
        got = Collector()
        c.submit_completion("hi", GREEDY, got, "r8")
        error = got.wait()
        assert isinstance(error, RemoteError) and "sent something unexpected" in str(error)
    finally:
        c.close()
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
