"""The OpenAI request layer, free of any HTTP library: JSON bodies in, GenerationRequests (engine prompts +
SamplingParams) out (responses.py turns the engine's outputs back into OpenAI's JSON shapes).

Every bad request raises ApiError(400, param=<the field at fault>), as OpenAI does; the fields, ranges and shapes
follow the README's "The endpoint's contract" (where OpenAI and vLLM differ, OpenAI). Every field an endpoint
reads is in its *_FIELDS set below; fields.py refuses the ones this server does not implement.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tokenizers.models import BPE

from app.server import chat
from app.server.chat import ReplyFormat
from app.server.fields import (
    ApiError,
    bad,
    boolean,
    integer,
    is_int,
    log_ignored,
    obj,
    refuse_unsupported,
    short,
    token_ids,
)
from app.server.reasoning import think_state
from app.server.sampling import max_tokens_field, sampling_params, stream_flags
from app.server.structured import after_reasoning, read_constraint
from app.server.tool_parsers import tool_format
from engine import ChatTemplateError, SamplingParams, TokensPrompt
from engine.prompts import has_chat_template, render_chat_text
from engine.sampling_params import MAX_LOGPROBS

# Fill-in-the-middle token names (StarCoder/SantaCoder style, then Qwen2.5-Coder style): prefix, suffix, middle.
_FIM_TOKENS = (("<fim_prefix>", "<fim_suffix>", "<fim_middle>"), ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"))

# The fields each endpoint reads (anything else is refused by fields.refuse_unsupported, accepted as bookkeeping,
# or logged as unknown).
_COMMON_FIELDS = frozenset(
    {"model", "n", "best_of", "temperature", "top_p", "presence_penalty", "frequency_penalty", "seed", "stop",
     "logit_bias", "top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids",
     "skip_special_tokens", "spaces_between_special_tokens", "include_stop_str_in_output", "bad_words",
     "allowed_token_ids", "prompt_logprobs", "truncate_prompt_tokens", "stream", "stream_options", "logprobs",
     "max_tokens", "echo", "add_special_tokens", "return_tokens_as_token_ids", "request_id", "response_format",
     "structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
     "guided_whitespace_pattern"}
)  # fmt: skip
COMPLETION_FIELDS = _COMMON_FIELDS | {"prompt", "suffix"}
CHAT_FIELDS = _COMMON_FIELDS | {
    "messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls",
    "chat_template", "chat_template_kwargs", "add_generation_prompt", "continue_final_message", "documents",
    "reasoning_effort",
}  # fmt: skip


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
    n: int = 1  # choices per prompt; params.n samples more with best_of, the n best of them are returned
    continuous_usage: bool = False  # stream_options.continuous_usage_stats: usage so far in every chunk
    prompt_logprobs: int | None = None  # vLLM's prompt_logprobs: reported in their own field
    tokens_as_ids: bool = False  # return_tokens_as_token_ids: logprobs name tokens "token_id:<id>"
    request_id: str | None = None  # the client's own id for the response (vLLM's request_id)
    reply: ReplyFormat = field(default_factory=ReplyFormat)  # chat: reasoning, tool calls, echo
    constraint_param: str | None = None  # the field a grammar the engine cannot compile is blamed on


def _check_model(body: dict, model: ModelInfo) -> None:
    name = body.get("model")
    if name is not None and name != model.name:
        raise ApiError(
            404,
            f"the model {short(name)} does not exist; this server serves {model.name!r}",
            param="model",
            code="model_not_found",
        )


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
        raise bad(
            param,
            f"the prompt is {len(text):,} characters long, more than the context of {model.max_model_len} tokens "
            f"can hold (no token of this model stands for more than {bound} characters)",
            code="context_length_exceeded",
        )


def _check_context(model: ModelInfo, prompt_len: int, max_tokens: int, prompt_param: str) -> None:
    if prompt_len >= model.max_model_len:
        raise bad(
            prompt_param,
            f"the prompt has {prompt_len} tokens, which leaves no room to generate within the "
            f"context of {model.max_model_len} tokens",
            code="context_length_exceeded",
        )
    if prompt_len + max_tokens > model.max_model_len:
        raise bad(
            "max_tokens",
            f"the prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) is over the "
            f"context of {model.max_model_len} tokens",
            code="context_length_exceeded",
        )


def _truncation(body: dict, model: ModelInfo) -> int | None:
    """truncate_prompt_tokens: keep the prompt's last N tokens (vLLM's; -1 is the model's context length)."""
    value = body.get("truncate_prompt_tokens")
    if value is None:
        return None
    if not is_int(value) or not (value == -1 or 1 <= value <= model.max_model_len):
        raise bad(
            "truncate_prompt_tokens",
            f"truncate_prompt_tokens must be -1 or an integer in [1, {model.max_model_len}], got {short(value)}",
        )
    return model.max_model_len if value == -1 else value


