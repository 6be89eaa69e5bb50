"""The OpenAI request layer, free of any HTTP library: JSON bodies in, GenerationRequests (engine prompts +
SamplingParams) out (responses.py turns the engine's outputs back into OpenAI's JSON shapes).

Every bad request raises ApiError(400, param=<the field at fault>), as OpenAI does; the fields, ranges and shapes
follow the README's "The endpoint's contract" (where OpenAI and vLLM differ, OpenAI).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from tokenizers.models import BPE

from engine import ChatTemplateError, SamplingParams, TokensPrompt, render_chat
from engine.prompts import has_chat_template
from engine.sampling_params import MAX_LOGPROBS

# More samples than this from a local server is a mistake rather than a use; it would crowd out every other client.
MAX_N = 16
# Fill-in-the-middle token names (StarCoder/SantaCoder style, then Qwen2.5-Coder style): prefix, suffix, middle.
_FIM_TOKENS = (("<fim_prefix>", "<fim_suffix>", "<fim_middle>"), ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"))
_CHAT_ROLES = ("system", "user", "assistant", "tool")


class ApiError(Exception):
    """An error the client sees as OpenAI's {"error": {...}} body with this HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def longest_token_chars(tokenizer) -> int | None:
    """The most characters of text one token can stand for, or None when nothing bounds it.

    A token's vocabulary string is at least as long as the text it covers in a BPE model that keeps every byte:
    byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM: one symbol per byte, and a character takes one byte or more)
    and SentencePiece BPE with byte fallback (Llama 2, Mistral: '▁' for a space, '<0xNN>' for a byte). A model
    that maps unknown text to an unknown token can fold a run of any length into one token, so it has no bound.
    """
    model = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
    if not isinstance(model, BPE) or (model.unk_token is not None and not model.byte_fallback):
        return None
    return max(map(len, tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))))


@dataclass(frozen=True)
class ModelInfo:
    name: str  # the served model name, what "model" must equal
    tokenizer: Any  # the HF tokenizer
    max_model_len: int
    vocab_size: int
    created: int
    # longest_token_chars(tokenizer), computed once: a text longer than max_model_len times this cannot fit the
    # context, which refuses a huge prompt without tokenizing it.
    max_token_chars: int | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_token_chars", longest_token_chars(self.tokenizer))


@dataclass
class GenerationRequest:
    kind: str  # "completion" | "chat"
    prompts: list[dict]  # engine prompts {"prompt_token_ids", "prompt"}: one per prompt, chat has one
    params: SamplingParams
    stream: bool
    include_usage: bool
    echo: bool  # completions: the prompt's text (and logprobs) go before each choice's
    logprobs: int | None  # top-N per token (completions' int, chat's top_logprobs), None when not asked
    model: str


# ---- field readers: each checks one field's type (and range) and names it in the error ----------------------------


