"""`kvstudio bench ui-heartbeat`: how long the window's UI thread goes without a turn while a batch runs.

It opens the main window offscreen on a model (its settings and chat history in a temporary folder, so the user's
are untouched), shows the Monitor page, imports a workload into the Batch page and clicks Run, as a user would.
Meanwhile a timer on the UI thread ticks every 10 ms; the gaps between its ticks (app/bench/heartbeat.py) say how
long the thread was held: by the monitor's redraws, the batch table's updates, or the engine thread holding the
GIL. It lives in ui/ because it drives the window; the launcher (ui/launcher.py) hands it to the command line, which
never imports Qt itself.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from PySide6.QtCore import QEventLoop, Qt, QTimer
from PySide6.QtWidgets import QApplication

from app.bench import throughput
from app.bench.heartbeat import HeartbeatReport, heartbeat_report
from app.cli.options import engine_kwargs
from app.history import ChatHistory
from app.library import model_store
from app.settings import Settings
from ui.bridge import EngineBridge, ModelLoadFailed
from ui.main_window import MainWindow
from ui.widgets.batch_table import DONE

HEARTBEAT_MS = 10


def run(args: argparse.Namespace) -> int:
    """The command: print the report; exit status 1 when the UI thread stalled (HeartbeatReport.smooth)."""
    requests = throughput.load_workload(args.prompts or throughput.BUILTIN_WORKLOAD, args.num_prompts, args.max_tokens)
    model = args.model or str(model_store.ensure_default_model())
    report = measure(model, engine_kwargs(args), requests)
    print(report.summary())
    return 0 if report.smooth else 1


def measure(model: str, options: dict, requests: list[throughput.BenchRequest]) -> HeartbeatReport:
    """Run `requests` through the Batch page of a window on `model` (loaded with `options`, LLM's keyword
    arguments) with the Monitor page shown, and report the UI thread's heartbeat meanwhile. Raises ValueError when
    the model does not load or the workload cannot be imported."""
    QApplication.instance() or QApplication(["kvstudio", "-platform", "offscreen"])
    with tempfile.TemporaryDirectory(prefix="kvstudio-heartbeat-") as tmp:
        folder = Path(tmp)
        window = MainWindow(
            EngineBridge(),
            ChatHistory(folder / "history.sqlite3"),
            Settings(last_model=model, engine_options=options),
            folder / "settings.json",
        )
        try:
            window.show()
            _load(window)
            window.show_page(window.monitor)
            workload = folder / "workload.jsonl"
            workload.write_text(
                "".join(json.dumps({"messages": r.messages, "max_tokens": r.max_tokens}) + "\n" for r in requests),
                encoding="utf-8",
            )
            batch = window.batch
            if not batch.import_file(workload):
                raise ValueError(batch.status.text())
            batch.sampling.temperature.setValue(0.0)  # greedy: the same tokens on every run
            return _run_batch(window)
        finally:
            window.close()
            window.deleteLater()


def _load(window: MainWindow) -> None:
    """Load the window's model (its settings' last one) and wait for the outcome on the event loop."""
    loop = QEventLoop()
    outcome = []
    for signal in (window.bridge.model_loaded, window.bridge.model_load_failed):
        signal.connect(outcome.append)
        signal.connect(loop.quit)
    window.start()
    loop.exec()
    if isinstance(outcome[0], ModelLoadFailed):
        raise ValueError(f"could not load {outcome[0].model}: {outcome[0].message}")


def _run_batch(window: MainWindow) -> HeartbeatReport:
    batch = window.batch
    loop = QEventLoop()
    ticks: list[float] = []

    def beat() -> None:
        ticks.append(time.perf_counter())
        if not batch.running:
            loop.quit()

    heartbeat = QTimer(interval=HEARTBEAT_MS, timerType=Qt.TimerType.PreciseTimer, timeout=beat)
    heartbeat.start()
    start = time.perf_counter()
    batch.run()  # as the Run button does
    loop.exec()
    seconds = time.perf_counter() - start
    heartbeat.stop()
    items = batch.model.items
    return heartbeat_report(
        ticks,
        HEARTBEAT_MS / 1000,
        prompts=len(items),
        done=batch.model.count(DONE),
        tokens=sum(item.tokens for item in items),
        seconds=seconds,
    )
