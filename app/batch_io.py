"""Batch inputs and outputs, without Qt: prompts from pasted text or .txt / .jsonl / .csv files, each with optional
per-row sampling overrides (and a response_format its reply keeps to), and results written to JSONL or CSV
atomically.

Every problem in an input file is a BatchFileError naming the file and the line (or CSV row) at fault, so the
batch page can say what to fix instead of failing somewhere inside a run.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from engine import SamplingParams
from engine.structured_output import StructuredOutputsParams, grammar_error

ROLES = ("system", "user", "assistant")
_ROW_FIELDS = ("messages", "response_format")  # a row's fields beside its prompt and sampling overrides
# Columns of an exported file. A results file may be imported again to re-run it, so these are accepted (and
# ignored) in inputs too.
RESULT_FIELDS = ("prompt", "output", "finish_reason", "tokens", "seconds", "error")


class BatchFileError(ValueError):
    """A batch input file that cannot be used, or an export that cannot be written; the message names the file
    and, for bad contents, the line or row."""


@dataclass
class BatchRow:
    """One prompt of a batch: plain text or chat messages, and the sampling fields this row sets for itself
    (None: the batch's shared setting)."""

    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    seed: int | None = None
    stop: list[str] | None = None
    # What the reply keeps to: any JSON object (json_object) or a JSON schema; None for free text.
    response_format: StructuredOutputsParams | None = None

    def overrides(self) -> dict[str, Any]:
        """The sampling fields this row sets, as SamplingParams keyword arguments."""
        fields = {name: getattr(self, name) for name in OVERRIDES if getattr(self, name) is not None}
        if self.response_format is not None:
            fields["structured_outputs"] = self.response_format
        return fields

    @property
    def text(self) -> str:
        """What to show for the row: the prompt, or a chat's last user message."""
        if self.prompt is not None:
            return self.prompt
        return next(
            (m["content"] for m in reversed(self.messages) if m["role"] == "user"), self.messages[-1]["content"]
        )


@dataclass
class BatchResult:
    """One row's outcome, as exported. `messages`: the chat a row was given as (JSONL keeps it; CSV has only the
    prompt, the chat's last user message)."""

    prompt: str
    output: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "abort", None when it failed or never ran
    tokens: int = 0
    seconds: float | None = None  # from submission to the last token
    error: str | None = None
    messages: list[dict[str, str]] | None = None


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError("must be a finite number")
    return float(value)


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("must be an integer")
    return value


def _stop(value: Any) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(s, str) and s for s in value):
        raise ValueError("must be a non-empty string or a list of non-empty strings")
    return value


def response_format(value: Any) -> StructuredOutputsParams:
    """A row's response_format: "json_object" (any JSON object), a JSON schema, or OpenAI's own forms of both
    ({"type": "json_object"}, {"type": "json_schema", "json_schema": {"schema": {...}}}). In a CSV cell, the
    schema is written as JSON text."""
    if isinstance(value, str):
        if value.strip() == "json_object":
            return StructuredOutputsParams(json_object=True)
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError('must be "json_object" or a JSON schema (an object)') from None
    if isinstance(value, dict) and value.get("type") == "json_object":
        return StructuredOutputsParams(json_object=True)
    if isinstance(value, dict) and value.get("type") == "json_schema":
        value = (value.get("json_schema") or {}).get("schema")
    if not isinstance(value, dict):
        raise ValueError('must be "json_object" or a JSON schema (an object)')
    params = StructuredOutputsParams(json=value)
    error = grammar_error(params)
    if error is not None:
        raise ValueError(f"is not a JSON schema the grammar engine can use: {error}")
    return params


# Each override field and the check that turns a JSON value into it (raising ValueError saying what is wrong).
OVERRIDES: dict[str, Callable[[Any], Any]] = {
    "temperature": _number,
    "top_p": _number,
    "top_k": _integer,
    "max_tokens": _integer,
    "seed": _integer,
    "stop": _stop,
}


