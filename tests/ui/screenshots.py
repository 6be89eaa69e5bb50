"""Screenshots of the real window for a person to look at: the welcome dialog, a model loading, and each page
(chat, batch, models, monitor, server) at 800x600 and 1920x1080, after a short chat and a small batch on the
default model.

    QT_QPA_PLATFORM=offscreen .venv/bin/python -m tests.ui.screenshots [OUTDIR]   (default build/screenshots)

It needs no network: kvstudio's data and the Hugging Face cache go to a temporary folder (the default model linked
into it from the real store, where `make setup` put it), and the Hub is pointed at a loopback port nothing listens
on, so the Models page shows how it looks offline.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

SIZES = ((800, 600), (1920, 1080))
ENGINE_OPTIONS = {"max_model_len": 1024, "kv_cache_memory": 0.05}
CHAT_PROMPT = "Write a haiku about the sea."
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


def shoot(window, out: Path) -> list[Path]:
    from ui.widgets.first_run import START_DEFAULT

    saved = []

    def save(widget, name: str) -> None:
        settle()
        path = out / f"{name}.png"
        widget.grab().save(str(path))
        saved.append(path)

    window.start()  # no model chosen yet: the welcome
    save(window.welcome, "welcome")
    window.welcome.done(START_DEFAULT)
    save(window, "loading")
    wait_until(lambda: window.bridge.ready(), "the default model to load")

    chat = window.chat
    chat.sampling.max_tokens.setValue(48)
    chat.input.setPlainText(CHAT_PROMPT)
    chat.send_button.click()
    wait_until(lambda: chat.reply is None, "the chat reply")

    batch = window.batch
    batch.sampling.max_tokens.setValue(48)
    batch.input.setPlainText("\n".join(BATCH_PROMPTS))
    batch.run()
    wait_until(lambda: not batch.running, "the batch")
    batch.table.selectRow(1)

    for width, height in SIZES:
        window.resize(width, height)
        for row, (name, _) in enumerate(window.named_pages):
            window.nav.setCurrentRow(row)
            save(window, f"{name.lower()}-{width}x{height}")
    return saved


def main(argv: list[str]) -> int:
    out = Path(argv[0] if argv else Path(__file__).resolve().parents[2] / "build" / "screenshots")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kvstudio-screenshots-") as scratch:
        isolate(Path(scratch))
        from PySide6.QtWidgets import QApplication

        app = QApplication.instance() or QApplication(sys.argv[:1])
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
            for path in shoot(window, out):
                print(path)
        finally:
            window.close()  # stops the engine thread before the scratch folder goes
            app.processEvents()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
