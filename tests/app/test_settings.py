"""Settings: round trip, defaults when the file is missing or unreadable, atomic writes, and a full disk said in
words with the old file kept."""

from __future__ import annotations

import errno
import os

import pytest

from app import settings as settings_module
from app.settings import Settings, SettingsError, default_path, load_settings, save_settings


def test_round_trip(tmp_path):
    path = tmp_path / "cfg" / "settings.json"
    save_settings(Settings(last_model="/models/x.gguf", engine_options={"max_model_len": 2048}), path)
    assert load_settings(path) == Settings("/models/x.gguf", {"max_model_len": 2048})
    assert [p.name for p in path.parent.iterdir()] == ["settings.json"]  # no temporary file left behind


def test_missing_or_unreadable_files_give_the_defaults(tmp_path):
    assert load_settings(tmp_path / "none.json") == Settings()
    bad = tmp_path / "bad.json"
    for text in (
        "{not json",
        "[1, 2]",
        '{"last_model": 5, "engine_options": "x", "unknown": 1}',
        '{"last_page": true, "use_remote": 1, "pages": [], "remote_url": null}',
    ):
        bad.write_text(text)
        assert load_settings(bad) == Settings()


def test_a_wrong_field_falls_back_alone_and_the_rest_is_kept(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text(
        '{"last_model": null, "last_page": "two", "remote_url": "http://gpu:8000/v1", '
        '"use_remote": true, "pages": {"chat": {"temperature": 0.2}}}'
    )
    assert load_settings(path) == Settings(
        remote_url="http://gpu:8000/v1", use_remote=True, pages={"chat": {"temperature": 0.2}}
    )


def test_the_file_holding_an_api_key_is_private_to_its_owner(tmp_path):
    path = tmp_path / "settings.json"
    save_settings(Settings(remote_api_key="sk-secret"), path)
    assert path.stat().st_mode & 0o777 == 0o600 and load_settings(path).remote_api_key == "sk-secret"


def test_the_default_path_follows_the_config_dir_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSTUDIO_CONFIG_DIR", str(tmp_path))
    assert default_path() == tmp_path / "settings.json"


def test_a_full_disk_is_said_in_words_and_the_old_file_is_kept(tmp_path, monkeypatch):
    path = tmp_path / "settings.json"
    save_settings(Settings(last_model="/models/old.gguf"), path)
    before = path.read_bytes()
    real_fdopen = os.fdopen

    def full_disk(fd, *args, **kwargs):  # the file opens; writing to it fails as on a full disk
        file = real_fdopen(fd, *args, **kwargs)

        def write(text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        file.write = write
        return file

    monkeypatch.setattr(settings_module.os, "fdopen", full_disk)
    with pytest.raises(SettingsError) as err:
        save_settings(Settings(last_model="/models/new.gguf"), path)
    assert str(err.value) == f"cannot save the settings to {path}: the disk is full; it keeps the settings saved before"
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["settings.json"]  # the temporary file went too
