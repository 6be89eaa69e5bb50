"""The monitor page: the engine's KV cache and queues, speculative decoding and memory, live. It only renders
EngineSnapshots handed to show_snapshot (queued from the engine thread through the bridge); it never touches the
engine.

On a small window the cards wrap onto more rows and the page scrolls, so the block map keeps a height at which its
cells still read as blocks; on a large one the block map takes the room there is. Under the block map, two charts
of the last minute: throughput, then KV usage with running and waiting requests. Every snapshot's figures are also
kept (app/monitor_history.py) for Export CSV.
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QEvent, Qt, Slot
from PySide6.QtGui import QColor, QPalette
from PySide6.QtWidgets import (
    QFileDialog,
    QFrame,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QVBoxLayout,
    QWidget,
)

from app.engine_thread import EngineSnapshot
from app.monitor_history import ExportError, MonitorHistory, Sample
from engine import BlockState
from ui.theme import BLOCK_COLORS, GENERATION_COLOR, KV_USAGE_COLOR, PROMPT_COLOR, RUNNING_COLOR, WAITING_COLOR
from ui.widgets.block_map import BlockMapWidget, Swatch
from ui.widgets.cards import card, muted, section, value_label
from ui.widgets.status_line import StatusLine
from ui.widgets.throughput_chart import ThroughputChart
from ui.widgets.usage_chart import UsageChart
from ui.widgets.wrap_layout import WrapLayout

# The least height of the block map (legend included): at 800x600 some 3,000 blocks still get cells with gaps.
BLOCK_MAP_MIN_HEIGHT = 240


class MonitorPage(QWidget):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)

        usage_card, usage = card("KV cache")
        self.usage_percent_label = value_label()
        self.usage_bar = QProgressBar()
        self.usage_bar.setTextVisible(False)
        self.usage_bar.setFixedHeight(6)
        self._style_usage_bar()
        self.usage_label = muted()
        usage.addWidget(self.usage_percent_label)
        usage.addWidget(self.usage_label)
        usage.addSpacing(6)
        usage.addWidget(self.usage_bar)

        requests_card, requests = card("Requests")
        self.running_label, self.waiting_label, self.swapped_label = value_label(), value_label(), value_label()
        requests.addLayout(
            self._figures(
                [(self.running_label, "running"), (self.waiting_label, "waiting"), (self.swapped_label, "swapped")]
            )
        )

        prefix_card, prefix = card("Prefix cache hit rate")
        self.hit_rate_label = value_label()
        self.hit_detail_label = muted()
        prefix.addWidget(self.hit_rate_label)
        prefix.addWidget(self.hit_detail_label)

        sharing_card, sharing = card("Block reuse")
        self.shared_label, self.cached_label = value_label(), value_label()
        sharing.addLayout(self._figures([(self.shared_label, "shared"), (self.cached_label, "cached")]))

        preempt_card, preempt = card("Preemptions")
        self.preemptions_label = value_label()
        preempt.addWidget(self.preemptions_label)
        preempt.addWidget(muted("since start"))

        cards = WrapLayout(spacing=12)
        for panel, stretch in (
            (usage_card, 3),
            (requests_card, 3),
            (prefix_card, 3),
            (sharing_card, 2),
            (preempt_card, 2),
        ):
            panel.layout().addStretch(1)  # cards share a height; their contents line up at the top
            cards.add_widget(panel, stretch)

        # A line under the cards: how many drafted tokens speculation keeps, and the memory the model takes.
        self.speculation_label, self.memory_label = muted("Speculation off"), muted()
        engine_line = QHBoxLayout()
        engine_line.setContentsMargins(4, 0, 4, 0)
        engine_line.addWidget(self.speculation_label)
        engine_line.addStretch(1)
        engine_line.addWidget(self.memory_label)

        self.block_map = BlockMapWidget()
        self.block_map.setMinimumHeight(BLOCK_MAP_MIN_HEIGHT)
        self.chart = ThroughputChart()
        self.chart.setMinimumHeight(140)
        self.chart.setMaximumHeight(240)
        # The chart's legend, with the latest rates.
        self.prompt_rate_label, self.generation_rate_label = QLabel(), QLabel()
        throughput_header = self._chart_header(
            "Throughput", [(PROMPT_COLOR, self.prompt_rate_label), (GENERATION_COLOR, self.generation_rate_label)]
        )
        self._show_rates(None, None)

        self.history = MonitorHistory()
        self.usage_chart = UsageChart()
        self.usage_chart.setMinimumHeight(140)
        self.usage_chart.setMaximumHeight(240)
        self.kv_now_label, self.running_now_label, self.waiting_now_label = QLabel(), QLabel(), QLabel()
        usage_header = self._chart_header(
            "KV usage and requests",
            [
                (KV_USAGE_COLOR, self.kv_now_label),
                (RUNNING_COLOR, self.running_now_label),
                (WAITING_COLOR, self.waiting_now_label),
            ],
        )
        self._show_usage(None)
        self.export_button = QPushButton("Export CSV…")
        self.export_button.setToolTip("Save every figure recorded since the page opened, one row per snapshot")
        self.export_button.clicked.connect(self._choose_export)
        self.export_status = StatusLine()
        export_line = QHBoxLayout()
        export_line.addWidget(self.export_status, 1)
        export_line.addWidget(self.export_button)

        # Said while Chat and Batch go to a remote endpoint, whose cache this page cannot see.
        self.remote_note = muted()
        self.remote_note.hide()

        content = QWidget()
        scroll = QScrollArea()
        scroll.setWidget(content)
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)  # the cards wrap instead
        page = QVBoxLayout(self)
        page.setContentsMargins(0, 0, 0, 0)
        page.addWidget(scroll)
        layout = QVBoxLayout(content)
        layout.setContentsMargins(24, 20, 24, 20)
        layout.setSpacing(12)
        layout.addWidget(self.remote_note)
        layout.addLayout(cards)
        layout.addLayout(engine_line)
        layout.addSpacing(8)
        layout.addWidget(section("KV blocks"))
        layout.addWidget(self.block_map, 1)
        layout.addSpacing(8)
        layout.addLayout(throughput_header)
        layout.addWidget(self.chart)
        layout.addSpacing(8)
        layout.addLayout(usage_header)
        layout.addWidget(self.usage_chart)
        layout.addLayout(export_line)

    def show_remote(self, where: str | None) -> None:
        """Say that chat and batch requests go to `where` (a remote endpoint), or nothing when they run here."""
        self.remote_note.setText(
            f"Chat and Batch are sending their requests to {where}; this page shows this "
            "computer's engine, which serves the Server page."
            if where
            else ""
        )
        self.remote_note.setVisible(bool(where))

    def _style_usage_bar(self) -> None:
        # A thin track in the palette's midlight with a block-map-blue fill; redone when the palette changes.
        track = self.palette().color(QPalette.ColorRole.Midlight).name()
        self.usage_bar.setStyleSheet(
            f"QProgressBar {{ background: {track}; border: none; border-radius: 3px; }}"
            f"QProgressBar::chunk {{ background: {BLOCK_COLORS[BlockState.USED].name()}; border-radius: 3px; }}"
        )

    def changeEvent(self, event: QEvent) -> None:
        if event.type() == QEvent.Type.PaletteChange:
            self._style_usage_bar()
        super().changeEvent(event)

    @staticmethod
    def _chart_header(title: str, lines: list[tuple[QColor, QLabel]]) -> QHBoxLayout:
        """A chart's title, then its legend on the right: a swatch per line beside a label with its latest value."""
        header = QHBoxLayout()
        header.setSpacing(6)
        header.addWidget(section(title))
        header.addStretch(1)
        for color, label in lines:
            header.addSpacing(14)
            header.addWidget(Swatch(lambda color=color: color))
            header.addWidget(label)
        return header

    @staticmethod
    def _figures(figures: list[tuple[QLabel, str]]) -> QGridLayout:
        """Big numbers side by side, each with its caption under it."""
        grid = QGridLayout()
        grid.setHorizontalSpacing(24)
        grid.setVerticalSpacing(0)
        for col, (label, caption) in enumerate(figures):
            grid.addWidget(label, 0, col)
            grid.addWidget(muted(caption), 1, col)
        grid.setColumnStretch(len(figures), 1)
        return grid

    @Slot(object)
    def show_snapshot(self, snapshot: EngineSnapshot) -> None:
        s = snapshot.stats
        self.usage_percent_label.setText(f"{s.kv_usage:.1%}")
        self.usage_bar.setRange(0, max(s.num_blocks_total, 1))
        self.usage_bar.setValue(s.num_blocks_used)
        self.usage_label.setText(f"{s.num_blocks_used:,} / {s.num_blocks_total:,} blocks")
        self.running_label.setText(f"{s.num_running:,}")
        self.waiting_label.setText(f"{s.num_waiting:,}")
        self.swapped_label.setText(f"{s.num_swapped:,}")
        self.preemptions_label.setText(f"{s.num_preemptions:,}")
        if s.prefix_cache_queries:
            self.hit_rate_label.setText(f"{s.prefix_cache_hits / s.prefix_cache_queries:.1%}")
            self.hit_detail_label.setText(f"{s.prefix_cache_hits:,} / {s.prefix_cache_queries:,} prompt tokens")
        else:
            self.hit_rate_label.setText("—")
            self.hit_detail_label.setText("no prompts yet")
        self.shared_label.setText(f"{s.num_blocks_shared:,}")
        self.cached_label.setText(f"{s.num_blocks_cached:,}")
        self.speculation_label.setText(self._speculation(snapshot))
        self.memory_label.setText(str(snapshot.memory))
        self.block_map.set_block_map(snapshot.block_map)
        self.chart.add_point(snapshot.time, s.prompt_tokens_per_s, s.generation_tokens_per_s)
        self._show_rates(s.prompt_tokens_per_s, s.generation_tokens_per_s)
        sample = self.history.record(snapshot)
        self.usage_chart.add_sample(sample)
        self._show_usage(sample)

    @staticmethod
    def _speculation(snapshot: EngineSnapshot) -> str:
        s = snapshot.stats
        if not snapshot.speculative:
            return "Speculation off"
        if s.spec_acceptance_rate is None:
            return "Speculation: no tokens drafted yet"
        return (
            f"Speculation: {s.spec_acceptance_rate:.0%} of drafted tokens accepted "
            f"({s.spec_accepted_tokens:,} of {s.spec_draft_tokens:,})"
        )

    def _show_rates(self, prompt: float | None, generation: float | None) -> None:
        def rate(value: float | None) -> str:
            return "—" if value is None else f"{value:,.0f} tok/s"

        self.prompt_rate_label.setText(f"Prompt {rate(prompt)}")
        self.generation_rate_label.setText(f"Generation {rate(generation)}")

    def _show_usage(self, sample: Sample | None) -> None:
        if sample is None:
            kv, running, waiting = "—", "—", "—"
        else:
            kv, running, waiting = f"{sample.kv_usage_percent:.0f}%", f"{sample.running:,}", f"{sample.waiting:,}"
        self.kv_now_label.setText(f"KV {kv}")
        self.running_now_label.setText(f"Running {running}")
        self.waiting_now_label.setText(f"Waiting {waiting}")

    # ---- export -----------------------------------------------------------------------------------------------
    def export_csv(self, path: str | Path) -> bool:
        """Write the recorded figures to `path`; says how it went on the status line. False when it failed."""
        try:
            self.history.write_csv(path)
        except ExportError as e:
            self.export_status.say(f"Could not export: {e}", "error")
            return False
        self.export_status.say(f"Exported {len(self.history.samples):,} samples to {path}", "ok")
        return True

    def _choose_export(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export monitor figures", "kvstudio-monitor.csv", "CSV (*.csv)")
        if path:
            self.export_csv(path if Path(path).suffix.lower() == ".csv" else path + ".csv")