def parse_text(text: str) -> list[BatchRow]:
    """Pasted text: one prompt per non-empty line, surrounding whitespace removed."""
    return [BatchRow(prompt=line.strip()) for line in text.splitlines() if line.strip()]


def load_rows(path: str | Path) -> list[BatchRow]:
    """The rows of a .txt (one prompt per line), .jsonl ({"prompt": ...} or {"messages": [...]} per line, plus
    override fields) or .csv (a header with a "prompt" column and optional override columns) file."""
    path = Path(path)
    readers = {".txt": _read_txt, ".jsonl": _read_jsonl, ".csv": _read_csv}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise BatchFileError(f"{path.name}: unknown file type {path.suffix or '(none)'!r}; use {', '.join(readers)}")
    text = _read_text(path)
    if not text.strip():
        raise BatchFileError(f"{path.name}: the file is empty")
    rows = reader(path, text)
    if not rows:
        raise BatchFileError(f"{path.name}: the file has no prompts")
    return rows


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise BatchFileError(f"{path.name}: cannot read the file: {e.strerror or e}") from e
    try:
        return raw.decode("utf-8-sig")  # -sig: spreadsheets often start their CSV and text with a BOM
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise BatchFileError(f"{path.name} line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x})") from e


def _read_txt(path: Path, text: str) -> list[BatchRow]:
    return parse_text(text)


def _read_jsonl(path: Path, text: str) -> list[BatchRow]:
    rows = []
    # Split on newlines only: JSON text may hold U+2028 and other characters that str.splitlines breaks at.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        place = f"{path.name} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise BatchFileError(f"{place}: bad JSON: {e.msg} at column {e.colno}") from e
        if not isinstance(record, dict):
            raise BatchFileError(f"{place}: expected a JSON object, got {type(record).__name__}")
        rows.append(row_from_record(record, place, "field"))
    return rows


def _read_csv(path: Path, text: str) -> list[BatchRow]:
    # newline="": lines end at \r and \n only (not U+2028 as str.splitlines would), and a quoted cell keeps its
    # own line breaks as they were.
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        header = reader.fieldnames or []
        if "prompt" not in header:
            raise BatchFileError(
                f"{path.name} row 1: the header needs a 'prompt' column "
                f"(found {', '.join(repr(h) for h in header) or 'nothing'})"
            )
        rows = []
        # Rows counted as a spreadsheet shows them: the header is row 1 (a quoted cell may span lines).
        for number, record in enumerate(reader, start=2):
            place = f"{path.name} row {number}"
            if None in record:  # DictReader files surplus cells under the key None
                raise BatchFileError(f"{place}: more cells than the header has columns")
            # An empty cell means "not set" (a spreadsheet cannot leave a cell out); only the prompt must be there.
            cells = {k: v for k, v in record.items() if k == "prompt" or v not in ("", None)}
            rows.append(row_from_record({k: _csv_value(k, v, place) for k, v in cells.items()}, place, "column"))
        return rows
    except csv.Error as e:
        raise BatchFileError(f"{path.name} line {reader.line_num}: bad CSV: {e}") from e


def _csv_value(name: str, cell: str | None, place: str) -> Any:
    """A CSV cell as the JSON value its field expects: numbers parsed, a stop cell is one stop string, a
    response_format cell "json_object" or a schema's JSON text (read by response_format())."""
    if name not in OVERRIDES or name == "stop":
        return cell
    try:
        return float(cell) if OVERRIDES[name] is _number else int(cell)
    except ValueError:
        kind = "a number" if OVERRIDES[name] is _number else "an integer"
        raise BatchFileError(f"{place}: {name} must be {kind}, got {cell!r}") from None


