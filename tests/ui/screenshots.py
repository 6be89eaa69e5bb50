"""Screenshots of the real window for a person to look at, after a short chat and a small batch on the default
model, in the light palette and the dark one.

    QT_QPA_PLATFORM=offscreen .venv/bin/python -m tests.ui.screenshots [OUTDIR]   (default build/screenshots)
        the welcome, a model loading, and each page (chat, batch, models, monitor, server) at 800x600 and
        1920x1080; each page again with "-dark" in its name.
    QT_QPA_PLATFORM=offscreen .venv/bin/python -m tests.ui.screenshots --readme docs/screenshots
        what README.md shows: the welcome and each page at 1280x800, light and dark (`make readme-screenshots`).

It needs no network: kvstudio's data and the Hugging Face cache go to a temporary folder (the default model linked
into it from the real store, where `make setup` put it), and the Hub is pointed at a loopback port nothing listens
on, so the Models page shows how it looks offline.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

SIZES = ((800, 600), (1920, 1080))
README_SIZE = (1280, 800)
ENGINE_OPTIONS = {"max_model_len": 1024, "kv_cache_memory": 0.05}
# Two turns: the second takes the first's KV blocks from the prefix cache, which the context meter shows.
CHAT_PROMPTS = ("Write a haiku about the sea.", "Now one about the mountains.")
SERVER_PROMPT = "Say hello in French."
BATCH_PROMPTS = (
    "What is the capital of France?",
    "Explain in two sentences why the sky is blue.",
    "List three uses of a paper clip.",
)
WAIT_S = 300  # for a load or a reply on a busy machine; a hang ends the script instead of blocking forever


def wait_until(done: Callable[[], bool], what: str) -> None:
    """Turn the event loop until done(); the workers' signals arrive through it."""
    from PySide6.QtWidgets import QApplication

    deadline = time.monotonic() + WAIT_S
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what} after {WAIT_S} s")
        QApplication.processEvents()
        time.sleep(0.02)


def settle() -> None:
    """Let posted layout and paint events run, so a grab shows the page as a person would see it."""
    from PySide6.QtWidgets import QApplication

    for _ in range(5):
        QApplication.processEvents()
        time.sleep(0.02)
    # A signal delivered by the last turn (a load stage: the engine thread keeps sending them) may have posted a
    # layout request that has not run yet; a grab then would show a label cut to its old height. Run what is
    # posted, and what that posts, before the grab.
    for _ in range(2):
        QApplication.sendPostedEvents()


def isolate(scratch: Path) -> None:
    """kvstudio's data and the HF cache in `scratch`, the default model linked in, the Hub unreachable."""
    from huggingface_hub import constants

    from app.library import model_store

    real_default = model_store.default_model_path()
    if not real_default.is_file():
        sys.exit(f"the default model is missing at {real_default}: run `make setup` (it fetches it)")
    os.environ[model_store.DATA_DIR_ENV] = str(scratch / "kvstudio")
    model_store.default_model_path().parent.mkdir(parents=True)
    model_store.default_model_path().symlink_to(real_default)
    constants.HF_HUB_CACHE = str(scratch / "hf-cache")
    with socket.socket() as s:  # a free port, closed again: connections to it are refused at once
        s.bind(("127.0.0.1", 0))
        constants.ENDPOINT = f"http://127.0.0.1:{s.getsockname()[1]}"


def use_scheme(scheme: str) -> None:
    """The application's palette as ui/theme.py sets it for the system's light or dark scheme."""
    from PySide6.QtCore import Qt
    from PySide6.QtWidgets import QApplication

    from ui.theme import palette_for

    app = QApplication.instance()
    app.setStyle("Fusion")
    app.setPalette(palette_for(Qt.ColorScheme.Dark if scheme == "dark" else Qt.ColorScheme.Light))


def ask_the_server(server) -> None:
    """Two requests, as a client would send them (no proxy), for the server page's request log."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    chat = {"model": server.served_model_name(), "messages": [{"role": "user", "content": SERVER_PROMPT}]}
    for path, body in (("/models", None), ("/chat/completions", {**chat, "max_tokens": 24})):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(server.base_url() + path, data, {"Content-Type": "application/json"})
        opener.open(request, timeout=WAIT_S).read()
    wait_until(lambda: server.log.rowCount() == 2, "the server's request log")


def shoot(window, out: Path, readme: bool) -> list[Path]:
    """readme: the welcome and each page at README_SIZE under plain names (chat.png, chat-dark.png, ...);
    otherwise the loading card too and each page at SIZES."""
    from ui.widgets.first_run import START_DEFAULT

    saved = []

    def save(widget, name: str) -> None:
        settle()
        path = out / f"{name}.png"
        widget.grab().save(str(path))
        saved.append(path)

    sizes = (README_SIZE,) if readme else SIZES
    window.resize(*sizes[0])
    window.start()  # no model chosen yet: the welcome
    save(window.welcome, "first-run" if readme else "welcome")
    window.welcome.done(START_DEFAULT)
    if not readme:
        save(window, "loading")
    chat = window.chat
    # The chat takes messages once it has heard the load end, a turn of the event loop after the bridge is ready.
    wait_until(lambda: window.bridge.ready() and not chat.loading, "the default model to load")

    chat.sampling.max_tokens.setValue(48)
    for prompt in CHAT_PROMPTS:
        chat.input.setPlainText(prompt)
        chat.send_button.click()
        if chat.reply is None:
            raise RuntimeError(f"the chat did not send: {chat.status.text()}")
        wait_until(lambda: chat.reply is None, "the chat reply")

    batch = window.batch
    batch.sampling.max_tokens.setValue(48)
    batch.input.setPlainText("\n".join(BATCH_PROMPTS))
    batch.run()
    wait_until(lambda: not batch.running, "the batch")
    batch.table.selectRow(1)
    # The server page as it looks serving: on a free loopback port, stopped again when the window closes.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    window.server.port.setValue(port)
    if not window.server.set_serving(True):
        raise RuntimeError(f"the server did not start: {window.server.status.text()}")
    ask_the_server(window.server)

    for scheme in ("light", "dark"):
        use_scheme(scheme)
        suffix = "" if scheme == "light" else "-dark"
        for width, height in sizes:
            window.resize(width, height)
            for row, (name, _) in enumerate(window.named_pages):
                window.nav.setCurrentRow(row)
                size = "" if readme else f"-{width}x{height}"
                save(window, f"{name.lower()}{size}{suffix}")
    return saved


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.ui.screenshots")
    parser.add_argument(
        "out", nargs="?", type=Path, default=Path(__file__).resolve().parents[2] / "build" / "screenshots"
    )
    parser.add_argument("--readme", action="store_true", help="the README's set: each page at 1280x800, light and dark")
    args = parser.parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kvstudio-screenshots-") as scratch:
        isolate(Path(scratch))
        from PySide6.QtWidgets import QApplication

        app = QApplication.instance() or QApplication(sys.argv[:1])
        use_scheme("light")
        from app.history import ChatHistory
        from app.settings import Settings
        from ui.app import make_llm
        from ui.bridge import EngineBridge
        from ui.main_window import MainWindow

        window = MainWindow(
            EngineBridge(make_llm),
            ChatHistory(Path(scratch) / "history.sqlite3"),
            Settings(engine_options=dict(ENGINE_OPTIONS)),
            Path(scratch) / "settings.json",
        )
        window.show()
        try:
            for path in shoot(window, out, args.readme):
                print(path)
        finally:
            window.close()  # stops the engine thread before the scratch folder goes
            app.processEvents()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
