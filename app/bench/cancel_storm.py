"""The cancel storm: what an IDE plugin does to the server, as a benchmark whose checks must hold.

A code editor asks for a completion at each pause in typing and drops it as soon as the user types on. `clients`
such editors fire `requests` requests between them, each client sending its next when its last one ends: most
are streamed fill-in-the-middle completions (the code before the cursor as the prompt, the code after it as the
suffix, or the prefix alone when the model has no FIM tokens) dropped a random 0–400 ms after they were sent, some
are dropped right after sending, before the server can answer a byte, and a few are chat requests read to the end.

Once every connection has closed and the engine thread has no request left, the storm checks that:
- the server still answers: /health says 200 and a short completion comes back whole;
- nothing is left running: the engine has no sequence running, waiting or swapped, and /metrics counts no request;
- no KV block is held (free blocks that keep a cached prefix for reuse are free);
- every request is accounted for: it finished, with as many tokens as its usage says, or its client dropped it.

It also reports the tokens never delivered (generated during the storm minus received, counted from each chunk's
logprobs) and the time to first token of the requests that finished. It runs against an in-process server
(app.server.run.BackgroundServer), whose engine thread it reads.
"""

from __future__ import annotations

import asyncio
import enum
import json
import random
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from app.bench.serve import percentiles
from app.engine_thread import EngineSnapshot, EngineThread
from app.server.run import BackgroundServer
from engine import EngineStats

MAX_DROP_S = 0.4  # a dropped completion's client leaves a uniform 0–MAX_DROP_S seconds after sending it
AT_ONCE_SHARE = 0.12  # of the requests, dropped right after sending
CHAT_SHARE = 0.08  # of the requests, chat read to the end
FIM_MAX_TOKENS = 128
CHAT_MAX_TOKENS = 48
CHAT_TIMEOUT_S = 600.0  # a chat request read to the end that takes longer than this has failed
SETTLE_TIMEOUT_S = 60.0  # after the storm, the time connections and requests get to end before it fails

# The files being edited, each after a line "### <name>": the cursor falls somewhere in their middle half.
EDITOR_FILES = Path(__file__).resolve().parents[2] / "resources" / "bench" / "editor_files.txt"
CODE = tuple(re.split(r"^### .*\n", EDITOR_FILES.read_text(encoding="utf-8"), flags=re.MULTILINE)[1:])


class StormError(RuntimeError):
    """The server answered something no OpenAI-compatible endpoint should (a bad status, an error event)."""


class Kind(enum.Enum):
    DROP = "completion, dropped after 0-400 ms"
    DROP_AT_ONCE = "completion, dropped before any byte"
    CHAT = "chat, read to the end"


@dataclass(frozen=True)
class Shot:
    """One planned request: which kind, in which file, where the cursor is, when a DROP's client leaves."""

    kind: Kind
    code: int  # index into CODE
    cursor: int
    drop_after: float  # seconds; DROP only


@dataclass(frozen=True)
class Outcome:
    kind: Kind
    finished: bool  # read to its end; else dropped by its client, or failed
    tokens: int  # tokens received
    ttft: float | None = None  # seconds from sending to the first token, when one came
    error: str | None = None  # why it failed

    @property
    def failed(self) -> bool:
        return self.error is not None


