"""The chat page in a process of its own, for test_chat.py to kill -9 mid-reply: the tiny model loads, one message
is sent, and each redraw of the streaming reply's bubble prints `drawn <the reply's text as JSON>` once it is on screen.

Usage: python chat_child.py MODEL_DIR HISTORY_FILE. The engine may take STEPS steps and then waits for good, so
the reply is unfinished whenever the test kills the process, however slow or loaded the machine.
"""

from __future__ import annotations

import json
import os
import sys
import threading

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6.QtWidgets import QApplication  # after the platform is chosen

from app.history import ChatHistory
from ui.bridge import EngineBridge
from ui.pages.chat import ChatPage

STEPS = 30  # of max_tokens=400: the reply streams for a while, then holds
LOAD_OPTIONS = {"max_model_len": 512, "kv_cache_memory": 0.02}


def hold_after(engine, steps: int) -> None:
    """Let the engine take `steps` steps, then block its thread in the next one."""
    allowed = threading.Semaphore(steps)
    step = engine.step

    def gated_step():
        allowed.acquire()
        return step()

    engine.step = gated_step


def report_draws(page: ChatPage) -> None:
    """After each redraw of the streaming reply's bubble, print the reply's text as drawn."""
    draw = page.transcript.stream

    def reported(message_id: int, text: str) -> None:
        draw(message_id, text)
        print("drawn", json.dumps(text), flush=True)

    page.transcript.stream = reported


def main(model: str, history_file: str) -> int:
    app = QApplication([])
    bridge = EngineBridge()
    bridge.load_model(model, LOAD_OPTIONS).join()
    hold_after(bridge.engine_thread.engine, STEPS)
    page = ChatPage(bridge, ChatHistory(history_file))
    report_draws(page)
    page.sampling.temperature.setValue(1.0)  # sampled, seeded: a random model's greedy choice is often newlines alone
    page.sampling.use_seed.setChecked(True)
    page.sampling.max_tokens.setValue(400)
    page.send("Tell me a long story.")
    return app.exec()


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
