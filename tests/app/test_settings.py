"""Settings: round trip, defaults when the file is missing or unreadable, and atomic writes."""

from __future__ import annotations

from app.settings import Settings, default_path, load_settings, save_settings


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
