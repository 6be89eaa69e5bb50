"""The engine thread: requests from several threads and from asyncio, streaming, aborts that free the KV blocks,
bad requests that leave it serving, a full queue, stats snapshots, and stopping with and without draining."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from app.engine_thread import EngineStoppedError, EngineThread, QueueFullError
from engine import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
PROMPTS = ["Hello there", "The quick brown fox", "Paged attention keeps keys", "Once upon a time"]


@pytest.fixture(scope="module")
def llm(tiny_chat_model) -> LLM:
    return LLM(str(tiny_chat_model), max_model_len=256, kv_cache_memory=0.01)


@pytest.fixture
def thread(llm):
    t = EngineThread(llm.llm_engine, stats_interval=0.0).start()
    yield t
    t.stop()
    assert llm.llm_engine.get_stats().num_blocks_used == 0


def expected(llm) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def test_requests_from_several_threads_get_what_they_get_alone(llm, thread):
    want = expected(llm)
    got: dict[int, list[int]] = {}
    done = threading.Barrier(len(PROMPTS) + 1)

    def client(i: int) -> None:
        finished = threading.Event()

        def on_output(out) -> None:
            assert not isinstance(out, BaseException), out
            if out.finished:
                got[i] = out.outputs[0].token_ids
                finished.set()

        thread.submit(PROMPTS[i], GREEDY, on_output).result(timeout=30)
        finished.wait(timeout=60)
        done.wait()

    workers = [threading.Thread(target=client, args=(i,)) for i in range(len(PROMPTS))]
    for w in workers:
        w.start()
    done.wait(timeout=120)
    assert [got[i] for i in range(len(PROMPTS))] == want


def test_async_streams_grow_to_the_final_output(llm, thread):
    want = expected(llm)

    async def run(prompt):
        lengths, last = [], None
        async for out in thread.generate(prompt, GREEDY):
            lengths.append(len(out.outputs[0].token_ids))
            last = out
        return lengths, last

    async def main():
        return await asyncio.gather(*(run(p) for p in PROMPTS))

    results = asyncio.run(main())
    for (lengths, last), tokens in zip(results, want):
        assert lengths == sorted(lengths) and lengths[-1] == 12 and len(lengths) > 1
        assert last.finished and last.outputs[0].token_ids == tokens


def test_leaving_a_stream_early_aborts_the_request_and_frees_its_blocks(llm, thread):
    engine = llm.llm_engine
    long = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)

    async def main():
        async for out in thread.generate(PROMPTS[0], long, request_id="leaver"):
            if len(out.outputs[0].token_ids) >= 3:
                break
        for _ in range(200):  # the abort is a command the engine thread takes between steps
            if not engine.has_request("leaver"):
                break
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert not engine.has_request("leaver") and thread.num_unfinished == 0


def test_a_bad_request_fails_alone_and_the_thread_serves_on(llm, thread):
    async def main():
        with pytest.raises(ValueError, match="the prompt is empty"):
            async for _ in thread.generate({"prompt_token_ids": []}, GREEDY):
                pass
        return [out async for out in thread.generate(PROMPTS[1], GREEDY)][-1]

    last = asyncio.run(main())
    assert last.finished and len(last.outputs[0].token_ids) == 12


def test_a_full_queue_refuses_at_once(llm):
    t = EngineThread(llm.llm_engine, max_queue=2).start()
    long = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
    try:
        t.submit(PROMPTS[0], long, lambda out: None)
        t.submit(PROMPTS[1], long, lambda out: None)
        with pytest.raises(QueueFullError, match="limit 2"):
            t.submit(PROMPTS[2], long, lambda out: None)
    finally:
        t.stop(drain_timeout=60)
    assert t.num_unfinished == 0


def test_listeners_see_the_pool_fill_and_empty(llm, thread):
    snapshots = []
    thread.add_listener(snapshots.append)

    async def consume(prompt):
        return [out async for out in thread.generate(prompt, GREEDY)]

    async def main():
        await asyncio.gather(*(consume(p) for p in PROMPTS))

    asyncio.run(main())
    assert max(s.stats.num_blocks_used for s in snapshots) > 0
    assert any(s.block_map.owners for s in snapshots)
    assert snapshots[-1].stats.num_blocks_used == 0 and snapshots[-1].stats.num_running == 0


def test_stop_without_draining_tells_running_requests_why(llm):
    t = EngineThread(llm.llm_engine).start()
    errors, started = [], threading.Event()

    def on_output(out):
        if isinstance(out, BaseException):
            errors.append(out)
        else:
            started.set()

    t.submit(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True), on_output)
    assert started.wait(timeout=30)
    t.stop()
    assert len(errors) == 1 and isinstance(errors[0], EngineStoppedError)
    with pytest.raises(EngineStoppedError):
        t.submit(PROMPTS[0], GREEDY, on_output)
    assert llm.llm_engine.get_stats().num_blocks_used == 0


def test_stop_with_draining_lets_running_requests_finish(llm):
    t = EngineThread(llm.llm_engine).start()
    finished = []
    t.submit(PROMPTS[0], GREEDY, lambda out: finished.append(out.finished))
    t.stop(drain_timeout=60)
    assert finished and finished[-1] is True


def test_an_idle_engine_reports_zero_rates(llm, monkeypatch):
    import engine.llm_engine as llm_engine_module

    engine = llm.llm_engine
    t = EngineThread(engine, stats_interval=0.0).start()
    snapshots = []
    t.add_listener(snapshots.append)
    done = threading.Event()
    t.submit(PROMPTS[0], GREEDY, lambda out: out.finished and done.set())
    assert done.wait(timeout=30)
    assert engine.get_stats().generation_tokens_per_s > 0
    real = llm_engine_module.time.perf_counter
    monkeypatch.setattr(llm_engine_module.time, "perf_counter", lambda: real() + 60.0)  # a minute later
    assert engine.get_stats().generation_tokens_per_s == 0.0
    count = len(snapshots)
    deadline = time.monotonic() + 5
    while len(snapshots) == count and time.monotonic() < deadline:  # idle snapshots keep coming
        time.sleep(0.05)
    t.stop()
    assert len(snapshots) > count and snapshots[-1].stats.generation_tokens_per_s == 0.0
