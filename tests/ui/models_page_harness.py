"""What the Models page's tests (test_models_page*.py, test_models_downloads.py) share: a loader that records
what it was asked to load and starts no engine, readers of the page's tables, a search and the row of an interrupted
download, and a machine of a given memory. The `hub` and `page` fixtures are in conftest.py."""

from __future__ import annotations

import math

from PySide6.QtCore import Qt

from app.library.machine import GIB, MachineMemory
from ui.pages.models import ModelsPage

UNTIL_DONE = math.inf  # qtbot.waitUntil's timeout: none
HUGE = 70_000_000_000  # parameters: too big for any machine this runs on


def tiny_params(tiny_chat_model) -> int:
    from safetensors import safe_open

    with safe_open(tiny_chat_model / "model.safetensors", framework="pt") as f:
        return sum(f.get_tensor(name).numel() for name in f.keys())  # noqa: SIM118 - not iterable


class RecordingLoader:
    """make_llm for the bridge: records what it was asked to load and fails, so no engine starts."""

    def __init__(self) -> None:
        self.loaded: list[str] = []
        self.options: list[dict] = []

    def __call__(self, model: str, options: dict, on_load_stage):
        self.loaded.append(model)
        self.options.append(options)
        raise RuntimeError("no engine in this test")


def cells(model, role=Qt.DisplayRole) -> list[list]:
    return [[model.data(model.index(r, c), role) for c in range(model.columnCount())] for r in range(model.rowCount())]


def library(page: ModelsPage) -> list[list[str]]:
    return cells(page.library)


def names(page: ModelsPage) -> list[str]:
    return [m.name for m in page.library.rows()]


def results(page: ModelsPage) -> list[list[str]]:
    return cells(page.hub.results)


def search(qtbot, page: ModelsPage, query: str) -> None:
    page.hub.query.setText(query)
    page.hub.search_button.click()  # disabled until the worker's answer arrives
    qtbot.waitUntil(page.hub.search_button.isEnabled, timeout=UNTIL_DONE)


def interrupted_row(page: ModelsPage, repo_id: str):
    """The Hub card's row offering to resume or discard `repo_id`'s unfinished download."""
    [row] = [row for row in page.hub.interrupted if row.pull.repo_id == repo_id]
    return row


def small_machine(available: int) -> MachineMemory:
    return MachineMemory("cpu", total=available, available=available, bytes_per_param=4, reserve=GIB // 2)
