"""What the endpoint's tests share: the server on port 0 with a tiny model on its own event loop thread, raw HTTP
where the `openai` client would hide what is checked, and a gate that makes "a client that leaves has its request
aborted" checkable whatever the machine's speed. The `engine` and `server` fixtures are in conftest.py."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import openai

from app.engine_thread import EngineThread
from app.server.app import ServerConfig
from app.server.run import BackgroundServer, model_info
from engine import LLMEngine

MODEL = "tiny"
MAX_LEN = 256
GATE_TIMEOUT_S = 60.0  # what a gate below waits at most for an event that should come in milliseconds


@dataclass
class Server:
    url: str  # http://127.0.0.1:port
    engine: LLMEngine
    thread: EngineThread

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=kw.pop("api_key", "unused"), max_retries=0, **kw)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base_url, api_key="unused", max_retries=0)


def http(method: str, url: str, body=None, headers: dict | None = None) -> tuple[int, dict, bytes]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def run_server(engine: LLMEngine, config: ServerConfig, max_queue: int | None = None):
    """Start the app on its own event loop thread; returns (Server, stop function)."""
    thread = EngineThread(engine, max_queue=max_queue).start()
    background = BackgroundServer(thread, model_info(engine, MODEL), config).start()

    def stop() -> None:
        background.stop()
        thread.stop()

    return Server(background.url, engine, thread), stop


def wait_all_free(engine: LLMEngine, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if engine.get_stats().num_blocks_used == 0 and not engine.has_unfinished_requests():
            return
        time.sleep(0.02)
    raise AssertionError(f"blocks still used: {engine.get_stats()}")


def generated_tokens(engine: LLMEngine) -> int:
    """Tokens the engine has generated so far (read while it is idle)."""
    return engine.get_stats().generation_tokens_total


class AbortGate:
    """Makes "a client that leaves has its request aborted" checkable whatever the machine's speed: before each
    step, the engine thread waits until the server has asked to abort as many requests as the test said clients
    would leave (expect()). A request whose client left so generates a step or two more before the abort, where
    one the server failed to abort runs on to max_tokens once the gate gives up (GATE_TIMEOUT_S, then no more)."""

    def __init__(self, thread: EngineThread, monkeypatch) -> None:
        self._changed = threading.Condition()
        self._expected = self._aborted = 0
        self.gave_up = False
        abort, step = thread.abort, thread.engine.step

        def counted_abort(request_id: str) -> None:
            abort(request_id)  # queued first: the step the gate lets through is followed by the abort
            with self._changed:
                self._aborted += 1
                self._changed.notify_all()

        def gated_step():
            with self._changed:
                if not self.gave_up and not self._changed.wait_for(
                    lambda: self._aborted >= self._expected, GATE_TIMEOUT_S
                ):
                    self.gave_up = True
            return step()

        monkeypatch.setattr(thread, "abort", counted_abort)
        monkeypatch.setattr(thread.engine, "step", gated_step)

    def expect(self) -> None:
        """A client is about to leave."""
        with self._changed:
            self._expected += 1