def _bad(param: str, message: str, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and not math.isnan(value)


def _number(
    body: dict,
    name: str,
    default: float | None,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
) -> float | None:
    value = body.get(name)
    if value is None:
        return default
    if not (
        _is_number(value) and (lo is None or (value > lo if lo_open else value >= lo)) and (hi is None or value <= hi)
    ):
        span = f"{'(' if lo_open else '['}{lo}, {hi}]" if lo is not None and hi is not None else "a number"
        raise _bad(name, f"{name} must be a number in {span}, got {_short(value)}")
    return float(value)


def _int(body: dict, name: str, default: int | None, lo: int | None = None, hi: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
        span = f" in [{lo}, {hi}]" if hi is not None else f" >= {lo}" if lo is not None else ""
        raise _bad(name, f"{name} must be an integer{span}, got {_short(value)}")
    return value


def _bool(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(name, f"{name} must be true or false, got {_short(value)}")
    return value


def _object(body: Any, name: str | None = None) -> dict:
    if not isinstance(body, dict):
        what = f"{name} must be" if name else "the request body must be"
        raise _bad(name, f"{what} a JSON object, got {type(body).__name__}")
    return body


def _check_model(body: dict, model: ModelInfo) -> None:
    name = body.get("model")
    if name is not None and name != model.name:
        raise ApiError(
            404,
            f"the model {_short(name)} does not exist; this server serves {model.name!r}",
            param="model",
            code="model_not_found",
        )


def _stream_flags(body: dict) -> tuple[bool, bool]:
    stream = _bool(body, "stream", False)
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise _bad("stream_options", "stream_options is only allowed when stream is true")
    return stream, _bool(_object(options, "stream_options"), "include_usage", False)


def _stop(body: dict) -> list[str] | None:
    stop = body.get("stop")
    if stop is None:
        return None
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise _bad("stop", f"stop must be a non-empty string or a list of them, got {_short(stop)}")
    return stops


def _token_ids(value: Any, vocab_size: int) -> bool:
    return isinstance(value, list) and all(_is_int(t) and 0 <= t < vocab_size for t in value)


# ---- sampling parameters ------------------------------------------------------------------------------------------

# SamplingParams' messages start with the field at fault; these are named differently in a request.
_PARAM_OF_FIELD = {"prompt_logprobs": "logprobs"}


def _sampling_params(
    body: dict,
    model: ModelInfo,
    max_tokens: int,
    logprobs: int | None,
    prompt_logprobs: int | None,
    logprobs_param: str,
    max_tokens_param: str,
) -> SamplingParams:
    """The fields both endpoints share (OpenAI's plus vLLM's extras); SamplingParams checks the ranges it owns."""
    bias = body.get("logit_bias")
    if bias is not None:
        _object(bias, "logit_bias")
    stop_token_ids = body.get("stop_token_ids")
    if stop_token_ids is not None and not _token_ids(stop_token_ids, model.vocab_size):
        raise _bad("stop_token_ids", f"stop_token_ids must be a list of token ids in [0, {model.vocab_size})")
    kwargs = dict(
        n=_int(body, "n", 1, 1, MAX_N),
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        seed=_int(body, "seed", None, -(2**63), 2**63 - 1),
        stop=_stop(body),
        logit_bias=bias,
        top_k=_int(body, "top_k", -1),
        min_p=_number(body, "min_p", 0.0),
        repetition_penalty=_number(body, "repetition_penalty", 1.0),
        min_tokens=_int(body, "min_tokens", 0),
        ignore_eos=_bool(body, "ignore_eos", False),
        stop_token_ids=stop_token_ids,
        skip_special_tokens=_bool(body, "skip_special_tokens", True),
        include_stop_str_in_output=_bool(body, "include_stop_str_in_output", False),
        max_tokens=max_tokens,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
    )
    try:
        params = SamplingParams(**kwargs)
        params.check_vocab(model.vocab_size)
    except ValueError as e:
        field = re.match(r"[a-z_]*", str(e)).group(0)
        param = {"logprobs": logprobs_param, "max_tokens": max_tokens_param}.get(field, _PARAM_OF_FIELD.get(field))
        raise _bad(param or (field if field in kwargs else None), str(e)) from None
    return params


def _max_tokens(body: dict, names: tuple[str, ...]) -> tuple[int | None, str]:
    """The first of `names` that is set (chat: max_completion_tokens, then the older max_tokens)."""
    for name in names:
        if body.get(name) is not None:
            return _int(body, name, None, 1), name
    return None, names[-1]


def _check_text_fits(model: ModelInfo, text: str, param: str) -> None:
    """Refuse, without tokenizing it, a text too long for the context whatever its tokens: tokenizing megabytes
    takes seconds of a worker thread only to be refused by _check_context."""
    bound = model.max_token_chars
    if bound is None or len(text) <= model.max_model_len * bound:
        return
    # The bound holds for the text the tokenizer's model sees, after its normalizer (Unicode composition can
    # shorten it); normalizing is a cheap pass next to tokenizing.
    normalizer = model.tokenizer.backend_tokenizer.normalizer
    chars = len(text) if normalizer is None else len(normalizer.normalize_str(text))
    if chars > model.max_model_len * bound:
        raise _bad(
            param,
            f"the prompt is {len(text):,} characters long, more than the context of {model.max_model_len} tokens "
            f"can hold (no token of this model stands for more than {bound} characters)",
            code="context_length_exceeded",
        )


class _FittingTokenizer:
    """The model's tokenizer, whose encode refuses a text that cannot fit the context before tokenizing it:
    render_chat renders the conversation, then tokenizes it through this."""

    def __init__(self, model: ModelInfo, param: str) -> None:
        self._model, self._param = model, param

    def encode(self, text: str, **kwargs) -> list[int]:
        _check_text_fits(self._model, text, self._param)
        return self._model.tokenizer.encode(text, **kwargs)

    def __getattr__(self, name: str) -> Any:  # the chat template and everything else: the model's tokenizer
        return getattr(self._model.tokenizer, name)


def _check_context(model: ModelInfo, prompt_len: int, max_tokens: int, prompt_param: str) -> None:
    if prompt_len >= model.max_model_len:
        raise _bad(
            prompt_param,
            f"the prompt has {prompt_len} tokens, which leaves no room to generate within the "
            f"context of {model.max_model_len} tokens",
            code="context_length_exceeded",
        )
    if prompt_len + max_tokens > model.max_model_len:
        raise _bad(
            "max_tokens",
            f"the prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) is over the "
            f"context of {model.max_model_len} tokens",
            code="context_length_exceeded",
        )


# ---- /v1/completions ----------------------------------------------------------------------------------------------


def _fim_tokens(tokenizer) -> tuple[str, str, str] | None:
    vocab = tokenizer.get_vocab()
    return next((names for names in _FIM_TOKENS if all(n in vocab for n in names)), None)


def _completion_prompts(body: dict, model: ModelInfo, echo: bool) -> list[dict]:
    """prompt: str | [str] | [int] | [[int]] -> one engine prompt each, with suffix as a PSM fill-in-the-middle."""
    prompt = body.get("prompt")
    if prompt is None:
        raise _bad("prompt", "prompt is required")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt)):
        prompt = [prompt]
    if (
        not isinstance(prompt, list)
        or not prompt
        or not (all(isinstance(p, str) for p in prompt) or all(isinstance(p, list) for p in prompt))
    ):
        raise _bad(
            "prompt", "prompt must be a non-empty string, list of strings, list of token ids or list of token id lists"
        )
    suffix = body.get("suffix")
    if suffix is not None and not isinstance(suffix, str):
        raise _bad("suffix", f"suffix must be a string, got {_short(suffix)}")
    fim = _fim_tokens(model.tokenizer) if suffix is not None else None
    if suffix and fim is None:
        raise _bad("suffix", f"{model.name} has no fill-in-the-middle tokens, so suffix is not supported")
    if fim is not None and not isinstance(prompt[0], str):
        raise _bad("suffix", "suffix needs the prompt as text, not token ids")
    if fim is not None and echo:
        raise _bad("echo", "echo cannot be combined with suffix")
    prompts = []
    for p in prompt:
        if isinstance(p, str):
            text = f"{fim[0]}{p}{fim[1]}{suffix}{fim[2]}" if fim else p
            _check_text_fits(model, text, "prompt")
            ids = model.tokenizer.encode(text, add_special_tokens=True)
            prompts.append({"prompt_token_ids": ids, "prompt": p})
        else:
            if not _token_ids(p, model.vocab_size):
                raise _bad("prompt", f"token id prompts must be lists of token ids in [0, {model.vocab_size})")
            prompts.append({"prompt_token_ids": list(p), "prompt": None})
        if not prompts[-1]["prompt_token_ids"]:
            raise _bad("prompt", "the prompt is empty")
    return prompts


def parse_completion_request(body: Any, model: ModelInfo) -> GenerationRequest:
    body = _object(body)
    _check_model(body, model)
    echo = _bool(body, "echo", False)
    prompts = _completion_prompts(body, model, echo)
    stream, include_usage = _stream_flags(body)
    logprobs = _int(body, "logprobs", None, 0, MAX_LOGPROBS)
    max_tokens, name = _max_tokens(body, ("max_tokens",))
    max_tokens = 16 if max_tokens is None else max_tokens
    params = _sampling_params(body, model, max_tokens, logprobs, logprobs if echo else None, "logprobs", name)
    for p in prompts:
        _check_context(model, len(p["prompt_token_ids"]), max_tokens, "prompt")
    return GenerationRequest("completion", prompts, params, stream, include_usage, echo, logprobs, model.name)


# ---- /v1/chat/completions -----------------------------------------------------------------------------------------


def _message(m: Any, i: int) -> dict:
    """One message for the chat template: content as one string (text parts joined by newlines, as vLLM does)."""
    if not isinstance(m, dict) or m.get("role") not in _CHAT_ROLES:
        raise _bad("messages", f"messages[{i}] must be an object whose role is one of {', '.join(_CHAT_ROLES)}")
    content = m.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise _bad(
                "messages",
                f'messages[{i}].content parts must be {{"type": "text", "text": ...}}: this server takes text only',
            )
        content = "\n".join(p["text"] for p in content)
    elif content is None and m["role"] == "assistant" and m.get("tool_calls"):
        content = ""
    elif not isinstance(content, str):
        raise _bad("messages", f"messages[{i}].content must be a string or a list of text parts")
    out = {"role": m["role"], "content": content}
    out.update({k: m[k] for k in ("name", "tool_calls", "tool_call_id") if m.get(k) is not None})
    return out


def _tools(body: dict) -> list[dict] | None:
    tools = body.get("tools") or None
    if tools is not None and not (
        isinstance(tools, list)
        and all(
            isinstance(t, dict)
            and t.get("type") == "function"
            and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str)
            and t["function"]["name"]
            for t in tools
        )
    ):
        raise _bad("tools", 'tools must be a list of {"type": "function", "function": {"name": ..., ...}}')
    choice = body.get("tool_choice")
    if choice is None:
        return tools
    if tools is None:
        raise _bad("tool_choice", "tool_choice is only allowed when tools are given")
    names = {t["function"]["name"] for t in tools}
    named = (
        choice["function"].get("name")
        if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict)
        else None
    )
    if choice not in ("none", "auto", "required") and named not in names:
        raise _bad(
            "tool_choice",
            f"tool_choice must be none, auto, required or a function among the tools, got {_short(choice)}",
        )
    return tools


