"""Named batch runs, saved under the data dir and reopened later: one JSON file per run in data_dir()/batch-runs,
each row stored as an input record (prompt or messages, overrides, response_format) with its result fields beside
it, so a saved row is read back by the same checks as an imported one.

A file's name is its run's name, percent-quoted: any name maps to one file and back, and listing the runs reads no
file. Writes go through a temporary file and os.replace, so a failed save leaves the earlier run (or nothing).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from app.batch_io import (
    OVERRIDES,
    BatchFileError,
    BatchResult,
    BatchRow,
    row_from_record,
    write_atomically,
)
from app.library.model_store import data_dir

SUFFIX = ".json"


@dataclass
class SavedRunInfo:
    name: str
    saved: float  # seconds since the epoch, the file's modification time


@dataclass
class SavedRun:
    name: str
    rows: list[BatchRow]
    results: list[BatchResult]  # one per row, in order


def runs_dir() -> Path:
    return data_dir() / "batch-runs"


def _path(name: str) -> Path:
    # A leading dot is quoted too: dot-files are the temporary files of saves in progress, and never listed.
    quoted = quote(name, safe=" ")
    return runs_dir() / (("%2E" + quoted[1:] if quoted.startswith(".") else quoted) + SUFFIX)


def list_runs() -> list[SavedRunInfo]:
    """The saved runs, newest first."""
    try:
        files = [p for p in runs_dir().iterdir() if p.suffix == SUFFIX and not p.name.startswith(".")]
    except OSError:  # no folder yet, or one that cannot be read: no runs to offer
        return []
    runs = []
    for p in files:
        try:
            runs.append(SavedRunInfo(unquote(p.name[: -len(SUFFIX)]), p.stat().st_mtime))
        except OSError:  # deleted meanwhile
            continue
    return sorted(runs, key=lambda r: r.saved, reverse=True)


def save_run(name: str, rows: list[BatchRow], results: list[BatchResult]) -> None:
    """Save (or replace) the run called `name`; BatchFileError says why it could not be written."""
    name = name.strip()
    if not name:
        raise BatchFileError("a saved run needs a name")
    folder = runs_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BatchFileError(f"cannot create the folder {folder}: {e.strerror or e}") from e
    document = {"name": name, "rows": [_record(row, result) for row, result in zip(rows, results, strict=True)]}
    write_atomically(_path(name), lambda out: json.dump(document, out, ensure_ascii=False))


def load_run(name: str) -> SavedRun:
    path = _path(name)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise BatchFileError(f"saved run {name!r}: cannot read {path}: {e.strerror or e}") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BatchFileError(f"saved run {name!r}: {path.name} is not a saved run ({e})") from e
    if not isinstance(document, dict) or not isinstance(document.get("rows"), list):
        raise BatchFileError(f"saved run {name!r}: {path.name} has no list of rows")
    rows, results = [], []
    for number, record in enumerate(document["rows"], start=1):
        place = f"saved run {name!r} row {number}"
        if not isinstance(record, dict):
            raise BatchFileError(f"{place}: expected a JSON object")
        row = row_from_record(record, place, "field")
        rows.append(row)
        results.append(
            BatchResult(
                row.text,
                _typed(record, "output", str, "", place),
                _typed(record, "finish_reason", str, None, place),
                _typed(record, "tokens", int, 0, place),
                _typed(record, "seconds", (int, float), None, place),
                _typed(record, "error", str, None, place),
                row.messages,
            )
        )
    return SavedRun(name, rows, results)


def delete_run(name: str) -> None:
    try:
        _path(name).unlink()
    except OSError as e:
        raise BatchFileError(f"cannot delete the saved run {name!r}: {e.strerror or e}") from e


def _record(row: BatchRow, result: BatchResult) -> dict[str, Any]:
    """A row as the JSONL import reads it, then its result's fields (which the import accepts and ignores)."""
    record: dict[str, Any] = {"messages": row.messages} if row.messages is not None else {"prompt": row.prompt}
    record |= {name: getattr(row, name) for name in OVERRIDES if getattr(row, name) is not None}
    if row.response_format is not None:
        fmt = row.response_format
        record["response_format"] = "json_object" if fmt.json_object else fmt.json
    record |= {
        "output": result.output,
        "finish_reason": result.finish_reason,
        "tokens": result.tokens,
        "seconds": result.seconds,
        "error": result.error,
    }
    return record


def _typed(record: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any, place: str) -> Any:
    value = record.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, kind):
        raise BatchFileError(f"{place}: {key} has the wrong type ({value!r})")
    return value
