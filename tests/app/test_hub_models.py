"""`kvstudio models list | pull | rm`, searching, and interrupted pulls found again after a restart (also after
kill -9, mid-download or mid-linking), against a fake Hugging Face Hub served on loopback. Repos of GGUF files are
tests/app/test_hub_gguf_models.py's."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from huggingface_hub import scan_cache_dir, try_to_load_from_cache

from app.cli import main as cli
from app.library import hub_files, hub_models, machine, model_store, pulls
from app.library.hub_search import hub_reachable, search_hub
from app.library.machine import CPU_RESERVE, GIB, MachineMemory
from app.units import byte_size


@pytest.fixture
def fake_hub(serve_hub, tiny_chat_model):
    tiny = {p.name: p.read_bytes() for p in sorted(tiny_chat_model.iterdir()) if p.is_file()}
    config = json.loads(tiny["config.json"])
    return serve_hub(
        {
            # what a real repo also carries, and a pull must leave on the Hub
            "org/tiny": {**tiny, "pytorch_model.bin": b"\0" * 300, "README.md": b"# tiny\n"},
            "org/bin-only": {"config.json": tiny["config.json"], "pytorch_model.bin": b"\0" * 300},
            "org/bert": {
                "config.json": json.dumps({**config, "architectures": ["BertModel"]}).encode(),
                "model.safetensors": tiny["model.safetensors"],
            },
        }
    )


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(["models", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def expected_files(tiny_chat_model: Path) -> set[str]:
    return {p.name for p in tiny_chat_model.iterdir() if p.is_file()}


def test_pull_downloads_only_what_the_engine_needs_into_the_hf_cache(fake_hub, tiny_chat_model, tmp_path, capsys):
    code, out, err = run(capsys, "pull", "org/tiny")
    assert code == 0, err
    snapshot = tmp_path / "hf-cache" / "models--org--tiny" / "snapshots" / fake_hub.commit
    assert out.strip().splitlines()[-1] == str(snapshot)
    assert {p.name for p in snapshot.iterdir()} == expected_files(tiny_chat_model)
    for name in expected_files(tiny_chat_model):
        assert (snapshot / name).read_bytes() == (tiny_chat_model / name).read_bytes()
    fetched = {path.rsplit("/", 1)[1] for method, path, _ in fake_hub.requests if "/resolve/" in path}
    assert fetched == expected_files(tiny_chat_model)  # no .bin, no README
    # the standard cache layout: other Hugging Face tools find the files without a download
    cache = tmp_path / "hf-cache"
    found = try_to_load_from_cache("org/tiny", "model.safetensors", cache_dir=cache)
    assert found == str(snapshot / "model.safetensors")
    assert [r.repo_id for r in scan_cache_dir(cache).repos] == ["org/tiny"]


def test_a_second_pull_downloads_nothing(fake_hub, capsys):
    assert run(capsys, "pull", "org/tiny")[0] == 0
    fake_hub.requests.clear()
    assert run(capsys, "pull", "org/tiny")[0] == 0
    assert [path for _, path, _ in fake_hub.requests if "/resolve/" in path] == []


def test_list_shows_the_pulled_model_with_family_size_quant_context_and_fit(
    fake_hub, tiny_chat_model, monkeypatch, capsys
):
    code, out, _ = run(capsys, "list")
    assert code == 0 and "library is empty" in out
    assert run(capsys, "pull", "org/tiny")[0] == 0

    size = sum((tiny_chat_model / name).stat().st_size for name in expected_files(tiny_chat_model))
    [model] = hub_models.list_local_models()
    assert (model.name, model.size, model.family, model.context_length) == ("org/tiny", size, "LlamaForCausalLM", 512)
    assert model.quant == "F32"  # the dtype its safetensors hold
    monkeypatch.setattr(machine, "machine_memory", lambda: MachineMemory("cpu", 64 * GIB, 32 * GIB, 4, CPU_RESERVE))
    code, out, _ = run(capsys, "list")
    assert code == 0
    needed = byte_size(model.num_params * 4 + CPU_RESERVE)
    assert out.split() == [
        "org/tiny",
        *byte_size(size).split(),
        "LlamaForCausalLM",
        "F32",
        "context",
        "512",
        "fits",
        *f"({needed})".split(),
    ]


def test_an_interrupted_pull_fails_and_the_next_one_resumes(fake_hub, tiny_chat_model, capsys):
    fake_hub.drop_halfway.add("org/tiny/model.safetensors")
    code, _, err = run(capsys, "pull", "org/tiny")
    assert code == 1
    assert "model.safetensors broke off" in err and "run the pull again to resume" in err
    assert hub_models.list_local_models() == []  # nothing half-downloaded in the library

    fake_hub.requests.clear()
    code, out, err = run(capsys, "pull", "org/tiny")
    assert code == 0, err
    weights = (tiny_chat_model / "model.safetensors").read_bytes()
    gets = [r for _, path, r in fake_hub.requests if path.endswith("/model.safetensors")]
    assert gets == [f"bytes={len(weights) // 2}-"]  # only the missing half was asked for
    assert (Path(out.strip().splitlines()[-1]) / "model.safetensors").read_bytes() == weights


def test_rm_clears_what_an_interrupted_pull_left(fake_hub, tiny_chat_model, tmp_path, capsys):
    fake_hub.drop_halfway.add("org/tiny/model.safetensors")
    assert run(capsys, "pull", "org/tiny")[0] == 1
    repo_dir = tmp_path / "hf-cache" / "models--org--tiny"
    kept = sum(f.stat().st_size for f in (repo_dir / "blobs").iterdir())
    weights = (tiny_chat_model / "model.safetensors").stat().st_size
    assert kept > weights // 2  # half the weights, plus the small files before them
    code, out, _ = run(capsys, "rm", "org/tiny")
    assert code == 0 and out.strip() == f"Removed org/tiny, freed {byte_size(kept)}."
    assert not repo_dir.exists()


@pytest.mark.parametrize(
    "repo, message",
    [
        ("org/missing", "no model org/missing on the Hub"),
        ("org/bin-only", "org/bin-only has no .safetensors weights"),
        ("org/bert", "org/bert is a BertModel, an architecture kvstudio cannot run"),
        ("not-a-repo-id", "'not-a-repo-id' is not a Hub model id"),
    ],
)
def test_a_pull_kvstudio_cannot_use_fails_with_the_reason(fake_hub, repo, message, capsys):
    code, _, err = run(capsys, "pull", repo)
    assert code == 1
    assert message in err
    assert hub_models.list_local_models() == []


def test_a_pull_needing_more_than_the_free_disk_fails_before_downloading(fake_hub, monkeypatch, capsys):
    monkeypatch.setattr(hub_files.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 10})())
    code, _, err = run(capsys, "pull", "org/tiny")
    assert code == 1 and "not enough disk space" in err
    assert [path for _, path, _ in fake_hub.requests if "/resolve/" in path] == []


def test_rm_frees_the_model_and_it_leaves_the_list(fake_hub, tiny_chat_model, tmp_path, capsys):
    assert run(capsys, "pull", "org/tiny")[0] == 0
    [model] = hub_models.list_local_models()
    code, out, _ = run(capsys, "rm", "org/tiny")
    assert code == 0
    assert out.strip() == f"Removed org/tiny, freed {byte_size(model.size)}."
    assert not (tmp_path / "hf-cache" / "models--org--tiny").exists()
    assert hub_models.list_local_models() == []

    code, _, err = run(capsys, "rm", "org/tiny")
    assert code == 1 and "no model org/tiny in the library" in err


def test_rm_leaves_a_mirror_with_the_same_commits_in_the_library(serve_hub, tiny_chat_model, capsys):
    tiny = {p.name: p.read_bytes() for p in sorted(tiny_chat_model.iterdir()) if p.is_file()}
    hub = serve_hub({"org/tiny": tiny, "mirror/tiny": tiny})  # one commit hash for both, as a mirror has
    # Deleting by commit hash picked whichever repo the cache scan listed first: each way round, a few times.
    for removed, kept in [("org/tiny", "mirror/tiny"), ("mirror/tiny", "org/tiny")] * 3:
        for name in (removed, kept):
            assert run(capsys, "pull", name)[0] == 0
        assert {m.name for m in hub_models.list_local_models()} == {"org/tiny", "mirror/tiny"}

        assert run(capsys, "rm", removed)[0] == 0
        [left] = hub_models.list_local_models()
        assert left.name == kept
        snapshot = Path(left.path)
        assert snapshot.name == hub.commit
        assert all((snapshot / name).read_bytes() == data for name, data in tiny.items())


def test_the_default_model_is_listed_and_removed_only_with_force(fake_hub, smollm2_gguf, capsys):
    default = model_store.default_model_path()
    default.parent.mkdir(parents=True)
    default.symlink_to(smollm2_gguf)  # removing the link leaves the suite's copy alone
    [model] = hub_models.list_local_models()
    assert (model.name, model.family, model.context_length, model.is_default) == (
        default.name,
        "LlamaForCausalLM",
        8192,
        True,
    )

    code, _, err = run(capsys, "rm", default.name)
    assert code == 1 and "--force" in err and default.exists()
    code, out, _ = run(capsys, "rm", default.name, "--force")
    assert code == 0 and not default.exists() and smollm2_gguf.is_file()
    assert out.strip() == f"Removed {default.name}, freed {byte_size(model_store.DEFAULT_MODEL.size)}."


def tiny_files(tiny_chat_model: Path) -> int:
    return sum((tiny_chat_model / name).stat().st_size for name in expected_files(tiny_chat_model))


def test_search_asks_the_hub_for_parameter_counts(serve_hub, tiny_chat_model):
    config = (tiny_chat_model / "config.json").read_bytes()
    serve_hub(
        {"org/tiny": {"config.json": config}, "org/tiny-gguf": {"config.json": config}},
        {"org/tiny": 5, "org/tiny-gguf": 1},
        num_params={"org/tiny": 4_200_000},
    )
    found = search_hub("tiny")
    assert [(m.name, m.downloads, m.num_params) for m in found] == [
        ("org/tiny", 5, 4_200_000),
        ("org/tiny-gguf", 1, None),
    ]


def test_the_hub_is_reachable_where_it_answers_and_not_where_nothing_listens(serve_hub, tiny_chat_model):
    hub = serve_hub({"org/tiny": {"config.json": (tiny_chat_model / "config.json").read_bytes()}})
    assert hub_reachable() and hub_reachable(hub.url)
    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    assert not hub_reachable(closed)


def test_a_failed_pull_is_found_again_with_its_progress_and_resumes(fake_hub, tiny_chat_model, tmp_path):
    weights = (tiny_chat_model / "model.safetensors").stat().st_size
    fake_hub.drop_halfway.add("org/tiny/model.safetensors")
    with pytest.raises(hub_models.HubError, match="broke off"):
        pulls.pull("org/tiny")
    # what a new process finds in the cache: the files fetched before the weights whole, half the weights
    [pull] = pulls.list_interrupted()
    assert (pull.model, pull.repo_id, pull.total) == ("org/tiny", "org/tiny", tiny_files(tiny_chat_model))
    blobs = tmp_path / "hf-cache" / "models--org--tiny" / "blobs"
    [partial] = blobs.glob("*.incomplete")
    assert partial.stat().st_size == weights // 2
    assert pull.done == sum(f.stat().st_size for f in blobs.iterdir()) < pull.total
    pulls.pull(pull.model)
    assert fake_hub.ranges == [None, f"bytes={weights // 2}-"]
    assert pulls.list_interrupted() == []


def test_a_pull_kvstudio_cannot_run_leaves_nothing_to_resume(fake_hub):
    with pytest.raises(hub_models.HubError, match="BertModel"):
        pulls.pull("org/bert")
    assert pulls.list_interrupted() == []


def test_discarding_an_interrupted_pull_removes_every_file_it_left(fake_hub, tmp_path):
    fake_hub.drop_halfway.add("org/tiny/model.safetensors")
    with pytest.raises(hub_models.HubError):
        pulls.pull("org/tiny")
    repo_dir = tmp_path / "hf-cache" / "models--org--tiny"
    on_disk = sum(f.stat().st_size for f in repo_dir.rglob("*") if f.is_file())
    assert pulls.discard_interrupted("org/tiny") == on_disk
    assert not repo_dir.exists() and pulls.list_interrupted() == []
    with pytest.raises(hub_models.HubError, match="no interrupted download of org/tiny"):
        pulls.discard_interrupted("org/tiny")


def test_discarding_an_interrupted_update_keeps_the_model_in_the_library(fake_hub, tiny_chat_model):
    pulls.pull("org/tiny")
    [before] = hub_models.list_local_models()
    # the repo's weights change on the Hub and the pull of the new ones breaks off halfway
    fake_hub.repos["org/tiny"]["model.safetensors"] = b"\1" * 1000
    fake_hub.drop_halfway.add("org/tiny/model.safetensors")
    with pytest.raises(hub_models.HubError):
        pulls.pull("org/tiny")
    [pull] = pulls.list_interrupted()
    assert pull.done == pull.total - 500
    assert pulls.discard_interrupted("org/tiny") == 500
    assert pulls.list_interrupted() == [] and hub_models.list_local_models() == [before]
    blobs = before.path.parent.parent / "blobs"
    assert not list(blobs.glob("*.incomplete"))
    assert (before.path / "model.safetensors").read_bytes() == (tiny_chat_model / "model.safetensors").read_bytes()


def test_an_unreadable_pull_record_still_shows_what_arrived(fake_hub, tmp_path):
    fake_hub.drop_halfway.add("org/tiny/model.safetensors")
    with pytest.raises(hub_models.HubError):
        pulls.pull("org/tiny")
    repo_dir = tmp_path / "hf-cache" / "models--org--tiny"
    (repo_dir / pulls.RECORD).write_text("{not json")
    partial = sum(f.stat().st_size for f in (repo_dir / "blobs").glob("*.incomplete"))
    assert pulls.list_interrupted() == [pulls.InterruptedPull("org/tiny", "org/tiny", partial, None)]
    pulls.discard_interrupted("org/tiny")
    assert not repo_dir.exists()


def test_a_corrupt_model_is_listed_with_the_problem_and_the_rest_still_show(fake_hub, smollm2_gguf, capsys):
    default = model_store.default_model_path()
    default.parent.mkdir(parents=True)
    with smollm2_gguf.open("rb") as f:
        default.write_bytes(f.read(5_000_000))  # cut short: its header is whole, its tensors are not
    pulls.pull("org/tiny")
    [cut, tiny] = hub_models.list_local_models()
    assert cut.name == default.name and cut.problem.startswith(f"{default} is truncated")
    assert (cut.family, cut.num_params) == ("?", None)
    assert tiny.problem is None and tiny.num_params > 0
    code, out, _ = run(capsys, "list")
    cut_line, tiny_line = out.splitlines()
    assert code == 0 and f"cannot load: {default} is truncated" in cut_line and "cannot load" not in tiny_line

    config = tiny.path / "config.json"
    config.unlink()  # the link into blobs/; a file of garbage in its place
    config.write_text("{not json")
    [_, tiny] = hub_models.list_local_models()
    assert tiny.name == "org/tiny" and tiny.problem.startswith(f"{config} cannot be read as JSON")


class Killed(BaseException):
    """kill -9 at this point: nothing after it runs, no handler or finally of the pull's catches it."""


