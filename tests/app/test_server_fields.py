"""vLLM's request fields through the endpoint on the tiny model, driven by the official `openai` client (extra_body):
each changes what it says it changes, or is refused with a 400 naming it."""

from __future__ import annotations

import openai
import pytest

USER = [{"role": "user", "content": "Tell me about the sea."}]


@pytest.fixture(scope="module")
def client(openai_endpoint) -> openai.OpenAI:
    return openai.OpenAI(base_url=openai_endpoint.base_url, api_key=openai_endpoint.api_key, max_retries=0)


def greedy(client, **kw):
    return client.completions.create(model="tiny", prompt="The sea is", max_tokens=30, temperature=0, **kw)


def test_include_stop_str_in_output_keeps_the_stop_string(client):
    full = greedy(client).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), f"choose another prompt: {full!r}"
    kept = greedy(client, stop=[stop], extra_body={"include_stop_str_in_output": True}).choices[0]
    assert kept.finish_reason == "stop" and kept.text == full[: full.index(stop) + len(stop)]
    streamed = greedy(client, stop=[stop], stream=True, extra_body={"include_stop_str_in_output": True})
    assert "".join(c.choices[0].text for c in streamed if c.choices) == kept.text


def test_best_of_returns_the_likeliest_of_its_samples(client):
    reply = client.completions.create(
        model="tiny", prompt="The sea is", max_tokens=8, best_of=4, seed=3, logprobs=0, extra_body={"ignore_eos": True}
    )
    assert len(reply.choices) == 1 and reply.usage.completion_tokens == 4 * 8  # all four were generated
    best = sum(reply.choices[0].logprobs.token_logprobs)
    each = client.completions.create(
        model="tiny", prompt="The sea is", max_tokens=8, n=4, seed=3, logprobs=0, extra_body={"ignore_eos": True}
    )
    assert best == pytest.approx(max(sum(c.logprobs.token_logprobs) for c in each.choices))
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt="x", best_of=2, stream=True)
    assert info.value.body["param"] == "best_of"


def test_seed_minus_one_is_no_seed(client):
    a = client.completions.create(model="tiny", prompt="The sea is", max_tokens=12, seed=-1)
    b = client.completions.create(model="tiny", prompt="The sea is", max_tokens=12, seed=-1)
    assert a.choices[0].text != b.choices[0].text


def test_allowed_token_ids_and_tokens_named_by_id(client, openai_endpoint):
    tok = openai_endpoint.engine.tokenizer
    allowed = tok.encode(" blue green sea wave")
    reply = greedy(client, logprobs=1, extra_body={"allowed_token_ids": allowed, "return_tokens_as_token_ids": True})
    ids = [int(t.removeprefix("token_id:")) for t in reply.choices[0].logprobs.tokens]
    assert ids and set(ids) <= set(allowed)
    assert all(k.startswith("token_id:") for k in reply.choices[0].logprobs.top_logprobs[0])


def test_bad_words_are_not_generated(client, openai_endpoint):
    tok = openai_endpoint.engine.tokenizer

    def token_ids(**extra) -> list[int]:
        reply = greedy(client, logprobs=0, extra_body={"return_tokens_as_token_ids": True, **extra})
        return [int(t.removeprefix("token_id:")) for t in reply.choices[0].logprobs.tokens]

    favourite = token_ids()[0]  # what greedy decoding picks first, and again later
    word = tok.decode([favourite])
    assert tok.encode(word) == [favourite]
    assert favourite not in token_ids(bad_words=[word])


def test_prompt_logprobs_on_both_endpoints(client, openai_endpoint):
    tok = openai_endpoint.engine.tokenizer
    reply = client.completions.create(
        model="tiny", prompt="The sea is blue", max_tokens=2, extra_body={"prompt_logprobs": 2}
    )
    got = reply.choices[0].model_extra["prompt_logprobs"]
    ids = tok.encode("The sea is blue")
    assert got[0] is None and len(got) == len(ids)
    for tid, entry in zip(ids[1:], got[1:]):
        assert str(tid) in entry and 2 <= len(entry) <= 3
        assert all(set(e) == {"logprob", "rank", "decoded_token"} for e in entry.values())
        ranked = sorted(entry.values(), key=lambda e: -e["logprob"])
        assert [e["rank"] for e in ranked[:2]] == [1, 2]
        assert entry[str(tid)]["decoded_token"] == tok.decode([tid])
    chat = client.chat.completions.create(model="tiny", messages=USER, max_tokens=2, extra_body={"prompt_logprobs": 0})
    prompt_logprobs = chat.model_extra["prompt_logprobs"]
    assert prompt_logprobs[0] is None and all(len(e) == 1 for e in prompt_logprobs[1:])


def test_continuous_usage_stats(client):
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=USER,
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True},
            extra_body={"ignore_eos": True},
        )
    )
    counts = [c.usage.completion_tokens for c in chunks]
    assert all(c.usage is not None for c in chunks) and counts == sorted(counts) and counts[-1] == 6
    assert chunks[-1].choices == [] and chunks[0].usage.prompt_tokens == chunks[-1].usage.prompt_tokens


def test_truncate_prompt_tokens_fits_a_long_prompt(client):
    long = "The sea is wide and deep. " * 60  # several times the 256-token context
    reply = client.completions.create(
        model="tiny", prompt=long, max_tokens=4, extra_body={"truncate_prompt_tokens": 40}
    )
    assert reply.usage.prompt_tokens == 40
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt=long, max_tokens=4)
    assert info.value.body["param"] == "prompt"


def test_a_prefilled_reply_continues_and_echo_repeats_it(client):
    prefill = [*USER, {"role": "assistant", "content": "The sea is"}]
    extra = {"add_generation_prompt": False, "continue_final_message": True, "echo": True, "ignore_eos": True}
    reply = client.chat.completions.create(
        model="tiny", messages=prefill, max_tokens=5, temperature=0, extra_body=extra
    )
    content = reply.choices[0].message.content
    assert content.startswith("The sea is") and len(content) > len("The sea is")
    streamed = client.chat.completions.create(
        model="tiny", messages=prefill, max_tokens=5, temperature=0, stream=True, extra_body=extra
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == content


def test_request_id_names_the_response(client):
    reply = client.chat.completions.create(model="tiny", messages=USER, max_tokens=2, extra_body={"request_id": "abc"})
    assert reply.id == "chatcmpl-abc"
    again = client.chat.completions.create(model="tiny", messages=USER, max_tokens=2, extra_body={"request_id": "abc"})
    assert again.id == "chatcmpl-abc"  # a client's id need not be unique


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"use_beam_search": True}, "use_beam_search"),
        ({"priority": 3}, "priority"),
        ({"spaces_between_special_tokens": True, "skip_special_tokens": False}, "spaces_between_special_tokens"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"stream_options": None, "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
        ({"reasoning_effort": "low"}, "reasoning_effort"),
    ],
)
def test_what_is_not_supported_is_refused_by_name(client, extra, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=USER, max_tokens=2, extra_body=extra)
    assert info.value.body["param"] == param
