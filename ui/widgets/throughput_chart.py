"""Prompt and generation tokens per second over the last minute, as two lines against "seconds ago"."""

from __future__ import annotations

import math
from collections import deque

from PySide6.QtCharts import QChart, QChartView, QLineSeries, QValueAxis
from PySide6.QtCore import QEvent, QMargins, QPointF, Qt
from PySide6.QtGui import QColor, QPainter, QPalette, QPen

from ui.theme import GENERATION_COLOR, PROMPT_COLOR


def nice_ceiling(value: float, intervals: int) -> float:
    """The smallest round axis maximum >= value whose `intervals` equal steps are round numbers too."""
    raw = value / intervals
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10) if m * magnitude >= raw)
    return step * intervals


class ThroughputChart(QChartView):
    """No legend of its own: the monitor page's header names the lines next to their latest values."""

    WINDOW_S = 60.0
    Y_INTERVALS = 4

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        # (time, prompt tok/s, generation tok/s), oldest first; times come from the caller's clock.
        self._points: deque[tuple[float, float, float]] = deque()
        chart = QChart()
        chart.setBackgroundRoundness(0)
        chart.setMargins(QMargins(0, 0, 0, 0))
        chart.layout().setContentsMargins(0, 0, 0, 0)
        chart.legend().hide()
        self.prompt_series, self.generation_series = QLineSeries(), QLineSeries()
        self.prompt_series.setName("Prompt tok/s")
        self.generation_series.setName("Generation tok/s")
        for series, color in ((self.prompt_series, PROMPT_COLOR), (self.generation_series, GENERATION_COLOR)):
            series.setPen(QPen(color, 2))
            chart.addSeries(series)
        self.x_axis, self.y_axis = QValueAxis(), QValueAxis()
        self.x_axis.setRange(-self.WINDOW_S, 0)
        self.x_axis.setTickCount(7)
        self.x_axis.setLabelFormat("%d s")
        self.y_axis.setLabelFormat("%g")
        self.y_axis.setTickCount(self.Y_INTERVALS + 1)
        self.y_axis.setRange(0, nice_ceiling(4, self.Y_INTERVALS))
        chart.addAxis(self.x_axis, Qt.AlignmentFlag.AlignBottom)
        chart.addAxis(self.y_axis, Qt.AlignmentFlag.AlignLeft)
        for series in (self.prompt_series, self.generation_series):
            series.attachAxis(self.x_axis)
            series.attachAxis(self.y_axis)
        self.setChart(chart)
        self.setRenderHint(QPainter.RenderHint.Antialiasing)
        self._apply_palette()

    def add_point(self, t: float, prompt_rate: float, gen_rate: float) -> None:
        """Append a sample taken at time t (seconds, any monotonic clock) and drop those older than the window."""
        self._points.append((t, prompt_rate, gen_rate))
        while self._points[0][0] < t - self.WINDOW_S:
            self._points.popleft()
        # x is "seconds ago", so every point moves each sample: replace the lot (at most a few hundred).
        self.prompt_series.replace([QPointF(pt - t, p) for pt, p, _ in self._points])
        self.generation_series.replace([QPointF(pt - t, g) for pt, _, g in self._points])
        peak = max(max(p, g) for _, p, g in self._points)
        # Headroom over the peak, so the line never runs along the top edge; 4 tok/s is the floor of an idle chart.
        self.y_axis.setRange(0, nice_ceiling(max(peak * 1.05, 4.0), self.Y_INTERVALS))

    def _apply_palette(self) -> None:
        pal = self.palette()
        text, grid = pal.color(QPalette.ColorRole.WindowText), pal.color(QPalette.ColorRole.Mid)
        chart = self.chart()
        chart.setBackgroundBrush(pal.color(QPalette.ColorRole.Window))
        chart.setPlotAreaBackgroundVisible(False)
        for axis in (self.x_axis, self.y_axis):
            axis.setLabelsColor(text)
            axis.setLinePenColor(grid)
            axis.setGridLineColor(QColor(grid.red(), grid.green(), grid.blue(), 90))

    def changeEvent(self, event: QEvent) -> None:
        if event.type() == QEvent.Type.PaletteChange:
            self._apply_palette()
        super().changeEvent(event)
