"""Running the endpoint: in the foreground until SIGTERM (`kvstudio serve`), or on its own event-loop thread
beside a caller that is not async (the desktop app, `kvstudio bench serve`, tests)."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from app.engine_thread import EngineThread
from app.server.app import ServerConfig, create_app
from app.server.protocol import ModelInfo
from engine import LLMEngine

logger = logging.getLogger("kvstudio.server")


async def start_server(app: web.Application, config: ServerConfig) -> web.AppRunner:
    """Listen on config.host:config.port (0 picks a free port: read it from the returned runner's addresses)."""
    # handler_cancellation: a client that disconnects cancels its handler, which aborts its request.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=config.drain_timeout)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    await site.start()
    return runner


def bound_port(runner: web.AppRunner) -> int:
    return runner.addresses[0][1]


def default_model_id(model: str) -> str:
    """The id clients name the model by when none is given: short, and free of the user's folders (plugins make
    users type it). A .gguf file's name without the extension, a Hub repo id without its revision, a folder's
    name (the repo id for a snapshot in the Hugging Face cache, whose folder is named after a commit)."""
    path = Path(model).expanduser()
    if path.is_file():
        return path.stem
    if path.is_dir():
        path = path.resolve()
        repo = path.parent.parent.name  # <cache>/models--org--name/snapshots/<commit>
        if path.parent.name == "snapshots" and repo.startswith("models--"):
            return repo.removeprefix("models--").replace("--", "/", 1)
        return path.name
    return model.partition("@")[0]


def model_info(engine: LLMEngine, served_model_name: str | None = None) -> ModelInfo:
    m = engine.model_config
    return ModelInfo(
        name=served_model_name or default_model_id(m.model),
        tokenizer=engine.tokenizer,
        max_model_len=m.max_model_len,
        vocab_size=m.vocab_size,
        created=int(time.time()),
    )


def serve(
    engine: LLMEngine, config: ServerConfig, served_model_name: str | None = None, max_queue: int | None = None
) -> None:
    """Run the endpoint until SIGTERM or SIGINT, then drain: in-flight requests get config.drain_timeout
    seconds to finish, new ones are refused."""
    # The model and its libraries live until exit: kept out of the cyclic collector's full walks, which took
    # 250 ms over them, a stall every client's stream would feel.
    gc.collect()
    gc.freeze()
    thread = EngineThread(engine, max_queue=max_queue).start()
    info = model_info(engine, served_model_name)

    async def main() -> None:
        runner = await start_server(create_app(thread, info, config), config)
        host = f"[{config.host}]" if ":" in config.host else config.host
        logger.warning('serving model "%s" at http://%s:%d/v1', info.name, host, bound_port(runner))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        logger.warning("shutting down: draining in-flight requests (up to %.0f s)", config.drain_timeout)
        await runner.cleanup()

    try:
        asyncio.run(main())
    finally:
        thread.stop(drain_timeout=config.drain_timeout)


class BackgroundServer:
    """The endpoint on its own event-loop thread, beside a caller that is not async (the desktop app's server
    switch, `kvstudio bench serve` without --url, tests)."""

    def __init__(
        self,
        thread: EngineThread,
        info: ModelInfo,
        config: ServerConfig,
        on_request: Callable[[dict], None] | None = None,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="kvstudio-server", daemon=True)
        self._app = create_app(thread, info, config, on_request)
        self._config = config
        self._runner: web.AppRunner | None = None

    def start(self) -> BackgroundServer:
        """Bind and serve; raises OSError (port in use, not allowed) after cleaning up its thread."""
        self._loop_thread.start()
        try:
            self._runner = asyncio.run_coroutine_threadsafe(start_server(self._app, self._config), self._loop).result()
        except BaseException:
            self._end_loop()
            raise
        return self

    @property
    def url(self) -> str:
        host = self._config.host
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        return f"http://{f'[{host}]' if ':' in host else host}:{bound_port(self._runner)}"

    @property
    def num_connections(self) -> int:
        """Client connections open now: being read, answered, or kept alive between requests. Once it is 0 and no
        client is connecting, no handler is left to hand the engine a request (one whose client left is
        cancelled, and can only abort)."""
        return asyncio.run_coroutine_threadsafe(self._num_connections(), self._loop).result()

    async def _num_connections(self) -> int:
        return len(self._runner.server.connections)

    def stop(self) -> None:
        """Stop listening; in-flight requests get the drain timeout to finish."""
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result()
        self._end_loop()

    def _end_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join()
        self._loop.close()
