"""The UI thread's heartbeat through a batch run, as figures: the gaps between the ticks of a periodic timer on that
thread. A gap much longer than the timer's interval is a time the window could not repaint or take a key press.
The window side (ui/heartbeat_bench.py, `kvstudio bench ui-heartbeat`) records the ticks; this turns them into what
it prints and judges, without Qt.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

# A pause of this long is seen as a stutter (and a key press echoed this late feels slow): the benchmark fails on it.
MAX_GAP_MS = 100.0


@dataclass(frozen=True)
class HeartbeatReport:
    interval_ms: float  # the timer's interval: the smallest gap there can be
    ticks: int
    max_gap_ms: float
    p99_gap_ms: float
    p50_gap_ms: float
    prompts: int
    done: int  # prompts that finished (the rest failed)
    tokens: int  # generated, all prompts together
    seconds: float  # from Run to the last row's end

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def smooth(self) -> bool:
        """Whether the UI thread never went MAX_GAP_MS without a turn."""
        return self.max_gap_ms < MAX_GAP_MS

    def summary(self) -> str:
        verdict = "ok" if self.smooth else f"too long: the UI thread stalled for {MAX_GAP_MS:.0f} ms or more"
        return "\n".join(
            [
                f"batch: {self.done} of {self.prompts} prompts done, {self.tokens} tokens in {self.seconds:.2f} s = "
                f"{self.tokens_per_s:.1f} tok/s",
                f"heartbeat every {self.interval_ms:g} ms, {self.ticks} ticks: gap p50 {self.p50_gap_ms:.1f} ms, "
                f"p99 {self.p99_gap_ms:.1f} ms, max {self.max_gap_ms:.1f} ms ({verdict})",
            ]
        )


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The nearest-rank q-th percentile (0 < q <= 100) of values sorted ascending."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    return sorted_values[max(math.ceil(q / 100 * len(sorted_values)) - 1, 0)]


def heartbeat_report(
    ticks: Sequence[float], interval_s: float, prompts: int, done: int, tokens: int, seconds: float
) -> HeartbeatReport:
    """The report for tick times (seconds, ascending) taken every interval_s during a run of `prompts` prompts."""
    if len(ticks) < 2:
        raise ValueError(f"the heartbeat ticked {len(ticks)} time(s): too few to measure a gap")
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    gaps = sorted(b - a for a, b in pairwise(ticks))
    return HeartbeatReport(
        interval_ms=interval_s * 1000,
        ticks=len(ticks),
        max_gap_ms=gaps[-1] * 1000,
        p99_gap_ms=percentile(gaps, 99) * 1000,
        p50_gap_ms=percentile(gaps, 50) * 1000,
        prompts=prompts,
        done=done,
        tokens=tokens,
        seconds=seconds,
    )