def _prompt(ids: list[int], text: str | None, truncate: int | None) -> TokensPrompt:
    """The engine prompt, its first tokens dropped when truncate keeps fewer (its text is then decoded from what
    is kept, where needed)."""
    if truncate is not None and len(ids) > truncate:
        return TokensPrompt(prompt_token_ids=ids[-truncate:], prompt=None)
    return TokensPrompt(prompt_token_ids=ids, prompt=text)


def _prompt_logprobs(body: dict) -> int | None:
    return integer(body, "prompt_logprobs", None, 0, MAX_LOGPROBS)


def _request_id(body: dict) -> str | None:
    value = body.get("request_id")
    if value is not None and not (isinstance(value, str) and value and value.isprintable() and len(value) <= 128):
        raise bad("request_id", "request_id must be a printable string of at most 128 characters")
    return value


# ---- /v1/completions ----------------------------------------------------------------------------------------------


def _fim_tokens(tokenizer) -> tuple[str, str, str] | None:
    vocab = tokenizer.get_vocab()
    return next((names for names in _FIM_TOKENS if all(n in vocab for n in names)), None)


def _completion_prompts(body: dict, model: ModelInfo, echo: bool) -> list[dict]:
    """prompt: str | [str] | [int] | [[int]] -> one engine prompt each, with suffix as a PSM fill-in-the-middle."""
    prompt = body.get("prompt")
    if prompt is None:
        raise bad("prompt", "prompt is required")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(is_int(t) for t in prompt)):
        prompt = [prompt]
    if (
        not isinstance(prompt, list)
        or not prompt
        or not (all(isinstance(p, str) for p in prompt) or all(isinstance(p, list) for p in prompt))
    ):
        raise bad(
            "prompt", "prompt must be a non-empty string, list of strings, list of token ids or list of token id lists"
        )
    suffix = body.get("suffix")
    if suffix is not None and not isinstance(suffix, str):
        raise bad("suffix", f"suffix must be a string, got {short(suffix)}")
    fim = _fim_tokens(model.tokenizer) if suffix is not None else None
    if suffix and fim is None:
        raise bad("suffix", f"{model.name} has no fill-in-the-middle tokens, so suffix is not supported")
    if fim is not None and not isinstance(prompt[0], str):
        raise bad("suffix", "suffix needs the prompt as text, not token ids")
    if fim is not None and echo:
        raise bad("echo", "echo cannot be combined with suffix")
    truncate = _truncation(body, model)
    add_special_tokens = boolean(body, "add_special_tokens", True)
    prompts = []
    for p in prompt:
        if isinstance(p, str):
            text = f"{fim[0]}{p}{fim[1]}{suffix}{fim[2]}" if fim else p
            if truncate is None:
                _check_text_fits(model, text, "prompt")
            ids = model.tokenizer.encode(text, add_special_tokens=add_special_tokens)
            prompts.append(_prompt(ids, p, truncate))
        else:
            if not token_ids(p, model.vocab_size):
                raise bad("prompt", f"token id prompts must be lists of token ids in [0, {model.vocab_size})")
            prompts.append(_prompt(list(p), None, truncate))
        if not prompts[-1]["prompt_token_ids"]:
            raise bad("prompt", "the prompt is empty")
    return prompts


def parse_completion_request(body: Any, model: ModelInfo) -> GenerationRequest:
    body = obj(body)
    _check_model(body, model)
    refuse_unsupported(body)
    log_ignored(body, COMPLETION_FIELDS)
    echo = boolean(body, "echo", False)
    prompts = _completion_prompts(body, model, echo)
    stream, include_usage, continuous = stream_flags(body)
    logprobs = integer(body, "logprobs", None, 0, MAX_LOGPROBS)
    prompt_logprobs = _prompt_logprobs(body)
    max_tokens, name = max_tokens_field(body, ("max_tokens",))
    max_tokens = 16 if max_tokens is None else max_tokens
    constraint = read_constraint(body)
    # An echo's logprobs are the prompt's: the engine's prompt logprobs, at least as many as the reply's.
    engine_prompt_logprobs = max(prompt_logprobs or 0, logprobs or 0) if echo and logprobs is not None else None
    if prompt_logprobs is not None:
        engine_prompt_logprobs = max(prompt_logprobs, engine_prompt_logprobs or 0)
    params, n = sampling_params(
        body, model.vocab_size, max_tokens, logprobs, engine_prompt_logprobs, "logprobs", name, stream, constraint
    )
    for p in prompts:
        _check_context(model, len(p["prompt_token_ids"]), max_tokens, "prompt")
    return GenerationRequest(
        "completion",
        prompts,
        params,
        stream,
        include_usage,
        echo,
        logprobs,
        model.name,
        n=n,
        continuous_usage=continuous,
        prompt_logprobs=prompt_logprobs,
        tokens_as_ids=boolean(body, "return_tokens_as_token_ids", False),
        request_id=_request_id(body),
        constraint_param=None if constraint is None else constraint.param,
    )


# ---- /v1/chat/completions -----------------------------------------------------------------------------------------


def _render(model: ModelInfo, conversation: list[dict], tools: list[dict] | None, options: dict) -> str:
    if options["chat_template"] is None and not has_chat_template(model.tokenizer):
        raise bad("messages", f"{model.name} has no chat template: use /v1/completions")
    try:
        return render_chat_text(model.tokenizer, conversation, tools=tools, **options)
    except ChatTemplateError as e:
        raise bad("messages", str(e)) from None