def _check_response_format(body: dict) -> None:
    """Accepted but not enforced: there is no constrained decoding yet, so json_object and json_schema only pass
    the check (the prompt has to ask for JSON, as with OpenAI's json_object)."""
    fmt = body.get("response_format")
    if fmt is None:
        return
    kind = _object(fmt, "response_format").get("type")
    if kind == "json_schema":
        schema = fmt.get("json_schema")
        if not isinstance(schema, dict) or not isinstance(schema.get("schema"), dict):
            raise _bad("response_format", "response_format json_schema needs json_schema.schema, a JSON schema object")
    elif kind not in ("text", "json_object"):
        raise _bad(
            "response_format", f"response_format type must be text, json_object or json_schema, got {_short(kind)}"
        )


def _chat_prompt(
    messages: Any, model: ModelInfo, tokenizer, tools: list[dict] | None = None, add_generation_prompt: bool = True
) -> TokensPrompt:
    """messages -> the engine prompt, through the model's chat template (which holds its own special tokens),
    tokenized by `tokenizer` (the model's, or one that refuses what cannot fit)."""
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "messages must be a non-empty list")
    conversation = [_message(m, i) for i, m in enumerate(messages)]
    if not has_chat_template(model.tokenizer):
        raise _bad("messages", f"{model.name} has no chat template: use /v1/completions")
    try:
        return render_chat(tokenizer, conversation, tools=tools, add_generation_prompt=add_generation_prompt)
    except ChatTemplateError as e:
        raise _bad("messages", str(e)) from None


