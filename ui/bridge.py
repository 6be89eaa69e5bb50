"""The engine thread's callbacks turned into Qt signals with dataclass payloads; the UI only reacts to these.

Loading a model runs on a worker thread (it takes seconds), requests run on the engine thread; both emit from
their own threads, and Qt queues each emission to the receivers' thread, so slots run on the UI thread and
nothing the UI thread does ever waits for the engine.

The model chosen last is the one loaded: a load_model call supersedes the loads still running, which stop at their
next stage (or, past the last one, are dropped uninstalled) without a signal, their memory released. cancel_load
stops the load under way the same way and then says so (model_load_cancelled). A load that fails or is cancelled
leaves the engine loaded before serving: loads run on a worker of their own, and the engine thread is replaced
only once a new engine is whole. If the engine thread dies (a bug in the engine), engine_died says so with the model
and options to load again; the requests it was running fail in words.

Chat and batch requests go to the current request target (ui/request_target.py): the in-process engine, or, once
the user connects one, a remote OpenAI-compatible endpoint (app/remote_client.py). The bridge holds the target and
forwards to it; either way replies arrive as the same RequestUpdate. The model store, the monitor and the server
page always work on the in-process engine.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PySide6.QtCore import QObject, Signal

from app.engine_thread import EngineDeadError, EngineThread
from app.library.hub_models import shown_name
from app.library.machine import ModelFit, check_model_fits
from app.remote_client import Endpoint, RemoteClient, TextUpdate, UpdateCallback, list_models
from engine import LLM, PromptType, RequestBlocks, SamplingParams
from ui.request_target import LocalTarget, RequestRefused, RequestTarget

# What the bridge loads a model with: make_llm(model, options, on_load_stage) -> LLM, where on_load_stage(sentence)
# is LLM's (engine/llm_engine.py) and a loader may call it too for stages of its own (a download first).
StageCallback = Callable[[str], None]
MakeLLM = Callable[[str, dict, StageCallback], LLM]


def _make_llm(model: str, options: dict, on_load_stage: StageCallback) -> LLM:
    return LLM(model, on_load_stage=on_load_stage, **options)


@dataclass(frozen=True)
class ModelLoadStage:
    """A stage of the current load has begun (reading the file, building the kernels, ...), in a sentence."""

    model: str
    stage: str


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
class ModelLoadCancelled:
    """The user cancelled the load of `model`: it stopped and released what it had allocated. `serving` is the
    model the engine still runs (loaded before), or None."""

    model: str
    serving: str | None

    @property
    def message(self) -> str:
        still = f"still running {shown_name(self.serving)}" if self.serving is not None else "no model is loaded"
        return f"Cancelled loading {shown_name(self.model)}: {still}."


class LoadCancelled(Exception):
    """Raised by a load's stage callback once the load is cancelled or superseded: it unwinds the loader between
    two stages, so nothing that load built stays referenced."""


@dataclass(frozen=True)
class EngineDied:
    """The engine thread ended on an internal error; load_model(model, options) brings the model back."""

    model: str
    options: dict
    message: str


@dataclass(frozen=True)
class RequestUpdate:
    """A reply so far (cumulative: everything generated yet); `finished` on the last one."""

    request_id: str
    text: str
    num_tokens: int
    finished: bool
    finish_reason: str | None = None  # "stop" | "length" | "abort", on the last one
    # From the in-process engine (None from a remote endpoint): the prompt's length, and for a chat the KV blocks
    # the request holds after the step that made this update (None on the last one: they are freed by then).
    num_prompt_tokens: int | None = None
    blocks: RequestBlocks | None = None


@dataclass(frozen=True)
class PreparedChat:
    """A chat ready to submit to the target it was prepared for (for the in-process engine, its chat template
    already rendered). Submitted after the target changed, it is prepared again for the new one."""

    messages: list[dict]
    target: RequestTarget
    prepared: Any  # target.prepare_chat(messages)

    @property
    def num_prompt_tokens(self) -> int | None:
        """The prompt's tokens for the in-process engine; None for a remote endpoint (its tokenizer is not here)."""
        return len(self.prepared["prompt_token_ids"]) if isinstance(self.target, LocalTarget) else None


