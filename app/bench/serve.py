"""Serving benchmark: W64's chat requests streamed against an OpenAI-compatible endpoint at several concurrency
levels; time to first token, inter-token latency (p50 / p90 / p99) and output tokens per second.

Each level runs the same requests through `concurrency` clients that each send their next request when the
last one ends. Greedy, EOS ignored, so every request streams exactly max_tokens tokens. TTFT is from sending the
request to the first content chunk; ITL is the gap between content chunks; output tok/s is the tokens the server
reported (usage) over the level's wall time.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import aiohttp


@dataclass(frozen=True)
class RequestTiming:
    ttft: float
    gaps: list[float]
    tokens: int


@dataclass(frozen=True)
class LevelResult:
    concurrency: int
    seconds: float
    timings: list[RequestTiming]

    @property
    def output_tokens_per_s(self) -> float:
        return sum(t.tokens for t in self.timings) / self.seconds

    def row(self) -> str:
        ttft = percentiles([t.ttft for t in self.timings])
        itl = percentiles([g for t in self.timings for g in t.gaps])
        ttft_ms = "/".join(f"{x * 1e3:.0f}" for x in ttft)
        itl_ms = "/".join(f"{x * 1e3:.1f}" for x in itl)
        return (
            f"{self.concurrency:>11} {len(self.timings):>8} {ttft_ms:>24} {itl_ms:>24} "
            f"{self.output_tokens_per_s:>12.1f}"
        )


def percentiles(values: list[float], points=(50, 90, 99)) -> list[float]:
    """Nearest-rank percentiles."""
    if not values:
        return [float("nan")] * len(points)
    ordered = sorted(values)
    return [ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))] for p in points]


async def _one(session: aiohttp.ClientSession, url: str, headers: dict, body: dict) -> RequestTiming:
    start = time.perf_counter()
    first, last, gaps, tokens = None, None, [], 0
    async with session.post(url + "/chat/completions", json=body, headers=headers) as response:
        if response.status != 200:
            raise RuntimeError(f"{url}: HTTP {response.status}: {await response.text()}")
        async for raw in response.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"{url}: {chunk['error'].get('message')}")
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                now = time.perf_counter()
                if first is None:
                    first = now
                else:
                    gaps.append(now - last)
                last = now
    return RequestTiming((first or time.perf_counter()) - start, gaps, tokens)


async def run_level(
    url: str, model: str, api_key: str | None, conversations: list[list[dict]], max_tokens: int, concurrency: int
) -> LevelResult:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    pending: asyncio.Queue[list[dict]] = asyncio.Queue()
    for messages in conversations:
        pending.put_nowait(messages)
    timings: list[RequestTiming] = []

    async def client(session: aiohttp.ClientSession) -> None:
        while not pending.empty():
            messages = pending.get_nowait()
            body = {
                "model": model,
                "messages": messages,
                "max_tokens": max_tokens,
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            timings.append(await _one(session, url, headers, body))

    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        start = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    return LevelResult(concurrency, seconds, timings)


def table(results: list[LevelResult]) -> str:
    lines = [
        f"{'concurrency':>11} {'requests':>8} {'TTFT p50/p90/p99 (ms)':>24} {'ITL p50/p90/p99 (ms)':>24} "
        f"{'output tok/s':>12}"
    ]
    return "\n".join(lines + [r.row() for r in results])
