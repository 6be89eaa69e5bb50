"""OpenAI's response shapes from engine outputs without a server: choice indexing, echo, both logprobs formats,
usage, and stream chunk sequences (role first, one finish_reason per choice, usage chunk). Outputs are built by
hand."""

from __future__ import annotations

from app.server.protocol import parse_chat_request, parse_completion_request
from app.server.responses import StreamState, chat_response, completion_response
from engine import CompletionOutput, RequestOutput

USER = [{"role": "user", "content": "hi"}]


def completion(**fields) -> dict:
    return {"model": "smol", "prompt": "Hello", **fields}


def chat(**fields) -> dict:
    return {"model": "smol", "messages": USER, "max_tokens": 8, **fields}


# ---- responses ------------------------------------------------------------------------------------------------------


def entry(token: int, logprob: float, others: dict[int, float]) -> dict[int, float]:
    return {**others, token: logprob}


def out(
    tok,
    prompt: str | None,
    prompt_ids: list[int],
    choices: list[tuple[list[int], str | None]],
    logprobs: bool = False,
    prompt_logprobs=None,
) -> RequestOutput:
    """An engine output with each choice's text decoded from its token ids; logprobs: chosen -0.5, and token 0
    at -1.0 and token 1 at -3.0 as the runners-up."""
    outputs = [
        CompletionOutput(
            i,
            tok.decode(ids),
            list(ids),
            -0.5 * len(ids),
            [entry(t, -0.5, {0: -1.0, 1: -3.0}) for t in ids] if logprobs else None,
            finish,
        )
        for i, (ids, finish) in enumerate(choices)
    ]
    return RequestOutput(
        "r", prompt, prompt_ids, outputs, all(c.finished() for c in outputs), prompt_logprobs=prompt_logprobs
    )