def plan(requests: int, seed: int) -> list[Shot]:
    """The storm's requests in the order the clients take them, the same for the same seed."""
    rng = random.Random(seed)
    shots = []
    for _ in range(requests):
        draw = rng.random()
        kind = (
            Kind.DROP_AT_ONCE if draw < AT_ONCE_SHARE else Kind.CHAT if draw < AT_ONCE_SHARE + CHAT_SHARE else Kind.DROP
        )
        code = rng.randrange(len(CODE))
        length = len(CODE[code])
        shots.append(Shot(kind, code, rng.randrange(length // 4, 3 * length // 4), rng.uniform(0.0, MAX_DROP_S)))
    return shots


def body(shot: Shot, model: str, fim: bool) -> dict:
    """The request a plugin would send: a streamed completion at the cursor, or a chat about the file. Logprobs
    are asked for only to count the tokens each chunk carries."""
    common = {"model": model, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    code = CODE[shot.code]
    if shot.kind is Kind.CHAT:
        messages = [{"role": "user", "content": f"What does this code do?\n\n```python\n{code}```"}]
        return {**common, "messages": messages, "max_tokens": CHAT_MAX_TOKENS, "logprobs": True}
    request = {**common, "prompt": code[: shot.cursor], "max_tokens": FIM_MAX_TOKENS, "logprobs": 0}
    if fim:
        request["suffix"] = code[shot.cursor :]
    return request


# ---- the clients ----------------------------------------------------------------------------------------------


@dataclass
class _Stream:
    """What a streamed response has delivered so far."""

    start: float
    tokens: int = 0
    ttft: float | None = None
    finish_reason: str | None = None
    usage: int | None = None
    done: bool = False

    def take(self, line: bytes) -> None:
        """One line of the event stream."""
        if not line.startswith(b"data: "):
            return
        if line.strip() == b"data: [DONE]":
            self.done = True
            return
        chunk = json.loads(line[6:])
        if "error" in chunk:
            raise StormError(f"an error event: {chunk['error'].get('message')}")
        if chunk.get("usage"):
            self.usage = chunk["usage"]["completion_tokens"]
        for choice in chunk["choices"]:
            logprobs = choice.get("logprobs") or {}
            tokens = len(logprobs["content"] if "content" in logprobs else logprobs.get("tokens", []))  # chat, text
            if tokens and self.ttft is None:
                self.ttft = time.perf_counter() - self.start
            self.tokens += tokens
            self.finish_reason = choice.get("finish_reason") or self.finish_reason

    def outcome(self, kind: Kind) -> Outcome:
        """The outcome of a stream read to its end."""
        if not (self.done and self.finish_reason):
            return Outcome(kind, False, self.tokens, self.ttft, "the stream ended without a finish_reason and [DONE]")
        if self.usage != self.tokens:
            return Outcome(kind, False, self.tokens, self.ttft, f"usage says {self.usage} tokens, {self.tokens} came")
        return Outcome(kind, True, self.tokens, self.ttft)


async def _read(session: aiohttp.ClientSession, url: str, path: str, request: dict, stream: _Stream) -> None:
    async with session.post(url + path, json=request) as response:
        if response.status != 200:
            raise StormError(f"HTTP {response.status}: {await response.text()}")
        async for line in response.content:
            stream.take(line)


async def _drop_at_once(url: str, request: dict) -> None:
    """Send the request on a connection of its own and close it without reading a byte."""
    where = urlsplit(url)
    payload = json.dumps(request).encode()
    _, writer = await asyncio.open_connection(where.hostname, where.port)
    head = (
        f"POST {where.path}/completions HTTP/1.1\r\nHost: {where.netloc}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    writer.write(head.encode() + payload)
    await writer.drain()
    writer.close()
    await writer.wait_closed()


async def _fire(session: aiohttp.ClientSession, url: str, shot: Shot, model: str, fim: bool) -> Outcome:
    request = body(shot, model, fim)
    stream = _Stream(time.perf_counter())
    path = "/chat/completions" if shot.kind is Kind.CHAT else "/completions"
    # A chat is read to its end; a DROP's client leaves at its time, which closes the connection (the session
    # keeps none alive): the server sees the client go, as it sees an editor's request cancelled.
    deadline = asyncio.timeout(CHAT_TIMEOUT_S if shot.kind is Kind.CHAT else shot.drop_after)
    try:
        if shot.kind is Kind.DROP_AT_ONCE:
            await _drop_at_once(url, request)
            return Outcome(shot.kind, False, 0)
        async with deadline:
            await _read(session, url, path, request, stream)
        return stream.outcome(shot.kind)
    except TimeoutError:
        if not deadline.expired():
            return Outcome(shot.kind, False, stream.tokens, stream.ttft, "TimeoutError from the connection")
        if shot.kind is Kind.CHAT:
            return Outcome(shot.kind, False, stream.tokens, stream.ttft, f"no end after {CHAT_TIMEOUT_S:.0f} s")
        return Outcome(shot.kind, False, stream.tokens, stream.ttft)
    except (aiohttp.ClientError, OSError, ValueError, StormError) as e:  # ValueError: a chunk that is not JSON
        return Outcome(shot.kind, False, stream.tokens, stream.ttft, f"{type(e).__name__}: {e}")


async def storm(url: str, model: str, shots: list[Shot], clients: int, fim: bool) -> list[Outcome]:
    """Fire the shots from `clients` concurrent clients, each sending its next request when its last one ends."""
    outcomes: list[Outcome | None] = [None] * len(shots)
    pending = iter(enumerate(shots))  # shared: a client takes the next shot when its last one ends

    async def client(session: aiohttp.ClientSession) -> None:
        for i, shot in pending:
            outcomes[i] = await _fire(session, url, shot, model, fim)

    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    assert all(o is not None for o in outcomes), "every shot is fired once"
    return outcomes


# ---- before and after ---------------------------------------------------------------------------------------


async def has_fim(url: str, model: str) -> bool:
    """Whether the server fills in the middle for this model: without FIM tokens it refuses a suffix (400)."""
    request = {"model": model, "prompt": "def add(a, b):\n    return ", "suffix": "\n", "max_tokens": 1}
    async with aiohttp.ClientSession() as session, session.post(url + "/completions", json=request) as response:
        if response.status == 200:
            return True
        error = (await response.json())["error"]
        if response.status == 400 and error["param"] == "suffix":
            return False
        raise StormError(f"the fill-in-the-middle probe got HTTP {response.status}: {error['message']}")


@dataclass(frozen=True)
class ServerCheck:
    problem: str | None  # why the server does not answer; None: /health said 200 and a completion came back whole
    requests: tuple[float, float] | None = None  # /metrics' requests running and waiting, when it answered


async def check_server(url: str, model: str) -> ServerCheck:
    """/health, a 4-token completion, and the request counts in /metrics."""
    root = url.removesuffix("/v1")
    request = {"model": model, "prompt": "def greet(name):", "max_tokens": 4, "ignore_eos": True}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=SETTLE_TIMEOUT_S)) as session:
            async with session.get(root + "/health") as response:
                if response.status != 200:
                    return ServerCheck(f"/health answered {response.status}: {await response.text()}")
            async with session.post(url + "/completions", json=request) as response:
                answer = await response.json(content_type=None)
                if response.status != 200 or answer["usage"]["completion_tokens"] != 4:
                    return ServerCheck(f"a 4-token completion got HTTP {response.status}: {answer}")
            async with session.get(root + "/metrics") as response:
                text = await response.text()
    except (aiohttp.ClientError, OSError) as e:
        return ServerCheck(f"no answer: {type(e).__name__}: {e}")
    samples = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}
    return ServerCheck(None, (samples["kvstudio_num_requests_running"], samples["kvstudio_num_requests_waiting"]))


class _EngineWatch:
    """The engine thread's snapshots, to read the engine once the storm has settled."""

    def __init__(self, thread: EngineThread) -> None:
        self._thread = thread
        self._latest: EngineSnapshot | None = None
        self._changed = threading.Condition()

    def update(self, snapshot: EngineSnapshot) -> None:
        """The engine thread's listener."""
        with self._changed:
            self._latest = snapshot
            self._changed.notify_all()

    def settled(self, server: BackgroundServer) -> EngineSnapshot | None:
        """A snapshot taken after the last connection closed and then the engine thread's last request ended;
        None when that does not happen within SETTLE_TIMEOUT_S. With no connection left and no client sending,
        no handler is left to hand the engine a request, so what the snapshot shows is final."""
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        idle_since = None
        while (remaining := deadline - time.monotonic()) > 0:
            if idle_since is None and not server.num_connections and not self._thread.num_unfinished:
                idle_since = time.monotonic()
            with self._changed:
                if idle_since is not None and self._latest is not None and self._latest.time > idle_since:
                    return self._latest
                # Snapshots come after steps and once a second while idle; the counts above come unannounced.
                self._changed.wait(min(remaining, 0.05))
        return None


# ---- the report ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StormReport:
    requests: int
    clients: int
    seed: int
    fim: bool
    seconds: float
    outcomes: list[Outcome]
    before: EngineStats  # the engine before the storm
    after: EngineStats | None  # and once it settled; None when it did not within SETTLE_TIMEOUT_S
    unfinished: int  # the engine thread's unfinished requests at the end
    server: ServerCheck

    @property
    def problems(self) -> list[str]:
        """What does not hold, in words; empty when the server came through."""
        problems = []
        if failed := [o for o in self.outcomes if o.failed]:
            problems.append(f"{len(failed)} requests failed, the first: {failed[0].error}")
        if (s := self.after) is None:
            problems.append(f"{self.unfinished} requests were unfinished {SETTLE_TIMEOUT_S:.0f} s after the storm")
        else:
            if s.num_running or s.num_waiting or s.num_swapped:
                problems.append(
                    f"the engine still had {s.num_running} sequences running, {s.num_waiting} requests waiting "
                    f"and {s.num_swapped} sequences swapped"
                )
            if s.num_blocks_used:
                problems.append(f"{s.num_blocks_used} KV blocks were still held")
        if self.server.problem is not None:
            problems.append(f"the server does not answer: {self.server.problem}")
        elif any(self.server.requests):
            problems.append("/metrics counts {:.0f} requests running and {:.0f} waiting".format(*self.server.requests))
        return problems

    @property
    def passed(self) -> bool:
        return not self.problems

    def table(self) -> str:
        prompts = "prefix + suffix (FIM)" if self.fim else "the code before the cursor (the model has no FIM tokens)"
        lines = [
            f"{self.requests} requests from {self.clients} clients in {self.seconds:.1f} s (seed {self.seed}); "
            f"completion prompts: {prompts}",
            "",
            f"{'kind':<36} {'sent':>5} {'finished':>9} {'dropped':>8} {'failed':>7} {'tokens received':>16}",
        ]
        for kind in Kind:
            of_kind = [o for o in self.outcomes if o.kind is kind]
            finished, failed = sum(o.finished for o in of_kind), sum(o.failed for o in of_kind)
            lines.append(
                f"{kind.value:<36} {len(of_kind):>5} {finished:>9} {len(of_kind) - finished - failed:>8} "
                f"{failed:>7} {sum(o.tokens for o in of_kind):>16,}"
            )
        lines += ["", *self._checks(), "", "PASS" if self.passed else "FAIL: " + "; ".join(self.problems)]
        return "\n".join(lines)

    def _checks(self) -> list[str]:
        server = "yes: /health 200, a 4-token completion" if self.server.problem is None else self.server.problem
        lines = [f"{'server answers':<24} {server}"]
        if (s := self.after) is None:
            return [*lines, f"{'left running':<24} {self.unfinished} requests did not end"]
        running = "" if self.server.requests is None else "; /metrics: {:.0f} requests running, {:.0f} waiting"
        received = sum(o.tokens for o in self.outcomes)
        generated = s.generation_tokens_total - self.before.generation_tokens_total
        dropped = sum(not o.finished and not o.failed for o in self.outcomes)
        ttft = [o.ttft for o in self.outcomes if o.finished and o.ttft is not None]
        p50, p99 = percentiles(ttft, (50, 99))
        return [
            *lines,
            f"{'left running':<24} engine: {s.num_running} sequences running, {s.num_waiting} waiting, "
            f"{s.num_swapped} swapped" + running.format(*self.server.requests or ()),
            f"{'KV blocks held':<24} {s.num_blocks_used} of {s.num_blocks_total:,} "
            f"({s.num_blocks_cached:,} free blocks keep a cached prefix)",
            f"{'tokens never delivered':<24} {generated - received:,} = {generated:,} generated - {received:,} "
            f"received ({(generated - received) / max(dropped, 1):.1f} per dropped request); "
            f"{s.prompt_tokens_total - self.before.prompt_tokens_total:,} prompt tokens computed",
            f"{'TTFT of finished':<24} p50 {p50 * 1e3:.0f} ms, p99 {p99 * 1e3:.0f} ms ({len(ttft)} requests)",
        ]


def run(
    server: BackgroundServer, thread: EngineThread, model: str, requests: int, clients: int, seed: int
) -> StormReport:
    """The storm against `server` (whose engine thread is `thread`), then the checks."""
    url = server.url + "/v1"
    fim = asyncio.run(has_fim(url, model))
    watch = _EngineWatch(thread)
    thread.add_listener(watch.update)
    try:
        if (before := watch.settled(server)) is None:
            raise StormError(f"the server is busy: {thread.num_unfinished} requests did not end")
        start = time.perf_counter()
        outcomes = asyncio.run(storm(url, model, plan(requests, seed), clients, fim))
        seconds = time.perf_counter() - start
        after = watch.settled(server)
    finally:
        thread.remove_listener(watch.update)
    after_stats = None if after is None else after.stats
    check = asyncio.run(check_server(url, model))
    return StormReport(
        requests, clients, seed, fim, seconds, outcomes, before.stats, after_stats, thread.num_unfinished, check
    )
