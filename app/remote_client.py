"""Chat and completion requests streamed from any OpenAI-compatible endpoint (a vLLM cluster, another kvstudio,
a hosted API) instead of the in-process engine, so the desktop app's chat and batch pages can outgrow the
workstation without changing.

One event-loop thread owns an aiohttp session; requests are coroutines on it. Callers on other threads submit
and abort through thread-safe calls and get each request's text as it grows through a callback. RemoteClient is a
request target for the desktop app's pages, beside the in-process engine (ui/request_target.py): the same calls,
the same TextUpdates. Aborting cancels the coroutine, which closes its connection: an OpenAI-compatible server
stops generating for a client that went away.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp

from engine import RequestBlocks, SamplingParams

CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 300  # between two chunks: a long prefill on a busy server can take minutes


class RemoteError(RuntimeError):
    """The endpoint could not be reached, refused the request, or broke off its stream; said in words."""


@dataclass(frozen=True)
class Endpoint:
    base_url: str  # e.g. "http://gpu-box:8000/v1"; a URL without a path gets "/v1"
    api_key: str = ""
    model: str = ""  # the model id to ask for; "" takes the first one the endpoint lists

    def __post_init__(self) -> None:
        url = self.base_url.strip().rstrip("/")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(
                f"the endpoint URL must start with http:// or https:// and name a host, got {self.base_url!r}"
            )
        object.__setattr__(self, "base_url", url if parts.path else url + "/v1")

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@dataclass(frozen=True)
class TextUpdate:
    """A request's reply so far; `finished` on the last one, which carries the finish reason. The in-process engine
    also says how long the prompt was and, for a chat, the KV blocks the request holds; a remote endpoint does not
    (None)."""

    text: str
    num_tokens: int
    finished: bool
    finish_reason: str | None = None
    num_prompt_tokens: int | None = None
    blocks: RequestBlocks | None = None


UpdateCallback = Callable[[TextUpdate | BaseException], None]


def list_models(endpoint: Endpoint, timeout: float = CONNECT_TIMEOUT_S) -> list[str]:
    """The model ids the endpoint serves (GET /models): the connection check. Raises RemoteError in words."""
    request = urllib.request.Request(f"{endpoint.base_url}/models", headers=endpoint.headers())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = json.load(response)
    except urllib.error.HTTPError as e:
        raise RemoteError(f"{endpoint.base_url} answered {e.code}: {_error_message(e.read())}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise RemoteError(f"cannot reach {endpoint.base_url}: {reason}") from None
    except ValueError:
        raise RemoteError(
            f"{endpoint.base_url}/models did not answer with JSON: is this an OpenAI-compatible endpoint?"
        ) from None
    try:
        return [m["id"] for m in body["data"]]
    except (KeyError, TypeError):
        raise RemoteError(f"{endpoint.base_url}/models answered without a model list") from None


def request_body(params: SamplingParams) -> dict:
    """SamplingParams as an OpenAI request's fields. top_k, min_p, repetition_penalty and ignore_eos are vLLM's
    extensions: they go only when set, since strict servers reject fields they do not know."""
    if params.n != 1:
        raise ValueError("a remote request takes n=1")
    body = {
        "temperature": params.temperature,
        "top_p": params.top_p,
        "max_tokens": params.max_tokens,
        "presence_penalty": params.presence_penalty,
        "frequency_penalty": params.frequency_penalty,
    }
    if params.seed is not None:
        body["seed"] = params.seed
    if params.stop_strings:
        body["stop"] = list(params.stop_strings)
    if params.top_k not in (-1, 0):
        body["top_k"] = params.top_k
    if params.min_p > 0:
        body["min_p"] = params.min_p
    if params.repetition_penalty != 1.0:
        body["repetition_penalty"] = params.repetition_penalty
    if params.ignore_eos:
        body["ignore_eos"] = True
    return body


@dataclass
class _Request:
    task: concurrent.futures.Future | None
    callback: UpdateCallback


class RemoteClient:
    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._loop = asyncio.new_event_loop()
        self._session: aiohttp.ClientSession | None = None  # made on the loop: aiohttp binds it there
        self._requests: dict[str, _Request] = {}  # in flight; guarded by _lock
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kvstudio-remote", daemon=True)
        self._thread.start()

    def chat_templated(self) -> bool:
        """Always: the endpoint applies its model's chat template itself."""
        return True

    def chat_route(self) -> tuple[str, str]:
        """How a chat reaches the model: (a short label, the end of a sentence saying where it goes)."""
        return f"Chat · {self.endpoint.model}", f"to {self.endpoint.base_url}"

    def prepare_chat(self, messages: list[dict]) -> list[dict]:
        """The messages as submit_chat sends them: as they are (the endpoint renders them)."""
        return list(messages)

    def submit_chat(
        self, messages: list[dict], params: SamplingParams, callback: UpdateCallback, request_id: str
    ) -> None:
        self._submit("chat/completions", {"messages": messages}, params, callback, request_id)

    def submit_completion(self, prompt: str, params: SamplingParams, callback: UpdateCallback, request_id: str) -> None:
        """Raises ValueError for a prompt that is not text (token ids stay with the in-process engine)."""
        if not isinstance(prompt, str):
            raise ValueError("a remote endpoint takes text prompts")
        self._submit("completions", {"prompt": prompt}, params, callback, request_id)

    def abort(self, request_id: str) -> None:
        """Stop a request (its connection closes); its callback gets nothing more, not even a line the loop had
        already read. Unknown ids are ignored."""
        with self._lock:
            request = self._requests.pop(request_id, None)
        if request is not None and request.task is not None:
            request.task.cancel()

    def close(self) -> None:
        """End the loop thread. Requests still in flight end with a RemoteError saying the connection closed, so
        no caller waits for a reply that will never come. Closing again does nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            requests, self._requests = list(self._requests.values()), {}
        for request in requests:
            request.callback(RemoteError(f"the connection to {self.endpoint.base_url} was closed"))
        # Every coroutine is cancelled and awaited on the loop, then the session closes, before it stops; a dead
        # peer (a timeout) or a loop already gone does not stop the closing.
        with contextlib.suppress(TimeoutError, concurrent.futures.TimeoutError, RuntimeError):
            asyncio.run_coroutine_threadsafe(self._shut_down(), self._loop).result(timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()

    async def _shut_down(self) -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def _submit(
        self, route: str, prompt: dict, params: SamplingParams, callback: UpdateCallback, request_id: str
    ) -> None:
        body = {
            "model": self.endpoint.model,
            **prompt,
            **request_body(params),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        request = _Request(None, callback)
        with self._lock:
            if self._closed:
                raise RemoteError(f"the connection to {self.endpoint.base_url} was closed")
            self._requests[request_id] = request
            # Scheduled under the lock, so close() sees either no request or one with its task.
            request.task = asyncio.run_coroutine_threadsafe(self._stream(route, body, request_id), self._loop)

    def _deliver(self, request_id: str, item: TextUpdate | BaseException) -> None:
        """Hand `item` to the request's callback unless it was aborted or closed meanwhile; the last item (finished
        or an error) retires the request."""
        last = isinstance(item, BaseException) or item.finished
        with self._lock:
            request = self._requests.get(request_id)
            if request is None:
                return
            if last:
                del self._requests[request_id]
        request.callback(item)

    async def _stream(self, route: str, body: dict, request_id: str) -> None:
        def deliver(item: TextUpdate | BaseException) -> None:
            self._deliver(request_id, item)

        try:
            await self._read_stream(route, body, deliver)
        except asyncio.CancelledError:
            raise
        except RemoteError as e:
            deliver(e)
        except ValueError as e:  # a chunk that is not JSON: not an OpenAI-compatible stream
            deliver(RemoteError(f"{self.endpoint.base_url} sent a stream that is not OpenAI's: {e}"))
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            deliver(RemoteError(f"cannot reach {self.endpoint.base_url}: {e or type(e).__name__}"))
        except Exception as e:  # anything else (JSON nested past the parser's depth): the caller must hear the end
            deliver(RemoteError(f"{self.endpoint.base_url} sent something unexpected: {e!r}"))

    async def _read_stream(self, route: str, body: dict, callback: UpdateCallback) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=READ_TIMEOUT_S)
            )
        url = f"{self.endpoint.base_url}/{route}"
        async with self._session.post(url, json=body, headers=self.endpoint.headers()) as response:
            if response.status != 200:
                raise RemoteError(f"{url} answered {response.status}: {_error_message(await response.read())}")
            text, tokens, reason = "", 0, None
            async for raw in response.content:  # one SSE line at a time
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if isinstance(chunk, dict) and "error" in chunk:
                    raise RemoteError(f"{url} stopped the reply: {_error_message(json.dumps(chunk).encode())}")
                try:
                    choices, usage_tokens = _chunk_parts(chunk)
                except _WrongShape as e:
                    raise RemoteError(f"{url} sent a chunk of the wrong shape ({e}): {_cut(data)}") from None
                tokens = tokens if usage_tokens is None else usage_tokens
                for piece, finish_reason in choices:
                    reason = finish_reason or reason
                    if piece:
                        text, tokens = text + piece, tokens + 1
                        callback(TextUpdate(text, tokens, False))
            if reason is None:
                raise RemoteError(f"{url} ended the stream before the reply finished")
            callback(TextUpdate(text, tokens, True, reason))


class _WrongShape(Exception):
    """A stream chunk that is JSON but not shaped as OpenAI's; says which part."""


