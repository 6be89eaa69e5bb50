"""System-prompt presets: saved, renamed and deleted by name in a file of their own (written atomically), read back
by a new store; names unique regardless of case; built-ins kept; a file that cannot be read is reported and kept."""

from __future__ import annotations

import json
import os

import pytest

from app import batch_io
from app.prompt_presets import BUILTIN, Preset, PresetError, PresetStore


@pytest.fixture
def path(tmp_path):
    return tmp_path / "data" / "prompt_presets.json"


def names(store: PresetStore) -> list[str]:
    return [p.name for p in store.presets()]


def test_presets_round_trip_through_the_file(path):
    store = PresetStore(path)
    assert store.presets() == list(BUILTIN) and store.problem is None and not path.exists()
    store.save("Pirate", "Talk like a pirate.")
    store.save("  Terse   reviewer ", "Review in one line.\nNo praise.")  # one line, single spaces
    store.rename("Pirate", "Buccaneer")
    again = PresetStore(path)
    own = [p for p in again.presets() if not p.builtin]
    assert own == [
        Preset("Buccaneer", "Talk like a pirate."),
        Preset("Terse reviewer", "Review in one line.\nNo praise."),
    ]
    assert json.loads(path.read_text()) == [
        {"name": "Buccaneer", "prompt": "Talk like a pirate."},
        {"name": "Terse reviewer", "prompt": "Review in one line.\nNo praise."},
    ]
    again.delete("buccaneer")  # any case
    assert names(PresetStore(path)) == [*(p.name for p in BUILTIN), "Terse reviewer"]


def test_names_are_unique_regardless_of_case_and_replaced_only_when_asked(path):
    store = PresetStore(path)
    store.save("Pirate", "Arr.")
    store.save("Poet", "Rhyme.")
    with pytest.raises(PresetError, match=r"^a preset named “Pirate” already exists$"):
        store.save("PIRATE", "Yo ho.")
    replaced = store.save("pirate ", "Yo ho.", replace=True)
    assert names(store)[-2:] == ["pirate", "Poet"] and replaced.prompt == "Yo ho."  # in its place
    with pytest.raises(PresetError, match=r"^a preset named “Poet” already exists$"):
        store.rename("pirate", "poet")
    store.rename("poet", "POET")  # its own name in another case
    assert names(PresetStore(path))[-2:] == ["pirate", "POET"]


def test_built_ins_cannot_be_overwritten_renamed_or_deleted(path):
    store = PresetStore(path)
    builtin = BUILTIN[0].name
    with pytest.raises(PresetError, match=r"is the name of a built-in preset; choose another$"):
        store.save(builtin.lower(), "Mine.", replace=True)
    with pytest.raises(PresetError, match=r"is built in and cannot be renamed$"):
        store.rename(builtin, "Mine")
    with pytest.raises(PresetError, match=r"is built in and cannot be deleted$"):
        store.delete(builtin)
    with pytest.raises(PresetError, match=r"^there is no preset named “Nope”$"):
        store.delete("Nope")
    assert store.presets() == list(BUILTIN) and not path.exists()


@pytest.mark.parametrize(
    ("name", "prompt", "reason"),
    [
        ("  ", "Hi.", "a preset needs a name"),
        ("x" * 61, "Hi.", "a preset's name is at most 60 characters (this one has 61)"),
        ("Empty", " \n", "the system prompt is empty: there is nothing to save"),
    ],
)
def test_a_bad_name_or_an_empty_prompt_is_refused(path, name, prompt, reason):
    with pytest.raises(PresetError) as e:
        PresetStore(path).save(name, prompt)
    assert str(e.value) == reason and not path.exists()


def test_a_failed_write_leaves_the_file_and_the_store_as_they_were(path, monkeypatch):
    store = PresetStore(path)
    store.save("Pirate", "Arr.")
    before = path.read_bytes()

    def full_disk(target, write):
        raise batch_io.BatchFileError(f"{target.name}: cannot write the file: No space left on device")

    monkeypatch.setattr("app.prompt_presets.write_atomically", full_disk)
    with pytest.raises(PresetError, match=r"No space left on device"):
        store.save("Poet", "Rhyme.")
    assert path.read_bytes() == before and names(store)[-1] == "Pirate"
    assert [f.name for f in path.parent.iterdir()] == [path.name]


def test_the_write_is_atomic_a_crash_midway_leaves_the_old_file(path, monkeypatch):
    store = PresetStore(path)
    store.save("Pirate", "Arr.")
    before = path.read_bytes()
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(5, "Input/output error")))
    with pytest.raises(PresetError, match=r"Input/output error"):
        store.save("Poet", "Rhyme.")
    monkeypatch.setattr(os, "replace", real_replace)
    assert path.read_bytes() == before and [f.name for f in path.parent.iterdir()] == [path.name]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b'[{"name": "Pirate", "prompt": "Arr."', "are not valid JSON: Expecting ',' delimiter at line 1"),
        (b'{"Pirate": "Arr."}', "are not a list"),
        (b'[{"name": "Pirate"}]', 'entry 1 is not {"name": text, "prompt": text}'),
        (b"\xff\xfe", "are not UTF-8 text"),
    ],
)
def test_an_unreadable_file_is_reported_and_kept_not_wiped(path, content, problem):
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    store = PresetStore(path)
    assert problem in store.problem and str(path) in store.problem
    assert store.presets() == list(BUILTIN) and path.read_bytes() == content  # reading changes nothing

    store.save("Poet", "Rhyme.")  # the first write keeps the unreadable file beside the new one
    assert store.unreadable_copy.read_bytes() == content and store.problem is None
    assert names(PresetStore(path))[-1] == "Poet"
