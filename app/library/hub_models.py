"""The local model library and its Hugging Face side: list what kvstudio can run, pull a repo, remove one.

Models live in the standard Hugging Face cache (so other tools share them), beside the default GGUF model in
kvstudio's data dir. A pull writes the cache layout itself instead of calling hf_hub_download: huggingface_hub
deletes a partial file when a download fails, while here `blobs/<etag>.incomplete` survives so the next pull
resumes it with a Range request (app/hub_files.py fetches one file). A snapshot's links are made only once every
file is complete, in a staging folder renamed into place in one step, so the library never shows a half-downloaded
model, even after kill -9; until then a small record beside the blobs says what the pull fetches, so after a
restart the app can offer to resume or discard it. A corrupt model file is listed with the problem said, not
dropped. No printing here: the CLI and the desktop app report through callbacks.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from huggingface_hub import constants, scan_cache_dir
from huggingface_hub.errors import CacheNotFound

from app.library import model_store
from app.library.hub_files import HubError, Progress, RemoteFile, check_space, download_file, remote_files
from app.library.machine import local_num_params
from engine.models.hub import ModelLoadError


@dataclass(frozen=True)
class LocalModel:
    name: str  # "org/name" for a Hub model, the file name for the default GGUF model
    path: Path  # the snapshot directory, or the .gguf file
    size: int  # bytes on disk (every cached revision of a Hub repo)
    family: str  # the Hugging Face architecture, e.g. "LlamaForCausalLM" (also for a GGUF); "?" when unreadable
    context_length: int | None
    is_default: bool = False
    num_params: int | None = None  # None: unknown (or the files are corrupt)
    problem: str | None = None  # why it cannot be loaded (a corrupt file), in a sentence naming the file


def is_supported_architecture(architecture: str) -> bool:
    # imported here: the registry builds every model class, which a pull or a removal does not need
    from engine.models.registry import UnsupportedModelError, model_class

    try:
        model_class(SimpleNamespace(architectures=[architecture]))
    except UnsupportedModelError:
        return False
    return True


def human_size(n: float) -> str:
    """Bytes in decimal units, as disk sizes are shown: 98362432 -> '98.4 MB'."""
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("KB", "MB", "GB"):
        n /= 1000
        if n < 1000 or unit == "GB":
            break
    return f"{n:.1f} {unit}"


def _cache_dir() -> Path:
    return Path(constants.HF_HUB_CACHE)  # read at call time, so HF_HUB_CACHE set by a test or the user counts


# ---------------------------------------------------------------------------------------------------- listing


def _gguf_model(path: Path, name: str, size: int, is_default: bool) -> LocalModel:
    # the engine's own reader: it checks the header and that the file holds every tensor (truncation), and takes
    # milliseconds where gguf.GGUFReader takes seconds (it maps each of the ~50k vocabulary strings)
    from engine.models.gguf import GGUFCheckpoint

    try:
        fields = GGUFCheckpoint(path).config_fields  # no LlamaConfig: that would import transformers' models
        num_params = local_num_params(path)
    except ModelLoadError as e:
        return LocalModel(name, path, size, "?", None, is_default, problem=str(e))
    return LocalModel(
        name, path, size, fields["architectures"][0], fields["max_position_embeddings"], is_default, num_params
    )


def _hf_model(snapshot: Path, name: str, size: int) -> LocalModel | None:
    config_file = snapshot / "config.json"
    if not config_file.is_file() or not any(snapshot.glob("*.safetensors")):
        return None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise TypeError("expected a JSON object")
    except (OSError, ValueError, TypeError) as e:
        return LocalModel(name, snapshot, size, "?", None, problem=f"{config_file} cannot be read as JSON: {e}")
    family = next((a for a in config.get("architectures") or [] if is_supported_architecture(a)), None)
    if family is None:
        return None
    try:
        num_params = local_num_params(snapshot)
    except ModelLoadError as e:
        return LocalModel(name, snapshot, size, family, None, problem=str(e))
    context = config.get("max_position_embeddings")
    return LocalModel(
        name, snapshot, size, family, context if isinstance(context, int) else None, num_params=num_params
    )


def list_local_models() -> list[LocalModel]:
    """The default model (when fetched) and every cached Hub repo kvstudio can run, by name; one whose files are
    corrupt is listed with its problem said, so the rest of the library still shows."""
    models: list[LocalModel] = []
    default = model_store.default_model_path()
    if default.is_file():
        models.append(_gguf_model(default, default.name, default.stat().st_size, is_default=True))
    try:
        repos = scan_cache_dir(_cache_dir()).repos
    except CacheNotFound:
        repos = frozenset()
    for repo in sorted(repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model" or not repo.revisions:
            continue
        latest = max(repo.revisions, key=lambda r: r.last_modified)
        model = _hf_model(latest.snapshot_path, repo.repo_id, repo.size_on_disk)
        if model is None:
            ggufs = sorted(latest.snapshot_path.glob("*.gguf"))
            if ggufs:
                model = _gguf_model(ggufs[0], repo.repo_id, repo.size_on_disk, is_default=False)
        if model is not None:
            models.append(model)
    return models


# ---------------------------------------------------------------------------------------------------- pulling


def _repo_dir(repo_id: str) -> Path:
    return _cache_dir() / ("models--" + repo_id.replace("/", "--"))


def pull(
    model: str,
    revision: str | None = None,
    progress: Progress | None = None,
    endpoint: str | None = None,
    cancel: threading.Event | None = None,
) -> Path:
    """Download `model` ("org/name" or "org/name@rev") into the Hugging Face cache; returns the snapshot dir.

    Only what the engine reads is fetched. An interrupted pull leaves `.incomplete` blobs that the next pull
    resumes, and a record list_interrupted finds; the snapshot (what the library lists) appears only once every
    file is complete. Setting `cancel` stops the pull between chunks with HubError("cancelled"), keeping what
    arrived for the next pull.
    """
    repo_id, _, at = model.partition("@")
    if at and revision is not None and at != revision:
        raise HubError(f"{model}: the revision after '@' contradicts revision={revision!r}")
    revision = at or revision
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise HubError(f"{model!r} is not a Hub model id: expected ORG/NAME[@REVISION]")
    endpoint = endpoint or constants.ENDPOINT
    commit, files = remote_files(repo_id, revision, endpoint)

    repo_dir = _repo_dir(repo_id)
    blobs = repo_dir / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    # config.json first: an unsupported architecture should fail before gigabytes of weights arrive
    files.sort(key=lambda f: f.name != "config.json")
    total = sum(f.size for f in files)
    missing = [f for f in files if not (blobs / f.etag).is_file()]
    partial_bytes = sum(
        (blobs / (f.etag + ".incomplete")).stat().st_size
        for f in missing
        if (blobs / (f.etag + ".incomplete")).is_file()
    )
    check_space(blobs, sum(f.size for f in missing) - partial_bytes)

    done = 0
    for file in files:
        blob = blobs / file.etag
        if not blob.is_file():
            url = f"{endpoint}/{repo_id}/resolve/{commit}/{urllib.parse.quote(file.name)}"
            if cancel is not None and cancel.is_set():
                raise HubError("cancelled")
            download_file(url, file, blob, done, total, progress, cancel)
        done += file.size
        if progress is not None:
            progress(done, total)
        if file.name == "config.json":
            _check_architecture(blob, repo_id)
            # from here on an interruption leaves a pull worth resuming (after a restart too): say what it fetches
            _write_manifest(repo_dir, f"{repo_id}@{revision}" if revision else repo_id, files)

    snapshot = _publish_snapshot(repo_dir, commit, files)
    refs = repo_dir / "refs"
    refs.mkdir(exist_ok=True)
    if revision != commit:
        (refs / (revision or "main")).write_text(commit)
    (repo_dir / _MANIFEST).unlink(missing_ok=True)  # complete: nothing left to resume
    return snapshot


def _publish_snapshot(repo_dir: Path, commit: str, files: list[RemoteFile]) -> Path:
    """snapshots/<commit> linking every file, appearing whole or not at all: the links are made in a staging folder
    beside snapshots/ (huggingface_hub's cache scan reads only snapshots/, refs/ and blobs/) and renamed into place.
    Made one by one in place, a pull killed among them left a snapshot the library listed with files missing."""
    snapshot = repo_dir / "snapshots" / commit
    if snapshot.is_dir() and all((snapshot / f.name).exists() for f in files):
        return snapshot
    staging = repo_dir / _STAGING / commit  # as deep as the snapshot: the same relative links work in both
    shutil.rmtree(staging.parent, ignore_errors=True)  # left by a pull that died while linking
    staging.mkdir(parents=True)
    for file in files:
        (staging / file.name).symlink_to(os.path.relpath(repo_dir / "blobs" / file.etag, snapshot))
    snapshot.parent.mkdir(exist_ok=True)
    if snapshot.is_dir():  # links missing or dangling (an earlier removal): replaced by the whole set
        shutil.rmtree(snapshot)
    os.replace(staging, snapshot)
    staging.parent.rmdir()
    return snapshot


def _check_architecture(config_file: Path, repo_id: str) -> None:
    try:
        architectures = json.loads(config_file.read_text(encoding="utf-8")).get("architectures") or []
    except ValueError as e:
        raise HubError(f"{repo_id}'s config.json is not valid JSON: {e}") from None
    if not any(is_supported_architecture(a) for a in architectures):
        raise HubError(
            f"{repo_id} is a {', '.join(architectures) or 'model naming no architecture'}, "
            "an architecture kvstudio cannot run"
        )


# ---------------------------------------------------------------------------------------------------- interrupted

_MANIFEST = "kvstudio-pull.json"  # beside blobs/ while a pull is unfinished; huggingface_hub's cache scan ignores it
_STAGING = "kvstudio-snapshot.tmp"  # beside snapshots/ while a finished pull's links are made; ignored likewise


@dataclass(frozen=True)
class InterruptedPull:
    """A pull that stopped before its end (it failed, was cancelled, or the app closed) and can be resumed."""

    model: str  # what was pulled, "org/name[@revision]": pulling it again continues where it stopped
    repo_id: str
    done: int  # bytes of it on disk
    total: int | None  # bytes the whole pull fetches; None when its record cannot be read


def _write_manifest(repo_dir: Path, model: str, files: list[RemoteFile]) -> None:
    manifest = repo_dir / _MANIFEST
    partial = manifest.with_name(manifest.name + ".tmp")
    try:
        partial.write_text(json.dumps({"model": model, "files": {f.etag: f.size for f in files}}), encoding="utf-8")
        os.replace(partial, manifest)  # whole or absent, never half a record
    except OSError as e:
        partial.unlink(missing_ok=True)
        raise HubError(f"cannot write {manifest} ({e}); run the pull again") from None


def _bytes_on_disk(blobs: Path, etag: str, size: int) -> int:
    if (blobs / etag).is_file():
        return size
    partial = blobs / (etag + ".incomplete")
    return min(partial.stat().st_size, size) if partial.is_file() else 0


def list_interrupted() -> list[InterruptedPull]:
    """Every pull in the cache that stopped before its end (also in an earlier run of kvstudio), by repo id."""
    found = []
    for manifest in sorted(_cache_dir().glob(f"models--*/{_MANIFEST}")):
        repo_dir = manifest.parent
        repo_id = repo_dir.name.removeprefix("models--").replace("--", "/")  # as huggingface_hub reads it
        blobs = repo_dir / "blobs"
        try:
            record = json.loads(manifest.read_text(encoding="utf-8"))
            sizes = {str(etag): int(size) for etag, size in record["files"].items()}
            model = str(record["model"])
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            # an unreadable record: what arrived is still shown, so it can be resumed from main or discarded
            done = sum(f.stat().st_size for f in blobs.glob("*.incomplete"))
            found.append(InterruptedPull(repo_id, repo_id, done, None))
            continue
        done = sum(_bytes_on_disk(blobs, etag, size) for etag, size in sizes.items())
        found.append(InterruptedPull(model, repo_id, done, sum(sizes.values())))
    return found


def discard_interrupted(repo_id: str) -> int:
    """Delete what an interrupted pull of `repo_id` left (partial files, finished files no snapshot links, its
    record), keeping a revision of it already in the library. Returns the bytes freed."""
    repo_dir = _repo_dir(repo_id)
    if not (repo_dir / _MANIFEST).is_file():
        raise HubError(f"there is no interrupted download of {repo_id} to discard")
    snapshots = repo_dir / "snapshots"
    if not snapshots.is_dir() or not any(snapshots.iterdir()):  # nothing of it is in the library: all goes
        freed = sum(f.stat().st_size for f in repo_dir.rglob("*") if f.is_file() and not f.is_symlink())
        shutil.rmtree(repo_dir)
        return freed
    linked = {link.resolve() for link in snapshots.rglob("*") if link.is_symlink()}
    freed = 0
    for blob in (repo_dir / "blobs").iterdir():
        if blob.resolve() not in linked:
            freed += blob.stat().st_size
            blob.unlink()
    shutil.rmtree(repo_dir / _STAGING, ignore_errors=True)  # links only: no bytes to count
    (repo_dir / _MANIFEST).unlink()
    return freed


# ---------------------------------------------------------------------------------------------------- removing


def remove(name: str, force: bool = False) -> int:
    """Delete a model from the library: every cached revision of a Hub repo, or (with force) the default
    GGUF file. Returns the bytes freed."""
    default = model_store.default_model_path()
    if name in (default.name, str(default)):
        if not default.is_file():
            raise HubError(f"the default model {default.name} is not in the library")
        if not force:
            raise HubError(
                f"{default.name} is the default model (kvstudio fetches it again on next use); "
                "pass --force to remove it anyway"
            )
        size = default.stat().st_size
        default.unlink()
        return size
    try:
        repos = scan_cache_dir(_cache_dir()).repos
    except CacheNotFound:
        repos = frozenset()
    repo = next((r for r in repos if r.repo_type == "model" and r.repo_id == name), None)
    leftover = _repo_dir(name) if "/" in name else None
    if repo is None and leftover is not None and leftover.is_dir():
        # only the .incomplete blobs of an interrupted pull: the cache scan skips such a folder
        size = sum(f.stat().st_size for f in leftover.rglob("*") if f.is_file() and not f.is_symlink())
        shutil.rmtree(leftover)
        return size
    if repo is None:
        raise HubError(f"no model {name} in the library (kvstudio models list shows what is there)")
    size = repo.size_on_disk
    # the cache's own deletion strategy removes the snapshots, refs and the blobs no other revision uses;
    # the repo folder itself (and any .incomplete blobs in it) go too, so nothing of the model is left
    scan_cache_dir(_cache_dir()).delete_revisions(*(r.commit_hash for r in repo.revisions)).execute()
    shutil.rmtree(repo.repo_path, ignore_errors=True)
    return size