def _chunk_parts(chunk) -> tuple[list[tuple[str | None, str | None]], int | None]:
    """One stream chunk (a chat delta or a completion) -> ([(text piece, finish reason) per choice], completion
    tokens from its usage or None). Raises _WrongShape for anything of another shape, so that no value of a wrong
    type reaches a caller's TextUpdate."""
    if not isinstance(chunk, dict):
        raise _WrongShape(f"a {type(chunk).__name__}, not an object")
    choices, usage = chunk.get("choices") or [], chunk.get("usage") or {}
    if not isinstance(choices, list):
        raise _WrongShape("choices is not a list")
    if not isinstance(usage, dict):
        raise _WrongShape("usage is not an object")
    tokens = usage.get("completion_tokens")
    if tokens is not None and (type(tokens) is not int or tokens < 0):
        raise _WrongShape("usage.completion_tokens is not a count")
    parts = []
    for choice in choices:
        if not isinstance(choice, dict):
            raise _WrongShape("a choice is not an object")
        if "delta" in choice:
            delta = choice["delta"] or {}
            if not isinstance(delta, dict):
                raise _WrongShape("a delta is not an object")
            piece = delta.get("content")
        else:
            piece = choice.get("text")
        reason = choice.get("finish_reason")
        if not isinstance(piece, str | None):
            raise _WrongShape("a text piece is not a string")
        if not isinstance(reason, str | None):
            raise _WrongShape("finish_reason is not a string")
        parts.append((piece, reason))
    return parts, tokens


def _cut(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _error_message(body: bytes) -> str:
    """The OpenAI error body's message, else the body itself (cut short)."""
    try:
        error = json.loads(body)["error"]
        return error["message"] if isinstance(error, dict) else str(error)
    except (ValueError, KeyError, TypeError):
        return body.decode("utf-8", "replace").strip()[:200] or "no reason given"