def test_completion_response_indexes_choices_across_prompts_and_sums_usage(model, tok):
    req = parse_completion_request(completion(prompt=["Hi", "Yo there"], n=2), model)
    a, b, c = tok.encode(" one"), tok.encode(" two three"), tok.encode("!")
    outputs = [
        out(tok, "Hi", tok.encode("Hi"), [(a, "length"), (b, "stop")]),
        out(tok, "Yo there", tok.encode("Yo there"), [(c, "stop"), (a + c, "length")]),
    ]
    resp = completion_response(req, "cmpl-abc", outputs, model)
    assert {k: resp[k] for k in ("id", "object", "model")} == {
        "id": "cmpl-abc",
        "object": "text_completion",
        "model": "smol",
    }
    assert isinstance(resp["created"], int)
    assert [(ch["index"], ch["text"], ch["finish_reason"], ch["logprobs"]) for ch in resp["choices"]] == [
        (0, " one", "length", None),
        (1, " two three", "stop", None),
        (2, "!", "stop", None),
        (3, " one!", "length", None),
    ]
    prompt_tokens = len(tok.encode("Hi")) + len(tok.encode("Yo there"))
    completion_tokens = 2 * len(a) + len(b) + 2 * len(c)
    assert resp["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def test_echo_prepends_the_prompt_text(model, tok):
    req = parse_completion_request(completion(prompt=[tok.encode("Hey")[:1], tok.encode("Hello")], echo=True), model)
    # Token id prompts come back with no prompt text: it is decoded from the ids.
    outputs = [
        out(tok, None, tok.encode("Hey")[:1], [(tok.encode(" you"), "length")]),
        out(tok, "Hello", tok.encode("Hello"), [(tok.encode(" world"), "stop")]),
    ]
    texts = [ch["text"] for ch in completion_response(req, "cmpl-1", outputs, model)["choices"]]
    assert texts == [tok.decode(tok.encode("Hey")[:1]) + " you", "Hello world"]


def test_completion_logprobs_format(model, tok):
    req = parse_completion_request(completion(prompt="Hi", logprobs=1), model)
    ids = tok.encode(" big world")
    resp = completion_response(req, "cmpl-1", [out(tok, "Hi", tok.encode("Hi"), [(ids, "length")], True)], model)
    lp = resp["choices"][0]["logprobs"]
    texts = [tok.decode([t]) for t in ids]
    assert lp["tokens"] == texts == [" big", " world"]
    assert lp["token_logprobs"] == [-0.5, -0.5]
    # The chosen token and the runners-up the engine gave, best first; keyed by token text.
    first = [tok.decode([0]), tok.decode([1])]
    assert [list(d.items()) for d in lp["top_logprobs"]] == [
        [(t, -0.5), (first[0], -1.0), (first[1], -3.0)] for t in texts
    ]
    assert lp["text_offset"] == [2, 2 + len(" big")]  # counted from the prompt's start


def test_completion_logprobs_with_echo_start_with_the_prompt(model, tok):
    req = parse_completion_request(completion(prompt="Hi there", logprobs=0, echo=True), model)
    prompt_ids = tok.encode("Hi there")
    prompt_lp = [None, {prompt_ids[1]: -2.0, 5: -0.25}]
    ids = tok.encode("!")
    output = out(tok, "Hi there", prompt_ids, [(ids, "stop")], True, prompt_lp)
    choice = completion_response(req, "cmpl-1", [output], model)["choices"][0]
    assert choice["text"] == "Hi there!"
    lp = choice["logprobs"]
    assert lp["tokens"] == ["Hi", " there", "!"]
    assert lp["token_logprobs"] == [None, -2.0, -0.5]
    assert lp["top_logprobs"][:2] == [None, {tok.decode([5]): -0.25, " there": -2.0}]
    assert lp["text_offset"] == [0, 2, 8]


def test_chat_response_and_logprobs_format(model, tok):
    req = parse_chat_request(chat(logprobs=True, top_logprobs=1, n=2), model)
    a, b = tok.encode("Héllo"), tok.encode(" ok")
    resp = chat_response(req, "chatcmpl-9", [out(tok, None, [1, 2, 3], [(a, "stop"), (b, "length")], True)], model)
    assert {k: resp[k] for k in ("id", "object", "model")} == {
        "id": "chatcmpl-9",
        "object": "chat.completion",
        "model": "smol",
    }
    assert [(c["index"], c["message"], c["finish_reason"]) for c in resp["choices"]] == [
        (0, {"role": "assistant", "content": "Héllo"}, "stop"),
        (1, {"role": "assistant", "content": " ok"}, "length"),
    ]
    content = resp["choices"][0]["logprobs"]["content"]
    texts = [tok.decode([t]) for t in a]
    assert "".join(texts) == "Héllo"
    top = tok.decode([0])
    assert content == [
        {
            "token": t,
            "logprob": -0.5,
            "bytes": list(t.encode()),
            "top_logprobs": [{"token": t, "logprob": -0.5, "bytes": list(t.encode())}],
        }
        for t in texts
    ]
    # A chosen token outside the top N is reported but not listed among them.
    low = {7: -4.0, 0: -1.0, 1: -3.0}
    output = RequestOutput("r", None, [1], [CompletionOutput(0, tok.decode([7]), [7], -4.0, [low], "stop")], True)
    item = chat_response(req, "c", [output], model)["choices"][0]["logprobs"]["content"][0]
    assert (item["logprob"], [t["token"] for t in item["top_logprobs"]]) == (-4.0, [top])
    assert resp["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": len(a) + len(b),
        "total_tokens": 3 + len(a) + len(b),
    }


def test_logprobs_zero_and_minus_infinity(model, tok):
    req = parse_chat_request(chat(logprobs=True), model)
    output = RequestOutput("r", None, [1], [CompletionOutput(0, "!", [0], 0.0, [{0: float("-inf")}], "stop")], True)
    item = chat_response(req, "c", [output], model)["choices"][0]["logprobs"]["content"][0]
    assert (item["logprob"], item["top_logprobs"]) == (-9999.0, [])


# ---- streaming ------------------------------------------------------------------------------------------------------


def growing(tok, prompt, prompt_ids, choices, logprobs=False, prompt_logprobs=None, hold=()) -> list[RequestOutput]:
    """The cumulative outputs an engine sends while each choice grows a token at a time; a choice ends (with its
    finish reason) at its last token, the longer ones keep going. Steps in `hold` show no new text (the
    detokenizer holding back a possible stop string)."""
    steps = max(len(ids) for ids, _ in choices)
    outs, shown = [], [""] * len(choices)
    for s in range(1, steps + 1):
        now = [(ids[:s], finish if s >= len(ids) else None) for ids, finish in choices]
        o = out(tok, prompt, prompt_ids, now, logprobs, prompt_logprobs)
        for c in o.outputs:
            if s in hold and not c.finished():
                c.text = shown[c.index]
            shown[c.index] = c.text
        outs.append(o)
    return outs


def stream(state: StreamState, outputs: list[RequestOutput]) -> list[dict]:
    return [chunk for o in outputs for chunk in state.chunks(o)]


def by_choice(chunks: list[dict]) -> dict[int, list[dict]]:
    seen: dict[int, list[dict]] = {}
    for chunk in chunks:
        assert len(chunk["choices"]) == 1
        seen.setdefault(chunk["choices"][0]["index"], []).append(chunk["choices"][0])
    return seen


def test_chat_stream_role_first_one_finish_per_choice_text_equals_the_response(model, tok):
    req = parse_chat_request(chat(n=2, stream=True, stream_options={"include_usage": True}), model)
    a, b = tok.encode("Hello there, friend"), tok.encode("Hi")
    outputs = growing(tok, None, [1, 2], [(a, "stop"), (b, "length")], hold={2})
    state = StreamState(req, "chatcmpl-s", model)
    chunks = stream(state, outputs)
    assert all(
        c["object"] == "chat.completion.chunk"
        and c["id"] == "chatcmpl-s"
        and c["model"] == "smol"
        and c["usage"] is None
        and c["created"] == state.created
        for c in chunks
    )
    final = chat_response(req, "chatcmpl-s", outputs[-1:], model)
    for index, choices in by_choice(chunks).items():
        assert choices[0]["delta"] == {"role": "assistant", "content": ""}
        assert all("role" not in c["delta"] for c in choices[1:])
        assert [c["finish_reason"] for c in choices] == [None] * (len(choices) - 1) + [
            final["choices"][index]["finish_reason"]
        ]
        assert "".join(c["delta"].get("content", "") for c in choices) == final["choices"][index]["message"]["content"]
    # No chunk without news: a held-back step sends nothing for the choice still growing.
    assert len(by_choice(chunks)[0]) == 1 + len(a) - 1
    usage = state.usage_chunk(outputs[-1:])
    assert usage["choices"] == [] and usage["usage"] == final["usage"]
    assert {k: usage[k] for k in ("id", "object", "model")} == {
        "id": "chatcmpl-s",
        "object": "chat.completion.chunk",
        "model": "smol",
    }
    assert stream(state, outputs[-1:]) == []  # finished choices send nothing more


def test_chat_stream_logprobs_add_up_to_the_response(model, tok):
    req = parse_chat_request(chat(stream=True, logprobs=True, top_logprobs=2), model)
    outputs = growing(tok, None, [1], [(tok.encode("one two three"), "stop")], logprobs=True, hold={1})
    chunks = stream(StreamState(req, "c", model), outputs)
    assert "usage" not in chunks[0]
    assert chunks[0]["choices"][0]["logprobs"] is None
    streamed = [item for c in chunks[1:] for item in c["choices"][0]["logprobs"]["content"]]
    assert streamed == chat_response(req, "c", outputs[-1:], model)["choices"][0]["logprobs"]["content"]


def test_completion_stream_with_echo_and_logprobs_equals_the_response(model, tok):
    req = parse_completion_request(completion(prompt=["x", "Hi there"], n=2, stream=True, echo=True, logprobs=1), model)
    prompt_ids = tok.encode("Hi there")
    prompt_lp = [None, {prompt_ids[1]: -2.0}]
    outputs = growing(
        tok,
        "Hi there",
        prompt_ids,
        [(tok.encode(" a b c"), "length"), (tok.encode("!"), "stop")],
        logprobs=True,
        prompt_logprobs=prompt_lp,
        hold={2},
    )
    chunks = stream(StreamState(req, "cmpl-s", model, prompt_index=1), outputs)
    assert all(c["object"] == "text_completion" and "usage" not in c for c in chunks)
    final = completion_response(req, "cmpl-s", [outputs[-1]], model)["choices"]
    seen = by_choice(chunks)
    assert sorted(seen) == [2, 3]  # prompt 1 of 2, n = 2
    for index, choices in seen.items():
        want = final[index - 2]
        assert choices[0]["text"].startswith("Hi there")
        assert "".join(c["text"] for c in choices) == want["text"]
        assert [c["finish_reason"] for c in choices][-1] == want["finish_reason"]
        assert all(c["finish_reason"] is None for c in choices[:-1])
        joined = {k: [v for c in choices for v in c["logprobs"][k]] for k in want["logprobs"]}
        assert joined == want["logprobs"]


def test_completion_stream_without_news_sends_nothing(model, tok):
    req = parse_completion_request(completion(stream=True), model)
    state = StreamState(req, "cmpl-s", model)
    assert state.chunks(out(tok, "Hello", [1], [([], None)])) == []
    first = state.chunks(out(tok, "Hello", [1], [(tok.encode(" a"), None)]))
    assert [c["choices"][0]["text"] for c in first] == [" a"]
    assert state.chunks(out(tok, "Hello", [1], [(tok.encode(" a"), None)])) == []
    last = state.chunks(out(tok, "Hello", [1], [(tok.encode(" a"), "length")]))
    assert [(c["choices"][0]["text"], c["choices"][0]["finish_reason"]) for c in last] == [("", "length")]
