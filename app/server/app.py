"""The OpenAI-compatible HTTP endpoint (aiohttp) on the in-process engine thread.

Routes, request fields, streaming, errors and the safety defaults follow the endpoint's contract (README.md, "The
endpoint's contract"): what the `openai` client and IDE plugins rely on, OpenAI's behaviour where vLLM's differs.
The request and response shapes live in protocol.py and responses.py, running it in run.py; this module is the
HTTP side: routing, server-sent events, security middlewares, metrics.
A client that disconnects cancels its handler (aiohttp's handler_cancellation), which leaves the engine stream
early and so aborts the request and frees its KV blocks at once. Request bodies are decoded, rendered and tokenized
on worker threads: a long prompt takes the event loop from no other stream.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any, TypeVar

from aiohttp import hdrs, web

from app.engine_thread import EngineDeadError, EngineStoppedError, EngineThread, QueueFullError
from app.server import protocol, responses
from app.server.fields import ApiError
from app.server.metrics import Metrics
from app.server.protocol import GenerationRequest, ModelInfo
from engine import PromptType, RequestOutput, SamplingParams

logger = logging.getLogger("kvstudio.server")

T = TypeVar("T")

# Request bodies above this answer 413: long prompts are a few hundred KiB of JSON at most.
MAX_BODY_BYTES = 8 * 2**20
RETRY_AFTER_S = 1


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    drain_timeout: float = 30.0  # seconds in-flight requests get to finish on shutdown

    @property
    def loopback(self) -> bool:
        return _is_loopback(self.host)


@dataclass
class _State:
    engine: EngineThread
    model: ModelInfo
    config: ServerConfig
    metrics: Metrics
    log: list[Callable[[dict], None]] = field(default_factory=list)  # request-log listeners (the desktop app)


_STATE = web.AppKey("state", _State)
_LOGGED = web.RequestKey("logged", bool)  # this request's log line is written


def _is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_name(header: str) -> str | None:
    """The name or address a Host header gives, without its port: "[::1]:8000" and "[::1]" -> "::1",
    "localhost:8000" -> "localhost". None for a malformed header (an IPv6 address must be bracketed)."""
    if header.startswith("["):
        name, bracket, port = header[1:].partition("]")
        if not bracket or (port and not (port.startswith(":") and port[1:].isdigit())):
            return None
        return name
    name, colon, port = header.partition(":")
    if colon and not port.isdigit():  # a second colon (a bare IPv6 address) or a port that is not a number
        return None
    return name


def _error(
    status: int,
    message: str,
    type_: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict | None = None,
) -> web.Response:
    return web.json_response(ApiError(status, message, type_, param, code).body(), status=status, headers=headers)


# ---- middlewares ------------------------------------------------------------------------------------------------


@web.middleware
async def _access_log(request: web.Request, handler) -> web.StreamResponse:
    """One line per request; generations log their own line with their token count."""
    start = time.perf_counter()
    response = await handler(request)
    if not request.get(_LOGGED):
        _log(request.app[_STATE], request, response.status, start, [])
    return response


@web.middleware
async def _errors(request: web.Request, handler) -> web.StreamResponse:
    """Every error is the OpenAI error body, never aiohttp's text or HTML."""
    try:
        return await handler(request)
    except ApiError as e:
        return web.json_response(e.body(), status=e.status)
    except ValueError as e:  # the engine's own checks of a request the protocol layer let through
        return _error(400, str(e), "invalid_request_error")
    except QueueFullError as e:
        return _error(503, str(e), "server_error", headers={"Retry-After": str(RETRY_AFTER_S)})
    except EngineDeadError as e:  # no Retry-After: only loading the model again helps
        return _error(503, str(e), "server_error", code="engine_dead")
    except EngineStoppedError as e:
        return _error(503, str(e), "server_error", headers={"Retry-After": str(RETRY_AFTER_S)})
    except web.HTTPRequestEntityTooLarge:
        return _error(413, f"the request body is over the limit of {MAX_BODY_BYTES} bytes", "invalid_request_error")
    except web.HTTPNotFound:
        return _error(404, f"no route {request.method} {request.path}", "invalid_request_error", code="not_found")
    except web.HTTPMethodNotAllowed:
        return _error(405, f"{request.method} is not allowed on {request.path}", "invalid_request_error")
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        logger.exception("unhandled error on %s %s", request.method, request.path)
        return _error(500, "internal error", "server_error")


