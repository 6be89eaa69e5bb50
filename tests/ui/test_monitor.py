"""The monitor page and its widgets, fed hand-built snapshots, and once the snapshots of a tiny model's engine that
speculates. Waits end on what they wait for, never on the clock (a hang is caught by the module's pytest-timeout
mark); the repaint cost is printed, not asserted."""

from __future__ import annotations

import csv
import math
import random
import re
import time
from pathlib import Path

import pytest
from PySide6.QtCore import QEvent, QPoint, Qt
from PySide6.QtGui import QColor, QHelpEvent, QPalette
from PySide6.QtWidgets import QApplication, QToolTip

from app.engine_thread import EngineSnapshot
from app.library.machine import MemoryUse
from app.units import byte_size
from engine import BlockMap, BlockState, EngineStats, SamplingParams
from engine.block_manager import chain_hash
from ui.bridge import EngineBridge
from ui.pages.monitor import MonitorPage
from ui.widgets.block_map import BlockGrid, BlockMapWidget
from ui.widgets.throughput_chart import ThroughputChart

pytestmark = pytest.mark.timeout(600)
UNTIL_DONE = math.inf  # qtbot.waitUntil's timeout: none
ROOT = Path(__file__).resolve().parents[2]


def make_stats(**fields) -> EngineStats:
    values = dict.fromkeys(EngineStats.__dataclass_fields__, 0) | {"block_size": 16}
    values.update(fields)
    return EngineStats(**values)


def shown_map(
    qtbot, states: bytes, owners: dict[int, tuple[str, ...]] | None = None, hashes=None, size=(400, 300)
) -> BlockMapWidget:
    widget = BlockMapWidget()
    qtbot.addWidget(widget)
    widget.resize(*size)
    widget.set_block_map(BlockMap(states=states, owners=owners or {}, hashes=hashes or {}))
    widget.show()
    qtbot.waitExposed(widget)
    return widget