@dataclass(frozen=True)
class ConnectionFailed:
    endpoint: Endpoint
    message: str


@dataclass(frozen=True)
class RequestFailed:
    request_id: str
    message: str
    refused: bool = False  # the engine turned the request down before running it: it produced nothing


class EngineBridge(QObject):
    model_loading = Signal(str)  # the model being loaded
    model_load_stage = Signal(object)  # ModelLoadStage, between model_loading and model_loaded (or _failed)
    model_loaded = Signal(object)  # ModelLoaded
    model_load_failed = Signal(object)  # ModelLoadFailed
    model_load_cancelled = Signal(object)  # ModelLoadCancelled: cancel_load's, in place of model_loaded / _failed
    engine_died = Signal(object)  # EngineDied
    request_update = Signal(object)  # RequestUpdate
    request_failed = Signal(object)  # RequestFailed
    snapshot = Signal(object)  # app.engine_thread.EngineSnapshot, at most every stats_interval seconds
    # The remote endpoint chat and batch now use (with its model filled in), or None for the in-process engine.
    connection_changed = Signal(object)
    connection_failed = Signal(object)  # ConnectionFailed

    def __init__(
        self,
        make_llm: MakeLLM = _make_llm,
        stats_interval: float = 0.05,
        parent: QObject | None = None,
    ) -> None:
        super().__init__(parent)
        self._make_llm = make_llm
        self._stats_interval = stats_interval
        self._thread: EngineThread | None = None
        self._local: LocalTarget | None = None  # requests to _thread
        self._loaded: tuple[str, dict] | None = None  # the model and options _thread runs
        self._ids = itertools.count()
        self._remote: RemoteClient | None = None
        self._requests: dict[str, RequestTarget] = {}  # the requests in flight, by id: the target running each
        self._generation = 0  # bumped by every change of target: a slower, older check then loses
        self._load_generation = 0  # bumped by every load_model, cancel_load and shutdown: an older load loses
        self._loading: int | None = None  # the generation of the load under way, until it ends or is cancelled
        self._cancelled: int | None = None  # the generation cancel_load stopped, until a later load_model
        # guards the engine thread, the targets, the requests and the generations between the workers and the UI
        self._lock = threading.Lock()

    @property
    def engine_thread(self) -> EngineThread | None:
        """The running engine thread (the server switch serves from it), or None before a model is loaded."""
        with self._lock:
            return self._thread

    @property
    def loaded_model(self) -> str | None:
        """The model the in-process engine serves, or None (nothing loaded, or its engine thread died)."""
        with self._lock:
            if self._thread is None or self._thread.failure is not None:
                return None
            return self._loaded[0]

    def load_model(self, model: str, options: dict | None = None) -> threading.Thread:
        """Load `model` on a worker thread, replacing the current one once it is ready; emits model_loading, a
        model_load_stage as each stage begins, then model_loaded or model_load_failed. Supersedes every load still
        running: those emit nothing more."""
        with self._lock:
            self._load_generation += 1
            generation = self._loading = self._load_generation
            self._cancelled = None  # a cancelled load still unwinding is superseded now: no news of it
        self.model_loading.emit(model)
        worker = threading.Thread(
            target=self._load, args=(model, dict(options or {}), generation), name="kvstudio-loader", daemon=True
        )
        worker.start()
        return worker

    def cancel_load(self) -> bool:
        """Cancel the load under way: it stops at its next stage (a stage under way, such as reading the weights,
        runs to its end first), releases what it allocated, and emits model_load_cancelled; the model loaded before
        serves on. Returns False, doing nothing, when no load is under way."""
        with self._lock:
            if self._loading is None:
                return False
            self._cancelled, self._loading = self._loading, None
            self._load_generation += 1
        return True

    @property
    def load_under_way(self) -> bool:
        """Whether a load is running that has not been cancelled (it ends in model_loaded or _failed)."""
        with self._lock:
            return self._loading is not None

    def check_fit(self, model: str, options: dict) -> ModelFit | None:
        """Whether `model` loads in the memory free now (None: not known, or not checked). A model too big for
        the RAM would end in the OOM killer, so loads are refused on it. The model loaded now stays until the new
        one is ready, so its memory rightly counts as taken; except a GPU engine, which holds most of the card by
        design (its KV pool): there a load that does not fit fails in words by itself (CUDA out of memory, a KV
        pool too small). Raises ModelLoadError naming a corrupt weights file."""
        current = self.engine_thread
        if current is not None and current.engine.config.torch_device.type == "cuda":
            return None
        return check_model_fits(model, options)

    def _load(self, model: str, options: dict, generation: int) -> None:
        start = time.perf_counter()
        failure = None
        try:
            if (fit := self.check_fit(model, options)) is not None and not fit.fits:
                raise MemoryError(fit.message)
            llm = self._make_llm(model, options, self._stage_reporter(model, generation))
        except Exception as e:  # a bad path, a corrupt file, too little memory: said in words, never a crash
            failure = str(e) or type(e).__name__  # kept as words: the traceback would hold the load's frames
        if failure is not None:
            if self._end_load(generation):  # the engine loaded before serves on
                self.model_load_failed.emit(ModelLoadFailed(model, failure))
            else:  # cancelled or superseded (LoadCancelled, or a failure that no longer matters)
                self._drop_load(model, generation)
            return
        max_model_len = llm.llm_engine.model_config.max_model_len
        thread = EngineThread(llm.llm_engine, stats_interval=self._stats_interval)
        del llm  # from here the thread holds the engine: dropping the thread drops the model
        with self._lock:
            current = generation == self._load_generation
            if current:
                old, self._thread, self._loaded = self._thread, thread, (model, options)
                self._local = LocalTarget(thread)
                self._loading = None
        if not current:  # cancelled, or a later choice is loading or loaded: this engine never serves
            del thread
            self._drop_load(model, generation)
            return
        thread.add_listener(self.snapshot.emit)
        thread.add_failure_listener(self._on_engine_dead)
        thread.start()
        if old is not None:
            old.stop()
        del old
        _release_and_freeze()
        self.model_loaded.emit(ModelLoaded(model, max_model_len, time.perf_counter() - start))

    def _end_load(self, generation: int) -> bool:
        """A load ended by itself (failed): whether it is still the current one, which then is no longer under way."""
        with self._lock:
            current = generation == self._load_generation
            if current:
                self._loading = None
            return current

    def _drop_load(self, model: str, generation: int) -> None:
        """A cancelled or superseded load has unwound: release what it allocated, then say so if it was cancelled
        (and no load was chosen since)."""
        _release_and_freeze()
        with self._lock:
            cancelled = self._cancelled == generation
            if cancelled:
                self._cancelled = None
        if cancelled:
            self.model_load_cancelled.emit(ModelLoadCancelled(model, self.loaded_model))

    def _stage_reporter(self, model: str, generation: int) -> StageCallback:
        """The on_load_stage callback of one load, called on its worker. Once the load is cancelled or superseded
        it raises LoadCancelled instead, which unwinds the loader there."""

        def report(stage: str) -> None:
            with self._lock:
                current = generation == self._load_generation
            if not current:
                raise LoadCancelled(f"the load of {model} was cancelled")
            self.model_load_stage.emit(ModelLoadStage(model, stage))

        return report

    def _on_engine_dead(self, error: EngineDeadError) -> None:
        """On the dying engine thread: say so, unless that engine was replaced meanwhile (then it is no news)."""
        with self._lock:
            current = self._thread is not None and self._thread.failure is error
            loaded = self._loaded
        if current and loaded is not None:
            model, options = loaded
            self.engine_died.emit(EngineDied(model, dict(options), str(error)))

    @property
    def remote(self) -> Endpoint | None:
        """The endpoint chat and batch requests go to, or None when they go to the in-process engine."""
        with self._lock:
            return None if self._remote is None else self._remote.endpoint

    def connect_remote(self, endpoint: Endpoint) -> threading.Thread:
        """Check `endpoint` on a worker (it must answer its model list and serve endpoint.model; an empty model
        takes its first) and send chat and batch requests there from then on; emits connection_changed or
        connection_failed. A later connect_remote, use_local, cancel_connect or shutdown makes this check stale:
        it then changes nothing and emits nothing."""
        with self._lock:
            self._generation += 1
            generation = self._generation
        worker = threading.Thread(
            target=self._connect, args=(endpoint, generation), name="kvstudio-connect", daemon=True
        )
        worker.start()
        return worker

    def cancel_connect(self) -> None:
        """Forget a check still running (the user cancelled it); the current target stays."""
        with self._lock:
            self._generation += 1

    def _connect(self, endpoint: Endpoint, generation: int) -> None:
        try:
            models = list_models(endpoint)
            if not models:
                raise RuntimeError(f"{endpoint.base_url} serves no model")
            if endpoint.model and endpoint.model not in models:
                raise RuntimeError(
                    f"{endpoint.base_url} does not serve {endpoint.model!r}; it serves {', '.join(models)}"
                )
        except Exception as e:  # unreachable, a wrong key, not OpenAI-compatible: said in words
            with self._lock:
                current = generation == self._generation
            if current:
                self.connection_failed.emit(ConnectionFailed(endpoint, str(e)))
            return
        client = RemoteClient(dataclasses.replace(endpoint, model=endpoint.model or models[0]))
        with self._lock:
            current = generation == self._generation
            if current:
                old, self._remote = self._remote, client
        if not current:
            client.close()
            return
        if old is not None:
            old.close()  # its requests in flight fail in words: the pages stop waiting for them
        self.connection_changed.emit(client.endpoint)

    def use_local(self) -> None:
        """Send chat and batch requests to the in-process engine again (a check still running is forgotten);
        requests in flight remotely fail in words. Always emits connection_changed(None)."""
        with self._lock:
            self._generation += 1
            old, self._remote = self._remote, None
        if old is not None:
            old.close()
        self.connection_changed.emit(None)

    @property
    def target(self) -> RequestTarget | None:
        """Where chat and batch requests go now: the remote endpoint when one is connected, else the model loaded
        here, else None."""
        with self._lock:
            return self._remote if self._remote is not None else self._local

    def ready(self) -> bool:
        """Whether a request can go anywhere: a remote endpoint is connected or a model is loaded."""
        return self.target is not None

    def chat_templated(self) -> bool:
        """Whether chats can be sent where requests go now (RequestTarget.chat_templated)."""
        target = self.target
        return target is not None and target.chat_templated()

    def context_length(self) -> int | None:
        """The in-process model's context (max_model_len, fixed at load) while chats go to it; None while they go
        to a remote endpoint, whose context is not known here, or nowhere."""
        with self._lock:
            local = self._local if self._remote is None else None
        return None if local is None else local.thread.engine.model_config.max_model_len

    def count_chat_tokens(self, messages: list[dict]) -> int | None:
        """The tokens of the prompt `messages` make for the in-process model (its chat template rendered and
        tokenized, as a send does), on the caller's thread: a fifth of a second for 2,000 messages, so a page calls it
        off the UI thread. None while chats go to a remote endpoint (its tokenizer is not here) or nowhere; raises
        ChatTemplateError as a send would."""
        with self._lock:
            local = self._local if self._remote is None else None
        return None if local is None else len(local.prepare_chat(messages)["prompt_token_ids"])

    def prepare_chat(self, messages: list[dict]) -> PreparedChat:
        """Prepare `messages` for the current target on the caller's thread: a batch renders its rows' templates
        before submitting any, since a busy engine thread competes for the GIL. Raises RuntimeError when nothing
        is connected or loaded, and the template's error when it cannot render `messages`."""
        target = self._current_target()
        return PreparedChat(messages, target, target.prepare_chat(messages))

    def submit_chat(self, chat: list[dict] | PreparedChat, params: SamplingParams) -> str:
        """Queue a chat (OpenAI-style messages, or prepare_chat's result); the reply arrives as request_update,
        a failure as request_failed. Raises as prepare_chat does, and as the target's submit_chat does."""
        target = self._current_target()
        if not isinstance(chat, PreparedChat):
            chat = PreparedChat(chat, target, target.prepare_chat(chat))
        elif chat.target is not target:  # an endpoint connected or left, or a model loaded, since it was prepared
            chat = PreparedChat(chat.messages, target, target.prepare_chat(chat.messages))
        return self._submit(target, target.submit_chat, chat.prepared, params)

    def submit(self, prompt: PromptType, params: SamplingParams) -> str:
        """Queue a raw-text prompt (or, to the local engine, {"prompt_token_ids": [...]}) as a completion.
        Raises RuntimeError when nothing is connected or loaded and QueueFullError when the engine's queue is
        full."""
        target = self._current_target()
        return self._submit(target, target.submit_completion, prompt, params)

    def abort(self, request_id: str) -> None:
        """Stop a request on the target that runs it; its reply gets nothing more. Unknown ids are ignored."""
        with self._lock:
            target = self._requests.pop(request_id, None)
        if target is not None:
            target.abort(request_id)

    def _current_target(self) -> RequestTarget:
        target = self.target
        if target is None:
            raise RuntimeError("no model is loaded")
        return target

    def _submit(
        self,
        target: RequestTarget,
        submit: Callable[[Any, SamplingParams, UpdateCallback, str], None],
        prompt: Any,
        params: SamplingParams,
    ) -> str:
        rid = f"ui-{next(self._ids)}"
        with self._lock:  # before submitting: the first update may arrive before submit returns
            self._requests[rid] = target
        try:
            submit(prompt, params, self._deliverer(rid), rid)
        except BaseException:
            with self._lock:
                del self._requests[rid]
            raise
        return rid

    def _deliverer(self, rid: str) -> UpdateCallback:
        """The callback a target answers request `rid` through, on its own thread: each item becomes a signal."""

        def deliver(item: TextUpdate | BaseException) -> None:
            failed = isinstance(item, BaseException)
            if failed or item.finished:
                with self._lock:
                    self._requests.pop(rid, None)
            if failed:
                self.request_failed.emit(RequestFailed(rid, str(item), refused=isinstance(item, RequestRefused)))
            else:
                self.request_update.emit(
                    RequestUpdate(
                        rid,
                        item.text,
                        item.num_tokens,
                        item.finished,
                        item.finish_reason,
                        item.num_prompt_tokens,
                        item.blocks,
                    )
                )

        return deliver

    def shutdown(self) -> None:
        """Stop the engine thread and the remote connection (the window is closing): running requests are
        aborted."""
        with self._lock:
            self._generation += 1
            self._load_generation += 1  # a load still running is dropped, not started after the window closed
            self._loading = self._cancelled = None
            thread, self._thread, self._local, self._loaded = self._thread, None, None, None
            remote, self._remote = self._remote, None
            self._requests.clear()
        if thread is not None:
            thread.stop()
        if remote is not None:
            remote.close()


def _release_and_freeze() -> None:
    """Free a dropped model, then freeze what lives on. Everything loaded lives as long as the model: moved out of
    the cyclic collector's reach, a full collection no longer walks the millions of objects torch and
    transformers bring (on the UI thread that walk was a 250 ms freeze in the middle of a batch run). Unfrozen
    first, so the dropped model's cycles are collected too."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