def _security(config: ServerConfig):
    @web.middleware
    async def security(request: web.Request, handler) -> web.StreamResponse:
        # DNS rebinding: a page on evil.example resolving to 127.0.0.1 sends Host: evil.example.
        if config.loopback and not _is_loopback(_host_name(request.headers.get(hdrs.HOST, "")) or ""):
            return _error(
                403, "the Host header must name this machine (localhost or a loopback address)", "invalid_request_error"
            )
        origin = request.headers.get("Origin")
        allowed = origin is not None and origin in config.cors_origins
        if request.method == "OPTIONS" and origin is not None:
            if not allowed:
                return _error(403, f"origin {origin} is not allowed", "invalid_request_error")
            return web.Response(status=204, headers=_cors_headers(origin, preflight=True))
        if config.api_key is not None and request.path != "/health":
            auth = request.headers.get("Authorization", "")
            token = auth[7:] if auth.startswith("Bearer ") else ""
            if not hmac.compare_digest(token.encode(), config.api_key.encode()):
                return _error(
                    401,
                    "a valid API key is required: Authorization: Bearer <key>",
                    "authentication_error",
                    code="invalid_api_key",
                )
        response = await handler(request)
        if allowed and not response.prepared:
            response.headers.update(_cors_headers(origin, preflight=False))
        return response

    return security


def _cors_headers(origin: str, preflight: bool) -> dict[str, str]:
    headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
    if preflight:
        headers.update(
            {
                "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                "Access-Control-Allow-Headers": "Authorization, Content-Type",
                "Access-Control-Max-Age": "600",
            }
        )
    return headers


# ---- handlers -----------------------------------------------------------------------------------------------


async def _parsed(request: web.Request, parse: Callable[[Any, ModelInfo], T]) -> T:
    """parse(the JSON body, the model) on a worker thread: decoding megabytes of JSON, rendering the chat template
    and tokenizing take long enough to stall every stream if run on the event loop."""
    raw = await request.read()
    model = request.app[_STATE].model
    return await asyncio.get_running_loop().run_in_executor(None, lambda: parse(_json(raw), model))


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None


async def models(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    return web.json_response({"object": "list", "data": [protocol.model_card(state.model)]})


async def model(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    if request.match_info["model_id"] != state.model.name:
        raise ApiError(
            404, f"the model {request.match_info['model_id']!r} does not exist", param="model", code="model_not_found"
        )
    return web.json_response(protocol.model_card(state.model))


async def completions(request: web.Request) -> web.StreamResponse:
    req = await _parsed(request, protocol.parse_completion_request)
    return await _generate(request, req, f"cmpl-{req.request_id or uuid.uuid4().hex}")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    req = await _parsed(request, protocol.parse_chat_request)
    return await _generate(request, req, f"chatcmpl-{req.request_id or uuid.uuid4().hex}")


def _refusal(req: GenerationRequest, e: ValueError) -> ApiError:
    """The engine's refusal of a request the protocol layer let through, as a 400: a grammar it cannot compile
    names the request field the grammar came from (response_format, tools, ...)."""
    param = req.constraint_param if str(e).startswith("structured_outputs") else None
    return ApiError(400, str(e), param=param)


async def _engine_stream(
    state: _State, prompt: PromptType, params: SamplingParams, request_id: str
) -> AsyncIterator[RequestOutput]:
    """The engine thread's stream of one request, counted in /metrics as waiting until its first output, then
    running, until it ends (finished, failed or left early, which aborts it)."""
    stream = state.engine.generate(prompt, params, request_id=request_id)
    counts = state.metrics.requests
    counts.waiting += 1
    running = False
    try:
        async for out in stream:
            if not running:
                running = True
                counts.waiting -= 1
                counts.running += 1
            yield out
    finally:
        await stream.aclose()  # left early: abort the request now, not when the generator is collected
        if running:
            counts.running -= 1
        else:
            counts.waiting -= 1


async def _generate(request: web.Request, req: GenerationRequest, request_id: str) -> web.StreamResponse:
    """request_id names the response; the engine's requests get ids of their own (a client's request_id need not
    be unique)."""
    state = request.app[_STATE]
    start = time.perf_counter()
    timing = _Timing(state.metrics, start)
    engine_id = uuid.uuid4().hex
    if req.stream:
        response = await _stream(request, req, request_id, engine_id, timing)
    else:
        try:
            # A TaskGroup: when one prompt fails, the others are cancelled, which aborts them in the engine.
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(_run_to_end(state, prompt, req, f"{engine_id}-{i}", timing))
                    for i, prompt in enumerate(req.prompts)
                ]
        except ExceptionGroup as eg:
            error = eg.exceptions[0]
            raise (_refusal(req, error) if isinstance(error, ValueError) else error) from None
        outputs = [t.result() for t in tasks]
        build = responses.chat_response if req.kind == "chat" else responses.completion_response
        response = web.json_response(build(req, request_id, outputs, state.model))
        _log(state, request, 200, start, outputs)
    return response


@dataclass
class _Timing:
    """Time to first token and the gaps between tokens, for the metrics' histograms."""

    metrics: Metrics
    start: float
    first: bool = True
    last: float = 0.0

    def tokens(self, now: float) -> None:
        if self.first:
            self.metrics.ttft.observe(now - self.start)
            self.first = False
        else:
            self.metrics.itl.observe(now - self.last)
        self.last = now


async def _run_to_end(state: _State, prompt: dict, req: GenerationRequest, rid: str, timing: _Timing) -> RequestOutput:
    last = None
    async for out in _engine_stream(state, prompt, req.params, rid):
        timing.tokens(time.perf_counter())
        last = out
    return last


async def _stream(
    request: web.Request, req: GenerationRequest, request_id: str, engine_id: str, timing: _Timing
) -> web.StreamResponse:
    state = request.app[_STATE]
    # Validate up front what can fail, so that errors before the first byte are plain HTTP errors.
    streams = [_engine_stream(state, prompt, req.params, f"{engine_id}-{i}") for i, prompt in enumerate(req.prompts)]
    merged: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream) -> None:
        try:
            async for out in stream:
                await merged.put((i, out))
        except Exception as e:
            await merged.put((i, e))
        finally:
            await merged.put((i, None))

    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    origin = request.headers.get("Origin")
    if origin is not None and origin in state.config.cors_origins:
        response.headers.update(_cors_headers(origin, preflight=False))
    tasks = []
    finals: dict[int, RequestOutput] = {}
    client_left = False
    try:
        first = await anext(streams[0])  # raises the engine's ValueError (or a full queue) before any byte
        await response.prepare(request)
        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams[1:], start=1)]
        await merged.put((0, first))
        tasks.append(asyncio.create_task(pump(0, streams[0])))
        states = [responses.StreamState(req, request_id, state.model, i) for i in range(len(streams))]
        open_streams = len(streams)
        while open_streams:
            i, item = await merged.get()
            if item is None:
                open_streams -= 1
                continue
            if isinstance(item, BaseException):
                raise item
            timing.tokens(time.perf_counter())
            finals[i] = item
            for chunk in states[i].chunks(item):
                await response.write(_sse(chunk))
        if req.include_usage:
            await response.write(_sse(states[0].usage_chunk([finals[i] for i in sorted(finals)])))
    except ConnectionResetError:  # the client left mid-stream (an editor cancelling a completion): nothing to say
        client_left = True
    except Exception as e:
        if not response.prepared:  # nothing sent yet: a plain HTTP error (the middleware shapes it)
            if isinstance(e, ValueError):
                raise _refusal(req, e) from None
            raise
        # The stream has started: the error becomes an event, then [DONE] as usual.
        logger.warning("stream %s failed: %s", request_id, e)
        error = e if isinstance(e, ApiError) else ApiError(500, f"generation failed: {e}", "server_error")
        await response.write(_sse(error.body()))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in streams:
            await s.aclose()  # a stream left early aborts its request
    if not client_left:
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    _log(state, request, 200, timing.start, list(finals.values()))
    return response


