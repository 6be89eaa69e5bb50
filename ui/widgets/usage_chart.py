"""KV usage (% of blocks in use) and running/waiting requests over the last minute, against "seconds ago": the
percentage on the left axis, request counts on the right, so a queue building up reads beside the pool filling."""

from __future__ import annotations

from collections import deque

from PySide6.QtCharts import QChart, QChartView, QLineSeries, QValueAxis
from PySide6.QtCore import QEvent, QMargins, QPointF, Qt
from PySide6.QtGui import QColor, QPainter, QPalette, QPen

from app.monitor_history import Sample
from ui.theme import KV_USAGE_COLOR, RUNNING_COLOR, WAITING_COLOR
from ui.widgets.throughput_chart import ThroughputChart, nice_ceiling


class UsageChart(QChartView):
    """No legend of its own: the monitor page's header names the lines next to their latest values."""

    WINDOW_S = ThroughputChart.WINDOW_S  # the two charts share their time axis
    Y_INTERVALS = 4

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._samples: deque[Sample] = deque()  # oldest first, within the window
        chart = QChart()
        chart.setBackgroundRoundness(0)
        chart.setMargins(QMargins(0, 0, 0, 0))
        chart.layout().setContentsMargins(0, 0, 0, 0)
        chart.legend().hide()
        self.kv_series, self.running_series, self.waiting_series = QLineSeries(), QLineSeries(), QLineSeries()
        self.x_axis, self.percent_axis, self.requests_axis = QValueAxis(), QValueAxis(), QValueAxis()
        self.x_axis.setRange(-self.WINDOW_S, 0)
        self.x_axis.setTickCount(7)
        self.x_axis.setLabelFormat("%d s")
        self.percent_axis.setRange(0, 100)
        self.percent_axis.setTickCount(self.Y_INTERVALS + 1)
        self.percent_axis.setLabelFormat("%d%%")
        self.requests_axis.setLabelFormat("%g")
        self.requests_axis.setTickCount(self.Y_INTERVALS + 1)
        self.requests_axis.setRange(0, self.Y_INTERVALS)
        chart.addAxis(self.x_axis, Qt.AlignmentFlag.AlignBottom)
        chart.addAxis(self.percent_axis, Qt.AlignmentFlag.AlignLeft)
        chart.addAxis(self.requests_axis, Qt.AlignmentFlag.AlignRight)
        for series, color, y_axis in (
            (self.kv_series, KV_USAGE_COLOR, self.percent_axis),
            (self.running_series, RUNNING_COLOR, self.requests_axis),
            (self.waiting_series, WAITING_COLOR, self.requests_axis),
        ):
            series.setPen(QPen(color, 2))
            chart.addSeries(series)
            series.attachAxis(self.x_axis)
            series.attachAxis(y_axis)
        self.setChart(chart)
        self.setRenderHint(QPainter.RenderHint.Antialiasing)
        self._apply_palette()

    def add_sample(self, sample: Sample) -> None:
        """Append a sample and drop those older than the window (times are the sample's own clock)."""
        t = sample.time_s
        self._samples.append(sample)
        while self._samples[0].time_s < t - self.WINDOW_S:
            self._samples.popleft()
        # x is "seconds ago", so every point moves each sample: replace the lot.
        self.kv_series.replace([QPointF(s.time_s - t, s.kv_usage_percent) for s in self._samples])
        self.running_series.replace([QPointF(s.time_s - t, s.running) for s in self._samples])
        self.waiting_series.replace([QPointF(s.time_s - t, s.waiting) for s in self._samples])
        peak = max(max(s.running, s.waiting) for s in self._samples)
        # Whole requests on round steps, the top a step over the peak so its line stays off the edge.
        self.requests_axis.setRange(0, nice_ceiling(max(peak + 1, self.Y_INTERVALS), self.Y_INTERVALS))

    def _apply_palette(self) -> None:
        pal = self.palette()
        text, grid = pal.color(QPalette.ColorRole.WindowText), pal.color(QPalette.ColorRole.Mid)
        chart = self.chart()
        chart.setBackgroundBrush(pal.color(QPalette.ColorRole.Window))
        chart.setPlotAreaBackgroundVisible(False)
        for axis in (self.x_axis, self.percent_axis, self.requests_axis):
            axis.setLabelsColor(text)
            axis.setLinePenColor(grid)
            axis.setGridLineColor(QColor(grid.red(), grid.green(), grid.blue(), 90))
        self.requests_axis.setGridLineVisible(False)  # one grid (the percentage's) is enough to read both

    def changeEvent(self, event: QEvent) -> None:
        if event.type() == QEvent.Type.PaletteChange:
            self._apply_palette()
        super().changeEvent(event)