def row_from_record(record: dict[str, Any], place: str, what: str) -> BatchRow:
    """One row from a JSONL object or a CSV record (`what`: "field" or "column", as errors name its keys); a saved
    run's records are read back the same way."""
    unknown = [k for k in record if k not in OVERRIDES and k not in RESULT_FIELDS and k not in _ROW_FIELDS]
    if unknown:
        raise BatchFileError(
            f"{place}: unknown {what} {unknown[0]!r} (known: prompt, messages, {', '.join(OVERRIDES)}, response_format)"
        )
    prompt, messages = record.get("prompt"), record.get("messages")
    if (prompt is None) == (messages is None):
        if prompt is not None:
            raise BatchFileError(f"{place}: needs exactly one of 'prompt' and 'messages'")
        raise BatchFileError(f"{place}: missing 'prompt'" + (" or 'messages'" if what == "field" else ""))
    if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
        raise BatchFileError(f"{place}: 'prompt' must be non-empty text, got {prompt!r}")
    if messages is not None:
        _check_messages(messages, place)
    row = BatchRow(prompt=prompt, messages=messages)
    for name, check in OVERRIDES.items():
        if record.get(name) is not None:
            try:
                setattr(row, name, check(record[name]))
            except ValueError as e:
                raise BatchFileError(f"{place}: {name} {e}, got {record[name]!r}") from None
    if record.get("response_format") is not None:
        try:
            row.response_format = response_format(record["response_format"])
        except ValueError as e:
            raise BatchFileError(f"{place}: response_format {e}") from None
    try:  # ranges (top_p in (0, 1], max_tokens >= 1, ...) as the engine would judge them
        SamplingParams(**row.overrides())
    except ValueError as e:
        raise BatchFileError(f"{place}: {e}") from None
    return row


def _check_messages(messages: Any, place: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise BatchFileError(f"{place}: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise BatchFileError(
                f'{place}: messages[{i}] must be {{"role": one of {", ".join(ROLES)}, "content": text}}, got {m!r}'
            )
    if not any(m["role"] == "user" for m in messages):
        raise BatchFileError(f"{place}: 'messages' has no user message")


# ---- export ---------------------------------------------------------------------------------------------------
def export_results(results: Iterable[BatchResult], path: str | Path) -> None:
    """Write results as JSONL or CSV, chosen by the file's suffix."""
    path = Path(path)
    writers = {".jsonl": export_jsonl, ".csv": export_csv}
    if path.suffix.lower() not in writers:
        raise BatchFileError(
            f"{path.name}: cannot export to {path.suffix or '(no suffix)'!r}; use {' or '.join(writers)}"
        )
    writers[path.suffix.lower()](results, path)


def export_jsonl(results: Iterable[BatchResult], path: str | Path) -> None:
    """One JSON object per result; a chat row has its "messages" in place of "prompt", as it was given, so the
    file can be imported again."""

    def write(out) -> None:
        for r in results:
            record = {k: v for k, v in asdict(r).items() if k in RESULT_FIELDS}
            if r.messages is not None:
                del record["prompt"]
                record = {"messages": r.messages, **record}
            out.write(json.dumps(record, ensure_ascii=False) + "\n")

    write_atomically(Path(path), write)


def export_csv(results: Iterable[BatchResult], path: str | Path) -> None:
    """A header row, then one row per result; cells with commas, quotes or line breaks are quoted."""

    def write(out) -> None:
        writer = csv.writer(out)
        writer.writerow(RESULT_FIELDS)
        for r in results:
            writer.writerow(["" if getattr(r, k) is None else getattr(r, k) for k in RESULT_FIELDS])

    write_atomically(Path(path), write)


def write_atomically(path: Path, write: Callable) -> None:
    """Write into a temporary file beside `path` and replace it in one step: a crash never leaves half a file."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise BatchFileError(f"{path.name}: cannot write to {path.parent}: {e.strerror or e}") from e
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as out:
            write(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise BatchFileError(f"{path.name}: cannot write the file: {e.strerror or e}") from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