def test_a_pull_killed_while_linking_lists_nothing_and_the_next_one_completes(fake_hub, tiny_chat_model, monkeypatch):
    real_symlink_to = Path.symlink_to

    def dies_at_the_tokenizer(link, target, *args, **kwargs):
        if link.name.startswith("tokenizer"):  # after config.json and the weights: enough for a listing
            raise Killed
        return real_symlink_to(link, target, *args, **kwargs)

    with monkeypatch.context() as patch, pytest.raises(Killed):
        patch.setattr(Path, "symlink_to", dies_at_the_tokenizer)
        pulls.pull("org/tiny")
    assert hub_models.list_local_models() == []  # no model listed without its tokenizer
    [pull] = pulls.list_interrupted()
    assert pull.done == pull.total  # every byte arrived; only the links were missing

    fake_hub.requests.clear()
    snapshot = pulls.pull("org/tiny")
    assert [path for _, path, _ in fake_hub.requests if "/resolve/" in path] == []  # nothing fetched again
    assert {p.name for p in snapshot.iterdir()} == expected_files(tiny_chat_model)
    assert [m.name for m in hub_models.list_local_models()] == ["org/tiny"] and pulls.list_interrupted() == []
    assert sorted(p.name for p in snapshot.parent.parent.iterdir()) == ["blobs", "refs", "snapshots"]


