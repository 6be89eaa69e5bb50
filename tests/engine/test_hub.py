"""Repo ids resolve through a Hugging Face cache built here (the real layout); with no Hub to reach, a repo
that is not cached fails at once with a message naming the repo and the cache."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import huggingface_hub
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from engine.models import hub
from engine.models.hub import ModelLoadError, is_model_file, resolve_model_path
from engine.models.loader import open_model

MAIN_COMMIT = "a" * 40
V1_COMMIT = "b" * 40


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # nothing here may reach the network: huggingface_hub refuses every request in offline mode
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _cache_snapshot(cache: Path, repo_id: str, commit: str, files: dict[str, bytes], ref: str | None) -> Path:
    """Lay files out the way huggingface_hub does: content-addressed blobs, a snapshot of symlinks, a ref."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for name, content in files.items():
        blob = repo / "blobs" / hashlib.sha256(content).hexdigest()
        blob.write_bytes(content)
        (snapshot / name).symlink_to(Path("../..") / "blobs" / blob.name)
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    return snapshot


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    cache = tmp_path / "hf-cache"
    _cache_snapshot(cache, "org/tiny", MAIN_COMMIT, {"config.json": b'{"rev": "main"}'}, ref="main")
    _cache_snapshot(cache, "org/tiny", V1_COMMIT, {"config.json": b'{"rev": "v1"}'}, ref="v1")
    return cache


def test_local_paths_come_back_unchanged(tmp_path: Path) -> None:
    model_file = tmp_path / "model.gguf"
    model_file.write_bytes(b"GGUF")
    assert resolve_model_path(str(tmp_path)) == tmp_path
    assert resolve_model_path(str(model_file)) == model_file


def test_repo_id_resolves_to_the_cached_main_snapshot(cache: Path) -> None:
    path = resolve_model_path("org/tiny", cache_dir=str(cache))
    assert path == cache / "models--org--tiny" / "snapshots" / MAIN_COMMIT
    assert json.loads((path / "config.json").read_text()) == {"rev": "main"}


@pytest.mark.parametrize(
    ("model", "revision"), [("org/tiny@v1", None), ("org/tiny", "v1"), (f"org/tiny@{V1_COMMIT}", None)]
)
def test_revision_picks_its_snapshot(cache: Path, model: str, revision: str | None) -> None:
    path = resolve_model_path(model, revision=revision, cache_dir=str(cache))
    assert path == cache / "models--org--tiny" / "snapshots" / V1_COMMIT


def test_contradictory_revisions_are_refused(cache: Path) -> None:
    with pytest.raises(ModelLoadError, match="contradicts"):
        resolve_model_path("org/tiny@v1", revision="main", cache_dir=str(cache))


def test_uncached_repo_without_a_hub_names_repo_and_cache(cache: Path) -> None:
    with pytest.raises(ModelLoadError, match="cannot be reached") as error:
        resolve_model_path("org/absent", cache_dir=str(cache))
    assert "org/absent" in str(error.value)
    assert str(cache) in str(error.value)


def test_uncached_revision_without_a_hub_names_it(cache: Path) -> None:
    with pytest.raises(ModelLoadError, match="cannot be reached") as error:
        resolve_model_path("org/tiny@v2", cache_dir=str(cache))
    assert "org/tiny@v2" in str(error.value)


def test_default_cache_is_named_when_none_is_given(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    default_cache = tmp_path / "default-hf-cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(default_cache))
    with pytest.raises(ModelLoadError) as error:
        resolve_model_path("org/absent")
    assert str(default_cache) in str(error.value)


@pytest.mark.parametrize("model", ["no-such-model", "/no/such/dir", "org/missing.gguf"])
def test_names_that_are_no_path_and_no_repo_id(model: str) -> None:
    with pytest.raises(ModelLoadError, match="no such file or directory") as error:
        resolve_model_path(model)
    assert model in str(error.value)


def test_open_model_loads_a_cached_repo(tmp_path: Path, smollm2_tokenizer) -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=49152,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    smollm2_tokenizer.save_pretrained(saved)
    cache = tmp_path / "hf-cache"
    files = {file.name: file.read_bytes() for file in saved.iterdir()}
    _cache_snapshot(cache, "org/tiny-llama", MAIN_COMMIT, files, ref="main")

    source = open_model("org/tiny-llama", cache_dir=str(cache))
    assert source.path == cache / "models--org--tiny-llama" / "snapshots" / MAIN_COMMIT
    assert source.tokenizer.chat_template is not None
    loaded = dict(source.weights(torch.float32))
    expected = model.state_dict()
    assert set(loaded) == set(expected)
    assert all(torch.equal(loaded[name], weight) for name, weight in expected.items())


# A repo's files: what a safetensors model needs, and what stays on the Hub.
NEEDED = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-00001-of-00002.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
]
NOT_NEEDED = [
    "pytorch_model.bin",
    "README.md",
    "model.Q4_0.gguf",
    "onnx/model.onnx",
    "original/config.json",
    "subfolder/model.safetensors",
    "adapter_config.json",
    "preprocessor_config.json",
    "image.png",
    "CONFIG.JSON",
]


def test_one_rule_says_which_repo_files_a_model_needs() -> None:
    assert [name for name in NEEDED if not is_model_file(name)] == []
    assert [name for name in NOT_NEEDED if is_model_file(name)] == []


def test_a_download_fetches_what_the_rule_names(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """resolve_model_path's downloads go through huggingface_hub's file filter: given the patterns it is handed,
    that filter keeps exactly the files is_model_file names (the rule app/library's pulls follow too)."""
    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append(kwargs)
        return str(tmp_path)

    monkeypatch.setattr(hub, "snapshot_download", snapshot_download)
    assert resolve_model_path("org/anything") == tmp_path
    [kwargs] = calls
    kept = huggingface_hub.utils.filter_repo_objects(
        NEEDED + NOT_NEEDED, allow_patterns=kwargs["allow_patterns"], ignore_patterns=kwargs["ignore_patterns"]
    )
    assert sorted(kept) == sorted(NEEDED)
