"""Chat and completion requests streamed from any OpenAI-compatible endpoint (a vLLM cluster, another kvstudio,
a hosted API) instead of the in-process engine, so the desktop app's chat and batch pages can outgrow the
workstation without changing.

One event-loop thread owns an aiohttp session; requests are coroutines on it. Callers on other threads submit
and abort through thread-safe calls and get each request's text as it grows through a callback, the same shape
the engine thread gives (app/engine_thread.py). Aborting cancels the coroutine, which closes its connection:
an OpenAI-compatible server stops generating for a client that went away.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp

from engine import SamplingParams

CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 300      # between two chunks: a long prefill on a busy server can take minutes


class RemoteError(RuntimeError):
    """The endpoint could not be reached, refused the request, or broke off its stream; said in words."""


@dataclass(frozen=True)
class Endpoint:
    base_url: str          # e.g. "http://gpu-box:8000/v1"; a URL without a path gets "/v1"
    api_key: str = ""
    model: str = ""        # the model id to ask for; "" takes the first one the endpoint lists

    def __post_init__(self) -> None:
        url = self.base_url.strip().rstrip("/")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"the endpoint URL must start with http:// or https:// and name a host, "
                             f"got {self.base_url!r}")
        object.__setattr__(self, "base_url", url if parts.path else url + "/v1")

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@dataclass(frozen=True)
class TextUpdate:
    """A request's reply so far; `finished` on the last one, which carries the finish reason."""
    text: str
    num_tokens: int
    finished: bool
    finish_reason: str | None = None


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
        raise RemoteError(f"{endpoint.base_url}/models did not answer with JSON: is this an OpenAI-compatible "
                          "endpoint?") from None
    try:
        return [m["id"] for m in body["data"]]
    except (KeyError, TypeError):
        raise RemoteError(f"{endpoint.base_url}/models answered without a model list") from None


def request_body(params: SamplingParams) -> dict:
    """SamplingParams as an OpenAI request's fields. top_k, min_p and repetition_penalty are vLLM's extensions:
    they go only when set, since strict servers reject fields they do not know."""
    if params.n != 1:
        raise ValueError("a remote request takes n=1")
    body = {"temperature": params.temperature, "top_p": params.top_p, "max_tokens": params.max_tokens,
            "presence_penalty": params.presence_penalty, "frequency_penalty": params.frequency_penalty}
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
    return body


class RemoteClient:
    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._loop = asyncio.new_event_loop()
        self._session: aiohttp.ClientSession | None = None   # made on the loop: aiohttp binds it there
        self._tasks: dict[str, concurrent.futures.Future] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kvstudio-remote", daemon=True)
        self._thread.start()

    def submit_chat(self, messages: list[dict], params: SamplingParams, callback: UpdateCallback,
                    request_id: str) -> None:
        self._submit("chat/completions", {"messages": messages}, params, callback, request_id)

    def submit_completion(self, prompt: str, params: SamplingParams, callback: UpdateCallback,
                          request_id: str) -> None:
        self._submit("completions", {"prompt": prompt}, params, callback, request_id)

    def abort(self, request_id: str) -> None:
        """Stop a request (its connection closes); its callback gets nothing more. Unknown ids are ignored."""
        with self._lock:
            task = self._tasks.pop(request_id, None)
        if task is not None:
            task.cancel()

    def close(self) -> None:
        """Abort everything in flight and end the loop thread."""
        with self._lock:
            tasks, self._tasks = list(self._tasks.values()), {}
        for task in tasks:
            task.cancel()
        if self._session is not None:
            asyncio.run_coroutine_threadsafe(self._session.close(), self._loop).result(timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def _submit(self, route: str, prompt: dict, params: SamplingParams, callback: UpdateCallback,
                request_id: str) -> None:
        body = {"model": self.endpoint.model, **prompt, **request_body(params), "stream": True,
                "stream_options": {"include_usage": True}}
        task = asyncio.run_coroutine_threadsafe(self._stream(route, body, callback), self._loop)
        with self._lock:
            self._tasks[request_id] = task
        task.add_done_callback(lambda _: self._forget(request_id, task))

    def _forget(self, request_id: str, task: concurrent.futures.Future) -> None:
        with self._lock:
            if self._tasks.get(request_id) is task:
                del self._tasks[request_id]

    async def _stream(self, route: str, body: dict, callback: UpdateCallback) -> None:
        try:
            await self._read_stream(route, body, callback)
        except asyncio.CancelledError:
            raise
        except RemoteError as e:
            callback(e)
        except ValueError as e:   # a chunk that is not JSON: not an OpenAI-compatible stream
            callback(RemoteError(f"{self.endpoint.base_url} sent a stream that is not OpenAI's: {e}"))
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            callback(RemoteError(f"cannot reach {self.endpoint.base_url}: {e or type(e).__name__}"))

    async def _read_stream(self, route: str, body: dict, callback: UpdateCallback) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=READ_TIMEOUT_S))
        url = f"{self.endpoint.base_url}/{route}"
        async with self._session.post(url, json=body, headers=self.endpoint.headers()) as response:
            if response.status != 200:
                raise RemoteError(f"{url} answered {response.status}: {_error_message(await response.read())}")
            text, tokens, reason = "", 0, None
            async for raw in response.content:   # one SSE line at a time
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise RemoteError(f"{url} stopped the reply: {_error_message(json.dumps(chunk).encode())}")
                if chunk.get("usage"):
                    tokens = chunk["usage"].get("completion_tokens", tokens)
                for choice in chunk.get("choices") or []:
                    piece = choice.get("delta", {}).get("content") if "delta" in choice else choice.get("text")
                    if piece:
                        text, tokens = text + piece, tokens + 1
                    reason = choice.get("finish_reason") or reason
                    if piece:
                        callback(TextUpdate(text, tokens, False))
            if reason is None:
                raise RemoteError(f"{url} ended the stream before the reply finished")
            callback(TextUpdate(text, tokens, True, reason))


def _error_message(body: bytes) -> str:
    """The OpenAI error body's message, else the body itself (cut short)."""
    try:
        error = json.loads(body)["error"]
        return error["message"] if isinstance(error, dict) else str(error)
    except (ValueError, KeyError, TypeError):
        return body.decode("utf-8", "replace").strip()[:200] or "no reason given"
