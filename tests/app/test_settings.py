"""Settings: round trip, defaults when the file is missing or unreadable, and atomic writes."""
from __future__ import annotations

from app.settings import Settings, default_path, load_settings, save_settings


def test_round_trip(tmp_path):
    path = tmp_path / "cfg" / "settings.json"
    save_settings(Settings(last_model="/models/x.gguf", engine_options={"max_model_len": 2048}), path)
    assert load_settings(path) == Settings("/models/x.gguf", {"max_model_len": 2048})
    assert [p.name for p in path.parent.iterdir()] == ["settings.json"]   # no temporary file left behind


def test_missing_or_unreadable_files_give_the_defaults(tmp_path):
    assert load_settings(tmp_path / "none.json") == Settings()
    bad = tmp_path / "bad.json"
    for text in ("{not json", "[1, 2]", '{"last_model": 5, "engine_options": "x", "unknown": 1}'):
        bad.write_text(text)
        assert load_settings(bad) == Settings()


def test_the_default_path_follows_the_config_dir_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSTUDIO_CONFIG_DIR", str(tmp_path))
    assert default_path() == tmp_path / "settings.json"
