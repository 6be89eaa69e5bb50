"""The monitor's figures over time: one sample per engine snapshot, the last hour or more of them kept, and written
to CSV for a spreadsheet or a plot. The write goes through a temporary file and os.replace, so a failed export
leaves no file behind (and an earlier export at that path as it was)."""

from __future__ import annotations

import csv
import os
import tempfile
from collections import deque
from dataclasses import astuple, dataclass, fields
from pathlib import Path

from app.engine_thread import EngineSnapshot

# Snapshots come at most every 50 ms (EngineThread.stats_interval): an hour at that rate, a day when idle (one a
# second); some 10 MiB at the most.
MAX_SAMPLES = 72_000


class ExportError(Exception):
    """The CSV could not be written; the message says why, in words."""


@dataclass(frozen=True, slots=True)
class Sample:
    """A snapshot's figures; the field names are the CSV's header."""

    time_s: float  # the snapshot's clock (monotonic seconds); written as seconds since the first sample kept
    prompt_tokens_per_s: float
    generation_tokens_per_s: float
    kv_usage_percent: float
    blocks_used: int
    blocks_total: int
    running: int
    waiting: int
    swapped: int

    @classmethod
    def of(cls, snapshot: EngineSnapshot) -> Sample:
        s = snapshot.stats
        return cls(
            snapshot.time,
            s.prompt_tokens_per_s,
            s.generation_tokens_per_s,
            100.0 * s.kv_usage,
            s.num_blocks_used,
            s.num_blocks_total,
            s.num_running,
            s.num_waiting,
            s.num_swapped,
        )


COLUMNS = tuple(f.name for f in fields(Sample))


class MonitorHistory:
    def __init__(self, max_samples: int = MAX_SAMPLES) -> None:
        self.samples: deque[Sample] = deque(maxlen=max_samples)

    def record(self, snapshot: EngineSnapshot) -> Sample:
        sample = Sample.of(snapshot)
        self.samples.append(sample)
        return sample

    def write_csv(self, path: str | Path) -> None:
        """Write a header row and one row per sample to `path`, whole or not at all. Raises ExportError."""
        path = Path(path)
        start = self.samples[0].time_s if self.samples else 0.0
        try:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        except OSError as e:
            raise ExportError(f"cannot write {path.name} in {path.parent}: {e.strerror or e}") from e
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as out:
                writer = csv.writer(out)
                writer.writerow(COLUMNS)
                for sample in self.samples:
                    writer.writerow([round(sample.time_s - start, 3), *astuple(sample)[1:]])
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except OSError as e:
            Path(tmp).unlink(missing_ok=True)
            raise ExportError(f"cannot write {path}: {e.strerror or e}") from e
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
