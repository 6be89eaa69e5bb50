"""One thread owns the LLMEngine and steps it whenever work is queued; everyone else talks to it through here.

The engine is single-threaded and synchronous (engine/llm_engine.py). Callers on other threads (the HTTP server's
event loop, the desktop app's UI thread, workers) submit and abort requests through a command queue that the
engine thread drains between steps; outputs go back through per-request callbacks, which asyncio callers wrap in
an async iterator. Every `stats_interval` seconds at most, listeners get a snapshot of the engine's stats and
block map, taken on the engine thread so it is consistent, with the memory the process and the engine hold.

Nothing a caller, a callback or a listener does can end the engine thread: a caller cancelled while its request
waits for acceptance has it dropped (or aborted once accepted), and callbacks and listeners that raise are logged.
If the thread dies anyway (a bug in the engine), every waiting request gets EngineDeadError in words, later
submits are refused with it, and failure listeners (the server's /health, the desktop window) are told.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from app.library.machine import MemoryUse, engine_memory
from engine import BeamSearchParams, BlockMap, EngineStats, LLMEngine, PromptType, RequestOutput, SamplingParams

logger = logging.getLogger(__name__)

# What a request's callback receives: its outputs as they grow, or the exception that ended it.
OutputCallback = Callable[[RequestOutput | BaseException], None]
StatsListener = Callable[["EngineSnapshot"], None]
FailureListener = Callable[["EngineDeadError"], None]


class QueueFullError(RuntimeError):
    """More requests than max_queue are unfinished: the caller should retry later (HTTP 503 + Retry-After)."""


class EngineStoppedError(RuntimeError):
    """The engine thread is stopping or stopped and takes no new requests."""


class EngineDeadError(EngineStoppedError):
    """The engine thread ended on an internal error: no request runs until the model is loaded again."""


@dataclass(frozen=True)
class EngineSnapshot:
    stats: EngineStats
    block_map: BlockMap
    time: float
    memory: MemoryUse  # the process's resident RAM, the engine's weights and KV pool
    speculative: bool  # the engine drafts tokens (a speculative_config was given)


@dataclass
class _Submit:
    request_id: str
    prompt: PromptType
    params: SamplingParams | BeamSearchParams
    callback: OutputCallback
    accepted: concurrent.futures.Future
    report_blocks: bool


@dataclass
class _Abort:
    request_id: str


_EMPTY = object()  # no command queued
IDLE_SNAPSHOT_S = 1.0


class EngineThread:
    def __init__(self, engine: LLMEngine, max_queue: int | None = None, stats_interval: float = 0.05) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self.stats_interval = stats_interval
        self._commands: queue.SimpleQueue[_Submit | _Abort | None] = queue.SimpleQueue()
        self._callbacks: dict[str, OutputCallback] = {}  # engine thread only
        self._report_blocks: set[str] = set()  # requests whose outputs carry their KV blocks; engine thread only
        self._num_unfinished = 0  # submitted, not yet finished; guarded by _lock
        self._lock = threading.Lock()
        self._listeners: list[StatsListener] = []
        self._failure_listeners: list[FailureListener] = []
        self._failure: EngineDeadError | None = None  # set once, when the thread dies; guarded by _lock
        self._ids = itertools.count()
        self._stopping = False
        self._last_snapshot_at = 0.0
        self._thread = threading.Thread(target=self._run, name="kvstudio-engine", daemon=True)

    # ---- any thread -------------------------------------------------------------------------------------------
    def start(self) -> EngineThread:
        self._thread.start()
        return self

    @property
    def failure(self) -> EngineDeadError | None:
        """Why the engine thread died, or None while it serves (or after a clean stop)."""
        with self._lock:
            return self._failure

    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    @property
    def num_unfinished(self) -> int:
        with self._lock:
            return self._num_unfinished

    def submit(
        self,
        prompt: PromptType,
        params: SamplingParams | BeamSearchParams,
        callback: OutputCallback,
        request_id: str | None = None,
        report_blocks: bool = False,
    ) -> concurrent.futures.Future:
        """Queue a request. The returned future resolves to its request id once the engine has accepted it, or
        raises the engine's ValueError for a bad request. Raises QueueFullError / EngineStoppedError at once.
        With report_blocks, each output carries the KV blocks the request holds after the step that made it
        (RequestOutput.blocks), counted here on the engine thread so the caller never reads the engine's state."""
        accepted: concurrent.futures.Future = concurrent.futures.Future()
        rid = request_id if request_id is not None else self.new_request_id()
        with self._lock:
            if self._failure is not None:
                raise self._failure
            if self._stopping:
                raise EngineStoppedError("the engine is shutting down")
            if self.max_queue is not None and self._num_unfinished >= self.max_queue:
                raise QueueFullError(f"{self._num_unfinished} requests are already queued (limit {self.max_queue})")
            self._num_unfinished += 1
            # Queued under the lock: a dying engine thread sets _failure under it too, then drains the queue, so
            # no submit can slip in after the drain and wait forever.
            self._commands.put(_Submit(rid, prompt, params, callback, accepted, report_blocks))
        return accepted

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks; its callback gets nothing more. Unknown ids are ignored."""
        self._commands.put(_Abort(request_id))

    async def generate(
        self, prompt: PromptType, params: SamplingParams | BeamSearchParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as they grow, the last one finished. Leaving the loop early (a client that
        went away, a cancelled task) aborts the request at once, also while it still waits to be accepted."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        rid = request_id if request_id is not None else self.new_request_id()
        accepted = self.submit(prompt, params, lambda item: loop.call_soon_threadsafe(outputs.put_nowait, item), rid)
        finished = False
        try:
            # Cancelled here, the future is cancelled too: the engine thread then drops the request unaccepted,
            # or, if it accepted it already, the abort below stops it. (A refused request raises here too; the
            # abort that follows finds nothing to stop.)
            await asyncio.wrap_future(accepted)
            while not finished:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(rid)

    def add_listener(self, listener: StatsListener) -> None:
        """listener(snapshot) is called on the engine thread after steps (at most every stats_interval seconds)
        and once when the engine goes idle; it must be quick and thread-safe (emit a signal, store a value)."""
        self._listeners.append(listener)

    def remove_listener(self, listener: StatsListener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def add_failure_listener(self, listener: FailureListener) -> None:
        """listener(error) is called once, on the dying engine thread, if the thread ends on an internal error;
        at once if it has already."""
        with self._lock:
            failure = self._failure
            if failure is None:
                self._failure_listeners.append(listener)
        if failure is not None:
            listener(failure)

    def stop(self, drain_timeout: float | None = None) -> None:
        """Take no new requests; wait up to drain_timeout seconds (None: no wait) for the running ones to finish,
        abort the rest, and end the thread."""
        with self._lock:
            self._stopping = True
        deadline = time.monotonic() + (drain_timeout or 0.0)
        while drain_timeout and self.num_unfinished and time.monotonic() < deadline:
            time.sleep(0.01)
        self._commands.put(None)
        self._thread.join()

    # ---- the engine thread ------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as e:  # a bug: say so to everyone waiting instead of leaving them hanging
            self._die(e)

    def _serve(self) -> None:
        engine = self.engine
        while True:
            # Idle: sleep until a command arrives (waking once a second so listeners see the rates fall to 0).
            # Busy: take whatever is queued, then step.
            if engine.has_unfinished_requests():
                command = self._next_command()
            else:
                try:
                    command = self._commands.get(timeout=IDLE_SNAPSHOT_S)
                except queue.Empty:
                    self._publish(force=True)
                    continue
            while command is not _EMPTY:
                if command is None:  # stop()
                    self._shutdown()
                    return
                self._handle(command)
                command = self._next_command()
            if engine.has_unfinished_requests():
                self._step()
            self._publish(force=not engine.has_unfinished_requests())

    def _next_command(self):
        try:
            return self._commands.get_nowait()
        except queue.Empty:
            return _EMPTY

    def _handle(self, command: _Submit | _Abort) -> None:
        engine = self.engine
        if isinstance(command, _Abort):
            callback = self._callbacks.pop(command.request_id, None)
            self._report_blocks.discard(command.request_id)
            if callback is not None:
                engine.abort_request(command.request_id)
                self._finished()
            return
        if not command.accepted.set_running_or_notify_cancel():
            self._finished()  # its caller left before the engine saw it: nothing to run, nothing to abort
            return
        try:
            engine.add_request(command.request_id, command.prompt, command.params)
        except Exception as e:  # a bad request: the submitter gets the engine's error, the engine serves on
            self._finished()
            command.accepted.set_exception(e)
            return
        self._callbacks[command.request_id] = command.callback
        if command.report_blocks:
            self._report_blocks.add(command.request_id)
        command.accepted.set_result(command.request_id)

    def _step(self) -> None:
        engine = self.engine
        try:
            outputs = engine.step()
        except Exception as e:
            # The engine aborted the failed step's requests and serves on; tell their callers why.
            logger.exception("engine step failed")
            for rid in [r for r in self._callbacks if not engine.has_request(r)]:
                self._report_blocks.discard(rid)
                self._deliver(self._callbacks.pop(rid), e)
                self._finished()
            return
        for out in outputs:
            callback = self._callbacks.get(out.request_id)
            if callback is None:
                continue
            if out.request_id in self._report_blocks:
                out.blocks = engine.get_request_blocks(out.request_id)  # None once finished: its blocks are freed
            if out.finished:
                del self._callbacks[out.request_id]
                self._report_blocks.discard(out.request_id)
                self._finished()
            self._deliver(callback, out)

    def _deliver(self, callback: OutputCallback, item: RequestOutput | BaseException) -> None:
        try:
            callback(item)
        except Exception:  # a broken consumer must not take the engine down with it
            logger.exception("an output callback failed")

    def _finished(self) -> None:
        with self._lock:
            self._num_unfinished -= 1

    def _publish(self, force: bool) -> None:
        now = time.monotonic()
        if not self._listeners or (not force and now - self._last_snapshot_at < self.stats_interval):
            return
        self._last_snapshot_at = now
        engine = self.engine
        snapshot = EngineSnapshot(
            engine.get_stats(),
            engine.get_block_map(),
            now,
            engine_memory(engine),
            engine.config.speculative is not None,
        )
        for listener in list(self._listeners):  # listeners come and go from other threads
            try:
                listener(snapshot)
            except Exception:
                logger.exception("a stats listener failed")

    def _die(self, error: BaseException) -> None:
        logger.critical("the engine thread died", exc_info=error)
        dead = EngineDeadError(
            f"the engine stopped after an internal error ({type(error).__name__}: {error}); load the model again"
        )
        dead.__cause__ = error
        with self._lock:
            self._failure = dead
            self._stopping = True
            listeners, self._failure_listeners = self._failure_listeners, []
        for rid, callback in list(self._callbacks.items()):
            try:
                self.engine.abort_request(rid)
            except Exception:  # the engine is broken already: its callers must still hear why
                logger.exception("aborting %s after the engine thread's failure failed", rid)
            self._deliver(callback, dead)
            self._finished()
        self._callbacks.clear()
        self._refuse_queued(dead)
        for listener in listeners:
            try:
                listener(dead)
            except Exception:
                logger.exception("a failure listener failed")

    def _refuse_queued(self, error: EngineStoppedError) -> None:
        while (command := self._next_command()) is not _EMPTY:
            if isinstance(command, _Submit):
                if command.accepted.set_running_or_notify_cancel():
                    command.accepted.set_exception(error)
                self._finished()

    def _shutdown(self) -> None:
        """Abort whatever is still running; its callers get EngineStoppedError."""
        for rid, callback in list(self._callbacks.items()):
            self.engine.abort_request(rid)
            self._deliver(callback, EngineStoppedError("the engine stopped before the request finished"))
            self._finished()
        self._callbacks.clear()
        self._refuse_queued(EngineStoppedError("the engine stopped"))
        self._publish(force=True)
