"""A Hub repo's GGUF files as the choices a pull offers: each file with its size, sha256 and the quantization its
name says (Q4_K_M, Q8_0, IQ4_XS, F16...), a model split into parts (`-00001-of-00003.gguf`) grouped as one choice
that is refused in words (the engine loads a model from one file), and choosing one by its file name or, as
Ollama and LM Studio users type it, by its quantization (`ORG/NAME:Q4_K_M`).

Before a GGUF download starts, the first bytes of the file are read to learn its architecture, so a model
kvstudio cannot run is refused before gigabytes arrive (a transformers pull checks its config.json first alike).
"""

from __future__ import annotations

import re
import struct
from collections import Counter
from dataclasses import dataclass

from gguf import GGUFValueType

from app.library.hub_files import HubError, RemoteFile
from app.library.quant_types import label_from_name

HEAD_BYTES = 1 << 16  # read before a download: general.architecture is among the first keys of a GGUF file
_SPLIT = re.compile(r"(?P<base>.+)-(?P<part>\d{5})-of-(?P<count>\d{5})\.gguf", re.IGNORECASE)
_SCALAR_SIZES = {
    GGUFValueType.UINT8: 1,
    GGUFValueType.INT8: 1,
    GGUFValueType.BOOL: 1,
    GGUFValueType.UINT16: 2,
    GGUFValueType.INT16: 2,
    GGUFValueType.UINT32: 4,
    GGUFValueType.INT32: 4,
    GGUFValueType.FLOAT32: 4,
    GGUFValueType.UINT64: 8,
    GGUFValueType.INT64: 8,
    GGUFValueType.FLOAT64: 8,
}


@dataclass(frozen=True)
class GGUFChoice:
    """One model a GGUF repo offers: a file, or the parts of a split one."""

    name: str  # the file's path in the repo; a split model's first part
    parts: tuple[RemoteFile, ...]  # the file alone, or every part of a split model, in order
    label: str | None  # the quantization its name says, e.g. "Q4_K_M"; None when it says none
    ref: str  # what ORG/NAME:REF picks it by: its label when no other choice has that label, else its file name
    missing_parts: int = 0  # parts of a split model the repo lacks

    @property
    def size(self) -> int:
        return sum(part.size for part in self.parts)

    @property
    def sha256(self) -> str | None:
        return self.parts[0].sha256 if len(self.parts) == 1 else None

    @property
    def problem(self) -> str | None:
        """Why kvstudio cannot load it, as the end of a sentence beginning with its name; None when it can."""
        if self.missing_parts:
            return f"is split into parts, {self.missing_parts} of which the repo lacks"
        if len(self.parts) > 1:
            return (
                f"is split into {len(self.parts)} files, and kvstudio loads a model from one GGUF file only "
                "(llama.cpp's llama-gguf-split --merge joins them into one)"
            )
        return None


def gguf_choices(files: list[RemoteFile]) -> list[GGUFChoice]:
    """The GGUF models among a repo's files, smallest first; a vision projector (mmproj-*.gguf) is no model and
    is left out."""
    singles: list[RemoteFile] = []
    splits: dict[str, list[tuple[int, int, RemoteFile]]] = {}
    for file in files:
        base = file.name.rsplit("/", 1)[-1]
        if not base.lower().endswith(".gguf") or base.lower().startswith("mmproj"):
            continue
        match = _SPLIT.fullmatch(file.name)
        if match is None:
            singles.append(file)
        else:
            splits.setdefault(match["base"], []).append((int(match["part"]), int(match["count"]), file))
    found: list[tuple[str, tuple[RemoteFile, ...], int]] = [(f.name, (f,), 0) for f in singles]
    for parts in splits.values():
        parts.sort(key=lambda p: p[0])
        count = max(p[1] for p in parts)
        found.append((parts[0][2].name, tuple(p[2] for p in parts), count - len({p[0] for p in parts})))
    labels = Counter(label_from_name(name) for name, _, _ in found)
    choices = []
    for name, parts, missing in found:
        label = label_from_name(name)
        ref = label if label is not None and labels[label] == 1 else name
        choices.append(GGUFChoice(name, parts, label, ref, missing))
    return sorted(choices, key=lambda c: (c.size, c.name))


