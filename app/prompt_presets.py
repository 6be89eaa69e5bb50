"""System prompts saved by name, without Qt: a few built in, the user's own in a JSON file of their own beside the
chat history, written atomically.

Built-in presets live here, not in the file, so they follow the app's updates; they cannot be renamed, deleted or
overwritten (a changed one is saved under a name of its own). Names are unique regardless of case and surrounding
spaces. A file that cannot be read (bad JSON, the wrong shape, unreadable) is reported by `problem` and left as it
is: the store then holds the built-ins only, and its first write keeps the unreadable file beside the new one
(`<name>.unreadable`) before replacing it, so what the user saved is never silently lost.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from app.batch_io import BatchFileError, write_atomically

FILE_NAME = "prompt_presets.json"
MAX_NAME = 60  # characters: a name is shown in a narrow settings column


class PresetError(ValueError):
    """A preset that cannot be saved, renamed or deleted, or a presets file that cannot be written."""


@dataclass(frozen=True)
class Preset:
    name: str
    prompt: str
    builtin: bool = False


BUILTIN = (
    Preset(
        "Concise assistant",
        "You are a helpful assistant. Answer directly and briefly: lead with the answer, skip preambles and "
        "restating the question, and use a short list only when it makes the answer clearer. If you are unsure, "
        "say so in one sentence.",
        builtin=True,
    ),
    Preset(
        "Code reviewer",
        "You are an experienced code reviewer. For the code you are given, point out bugs, unhandled edge cases, "
        "security problems and unclear names, most serious first, each with the line it concerns and a concrete "
        "fix. Say what is good only briefly. Do not rewrite the whole file unless asked.",
        builtin=True,
    ),
)


def _key(name: str) -> str:
    return name.strip().casefold()


class PresetStore:
    """The presets: the built-ins first, then the user's in the order saved."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.problem: str | None = None  # why the file could not be read; it is kept until the next write
        self._own: list[Preset] = []
        try:
            self._own = _read(self.path)
        except FileNotFoundError:
            pass
        except PresetError as e:
            self.problem = str(e)

    def presets(self) -> list[Preset]:
        return [*BUILTIN, *self._own]

    def get(self, name: str) -> Preset | None:
        return next((p for p in self.presets() if _key(p.name) == _key(name)), None)

    def save(self, name: str, prompt: str, replace: bool = False) -> Preset:
        """Save `prompt` as `name`; an existing preset of that name is replaced only when `replace` (and never a
        built-in). Raises PresetError saying why it cannot."""
        name = self._check_name(name)
        if not prompt.strip():
            raise PresetError("the system prompt is empty: there is nothing to save")
        existing = self.get(name)
        if existing is not None and (existing.builtin or not replace):
            raise PresetError(self._taken(existing))
        preset = Preset(name, prompt)
        if existing is None:
            self._write([*self._own, preset])
        else:  # replaced where it stood
            self._write([preset if p is existing else p for p in self._own])
        return preset

    def rename(self, name: str, new_name: str) -> Preset:
        preset = self._own_preset(name, "renamed")
        new_name = self._check_name(new_name)
        other = self.get(new_name)
        if other is not None and other is not preset:
            raise PresetError(self._taken(other))
        renamed = Preset(new_name, preset.prompt)
        self._write([renamed if p is preset else p for p in self._own])
        return renamed

    def delete(self, name: str) -> None:
        preset = self._own_preset(name, "deleted")
        self._write([p for p in self._own if p is not preset])

    # ---- helpers ----------------------------------------------------------------------------------------------
    def _check_name(self, name: str) -> str:
        name = " ".join(name.split())  # a name is one line
        if not name:
            raise PresetError("a preset needs a name")
        if len(name) > MAX_NAME:
            raise PresetError(f"a preset's name is at most {MAX_NAME} characters (this one has {len(name)})")
        return name

    def _own_preset(self, name: str, done: str) -> Preset:
        preset = self.get(name)
        if preset is None:
            raise PresetError(f"there is no preset named “{name}”")
        if preset.builtin:
            raise PresetError(f"“{preset.name}” is built in and cannot be {done}")
        return preset

    @staticmethod
    def _taken(existing: Preset) -> str:
        if existing.builtin:
            return f"“{existing.name}” is the name of a built-in preset; choose another"
        return f"a preset named “{existing.name}” already exists"

    def _write(self, own: list[Preset]) -> None:
        """Write `own` whole or not at all; the store changes only once the file holds it."""
        records = [{"name": p.name, "prompt": p.prompt} for p in own]
        try:
            if self.problem is not None and self.path.exists():
                self.path.replace(self.unreadable_copy)
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PresetError(f"cannot save the presets to {self.path}: {e.strerror or e}") from e
        try:
            write_atomically(self.path, lambda out: out.write(json.dumps(records, indent=2, ensure_ascii=False)))
        except BatchFileError as e:
            raise PresetError(f"cannot save the presets: {e}") from e
        self._own, self.problem = own, None

    @property
    def unreadable_copy(self) -> Path:
        """Where an unreadable presets file is kept when the store is next written."""
        return self.path.with_name(self.path.name + ".unreadable")


def _read(path: Path) -> list[Preset]:
    """The user's presets in `path`; raises FileNotFoundError, or PresetError naming what is wrong."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except OSError as e:
        raise PresetError(f"cannot read the presets in {path}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise PresetError(f"the presets in {path} are not UTF-8 text") from e
    except json.JSONDecodeError as e:
        raise PresetError(f"the presets in {path} are not valid JSON: {e.msg} at line {e.lineno}") from e
    if not isinstance(raw, list):
        raise PresetError(f"the presets in {path} are not a list")
    presets: list[Preset] = []
    for i, record in enumerate(raw):
        if (
            not isinstance(record, dict)
            or not isinstance(record.get("name"), str)
            or not record["name"].strip()
            or not isinstance(record.get("prompt"), str)
        ):
            raise PresetError(f'the presets in {path}: entry {i + 1} is not {{"name": text, "prompt": text}}')
        presets.append(Preset(record["name"], record["prompt"]))
    return presets
