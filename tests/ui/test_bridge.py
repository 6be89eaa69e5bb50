"""The bridge from the engine thread to Qt: a model loads on a worker while the UI thread keeps turning,
requests stream back as signals, failures arrive in words, and snapshots flow to the monitor.

Waits end on what they wait for, never on the clock: a loaded machine only makes them slower. A hang is caught by
the module's pytest-timeout mark."""

from __future__ import annotations

import math
import threading
import weakref

import pytest
from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QApplication

from engine import LLM, SamplingParams, llm_engine
from ui.bridge import (
    EngineBridge,
    EngineDied,
    ModelLoadCancelled,
    ModelLoaded,
    ModelLoadFailed,
    ModelLoadStage,
    RequestFailed,
)

pytestmark = pytest.mark.timeout(600)
UNTIL_DONE = math.inf  # qtbot.waitUntil's timeout: none

OPTIONS = {"max_model_len": 256, "kv_cache_memory": 0.01}
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


@pytest.fixture
def bridge(qtbot, tiny_chat_model):
    b = EngineBridge()
    with qtbot.waitSignal(b.model_loaded, timeout=None) as loaded:
        b.load_model(str(tiny_chat_model), OPTIONS)
    assert isinstance(loaded.args[0], ModelLoaded) and loaded.args[0].max_model_len == 256
    yield b
    b.shutdown()


def test_loading_keeps_the_ui_thread_turning(qtbot, tiny_chat_model):
    """The load runs on a worker: held inside it, the loader waits while the UI thread's timer ticks on."""
    inside, release = threading.Event(), threading.Event()

    def make_llm(model: str, options: dict, on_load_stage) -> LLM:
        inside.set()
        release.wait()
        return LLM(model, **options)

    b = EngineBridge(make_llm)
    ticks: list[None] = []
    timer = QTimer(interval=1, timeout=lambda: ticks.append(None))
    timer.start()
    try:
        loader = b.load_model(str(tiny_chat_model), OPTIONS)
        qtbot.waitUntil(inside.is_set, timeout=UNTIL_DONE)
        held_at = len(ticks)
        qtbot.waitUntil(lambda: len(ticks) >= held_at + 50, timeout=UNTIL_DONE)  # 50 ticks, the load still held
        assert loader.is_alive() and b.engine_thread is None
        with qtbot.waitSignal(b.model_loaded, timeout=None):
            release.set()
    finally:
        release.set()
        timer.stop()
        b.shutdown()
    assert b.engine_thread is None  # shut down


def test_a_request_streams_back_as_signals(qtbot, bridge, tiny_chat_model):
    updates = []
    bridge.request_update.connect(updates.append)
    rid = bridge.submit("Hello there", GREEDY)
    qtbot.waitUntil(lambda: bool(updates) and updates[-1].finished, timeout=UNTIL_DONE)
    assert {u.request_id for u in updates} == {rid}
    lengths = [u.num_tokens for u in updates]
    assert lengths == sorted(lengths) and lengths[-1] == 10 and updates[-1].finish_reason == "length"
    assert not any(u.finished for u in updates[:-1])
    expected = LLM(str(tiny_chat_model), **OPTIONS).generate("Hello there", GREEDY, use_tqdm=False)
    assert updates[-1].text == expected[0].outputs[0].text


def test_a_rejected_request_fails_in_words(qtbot, bridge):
    with qtbot.waitSignal(bridge.request_failed, timeout=None) as failed:
        rid = bridge.submit({"prompt_token_ids": []}, GREEDY)
    assert failed.args[0] == RequestFailed(rid, "the prompt is empty", refused=True)


def test_a_model_that_cannot_load_fails_in_words(qtbot, tmp_path):
    b = EngineBridge()
    with qtbot.waitSignal(b.model_load_failed, timeout=None) as failed:
        b.load_model(str(tmp_path / "missing.gguf"), OPTIONS)
    assert isinstance(failed.args[0], ModelLoadFailed) and "missing.gguf" in failed.args[0].message
    assert b.engine_thread is None
    with pytest.raises(RuntimeError, match="no model is loaded"):
        b.submit("hi", GREEDY)


