"""Reading a request's JSON fields: each reader checks one field's type (and range) and names it in the error.

Every bad field raises ApiError(400, param=<the field at fault>), as OpenAI does. Which fields each endpoint reads,
which it accepts without their changing anything, and which it refuses, is listed in the README's "The endpoint's
contract"; FIELDS_REFUSED below is the refused part.
"""

from __future__ import annotations

import logging
import math
from typing import Any

logger = logging.getLogger("kvstudio.server")


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


def bad(param: str | None, message: str, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return (is_int(value) or isinstance(value, float)) and not math.isnan(value)


def number(
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
        is_number(value) and (lo is None or (value > lo if lo_open else value >= lo)) and (hi is None or value <= hi)
    ):
        span = f"{'(' if lo_open else '['}{lo}, {hi}]" if lo is not None and hi is not None else "a number"
        raise bad(name, f"{name} must be a number in {span}, got {short(value)}")
    return float(value)


def integer(body: dict, name: str, default: int | None, lo: int | None = None, hi: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if not is_int(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
        span = f" in [{lo}, {hi}]" if hi is not None else f" >= {lo}" if lo is not None else ""
        raise bad(name, f"{name} must be an integer{span}, got {short(value)}")
    return value


def boolean(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(name, f"{name} must be true or false, got {short(value)}")
    return value


def string(body: dict, name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise bad(name, f"{name} must be a string, got {short(value)}")
    return value


def obj(body: Any, name: str | None = None) -> dict:
    if not isinstance(body, dict):
        what = f"{name} must be" if name else "the request body must be"
        raise bad(name, f"{what} a JSON object, got {type(body).__name__}")
    return body


def strings(body: dict, name: str) -> list[str] | None:
    """A non-empty string or a list of them (stop), as a list."""
    value = body.get(name)
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise bad(name, f"{name} must be a non-empty string or a list of them, got {short(value)}")
    return items


def token_ids(value: Any, vocab_size: int) -> bool:
    return isinstance(value, list) and all(is_int(t) and 0 <= t < vocab_size for t in value)


def token_id_list(body: dict, name: str, vocab_size: int, allow_empty: bool = True) -> list[int] | None:
    value = body.get(name)
    if value is None:
        return None
    if not token_ids(value, vocab_size) or (not value and not allow_empty):
        what = "a non-empty list" if not allow_empty else "a list"
        raise bad(name, f"{name} must be {what} of token ids in [0, {vocab_size})")
    return value


# ---- fields no request may set -------------------------------------------------------------------------------------

# OpenAI's and vLLM's request fields this server does not implement: a request that sets one (to anything but its
# default, the value in the pair) is refused, naming it, rather than answered as if it had not been sent.
_NOT_SET = object()
FIELDS_REFUSED: dict[str, tuple[Any, str]] = {
    "use_beam_search": (False, "beam search is not served over HTTP; use LLM.beam_search"),
    "length_penalty": (1.0, "length_penalty only applies to beam search, which is not served over HTTP"),
    "early_stopping": (False, "early_stopping only applies to beam search, which is not served over HTTP"),
    "priority": (0, "the scheduler has no priorities: every request is first come, first served"),
    "logits_processors": (_NOT_SET, "custom logits processors cannot be sent over HTTP"),
    "cache_salt": (_NOT_SET, "the prefix cache is shared by every request of this server; it takes no salt"),
    "kv_transfer_params": (_NOT_SET, "KV cache transfer is not supported"),
    "vllm_xargs": (_NOT_SET, "vllm_xargs is not supported"),
    "mm_processor_kwargs": (_NOT_SET, "this server takes text only"),
    "prompt_embeds": (_NOT_SET, "prompts are text or token ids; embeddings are not accepted"),
    "return_token_ids": (False, "return_token_ids is not supported; /tokenize gives a prompt's ids"),
    "functions": (_NOT_SET, "functions is OpenAI's deprecated form: send tools"),
    "function_call": (_NOT_SET, "function_call is OpenAI's deprecated form: send tool_choice"),
    "audio": (_NOT_SET, "this server generates text only"),
    "prediction": (_NOT_SET, "predicted outputs are not supported"),
    "web_search_options": (_NOT_SET, "web search is not supported"),
    "verbosity": (_NOT_SET, "verbosity is not supported: ask for brevity in the prompt"),
    "guided_decoding_backend": (_NOT_SET, "the grammar engine is llguidance; it cannot be chosen"),
}
# Accepted values of a few of them, beside their default.
_ALSO_ACCEPTED = {"guided_decoding_backend": ("auto", "guidance", "llguidance")}
# Fields that change nothing in the reply by their nature (bookkeeping, billing, storage at OpenAI): accepted and
# not used. Every other field not read by the endpoint is logged as ignored.
FIELDS_BOOKKEEPING = frozenset(
    {"user", "store", "metadata", "service_tier", "prompt_cache_key", "safety_identifier", "model"}
)


def refuse_unsupported(body: dict) -> None:
    for name, (default, why) in FIELDS_REFUSED.items():
        value = body.get(name)
        if value in (None, [], {}) or value == default or value in _ALSO_ACCEPTED.get(name, ()):
            continue
        raise bad(name, f"{name} is not supported by this server: {why}")
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise bad("modalities", 'this server generates text only: modalities must be ["text"]')


def log_ignored(body: dict, read: frozenset[str]) -> None:
    """Fields neither read nor known: logged (as vLLM does), not refused, since clients keep adding fields."""
    ignored = sorted(set(body) - read - FIELDS_BOOKKEEPING - set(FIELDS_REFUSED) - {"modalities"})
    if ignored:
        logger.warning("request fields ignored (unknown to this server): %s", ", ".join(ignored))
