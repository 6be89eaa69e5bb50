"""The engine thread: requests from several threads and from asyncio, streaming, aborts that free the KV blocks,
bad requests that leave it serving, a full queue, stats snapshots, and stopping with and without draining."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from app.engine_thread import EngineDeadError, EngineStoppedError, EngineThread, QueueFullError
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
    # The last outputs reach their callers before the engine thread publishes the idle snapshot that follows.
    emptied = threading.Event()
    thread.add_listener(lambda s: s.stats.num_blocks_used == 0 and s.stats.num_running == 0 and emptied.set())
    assert emptied.wait(timeout=30)


def _hold_engine_thread(thread, outputs: list | None = None, max_tokens: int = 2):
    """Submit a request whose first output blocks the engine thread until the returned event is set, so that
    commands queued meanwhile wait for acceptance. Its outputs go to `outputs`."""
    blocked, release = threading.Event(), threading.Event()

    def on_output(out):
        if outputs is not None:
            outputs.append(out)
        if not blocked.is_set():
            blocked.set()
            release.wait(timeout=30)

    thread.submit(PROMPTS[3], SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True), on_output)
    assert blocked.wait(timeout=30)
    return release


def test_a_caller_cancelled_before_acceptance_leaves_the_engine_serving_and_its_request_unrun(llm, thread):
    engine = llm.llm_engine
    before = engine.get_stats().generation_tokens_total
    release = _hold_engine_thread(thread)

    async def main():
        long = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
        task = asyncio.create_task(anext(thread.generate(PROMPTS[0], long, request_id="gone")))
        await asyncio.sleep(0)  # the task submits, then waits for acceptance
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        return [out async for out in thread.generate(PROMPTS[1], GREEDY)][-1]

    last = asyncio.run(main())
    assert last.finished and len(last.outputs[0].token_ids) == 12  # the thread serves on
    assert thread._thread.is_alive() and thread.failure is None
    assert not engine.has_request("gone")
    # Only the holder's 2 tokens and the later request's 12: the cancelled one never ran.
    assert engine.get_stats().generation_tokens_total - before == 2 + 12
    assert thread.num_unfinished == 0


def test_a_caller_cancelled_right_after_acceptance_has_its_request_aborted(llm, thread):
    engine = llm.llm_engine
    before = engine.get_stats().generation_tokens_total
    long = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    accepted = threading.Event()
    real_add = engine.add_request

    def add_and_signal(*args, **kwargs):
        real_add(*args, **kwargs)
        accepted.set()

    async def main():
        task = asyncio.create_task(anext(thread.generate(PROMPTS[0], long, request_id="leaves")))
        await asyncio.get_running_loop().run_in_executor(None, accepted.wait, 30)
        task.cancel()  # accepted, but its caller has seen nothing yet
        with pytest.raises(asyncio.CancelledError):
            await task

    engine.add_request = add_and_signal
    try:
        asyncio.run(main())
    finally:
        del engine.add_request
    emptied = threading.Event()
    thread.add_listener(lambda s: s.stats.num_running == 0 and s.stats.num_waiting == 0 and emptied.set())
    assert emptied.wait(timeout=30)
    assert not engine.has_request("leaves") and thread.num_unfinished == 0
    assert engine.get_stats().generation_tokens_total - before < 50  # far fewer than the 200 asked for


def test_a_dead_engine_thread_tells_every_caller_in_words(llm):
    engine = llm.llm_engine
    t = EngineThread(engine, stats_interval=0.0).start()
    failures, running = [], []
    t.add_failure_listener(failures.append)
    release = _hold_engine_thread(t, running, max_tokens=200)  # running when the thread dies
    queued = t.submit(PROMPTS[0], GREEDY, lambda out: None)  # waiting for acceptance when it dies

    def broken_stats():
        raise RuntimeError("a bug in the stats")

    t.add_listener(lambda s: None)  # publishing reads the stats: the bug is hit on the engine thread
    engine.get_stats = broken_stats
    try:
        release.set()
        t._thread.join(timeout=30)
    finally:
        del engine.get_stats
    assert not t._thread.is_alive()
    assert len(failures) == 1 and "a bug in the stats" in str(failures[0])
    assert t.failure is failures[0]
    assert isinstance(running[-1], EngineDeadError)
    assert "internal error" in str(running[-1]) and "load the model again" in str(running[-1])
    with pytest.raises(EngineDeadError):
        queued.result(timeout=5)
    with pytest.raises(EngineDeadError):
        t.submit(PROMPTS[1], GREEDY, lambda out: None)
    late = []
    t.add_failure_listener(late.append)  # a listener added after the death hears of it at once
    assert late == failures and t.num_unfinished == 0
    t.stop()
    assert engine.get_stats().num_blocks_used == 0


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
    import engine.stats as stats_module

    engine = llm.llm_engine
    t = EngineThread(engine, stats_interval=0.0).start()
    snapshots = []
    t.add_listener(snapshots.append)
    done = threading.Event()
    t.submit(PROMPTS[0], GREEDY, lambda out: out.finished and done.set())
    assert done.wait(timeout=30)
    assert engine.get_stats().generation_tokens_per_s > 0
    real = stats_module.time.perf_counter
    monkeypatch.setattr(stats_module.time, "perf_counter", lambda: real() + 60.0)  # a minute later
    assert engine.get_stats().generation_tokens_per_s == 0.0
    count = len(snapshots)
    deadline = time.monotonic() + 5
    while len(snapshots) == count and time.monotonic() < deadline:  # idle snapshots keep coming
        time.sleep(0.05)
    t.stop()
    assert len(snapshots) > count and snapshots[-1].stats.generation_tokens_per_s == 0.0


def test_outputs_carry_the_blocks_their_request_holds_only_when_asked(llm, thread):
    """The counts ride on each output, taken on the engine thread right after its step: the callback (called there
    too, before the next step) finds the same blocks in the request's block tables."""
    engine = llm.llm_engine
    seen: dict[str, list] = {"counted": [], "plain": []}
    done = {rid: threading.Event() for rid in seen}

    def recorder(rid: str):
        def record(out) -> None:
            tables = [s.block_table for s in engine.scheduler.running_seqs() if s.request_id == rid]
            seen[rid].append((out.blocks, len({b for t in tables for b in t}), out.finished))
            if out.finished:
                done[rid].set()

        return record

    thread.submit(PROMPTS[1], GREEDY, recorder("counted"), "counted", report_blocks=True)
    thread.submit(PROMPTS[2], GREEDY, recorder("plain"), "plain")
    for event in done.values():
        event.wait()
    *running, last = seen["counted"]
    assert len(running) == 11 and all(blocks.num_blocks == held > 0 for blocks, held, _ in running)
    assert last[0] is None and last[2]  # finished: its blocks are already back in the pool
    assert [blocks for blocks, _, _ in seen["plain"]] == [None] * 12