def _sse(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def _log(state: _State, request: web.Request, status: int, start: float, outputs: list[RequestOutput]) -> None:
    request[_LOGGED] = True
    tokens = sum(len(c.token_ids) for o in outputs if o is not None for c in o.outputs)
    entry = {
        "time": time.time(),
        "method": request.method,
        "path": request.path,
        "status": status,
        "seconds": round(time.perf_counter() - start, 3),
        "completion_tokens": tokens,
        "remote": request.remote,
    }
    logger.info("%s %s %d %.3fs %d tokens", request.method, request.path, status, entry["seconds"], tokens)
    for listener in state.log:
        listener(entry)


async def tokenize(request: web.Request) -> web.Response:
    return web.json_response(await _parsed(request, protocol.tokenize_response))


async def detokenize(request: web.Request) -> web.Response:
    return web.json_response(await _parsed(request, protocol.detokenize_response))


async def health(request: web.Request) -> web.Response:
    """200 while the engine serves; 503 with the reason once its thread has died (a load balancer or the desktop
    window then knows to reload the model)."""
    failure = request.app[_STATE].engine.failure
    if failure is not None:
        return web.json_response({"status": "error", "error": str(failure)}, status=503)
    return web.json_response({"status": "ok"})


async def version_route(request: web.Request) -> web.Response:
    try:
        v = version("kvstudio")
    except PackageNotFoundError:
        v = "unknown"
    return web.json_response({"version": v})


async def metrics(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    body, content_type = state.metrics.render()
    return web.Response(body=body, headers={"Content-Type": content_type})


def create_app(
    engine: EngineThread, model_info: ModelInfo, config: ServerConfig, on_request: Callable[[dict], None] | None = None
) -> web.Application:
    app = web.Application(middlewares=[_access_log, _errors, _security(config)], client_max_size=MAX_BODY_BYTES)
    state = _State(engine, model_info, config, Metrics(model_info.name))
    engine.add_listener(state.metrics.update)

    async def stop_listening(_: web.Application) -> None:  # a server switched off leaves no listener behind
        engine.remove_listener(state.metrics.update)

    app.on_cleanup.append(stop_listening)
    if on_request is not None:
        state.log.append(on_request)
    app[_STATE] = state
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model_id:.+}", model)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    app.router.add_get("/health", health)
    app.router.add_get("/version", version_route)
    app.router.add_get("/metrics", metrics)
    return app