def cell_center(grid: BlockGrid, block: int, cell: int) -> QPoint:
    """Where block `block` must be drawn, worked out here: rows of width // cell cells, left to right."""
    cols = grid.width() // cell
    return QPoint((block % cols) * cell + cell // 2, (block // cols) * cell + cell // 2)


def test_each_block_is_painted_in_its_states_colour(qtbot):
    states = bytes(
        [BlockState.FREE, BlockState.USED, BlockState.SHARED, BlockState.CACHED] * 5
        + [BlockState.USED, BlockState.CACHED]
    )
    widget = shown_map(qtbot, states)
    grid = widget.grid
    colors = {
        state: grid.state_color(state).name()
        for state in (BlockState.FREE, BlockState.USED, BlockState.SHARED, BlockState.CACHED)
    }
    assert len(set(colors.values())) == 4

    # 22 blocks fit easily: cells take their largest size.
    assert grid.cell_layout()[0] == BlockGrid.MAX_CELL
    image = grid.grab().toImage()
    for block, state in enumerate(states):
        assert image.pixelColor(cell_center(grid, block, BlockGrid.MAX_CELL)).name() == colors[state], block
    # Past the last block the row stays empty: nothing in any state's colour.
    after = image.pixelColor(cell_center(grid, len(states), BlockGrid.MAX_CELL)).name()
    assert after not in colors.values()


def test_cells_shrink_to_fit_then_scroll_at_the_smallest_size(qtbot):
    rng = random.Random(0)
    states = bytes(
        rng.choice((BlockState.FREE, BlockState.USED, BlockState.SHARED, BlockState.CACHED)) for _ in range(3000)
    )
    widget = shown_map(qtbot, states)
    grid = widget.grid
    cell, cols = grid.cell_layout()
    assert BlockGrid.MIN_CELL < cell < BlockGrid.MAX_CELL
    assert cols == grid.width() // cell
    assert math.ceil(3000 / cols) * cell <= grid.height() < math.ceil(3000 / (grid.width() // (cell + 1))) * (cell + 1)
    image = grid.grab().toImage()
    for block in (0, cols - 1, cols, 1234, 2999):
        assert image.pixelColor(cell_center(grid, block, cell)).name() == grid.state_color(states[block]).name(), block

    # 100k blocks cannot fit 400x300 at 3 px: the grid grows taller than the view and scrolls.
    big = bytes(
        rng.choice((BlockState.FREE, BlockState.USED, BlockState.SHARED, BlockState.CACHED)) for _ in range(100_000)
    )
    widget.set_block_map(BlockMap(states=big, owners={}))
    qtbot.waitUntil(
        lambda: (
            grid.cell_layout()[0] == BlockGrid.MIN_CELL
            and grid.height() >= math.ceil(100_000 / (grid.width() // BlockGrid.MIN_CELL)) * BlockGrid.MIN_CELL
        ),
        timeout=UNTIL_DONE,
    )
    assert grid.height() > widget.height()
    image = grid.grab().toImage()
    for block in (0, 77_777, 99_999):
        pixel = image.pixelColor(cell_center(grid, block, BlockGrid.MIN_CELL))
        assert pixel.name() == grid.state_color(big[block]).name()


def tooltip_at(grid: BlockGrid, block: int) -> str:
    """Hover block `block` (cells of MAX_CELL px, as a few blocks get) and return the tooltip shown."""
    pos = cell_center(grid, block, BlockGrid.MAX_CELL)
    QToolTip.hideText()
    grid.event(QHelpEvent(QEvent.Type.ToolTip, pos, grid.mapToGlobal(pos)))
    return QToolTip.text()


def test_tooltip_names_the_block_its_state_holders_and_prefix_hash(qtbot):
    states = bytes([BlockState.FREE, BlockState.USED, BlockState.SHARED, BlockState.CACHED, BlockState.SHARED])
    hashes = {2: bytes.fromhex("3fa9c1d2") + bytes(12), 3: bytes.fromhex("00b7e5a1") + bytes(12)}
    owners = {1: ("req-a",), 2: ("req-a", "req-b", "req-c"), 4: ("fork", "fork", "req-d")}
    grid = shown_map(qtbot, states, owners=owners, hashes=hashes).grid

    assert tooltip_at(grid, 2) == "block 2: shared\nrequests req-a, req-b, req-c\nprefix 3fa9c1d2"
    assert tooltip_at(grid, 1) == "block 1: used\nrequest req-a"
    assert tooltip_at(grid, 4) == "block 4: shared\nrequests fork (2 sequences), req-d"
    assert tooltip_at(grid, 0) == "block 0: free"
    assert tooltip_at(grid, 3) == "block 3: cached\nprefix 00b7e5a1"
    assert grid.block_at(QPoint(grid.width() - 1, grid.height() - 1)) is None


def test_tooltip_of_a_prefix_hit_names_both_requests_and_the_hash(qtbot, loaded_bridge):
    """Two requests with one prompt prefix, the second sent once the first's prefix blocks are cached: the
    engine's block map, shown on the page, names both on the shared blocks, with the engine's chain hash."""
    engine = loaded_bridge.engine_thread.engine
    snapshots: list[EngineSnapshot] = []
    loaded_bridge.snapshot.connect(snapshots.append, Qt.QueuedConnection)
    prefix = [412, 1037, 88, 2051, 77, 5, 913, 640] * 6  # several full blocks
    params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
    first = loaded_bridge.submit({"prompt_token_ids": [*prefix, 31]}, params)
    second = None
    try:
        # The first request holds a hashed (cached) block: its prefix can be hit.
        qtbot.waitUntil(
            lambda: any(first in s.block_map.owners.get(b, ()) for s in snapshots for b in s.block_map.hashes),
            timeout=UNTIL_DONE,
        )
        second = loaded_bridge.submit({"prompt_token_ids": [*prefix, 32]}, params)

        def shared() -> tuple[EngineSnapshot, int] | None:
            for s in snapshots:
                for block, holders in s.block_map.owners.items():
                    if {first, second} <= set(holders):
                        return s, block
            return None

        qtbot.waitUntil(lambda: shared() is not None, timeout=UNTIL_DONE)
    finally:
        loaded_bridge.snapshot.disconnect(snapshots.append)
        for rid in (first, second):
            if rid is not None:
                loaded_bridge.abort(rid)
    found, block = shared()
    page = MonitorPage()
    qtbot.addWidget(page)
    page.resize(1280, 860)
    page.show()
    qtbot.waitExposed(page)
    page.show_snapshot(found)
    # The shared block's hash is one of the chain hashes of the prefix's full blocks.
    size = engine.block_manager.block_size
    chain = [None]
    for i in range(len(prefix) // size):
        chain.append(chain_hash(chain[-1], tuple(prefix[i * size : (i + 1) * size])))
    block_hash = found.block_map.hashes[block]
    assert block_hash in chain[1:]

    grid = page.block_map.grid
    pos = grid.cell_rect(block).center()
    QToolTip.hideText()
    grid.event(QHelpEvent(QEvent.Type.ToolTip, pos, grid.mapToGlobal(pos)))
    assert QToolTip.text() == f"block {block}: shared\nrequests {first}, {second}\nprefix {block_hash.hex()[:8]}"


def test_legend_counts_each_state(qtbot):
    states = bytes([BlockState.USED] * 7 + [BlockState.SHARED] * 3 + [BlockState.CACHED] * 2 + [BlockState.FREE] * 1988)
    widget = shown_map(qtbot, states)
    assert {s: label.text() for s, label in widget.count_labels.items()} == {
        BlockState.USED: "Used 7",
        BlockState.SHARED: "Shared 3",
        BlockState.CACHED: "Cached 2",
        BlockState.FREE: "Free 1,988",
    }
    assert widget.total_label.text() == "2,000 blocks"


MEMORY = MemoryUse(rss=412 * 2**20, weights=97 * 2**20, kv_pool=20 * 2**20)


def snapshot(
    t: float = 0.0,
    states: bytes = b"",
    owners: dict[int, tuple[str, ...]] | None = None,
    speculative: bool = False,
    memory: MemoryUse = MEMORY,
    **stats,
) -> EngineSnapshot:
    return EngineSnapshot(
        stats=make_stats(**stats),
        block_map=BlockMap(states=states, owners=owners or {}),
        time=t,
        memory=memory,
        speculative=speculative,
    )


def test_page_shows_usage_queues_and_hit_rate(qtbot):
    page = MonitorPage()
    qtbot.addWidget(page)
    assert page.hit_rate_label.text() == "—"

    page.show_snapshot(
        snapshot(
            num_blocks_total=3000,
            num_blocks_used=1234,
            num_blocks_free=1766,
            num_blocks_shared=56,
            num_blocks_cached=210,
            num_running=9,
            num_waiting=4,
            num_swapped=2,
            num_preemptions=3,
            states=bytes([BlockState.USED] * 5 + [BlockState.FREE] * 5),
        )
    )
    assert page.usage_percent_label.text() == "41.1%"
    assert page.usage_label.text() == "1,234 / 3,000 blocks"
    assert (page.usage_bar.minimum(), page.usage_bar.maximum(), page.usage_bar.value()) == (0, 3000, 1234)
    assert [
        label.text()
        for label in (
            page.running_label,
            page.waiting_label,
            page.swapped_label,
            page.preemptions_label,
            page.shared_label,
            page.cached_label,
        )
    ] == ["9", "4", "2", "3", "56", "210"]
    assert page.hit_rate_label.text() == "—"  # no prompt looked up yet
    assert page.block_map.count_labels[BlockState.USED].text() == "Used 5"

    page.show_snapshot(snapshot(t=1.0, num_blocks_total=3000, prefix_cache_queries=4000, prefix_cache_hits=3000))
    assert page.hit_rate_label.text() == "75.0%"
    assert page.hit_detail_label.text() == "3,000 / 4,000 prompt tokens"
    assert page.chart.prompt_series.count() == 2
    assert page.prompt_rate_label.text() == "Prompt 0 tok/s"


def test_page_shows_speculation_and_memory(qtbot):
    page = MonitorPage()
    qtbot.addWidget(page)
    assert page.speculation_label.text() == "Speculation off"

    page.show_snapshot(snapshot())
    assert page.speculation_label.text() == "Speculation off"
    assert page.memory_label.text() == "Memory 412 MiB (weights 97 MiB, KV 20 MiB)"
    page.show_snapshot(snapshot(speculative=True))
    assert page.speculation_label.text() == "Speculation: no tokens drafted yet"
    page.show_snapshot(
        snapshot(speculative=True, spec_draft_tokens=1200, spec_accepted_tokens=873, memory=MemoryUse(3 * 2**30, 0, 0))
    )
    assert page.speculation_label.text() == "Speculation: 73% of drafted tokens accepted (873 of 1,200)"
    assert page.memory_label.text() == "Memory 3.0 GiB (weights 0 B, KV 0 B)"


def test_a_speculating_engine_shows_its_acceptance_and_memory_live(qtbot, tiny_chat_model, load_options, screenshots):
    ngram = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
    bridge = EngineBridge()
    bridge.load_model(str(tiny_chat_model), load_options | {"speculative_config": ngram}).join()
    thread = bridge.engine_thread
    assert thread is not None
    engine = thread.engine
    page = MonitorPage()
    qtbot.addWidget(page)
    page.resize(1280, 860)
    bridge.snapshot.connect(page.show_snapshot, Qt.QueuedConnection)
    try:
        finished = []
        phrase = [412, 1037, 88, 2051, 77]  # a phrase repeated: prompt lookup drafts from the first decode
        thread.submit(
            {"prompt_token_ids": phrase * 4},
            SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True),
            lambda out: finished.append(out) if getattr(out, "finished", True) else None,
        )
        qtbot.waitUntil(lambda: bool(finished), timeout=UNTIL_DONE)
        stats = engine.get_stats()  # the engine is idle: its counts stay put
        assert stats.spec_draft_tokens > 0
        expected = (
            f"Speculation: {stats.spec_accepted_tokens / stats.spec_draft_tokens:.0%} of drafted tokens accepted "
            f"({stats.spec_accepted_tokens:,} of {stats.spec_draft_tokens:,})"
        )
        # The idle engine publishes a snapshot at once and every second after; the page follows the last one.
        qtbot.waitUntil(lambda: page.speculation_label.text() == expected, timeout=UNTIL_DONE)

        memory = page.memory_label.text()
        kv_pool = engine.runner.kv_cache.nbytes
        assert 0 < kv_pool <= load_options["kv_cache_memory"] * 2**30
        said = re.fullmatch(r"Memory ([\d.]+) (MiB|GiB) \(weights (.+), KV (.+)\)", memory)
        assert said is not None, memory
        assert said.groups()[2:] == (byte_size(engine.weight_bytes), byte_size(kv_pool))
        # The resident set holds at least the weights, which every step reads.
        assert float(said[1]) * {"MiB": 2**20, "GiB": 2**30}[said[2]] >= engine.weight_bytes
        page.show()
        qtbot.waitExposed(page)
        QApplication.sendPostedEvents()
        assert page.grab().save(str(screenshots / "monitor-speculation.png"))
    finally:
        bridge.shutdown()


def test_chart_keeps_the_last_minute_and_rescales(qtbot):
    chart = ThroughputChart()
    qtbot.addWidget(chart)
    for t in range(101):
        chart.add_point(1000.0 + t, prompt_rate=10.0 * t, gen_rate=5.0)
    # Samples from t = 40 s to 100 s remain, at 60..0 seconds ago.
    points = chart.prompt_series.points()
    assert len(points) == 61 and chart.generation_series.count() == 61
    assert (points[0].x(), points[0].y(), points[-1].x(), points[-1].y()) == (-60.0, 400.0, 0.0, 1000.0)
    assert (chart.y_axis.min(), chart.y_axis.max()) == (0, 1200)  # 1000 + headroom, in steps of 300

    chart.add_point(1200.0, prompt_rate=20.0, gen_rate=30.0)  # a long pause: everything older is gone
    assert [(p.x(), p.y()) for p in chart.generation_series.points()] == [(0.0, 30.0)]
    assert chart.y_axis.max() == 32  # in steps of 8


def test_100k_block_update_and_repaint_time(qtbot):
    """Not a timing assertion (machines differ): prints the cost of one update + synchronous repaint."""
    widget = shown_map(qtbot, b"", size=(1200, 700))
    rng = random.Random(1)
    maps = [
        BlockMap(
            states=bytes(
                rng.choice((BlockState.FREE, BlockState.USED, BlockState.SHARED, BlockState.CACHED))
                for _ in range(100_000)
            ),
            owners={},
        )
        for _ in range(2)
    ]
    widget.set_block_map(maps[1])
    grid = widget.grid
    # Let the scroll area grow the grid to its full height first, so every frame paints all 100k cells.
    qtbot.waitUntil(lambda: grid.height() >= grid.heightForWidth(grid.width()) > widget.height(), timeout=UNTIL_DONE)
    frames = 20
    start = time.perf_counter()
    for i in range(frames):
        widget.set_block_map(maps[i % 2])
        grid.repaint()
    per_frame = (time.perf_counter() - start) / frames
    print(
        f"\n100k blocks: {per_frame * 1e3:.2f} ms per set_block_map + repaint "
        f"(cell {grid.cell_layout()[0]} px, grid {grid.width()}x{grid.height()})"
    )


def realistic_block_map(n: int = 3072, seed: int = 7) -> BlockMap:
    """Chats sharing a system-prompt prefix, a couple of forked (n > 1) requests, cached prefixes left by finished
    requests, and a free tail with holes: roughly what a busy engine's pool looks like."""
    rng = random.Random(seed)
    states, owners = bytearray([BlockState.FREE] * n), {}
    for block in range(6):  # the shared system prompt, first held by chat-0
        states[block], owners[block] = BlockState.SHARED, ("chat-0",)
    pos, request = 6, 0
    while pos < int(n * 0.72):
        kind = rng.random()
        length = rng.randint(6, 70)
        if kind < 0.18:  # a finished request's blocks, kept as a reusable prefix
            fill, owner = BlockState.CACHED, None
        elif kind < 0.26:  # a hole freed by a finished request
            fill, owner = BlockState.FREE, None
        else:
            fill, owner = BlockState.USED, (f"chat-{request}",)
            request += 1
        for block in range(pos, min(pos + length, n)):
            states[block] = fill
            if owner:
                owners[block] = owner
        if owner and rng.random() < 0.2:  # a forked request: its prompt blocks are shared by the forks
            for block in range(pos, min(pos + rng.randint(2, 8), n)):
                states[block], owners[block] = BlockState.SHARED, owner * 2
        pos += length
    for _ in range(12):  # stray cached prefixes in the free tail
        start = rng.randrange(pos, n - 20)
        for block in range(start, start + rng.randint(2, 14)):
            states[block] = BlockState.CACHED
    return BlockMap(
        states=bytes(states),
        owners={b: o for b, o in owners.items() if states[b] in (BlockState.USED, BlockState.SHARED)},
    )


def test_screenshot_of_a_busy_page(qtbot):
    page = MonitorPage()
    qtbot.addWidget(page)
    page.resize(1280, 860)
    page.show()
    qtbot.waitExposed(page)

    block_map = realistic_block_map()
    counts = {
        state: block_map.states.count(state)
        for state in (BlockState.FREE, BlockState.USED, BlockState.SHARED, BlockState.CACHED)
    }
    rng = random.Random(3)
    for i in range(300):  # 60 s of history at 5 snapshots a second
        t = i * 0.2
        prompt = max(0.0, 2400 + 1600 * math.sin(t / 7) + rng.uniform(-500, 500)) if i % 40 < 25 else 0.0
        gen = 780 + 120 * math.sin(t / 11) + rng.uniform(-40, 40)
        page.show_snapshot(
            snapshot(
                t=t,
                states=block_map.states,
                owners=block_map.owners,
                num_blocks_total=len(block_map.states),
                num_blocks_used=counts[BlockState.USED] + counts[BlockState.SHARED],
                num_blocks_free=counts[BlockState.FREE] + counts[BlockState.CACHED],
                num_blocks_cached=counts[BlockState.CACHED],
                num_blocks_shared=counts[BlockState.SHARED],
                num_running=24,
                num_waiting=5,
                num_swapped=2,
                num_preemptions=7,
                prefix_cache_queries=182_400,
                prefix_cache_hits=121_307,
                prompt_tokens_per_s=prompt,
                generation_tokens_per_s=gen,
                speculative=True,
                spec_draft_tokens=48_210,
                spec_accepted_tokens=31_904,
                memory=MemoryUse(rss=int(5.3 * 2**30), weights=int(2.4 * 2**30), kv_pool=2**31),
            )
        )
    assert page.chart.prompt_series.count() == 300

    out = ROOT / "build" / "screenshots"
    out.mkdir(parents=True, exist_ok=True)
    QApplication.sendPostedEvents()  # the layout requests the new label texts posted
    assert page.grab().save(str(out / "monitor.png"))
    # The same page after the desktop switches to dark: free cells, cards, axes follow the application palette.
    light = QApplication.palette()
    QApplication.setPalette(dark_palette())
    try:
        QApplication.sendPostedEvents()
        assert page.grab().save(str(out / "monitor-dark.png"))
    finally:
        QApplication.setPalette(light)
    assert (out / "monitor.png").stat().st_size > 10_000


def dark_palette() -> QPalette:
    palette = QPalette()
    for role, color in (
        (QPalette.ColorRole.Window, "#1f2124"),
        (QPalette.ColorRole.WindowText, "#e6e6e6"),
        (QPalette.ColorRole.Base, "#2a2d31"),
        (QPalette.ColorRole.Text, "#e6e6e6"),
        (QPalette.ColorRole.Midlight, "#3a3d42"),
        (QPalette.ColorRole.Mid, "#50545a"),
        (QPalette.ColorRole.PlaceholderText, "#9aa0a6"),
        (QPalette.ColorRole.Button, "#2a2d31"),
        (QPalette.ColorRole.ButtonText, "#e6e6e6"),
    ):
        palette.setColor(role, QColor(color))
    return palette


# ---- KV usage chart and CSV export ---------------------------------------------------------------------------


def varied_snapshots(count: int) -> list[EngineSnapshot]:
    """Snapshots 0.25 s apart whose every figure changes from one to the next."""
    return [
        snapshot(
            t=500.0 + i * 0.25,
            num_blocks_total=400,
            num_blocks_used=(37 * i) % 400,
            num_running=i % 7,
            num_waiting=(3 * i) % 5,
            num_swapped=i % 2,
            prompt_tokens_per_s=1000.0 + 12.5 * i,
            generation_tokens_per_s=50.0 + 0.75 * i,
        )
        for i in range(count)
    ]


def test_usage_chart_grows_with_snapshots_and_plots_their_figures(qtbot):
    page = MonitorPage()
    qtbot.addWidget(page)
    chart = page.usage_chart
    fed = varied_snapshots(12)
    for n, snap in enumerate(fed, start=1):
        page.show_snapshot(snap)
        assert chart.kv_series.count() == chart.running_series.count() == chart.waiting_series.count() == n
    now = fed[-1].time
    expected_x = [s.time - now for s in fed]
    for series, figure in (
        (chart.kv_series, lambda s: 100.0 * s.stats.num_blocks_used / s.stats.num_blocks_total),
        (chart.running_series, lambda s: s.stats.num_running),
        (chart.waiting_series, lambda s: s.stats.num_waiting),
    ):
        points = series.points()
        assert [p.x() for p in points] == pytest.approx(expected_x)
        assert [p.y() for p in points] == pytest.approx([figure(s) for s in fed])
    assert chart.requests_axis.max() > max(max(s.stats.num_running, s.stats.num_waiting) for s in fed)
    last = fed[-1].stats
    assert page.kv_now_label.text() == f"KV {100 * last.kv_usage:.0f}%"
    assert (page.running_now_label.text(), page.waiting_now_label.text()) == (
        f"Running {last.num_running}",
        f"Waiting {last.num_waiting}",
    )


def test_csv_export_round_trips_the_snapshots(qtbot, tmp_path):
    page = MonitorPage()
    qtbot.addWidget(page)
    fed = varied_snapshots(30)
    for snap in fed:
        page.show_snapshot(snap)
    path = tmp_path / "monitor.csv"
    assert page.export_csv(path)
    assert page.export_status.text() == f"Exported 30 samples to {path}"
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(fed)
    for row, snap in zip(rows, fed):
        s = snap.stats
        assert float(row["time_s"]) == pytest.approx(snap.time - fed[0].time)
        assert float(row["prompt_tokens_per_s"]) == s.prompt_tokens_per_s
        assert float(row["generation_tokens_per_s"]) == s.generation_tokens_per_s
        assert float(row["kv_usage_percent"]) == pytest.approx(100.0 * s.num_blocks_used / s.num_blocks_total)
        assert [int(row[k]) for k in ("blocks_used", "blocks_total", "running", "waiting", "swapped")] == [
            s.num_blocks_used,
            s.num_blocks_total,
            s.num_running,
            s.num_waiting,
            s.num_swapped,
        ]
    assert [p.name for p in tmp_path.iterdir()] == ["monitor.csv"]  # no temporary file left beside it


def test_a_failed_csv_export_is_said_and_leaves_nothing(qtbot, tmp_path):
    page = MonitorPage()
    qtbot.addWidget(page)
    page.show_snapshot(varied_snapshots(1)[0])
    missing = tmp_path / "no-such-folder" / "monitor.csv"
    assert not page.export_csv(missing)
    said = page.export_status.text()
    assert said.startswith("Could not export: ") and "monitor.csv" in said and "No such file or directory" in said
    assert list(tmp_path.iterdir()) == []

    # A path that is a folder: the temporary file is written, the replace fails, and the temporary file goes.
    folder = tmp_path / "taken.csv"
    folder.mkdir()
    assert not page.export_csv(folder)
    assert page.export_status.text().startswith("Could not export: ")
    assert [p.name for p in tmp_path.iterdir()] == ["taken.csv"] and list(folder.iterdir()) == []
