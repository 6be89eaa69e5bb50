"""The OpenAI-compatible endpoint, in-process on port 0 with a tiny model, driven by the official `openai`
client (sync and async) and by raw HTTP where the client would hide what is checked (status codes, headers)."""

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
    http,
    run_server,
    wait_all_free,
)

from app.server.app import ServerConfig

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