def test_snapshots_follow_the_pool(qtbot, bridge):
    snapshots = []
    bridge.snapshot.connect(snapshots.append)
    rid = bridge.submit("Count", SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
    qtbot.waitUntil(lambda: any(s.stats.num_blocks_used for s in snapshots), timeout=UNTIL_DONE)
    qtbot.waitUntil(lambda: snapshots[-1].stats.num_blocks_used == 0, timeout=UNTIL_DONE)
    assert any(rid in holders for s in snapshots for holders in s.block_map.owners.values())


def test_a_model_too_big_for_the_free_memory_is_refused_before_loading(qtbot, tiny_chat_model, monkeypatch):
    from app.library import machine

    loads = []
    b = EngineBridge(lambda model, options, on_load_stage: loads.append(model))
    little = machine.MachineMemory("cpu", 2**30, 2**20, 4, machine.CPU_RESERVE)
    monkeypatch.setattr(machine, "machine_memory", lambda: little)
    with qtbot.waitSignal(b.model_load_failed, timeout=None) as failed:
        b.load_model(str(tiny_chat_model), OPTIONS)
    assert failed.args[0].message.startswith("Too big for this machine: needs about") and not loads
    assert b.engine_thread is None


def test_the_fit_check_steps_aside_while_a_gpu_engine_holds_the_card(tiny_chat_model, monkeypatch):
    from types import SimpleNamespace

    import torch

    from app.library import machine

    b = EngineBridge()
    monkeypatch.setattr(
        machine, "machine_memory", lambda: machine.MachineMemory("cpu", 2**30, 2**20, 4, machine.CPU_RESERVE)
    )
    assert b.check_fit(str(tiny_chat_model), {}).verdict == "too big"
    b._thread = SimpleNamespace(engine=SimpleNamespace(config=SimpleNamespace(torch_device=torch.device("cuda"))))
    assert b.check_fit(str(tiny_chat_model), {}) is None
    b._thread = SimpleNamespace(engine=SimpleNamespace(config=SimpleNamespace(torch_device=torch.device("cpu"))))
    assert b.check_fit(str(tiny_chat_model), {}).verdict == "too big"


def test_a_loaded_model_is_kept_out_of_the_cyclic_collectors_walks(bridge):
    import gc

    # torch, transformers and the model's own objects: a full collection over them froze the UI thread for 250 ms.
    assert gc.get_freeze_count() > 100_000


def wait_reply(qtbot, bridge: EngineBridge, rid: str) -> list:
    updates = []
    bridge.request_update.connect(lambda u: u.request_id == rid and updates.append(u))
    qtbot.waitUntil(lambda: bool(updates) and updates[-1].finished, timeout=UNTIL_DONE)
    return updates


def test_a_load_reports_its_stages_on_the_ui_thread_before_it_is_loaded(qtbot, tiny_chat_model):
    b = EngineBridge()
    events: list[tuple[object, bool]] = []  # each signal's payload, and whether it ran on the UI thread

    def record(payload: object) -> None:
        events.append((payload, threading.current_thread() is threading.main_thread()))

    b.model_load_stage.connect(record)
    b.model_loaded.connect(record)
    try:
        with qtbot.waitSignal(b.model_loaded, timeout=None):
            b.load_model(str(tiny_chat_model), OPTIONS)
    finally:
        b.shutdown()
    assert all(on_ui_thread for _, on_ui_thread in events)
    *stages, (loaded, _) = events
    assert isinstance(loaded, ModelLoaded)
    assert all(isinstance(s, ModelLoadStage) and s.model == str(tiny_chat_model) for s, _ in stages)
    assert [s.stage for s, _ in stages] == [
        "Reading the model file",
        "Building the CPU kernels",
        "Loading the weights",
        "Allocating the KV pool",
        "Warming up: building the fused decode step",
    ]


def test_the_model_chosen_last_is_loaded_even_when_an_earlier_load_ends_later(qtbot, tiny_chat_model):
    first_may_finish = threading.Event()
    engines: dict[str, weakref.ref] = {}

    def make_llm(model: str, options: dict, on_load_stage) -> LLM:
        llm = LLM(str(tiny_chat_model), on_load_stage=on_load_stage, **options)
        engines[model] = weakref.ref(llm.llm_engine)
        if model == "first":
            first_may_finish.wait()  # the first choice takes longer: it ends after the second has loaded
            on_load_stage("The first choice, still loading")  # too late: no news
        return llm

    b = EngineBridge(make_llm)
    loaded, failed, stages = [], [], []
    b.model_loaded.connect(loaded.append)
    b.model_load_failed.connect(failed.append)
    b.model_load_stage.connect(stages.append)
    first = b.load_model("first", OPTIONS)
    with qtbot.waitSignal(b.model_loaded, timeout=None):
        b.load_model("second", OPTIONS)
    first_may_finish.set()
    first.join()
    QApplication.processEvents()  # whatever the first load emitted would be delivered now
    assert [m.model for m in loaded] == ["second"] and failed == []
    assert "The first choice, still loading" not in [s.stage for s in stages]
    assert b.loaded_model == "second" and b.engine_thread.engine is engines["second"]()
    # Superseded while it loads, the first stops at its next stage and builds no engine; superseded once built
    # (the second load_model came late), its engine is dropped: never installed, its memory released.
    assert "first" not in engines or engines["first"]() is None
    rid = b.submit("Hello there", GREEDY)
    assert wait_reply(qtbot, b, rid)[-1].num_tokens == 10
    b.shutdown()


def test_a_cancelled_load_stops_at_its_next_stage_frees_what_it_built_and_the_model_before_answers(
    qtbot, tiny_chat_model, monkeypatch
):
    """Cancelled while it reads the weights, the load stops when that stage ends (its stage callback raises
    LoadCancelled on the loader): it never allocates a KV pool, its weights are freed, it says it was cancelled
    naming the model still served, and that model answers on the engine thread that served it before."""
    models: list[weakref.ref] = []  # each load's model, as build_model returned it
    build_model = llm_engine.build_model

    def recording_build_model(*args, **kwargs):
        built = build_model(*args, **kwargs)
        models.append(weakref.ref(built.model))
        return built

    monkeypatch.setattr(llm_engine, "build_model", recording_build_model)
    reading, release = threading.Event(), threading.Event()

    def make_llm(model: str, options: dict, on_load_stage) -> LLM:
        def stage(sentence: str) -> None:
            on_load_stage(sentence)
            if model == "second" and sentence == "Loading the weights":
                reading.set()
                release.wait()  # the weights load while the user clicks Cancel

        return LLM(str(tiny_chat_model), on_load_stage=stage, **options)

    b = EngineBridge(make_llm)
    try:
        with qtbot.waitSignal(b.model_loaded, timeout=None):
            b.load_model("first", OPTIONS)
        serving = b.engine_thread
        stages, outcomes = [], []
        b.model_load_stage.connect(stages.append)
        for signal in (b.model_loaded, b.model_load_failed, b.model_load_cancelled):
            signal.connect(outcomes.append)
        b.load_model("second", OPTIONS)
        qtbot.waitUntil(reading.is_set, timeout=UNTIL_DONE)
        assert b.load_under_way
        with qtbot.waitSignal(b.model_load_cancelled, timeout=None):
            assert b.cancel_load()
            release.set()
        assert outcomes == [ModelLoadCancelled("second", "first")]
        assert outcomes[0].message == "Cancelled loading second: still running first."
        assert not b.load_under_way and not b.cancel_load()  # nothing under way to cancel now
        assert [s.stage for s in stages][-1] == "Loading the weights"  # no KV pool was allocated
        assert b.engine_thread is serving and b.loaded_model == "first"
        assert len(models) == 2 and models[0]() is not None and models[1]() is None  # the second's weights freed
        rid = b.submit("Hello there", GREEDY)
        assert wait_reply(qtbot, b, rid)[-1].num_tokens == 10
    finally:
        release.set()
        b.shutdown()


def test_a_load_cancelled_with_no_model_before_says_none_is_loaded_and_a_later_load_is_not_cancelled(
    qtbot, tiny_chat_model
):
    """With nothing loaded before, the cancelled load says so; a load chosen while the cancelled one still unwinds
    supersedes it (no cancel is reported for a load the user has moved on from) and loads."""
    reading, release = threading.Event(), threading.Event()

    def make_llm(model: str, options: dict, on_load_stage) -> LLM:
        def stage(sentence: str) -> None:
            on_load_stage(sentence)
            if model == "held" and sentence == "Reading the model file":
                reading.set()
                release.wait()

        return LLM(str(tiny_chat_model), on_load_stage=stage, **options)

    b = EngineBridge(make_llm)
    outcomes: list[object] = []
    for signal in (b.model_loaded, b.model_load_failed, b.model_load_cancelled):
        signal.connect(outcomes.append)
    try:
        loader = b.load_model("held", OPTIONS)
        qtbot.waitUntil(reading.is_set, timeout=UNTIL_DONE)
        with qtbot.waitSignal(b.model_load_cancelled, timeout=None) as cancelled:
            b.cancel_load()
            release.set()
        assert cancelled.args[0].message == "Cancelled loading held: no model is loaded."
        assert b.engine_thread is None and b.loaded_model is None

        reading.clear()
        release.clear()
        loader = b.load_model("held", OPTIONS)
        qtbot.waitUntil(reading.is_set, timeout=UNTIL_DONE)
        b.cancel_load()
        with qtbot.waitSignal(b.model_loaded, timeout=None):
            b.load_model("next", OPTIONS)  # chosen before the cancelled load has unwound
            release.set()
        loader.join()
        QApplication.processEvents()  # whatever the cancelled load emitted would be delivered now
        assert [type(o).__name__ for o in outcomes] == ["ModelLoadCancelled", "ModelLoaded"]
        assert b.loaded_model == "next"
    finally:
        release.set()
        b.shutdown()


def test_a_truncated_model_is_refused_in_words_and_the_model_loaded_before_serves_on(
    qtbot, bridge, tiny_chat_model, smollm2_gguf, tmp_path
):
    cut = tmp_path / "cut.gguf"
    with smollm2_gguf.open("rb") as f:
        cut.write_bytes(f.read(5_000_000))  # its header is whole, its tensors are not
    serving = bridge.engine_thread
    with qtbot.waitSignal(bridge.model_load_failed, timeout=None) as failed:
        bridge.load_model(str(cut), OPTIONS)
    assert failed.args[0].model == str(cut) and failed.args[0].message.startswith(f"{cut} is truncated")
    assert bridge.engine_thread is serving and bridge.loaded_model == str(tiny_chat_model)
    rid = bridge.submit_chat([{"role": "user", "content": "Still there?"}], GREEDY)
    assert wait_reply(qtbot, bridge, rid)[-1].num_tokens == 10


def test_an_engine_thread_that_dies_is_said_with_the_model_to_load_again(qtbot, bridge, tiny_chat_model, break_engine):
    failures = []
    bridge.request_failed.connect(failures.append)
    break_engine(bridge.engine_thread.engine)
    with qtbot.waitSignal(bridge.engine_died, timeout=None) as died:
        rid = bridge.submit("Hello there", SamplingParams(max_tokens=200, ignore_eos=True))
    message = "the engine stopped after an internal error (RuntimeError: stats broke); load the model again"
    assert died.args[0] == EngineDied(str(tiny_chat_model), OPTIONS, message)
    assert failures == [RequestFailed(rid, message)]  # the running request ended with it (delivered first)
    assert bridge.loaded_model is None
    with pytest.raises(RuntimeError, match="internal error"):
        bridge.submit("Anyone?", GREEDY)

    with qtbot.waitSignal(bridge.model_loaded, timeout=None):
        bridge.load_model(died.args[0].model, died.args[0].options)
    assert bridge.loaded_model == str(tiny_chat_model)
    rid = bridge.submit("Hello again", GREEDY)
    assert wait_reply(qtbot, bridge, rid)[-1].num_tokens == 10
