"""The fields both endpoints read into SamplingParams (OpenAI's and vLLM's), streaming's flags, and max_tokens."""

from __future__ import annotations

import re

from app.server.fields import bad, boolean, integer, number, obj, short, strings, token_id_list
from app.server.structured import Constraint
from engine import SamplingParams

# More samples than this from a local server is a mistake rather than a use; it would crowd out every other client.
MAX_N = 16


def stream_flags(body: dict) -> tuple[bool, bool, bool]:
    """stream, stream_options.include_usage and stream_options.continuous_usage_stats."""
    stream = boolean(body, "stream", False)
    options = body.get("stream_options")
    if options is None:
        return stream, False, False
    if not stream:
        raise bad("stream_options", "stream_options is only allowed when stream is true")
    options = obj(options, "stream_options")
    include_usage = boolean(options, "include_usage", False)
    continuous = boolean(options, "continuous_usage_stats", False)
    if continuous and not include_usage:
        raise bad("continuous_usage_stats", "continuous_usage_stats needs include_usage set to true (as vLLM has it)")
    return stream, include_usage, continuous


# ---- sampling parameters ------------------------------------------------------------------------------------------


def _spaces_between_special_tokens(body: dict, skip_special_tokens: bool) -> None:
    """The engine decodes with the tokenizer's fast decoder, which writes special tokens next to each other with
    nothing between them (vLLM's fast detokenizer does the same): spaces_between_special_tokens false. True
    changes nothing while special tokens are skipped, and is refused where it would."""
    if boolean(body, "spaces_between_special_tokens", False) and not skip_special_tokens:
        raise bad(
            "spaces_between_special_tokens",
            "special tokens are decoded with nothing between them: spaces_between_special_tokens true is not "
            "supported together with skip_special_tokens false",
        )


def sampling_params(
    body: dict,
    vocab_size: int,
    max_tokens: int,
    logprobs: int | None,
    prompt_logprobs: int | None,
    logprobs_param: str,
    max_tokens_param: str,
    stream: bool,
    constraint: Constraint | None = None,
    skip_special_tokens: bool | None = None,
) -> tuple[SamplingParams, int]:
    """The fields both endpoints share (OpenAI's plus vLLM's extras); SamplingParams checks the ranges it owns.
    Returns the params and n, the choices to return (params.n samples best_of of them)."""
    bias = body.get("logit_bias")
    if bias is not None:
        obj(bias, "logit_bias")
    n = integer(body, "n", 1, 1, MAX_N)
    best_of = integer(body, "best_of", None, 1, MAX_N)
    if best_of is not None and best_of < n:
        raise bad("best_of", f"best_of ({best_of}) must be at least n ({n})")
    if best_of is not None and best_of > n and stream:
        raise bad("best_of", "best_of cannot be streamed: the best are known only once all have finished")
    samples = max(best_of or n, n)
    if samples > n and logprobs is None:
        logprobs = 0  # the sample's cumulative logprob ranks it; the per-token logprobs are left out of the reply
    bad_words = body.get("bad_words")
    if bad_words is not None and not (isinstance(bad_words, list) and all(isinstance(w, str) and w for w in bad_words)):
        raise bad("bad_words", f"bad_words must be a list of non-empty strings, got {short(bad_words)}")
    skip = boolean(body, "skip_special_tokens", True) if skip_special_tokens is None else skip_special_tokens
    _spaces_between_special_tokens(body, skip)
    kwargs = dict(
        n=samples,
        temperature=number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        presence_penalty=number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        seed=integer(body, "seed", None, -(2**63), 2**63 - 1),
        stop=strings(body, "stop"),
        logit_bias=bias,
        top_k=integer(body, "top_k", -1),
        min_p=number(body, "min_p", 0.0),
        repetition_penalty=number(body, "repetition_penalty", 1.0),
        min_tokens=integer(body, "min_tokens", 0),
        ignore_eos=boolean(body, "ignore_eos", False),
        stop_token_ids=token_id_list(body, "stop_token_ids", vocab_size),
        skip_special_tokens=skip,
        include_stop_str_in_output=boolean(body, "include_stop_str_in_output", False),
        bad_words=bad_words,
        allowed_token_ids=token_id_list(body, "allowed_token_ids", vocab_size, allow_empty=False),
        max_tokens=max_tokens,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        structured_outputs=None if constraint is None else constraint.params,
    )
    try:
        params = SamplingParams(**kwargs)
        params.check_vocab(vocab_size)
    except ValueError as e:
        # SamplingParams' messages start with the field at fault; a few are named otherwise in a request.
        name = re.match(r"[a-z_]*", str(e)).group(0)
        param = {
            "logprobs": logprobs_param,
            "max_tokens": max_tokens_param,
            "n": "best_of" if samples > n else "n",
            "structured_outputs": None if constraint is None else constraint.param,
        }.get(name, name if name in kwargs else None)
        raise bad(param, str(e)) from None
    return params, n


def max_tokens_field(body: dict, names: tuple[str, ...]) -> tuple[int | None, str]:
    """The first of `names` that is set (chat: max_completion_tokens, then the older max_tokens)."""
    for name in names:
        if body.get(name) is not None:
            return integer(body, name, None, 1), name
    return None, names[-1]