def parse_chat_request(body: Any, model: ModelInfo) -> GenerationRequest:
    body = obj(body)
    _check_model(body, model)
    refuse_unsupported(body)
    log_ignored(body, CHAT_FIELDS)
    if body.get("messages") is None:
        raise bad("messages", "messages is required")
    conversation = chat.messages(body["messages"])
    tools = chat.read_tools(body)
    options = chat.template_options(body, getattr(model.tokenizer, "chat_template", None))
    constraint = read_constraint(body)
    if constraint is not None and tools.choice not in ("none", "auto"):
        raise bad(constraint.param, f"{constraint.param} cannot be combined with a tool_choice that forces a call")
    truncate = _truncation(body, model)
    text = _render(model, conversation, tools.tools, options)
    if truncate is None:
        _check_text_fits(model, text, "messages")
    ids = model.tokenizer.encode(text, add_special_tokens=boolean(body, "add_special_tokens", False))
    prompt = _prompt(ids, text, truncate)
    ids = prompt["prompt_token_ids"]
    think = think_state(model.tokenizer, ids)
    fmt = tool_format(model.tokenizer) if tools.tools and tools.choice != "none" else None
    if constraint is not None:
        constraint = after_reasoning(constraint, think)
    elif fmt is not None:
        constraint = chat.tool_grammar(tools, fmt, think)
    echo = boolean(body, "echo", False) and conversation[-1]["role"] == "assistant"
    reply = ReplyFormat(think and think.state, fmt, tools.parallel, conversation[-1]["content"] if echo else "")
    stream, include_usage, continuous = stream_flags(body)
    want_logprobs = boolean(body, "logprobs", False)
    top = integer(body, "top_logprobs", None, 0, MAX_LOGPROBS)
    if top is not None and not want_logprobs:
        raise bad("top_logprobs", "top_logprobs needs logprobs set to true")
    logprobs = (top or 0) if want_logprobs else None
    max_tokens, name = max_tokens_field(body, ("max_completion_tokens", "max_tokens"))
    if max_tokens is None:  # unset: whatever the context leaves
        _check_context(model, len(ids), 0, "messages")
        max_tokens = model.max_model_len - len(ids)
    prompt_logprobs = _prompt_logprobs(body)
    # The syntax the reply is parsed by must be in its text: special tokens it is written with are decoded.
    keep_special = (fmt is not None and fmt.keeps_special_tokens) or (think is not None and think.special)
    params, n = sampling_params(
        body,
        model.vocab_size,
        max_tokens,
        logprobs,
        prompt_logprobs,
        "top_logprobs",
        name,
        stream,
        constraint,
        False if keep_special else None,
    )
    _check_context(model, len(ids), max_tokens, "messages")
    return GenerationRequest(
        "chat",
        [prompt],
        params,
        stream,
        include_usage,
        False,
        logprobs,
        model.name,
        n=n,
        continuous_usage=continuous,
        prompt_logprobs=prompt_logprobs,
        tokens_as_ids=boolean(body, "return_tokens_as_token_ids", False),
        request_id=_request_id(body),
        reply=reply,
        constraint_param=None if constraint is None else constraint.param,
    )


# ---- /tokenize, /detokenize, /v1/models ---------------------------------------------------------------------------


def tokenize_response(body: Any, model: ModelInfo) -> dict:
    """vLLM's /tokenize: {"prompt": str} (add_special_tokens defaults to true) or {"messages": [...]} through the
    chat template (add_generation_prompt defaults to true, add_special_tokens to false: the template has them).
    Texts longer than the context are counted too: telling how long they are is what /tokenize is for."""
    body = obj(body)
    _check_model(body, model)
    if body.get("messages") is not None:
        options = chat.template_options(body, getattr(model.tokenizer, "chat_template", None))
        text = _render(model, chat.messages(body["messages"]), chat.read_tools(body).tools, options)
        ids = model.tokenizer.encode(text, add_special_tokens=boolean(body, "add_special_tokens", False))
    else:
        text = body.get("prompt")
        if not isinstance(text, str):
            raise bad("prompt", "prompt (a string) or messages is required")
        ids = model.tokenizer.encode(text, add_special_tokens=boolean(body, "add_special_tokens", True))
    return {"tokens": ids, "count": len(ids), "max_model_len": model.max_model_len}


def detokenize_response(body: Any, model: ModelInfo) -> dict:
    body = obj(body)
    _check_model(body, model)
    tokens = body.get("tokens")
    if not token_ids(tokens, model.vocab_size):
        raise bad("tokens", f"tokens must be a list of token ids in [0, {model.vocab_size})")
    return {"prompt": model.tokenizer.decode(tokens)}


def model_card(model: ModelInfo) -> dict:
    return {
        "id": model.name,
        "object": "model",
        "created": model.created,
        "owned_by": "kvstudio",
        "max_model_len": model.max_model_len,
    }