def choose(shown: str, choices: list[GGUFChoice], wanted: str | None) -> GGUFChoice:
    """The choice `wanted` names (a file name, or a quantization label in any case); with none named, the repo's
    only loadable one. HubError in words when it names none, several, or one kvstudio cannot load."""
    if not choices:
        raise HubError(f"{shown} has no GGUF file")
    offered = ", ".join(c.ref for c in choices)
    if wanted is None:
        loadable = [c for c in choices if c.problem is None]
        if len(loadable) == 1:
            return loadable[0]
        raise HubError(
            f"{shown} offers {len(choices)} GGUF files: choose one with --file NAME.gguf or as {shown}:QUANT "
            f"({offered}); `kvstudio models files {shown}` lists them with their sizes"
        )
    picked = [c for c in choices if wanted in (c.name, c.name.rsplit("/", 1)[-1])] or [
        c for c in choices if c.label is not None and c.label.lower() == wanted.lower()
    ]
    if not picked:
        raise HubError(f"{shown} has no GGUF file {wanted!r}; it offers {offered}")
    if len(picked) > 1:
        names = ", ".join(c.name for c in picked)
        raise HubError(f"{shown} has {len(picked)} {wanted} files ({names}): choose one with --file NAME.gguf")
    if picked[0].problem is not None:
        raise HubError(f"{shown}: {picked[0].name} {picked[0].problem}")
    return picked[0]


def check_architecture(head: bytes, shown: str, name: str) -> None:
    """Refuse a GGUF file whose first bytes say an architecture the engine cannot run (or no GGUF at all)."""
    from engine.models.gguf import SUPPORTED_ARCHITECTURES

    if head[:4] != b"GGUF":
        raise HubError(f"{shown}: {name} is not a GGUF file (it does not start with 'GGUF')")
    architecture = _architecture(head)
    if architecture is not None and architecture not in SUPPORTED_ARCHITECTURES:
        raise HubError(
            f"{shown}: {name} is a '{architecture}' model, an architecture kvstudio cannot run "
            f"(it runs {', '.join(SUPPORTED_ARCHITECTURES)})"
        )


def _architecture(head: bytes) -> str | None:
    """general.architecture from the start of a GGUF file: None when it is not among the keys `head` holds."""
    try:
        (count,) = struct.unpack_from("<Q", head, 16)  # after the magic, the version and the tensor count
        position = 24
        for _ in range(count):
            key, position = _string(head, position)
            kind = GGUFValueType(struct.unpack_from("<I", head, position)[0])
            position += 4
            if key == "general.architecture" and kind == GGUFValueType.STRING:
                return _string(head, position)[0]
            position = _skip(head, position, kind)
    except (struct.error, ValueError):  # ran past `head`, or bytes that are no GGUF metadata
        return None
    return None


def _string(head: bytes, position: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", head, position)
    end = position + 8 + length
    if end > len(head):
        raise struct.error("the string runs past the bytes read")
    return head[position + 8 : end].decode("utf-8"), end


def _skip(head: bytes, position: int, kind: GGUFValueType) -> int:
    if kind in _SCALAR_SIZES:
        return position + _SCALAR_SIZES[kind]
    if kind == GGUFValueType.STRING:
        return _string(head, position)[1]
    element = GGUFValueType(struct.unpack_from("<I", head, position)[0])
    (count,) = struct.unpack_from("<Q", head, position + 4)
    position += 12
    if element in _SCALAR_SIZES:
        return position + count * _SCALAR_SIZES[element]
    for _ in range(count):
        position = _skip(head, position, element)
    return position
