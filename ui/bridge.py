"""The engine thread's callbacks turned into Qt signals with dataclass payloads; the UI only reacts to these.

Loading a model runs on a worker thread (it takes seconds), requests run on the engine thread; both emit from
their own threads, and Qt queues each emission to the receivers' thread, so slots run on the UI thread and
nothing the UI thread does ever waits for the engine.
"""
from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from PySide6.QtCore import QObject, Signal

from app.engine_thread import EngineThread
from engine import LLM, BeamSearchParams, RequestOutput, SamplingParams


@dataclass(frozen=True)
class ModelLoaded:
    model: str
    max_model_len: int
    seconds: float


@dataclass(frozen=True)
class ModelLoadFailed:
    model: str
    message: str


@dataclass(frozen=True)
class RequestUpdate:
    request_id: str
    output: RequestOutput        # cumulative: everything generated so far; output.finished on the last one


@dataclass(frozen=True)
class RequestFailed:
    request_id: str
    message: str


class EngineBridge(QObject):
    model_loading = Signal(str)          # the model being loaded
    model_loaded = Signal(object)        # ModelLoaded
    model_load_failed = Signal(object)   # ModelLoadFailed
    request_update = Signal(object)      # RequestUpdate
    request_failed = Signal(object)      # RequestFailed
    snapshot = Signal(object)            # app.engine_thread.EngineSnapshot, at most every stats_interval seconds

    def __init__(self, make_llm: Callable[[str, dict], LLM] = lambda model, options: LLM(model, **options),
                 stats_interval: float = 0.05, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._make_llm = make_llm
        self._stats_interval = stats_interval
        self._thread: EngineThread | None = None
        self._ids = itertools.count()
        self._lock = threading.Lock()   # guards _thread between the loader and the UI thread

    @property
    def engine_thread(self) -> EngineThread | None:
        """The running engine thread (the server switch serves from it), or None before a model is loaded."""
        with self._lock:
            return self._thread

    def load_model(self, model: str, options: dict | None = None) -> threading.Thread:
        """Load `model` on a worker thread, replacing the current one once it is ready; emits model_loading,
        then model_loaded or model_load_failed."""
        self.model_loading.emit(model)
        worker = threading.Thread(target=self._load, args=(model, dict(options or {})), name="kvstudio-loader",
                                  daemon=True)
        worker.start()
        return worker

    def _load(self, model: str, options: dict) -> None:
        start = time.perf_counter()
        try:
            llm = self._make_llm(model, options)
        except Exception as e:   # a bad path, a corrupt file, too little memory: said in words, never a crash
            self.model_load_failed.emit(ModelLoadFailed(model, str(e) or type(e).__name__))
            return
        thread = EngineThread(llm.llm_engine, stats_interval=self._stats_interval)
        thread.add_listener(self.snapshot.emit)
        thread.start()
        with self._lock:
            old, self._thread = self._thread, thread
        if old is not None:
            old.stop()
        self.model_loaded.emit(ModelLoaded(model, llm.llm_engine.model_config.max_model_len,
                                           time.perf_counter() - start))

    def submit(self, prompt: str | dict, params: SamplingParams | BeamSearchParams,
               request_id: str | None = None) -> str:
        """Queue a request; its outputs arrive as request_update, a rejection or failure as request_failed.
        Raises RuntimeError when no model is loaded and QueueFullError when the engine's queue is full."""
        thread = self.engine_thread
        if thread is None:
            raise RuntimeError("no model is loaded")
        rid = request_id if request_id is not None else f"ui-{next(self._ids)}"

        def deliver(item: RequestOutput | BaseException) -> None:
            if isinstance(item, BaseException):
                self.request_failed.emit(RequestFailed(rid, str(item)))
            else:
                self.request_update.emit(RequestUpdate(rid, item))

        def rejected(accepted) -> None:   # the engine refused the request (a ValueError naming what is wrong)
            if accepted.exception() is not None:
                self.request_failed.emit(RequestFailed(rid, str(accepted.exception())))

        thread.submit(prompt, params, deliver, rid).add_done_callback(rejected)
        return rid

    def abort(self, request_id: str) -> None:
        thread = self.engine_thread
        if thread is not None:
            thread.abort(request_id)

    def shutdown(self) -> None:
        """Stop the engine thread (the window is closing): running requests are aborted."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.stop()