def parse_chat_request(body: Any, model: ModelInfo) -> GenerationRequest:
    body = _object(body)
    _check_model(body, model)
    if body.get("messages") is None:
        raise _bad("messages", "messages is required")
    _check_response_format(body)
    prompt = _chat_prompt(body["messages"], model, _FittingTokenizer(model, "messages"), _tools(body))
    stream, include_usage = _stream_flags(body)
    want_logprobs = _bool(body, "logprobs", False)
    top = _int(body, "top_logprobs", None, 0, MAX_LOGPROBS)
    if top is not None and not want_logprobs:
        raise _bad("top_logprobs", "top_logprobs needs logprobs set to true")
    logprobs = (top or 0) if want_logprobs else None
    prompt_len = len(prompt["prompt_token_ids"])
    max_tokens, name = _max_tokens(body, ("max_completion_tokens", "max_tokens"))
    if max_tokens is None:  # unset: whatever the context leaves
        _check_context(model, prompt_len, 0, "messages")
        max_tokens = model.max_model_len - prompt_len
    params = _sampling_params(body, model, max_tokens, logprobs, None, "top_logprobs", name)
    _check_context(model, prompt_len, max_tokens, "messages")
    return GenerationRequest("chat", [prompt], params, stream, include_usage, False, logprobs, model.name)


# ---- /tokenize, /detokenize, /v1/models ---------------------------------------------------------------------------


def tokenize_response(body: Any, model: ModelInfo) -> dict:
    """vLLM's /tokenize: {"prompt": str} (add_special_tokens defaults to true) or {"messages": [...]} through the
    chat template (add_generation_prompt defaults to true, add_special_tokens to false: the template has them).
    Texts longer than the context are counted too: telling how long they are is what /tokenize is for."""
    body = _object(body)
    _check_model(body, model)
    if body.get("messages") is not None:
        prompt = _chat_prompt(
            body["messages"], model, model.tokenizer, _tools(body), _bool(body, "add_generation_prompt", True)
        )
        ids = prompt["prompt_token_ids"]
        if _bool(body, "add_special_tokens", False):
            ids = model.tokenizer.encode(prompt["prompt"], add_special_tokens=True)
    else:
        text = body.get("prompt")
        if not isinstance(text, str):
            raise _bad("prompt", "prompt (a string) or messages is required")
        ids = model.tokenizer.encode(text, add_special_tokens=_bool(body, "add_special_tokens", True))
    return {"tokens": ids, "count": len(ids), "max_model_len": model.max_model_len}


def detokenize_response(body: Any, model: ModelInfo) -> dict:
    body = _object(body)
    _check_model(body, model)
    tokens = body.get("tokens")
    if not _token_ids(tokens, model.vocab_size):
        raise _bad("tokens", f"tokens must be a list of token ids in [0, {model.vocab_size})")
    return {"prompt": model.tokenizer.decode(tokens)}


def model_card(model: ModelInfo) -> dict:
    return {
        "id": model.name,
        "object": "model",
        "created": model.created,
        "owned_by": "kvstudio",
        "max_model_len": model.max_model_len,
    }
