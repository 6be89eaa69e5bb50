"""Fixtures the UI tests share: a bridge with the tiny chat model loaded, where screenshots go, and the Models
page's fake Hub and page (test_models_page*.py, test_models_downloads.py; their helpers are in
models_page_harness.py)."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
from models_page_harness import HUGE, RecordingLoader, tiny_params

from ui.bridge import EngineBridge
from ui.pages.models import ModelsPage

# Options for loading the tiny chat model (tests/conftest.py) behind a page.
LOAD_OPTIONS = {"max_model_len": 512, "kv_cache_memory": 0.02}


@pytest.fixture(scope="module")
def loaded_bridge(tiny_chat_model):
    from PySide6.QtWidgets import QApplication

    QApplication.instance() or QApplication([])
    bridge = EngineBridge()
    bridge.load_model(str(tiny_chat_model), LOAD_OPTIONS).join()
    assert bridge.engine_thread is not None
    yield bridge
    bridge.shutdown()


@pytest.fixture(scope="session")
def screenshots() -> Path:
    """build/screenshots (git-ignored): page grabs that a person looks at."""
    path = Path(__file__).resolve().parents[2] / "build" / "screenshots"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def load_options() -> dict:
    return dict(LOAD_OPTIONS)


# The Models page against a fake Hub on loopback (test_models_page*.py, test_models_downloads.py); a module with a
# `hub` or `page` of its own uses that instead.
@pytest.fixture
def hub(serve_hub, tiny_chat_model):
    tiny = {p.name: p.read_bytes() for p in sorted(tiny_chat_model.iterdir()) if p.is_file()}
    return serve_hub(
        {"org/tiny": tiny, "org/tiny-instruct": tiny, "org/huge": {"config.json": tiny["config.json"]}},
        {"org/tiny": 1200, "org/tiny-instruct": 3400, "org/huge": 10},
        {"org/tiny": tiny_params(tiny_chat_model), "org/huge": HUGE},
    )


@pytest.fixture
def page(qtbot, hub):
    p = ModelsPage(EngineBridge(make_llm=RecordingLoader()))
    qtbot.addWidget(p)
    p.resize(1200, 640)
    yield p
    p.shutdown()


@pytest.fixture
def break_engine():
    """break_engine(engine): its thread dies at the next stats snapshot taken while a request runs (the bridge's
    listener has one taken after steps), as on a bug in the engine; get_stats is restored after the test."""
    broken = []

    def breaking(engine) -> None:
        healthy = engine.get_stats

        def get_stats():
            if engine.has_unfinished_requests():  # never while idle: the request is surely running when it dies
                raise RuntimeError("stats broke")
            return healthy()

        engine.get_stats = get_stats
        broken.append(engine)

    yield breaking
    for engine in broken:
        del engine.get_stats


@pytest.fixture(autouse=True)
def collect_qt_garbage_on_the_ui_thread():
    """Collect cyclic garbage here, on the UI thread, before and after each test. A Qt object a test leaves in a
    reference cycle (a monkeypatched bound method kept in a bridge's __dict__, a wrapper that captures its widget)
    is otherwise collected by whichever thread next triggers a collection: often a model loader or the engine
    thread, and deleting a widget there crashes the process."""
    gc.collect()
    yield
    gc.collect()
