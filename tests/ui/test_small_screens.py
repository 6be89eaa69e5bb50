"""The window on small and large screens: at 800x600 every page fits (the chat's settings column folds away, the
monitor scrolls) and the block map keeps readable cells; at 1920x1080 the settings come back and the block map's
cells grow to fill the room it has."""

from __future__ import annotations

import math

import pytest
from PySide6.QtCore import QSize
from PySide6.QtWidgets import QApplication

from app.engine_thread import EngineSnapshot
from app.history import ChatHistory
from app.library.machine import MemoryUse
from app.settings import Settings
from engine import BlockMap, BlockState, EngineStats
from ui.bridge import EngineBridge
from ui.main_window import MainWindow
from ui.widgets.block_map import BlockGrid, BlockMapWidget

# About the KV pool of the default model on the CPU (2 GiB of 16-token blocks).
BLOCKS = bytes([BlockState.USED] * 300 + [BlockState.CACHED] * 200 + [BlockState.FREE] * 2300)


def pool_snapshot() -> EngineSnapshot:
    fields = dict.fromkeys(EngineStats.__dataclass_fields__, 0)
    stats = EngineStats(**(fields | {"block_size": 16, "num_blocks_total": len(BLOCKS), "num_blocks_used": 300}))
    return EngineSnapshot(
        stats=stats,
        block_map=BlockMap(states=BLOCKS, owners={}),
        time=0.0,
        memory=MemoryUse(rss=400 * 2**20, weights=100 * 2**20, kv_pool=2**31),
        speculative=False,
    )


@pytest.fixture
def window(qtbot, tmp_path):
    w = MainWindow(EngineBridge(), ChatHistory(tmp_path / "history.sqlite3"), Settings(), tmp_path / "settings.json")
    qtbot.addWidget(w)
    w.show()
    qtbot.waitExposed(w)
    w.monitor.show_snapshot(pool_snapshot())
    yield w
    w.bridge.shutdown()


def resized(window: MainWindow, width: int, height: int) -> None:
    window.resize(width, height)
    QApplication.sendPostedEvents()  # the layouts follow the size in posted events
    QApplication.processEvents()


def test_every_page_fits_an_800x600_window(qtbot, window, screenshots):
    resized(window, 800, 600)
    assert window.size() == QSize(800, 600)
    room = window.pages.size()
    for name, page in window.named_pages:
        window.show_page(page)
        QApplication.processEvents()
        hint = page.minimumSizeHint()
        assert hint.width() <= room.width() and hint.height() <= room.height(), (name, hint, room)
        assert page.size() == room, name  # not cut off below or beyond the window's edge
        window.grab().save(str(screenshots / f"small-{name.lower()}-800x600.png"))
    # The chat keeps its conversation list and message column; its settings column folds away.
    left, middle, settings = window.chat.splitter.sizes()
    assert settings == 0 and middle >= window.chat.splitter.widget(1).minimumSizeHint().width() and left > 0


def test_the_chat_settings_come_back_on_a_large_window(qtbot, window):
    resized(window, 800, 600)
    assert window.chat.splitter.sizes()[2] == 0
    resized(window, 1920, 1080)
    settings = window.chat.splitter.sizes()[2]
    assert settings >= window.chat.settings_panel.widget().minimumSizeHint().width()


def test_the_monitor_block_map_keeps_cells_that_read_as_blocks_at_800x600(qtbot, window):
    resized(window, 800, 600)
    window.show_page(window.monitor)
    QApplication.processEvents()
    grid = window.monitor.block_map.grid
    cell, cols = grid.cell_layout()
    assert cell >= BlockGrid.GAP_FROM  # gaps between cells: not grey bars
    assert math.ceil(len(BLOCKS) / cols) * cell <= grid.height() + 1e-6  # every block shown, no scrolling in it


def used_fraction(grid: BlockGrid) -> float:
    """The share of the grid's area its cells cover."""
    cell, _ = grid.cell_layout()
    return len(BLOCKS) * cell * cell / (grid.width() * grid.height())


def test_block_map_cells_grow_and_shrink_with_its_size(qtbot):
    widget = BlockMapWidget()
    qtbot.addWidget(widget)
    widget.set_block_map(BlockMap(states=BLOCKS, owners={}))
    widget.show()
    cells = []
    for size in ((600, 300), (1400, 720), (700, 360)):
        widget.resize(*size)
        QApplication.processEvents()
        grid = widget.grid
        cell, cols = grid.cell_layout()
        rows = math.ceil(len(BLOCKS) / cols)
        assert cols * cell <= grid.width() + 1e-6 and rows * cell <= grid.height() + 1e-6, size
        # The cells fill the map: no empty band under them (fixed-size cells covered 64% at 1400x720).
        assert used_fraction(grid) > 0.85, size
        cells.append(cell)
    small, large, middle = cells
    assert small < middle < large