def wait_for_file(path: Path, child: subprocess.Popen, errors: Path) -> int:
    """Poll (another process writes it) until `path` holds bytes; returns how many."""
    while not (path.is_file() and path.stat().st_size):
        assert child.poll() is None, errors.read_text()
        time.sleep(0.01)
    return path.stat().st_size


@pytest.mark.timeout(600)  # the poll above has no deadline of its own: a loaded machine only makes it slower
def test_a_pull_killed_with_sigkill_lists_nothing_and_the_next_pull_resumes(fake_hub, tiny_chat_model, tmp_path):
    weights = (tiny_chat_model / "model.safetensors").read_bytes()
    fake_hub.stall_halfway.add("org/tiny/model.safetensors")  # half is sent, the rest never comes
    errors = tmp_path / "pull.err"
    child = subprocess.Popen(
        [str(Path(sys.executable).with_name("kvstudio")), "models", "pull", "org/tiny"],
        env={
            **os.environ,
            "HF_ENDPOINT": fake_hub.url,
            "HF_HUB_CACHE": str(tmp_path / "hf-cache"),
            model_store.DATA_DIR_ENV: str(tmp_path / "kvstudio"),
        },
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=errors.open("w"),
    )
    blobs = tmp_path / "hf-cache" / "models--org--tiny" / "blobs"
    partial = blobs / (hashlib.sha256(weights).hexdigest() + ".incomplete")
    try:
        wait_for_file(partial, child, errors)
    finally:
        child.kill()  # SIGKILL mid-download: no handler runs, nothing is cleaned up
        child.wait()
    fake_hub.release.set()
    kept = partial.stat().st_size
    assert 0 < kept < len(weights)
    assert hub_models.list_local_models() == []  # nothing half-written in the library
    [pull] = pulls.list_interrupted()
    assert (pull.model, pull.total) == ("org/tiny", tiny_files(tiny_chat_model))

    fake_hub.requests.clear()
    snapshot = pulls.pull(pull.model)
    assert fake_hub.ranges == [f"bytes={kept}-"]  # resumed where the killed pull stopped
    assert (snapshot / "model.safetensors").read_bytes() == weights
    assert [m.name for m in hub_models.list_local_models()] == ["org/tiny"] and pulls.list_interrupted() == []


# ---- repos of GGUF files ----------------------------------------------------------------------------------------


def test_a_snapshot_is_shown_by_its_repo_id_and_anything_else_by_its_name(tmp_path):
    snapshot = tmp_path / "hf-cache" / "models--org--tiny-chat" / "snapshots" / "0123abcd"
    assert hub_models.shown_name(str(snapshot)) == "org/tiny-chat"
    assert hub_models.shown_name(str(snapshot / "model.Q4_K_M.gguf")) == "model.Q4_K_M.gguf"
    assert hub_models.shown_name("/models/SmolLM2-135M-Instruct.Q4_1.gguf") == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert hub_models.shown_name(str(tmp_path / "snapshots" / "v1")) == "v1"  # not the cache's layout
