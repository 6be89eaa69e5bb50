"""The batch page's progress bar: rows finished, the share of the run's token budget spent, and the time left."""

from __future__ import annotations

from PySide6.QtWidgets import QProgressBar

from ui.widgets.batch_table import CANCELLED, DONE, FAILED, BatchTableModel


class RunProgress(QProgressBar):
    def show_rows(self, rows: int) -> None:
        """No run yet: an empty bar over the rows to run."""
        self.setRange(0, 1)
        self.setValue(0)
        self.setFormat(f"0 / {rows} rows")

    def show_run(self, model: BatchTableModel, rate: float, running: bool) -> None:
        """Fill the bar by tokens, not rows: rows run side by side and finish in bunches, so counting rows would
        stand still and then jump, while tokens come every step. The work left is the budget not yet spent (each
        running row's max_tokens less what it generated; nothing for a finished row), and the time left is that
        at the run's token rate so far (`rate`, tokens/s). A row that stops early frees the rest of its budget, so
        the estimate errs long, and the bar jumps forward, never back."""
        done, rows = model.count(DONE, FAILED, CANCELLED), len(model.items)
        spent, budget = model.token_progress()
        if not budget:  # a reopened run's budgets are not saved: its bar shows the rows finished
            spent, budget = done, rows
        self.setRange(0, max(budget, 1))
        self.setValue(spent)
        text = f"{done} / {rows} rows · %p%"
        if running and rate > 0 and spent:
            text += f" · about {_duration((budget - spent) / rate)} left"
        self.setFormat(text)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{max(seconds, 1):.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"
