"""Pulling models from the Hugging Face Hub into its standard cache (so other tools share them), and the pulls left
unfinished, to resume or discard.

A pull fetches either what the engine reads of a transformers repo (config, tokenizer, safetensors weights) or one
GGUF file of a repo of quantizations (`ORG/NAME:Q4_K_M`, or by its file name), which the engine loads by path.
It writes the cache layout itself instead of calling hf_hub_download: huggingface_hub deletes a partial file when a
download fails, while here `blobs/<etag>.incomplete` survives so the next pull resumes it with a Range request
(hub_files.download_file fetches one file). A snapshot's links are made only once every file is complete, in a
staging folder renamed into place in one step, so the library never shows a half-downloaded model, even after
kill -9; until then a small record beside the blobs says what the pull fetches, so after a restart the app can
offer to resume or discard it. No printing here: the CLI and the desktop app report through callbacks.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants

from app.library.gguf_files import HEAD_BYTES, GGUFChoice, check_architecture, choose, gguf_choices
from app.library.hub_files import (
    HubError,
    Progress,
    RemoteFile,
    cache_dir,
    check_space,
    download_file,
    is_transformers_model,
    model_files,
    read_head,
    repo_dir,
    repo_files,
)
from app.library.hub_models import is_supported_architecture

RECORD = "kvstudio-pull.json"  # beside blobs/ while a transformers pull is unfinished; the cache scan ignores it
_GGUF_RECORD = "kvstudio-pull-{}.json"  # one per unfinished GGUF file pull, by its blob's name: several may wait
_STAGING = "kvstudio-snapshot.tmp"  # beside snapshots/ while a finished pull's links are made; ignored likewise


@dataclass(frozen=True)
class PullRef:
    """What a pull was asked for: ORG/NAME[@REVISION][:FILE_OR_QUANT]."""

    repo_id: str
    revision: str | None
    file: str | None  # a GGUF file's name or a quantization label; None: the repo's model

    @property
    def shown(self) -> str:
        return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id

    def with_file(self, file: str) -> str:
        return f"{self.shown}:{file}"


def parse_ref(model: str, revision: str | None = None, file: str | None = None) -> PullRef:
    """`model` as ORG/NAME[@REVISION][:FILE_OR_QUANT] (an Ollama-style hf.co/ prefix allowed); `revision` and
    `file` given apart must agree with what it says."""
    name, colon, tag = model.removeprefix("hf.co/").partition(":")
    repo_id, _, at = name.partition("@")
    if at and revision is not None and at != revision:
        raise HubError(f"{model}: the revision after '@' contradicts revision={revision!r}")
    if colon and not tag:
        raise HubError(f"{model!r}: nothing follows ':'; expected a GGUF file or a quantization such as Q4_K_M")
    if tag and file is not None and tag != file:
        raise HubError(f"{model}: the file after ':' contradicts --file {file}")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise HubError(f"{model!r} is not a Hub model id: expected ORG/NAME[@REVISION][:QUANT]")
    return PullRef(repo_id, at or revision, file or tag or None)


def pull(
    model: str,
    revision: str | None = None,
    progress: Progress | None = None,
    endpoint: str | None = None,
    cancel: threading.Event | None = None,
    file: str | None = None,
) -> Path:
    """Download `model` (see parse_ref) into the Hugging Face cache; returns the snapshot directory of a
    transformers model, the file's path in the snapshot for a GGUF file.

    A repo of GGUF files needs one chosen (`file`, or ':' after the id) unless it offers one loadable file only.
    An interrupted pull leaves `.incomplete` blobs that the next pull resumes, and a record list_interrupted
    finds; the snapshot (what the library lists) appears only once every file is complete. Setting `cancel`
    stops the pull between chunks with HubError("cancelled"), keeping what arrived for the next pull.
    """
    ref = parse_ref(model, revision, file)
    endpoint = endpoint or constants.ENDPOINT
    listing = repo_files(ref.repo_id, ref.revision, endpoint)
    choices = gguf_choices(listing.files)
    if ref.file is None and (is_transformers_model(listing.files) or not choices):
        return _pull_model(ref, listing.commit, model_files(ref.shown, listing.files), progress, endpoint, cancel)
    return _pull_gguf(ref, listing.commit, choose(ref.shown, choices, ref.file), progress, endpoint, cancel)


@dataclass(frozen=True)
class RepoFiles:
    """What a repo offers to pull."""

    ref: PullRef
    commit: str
    model_files: list[RemoteFile]  # what `pull ORG/NAME` fetches of a transformers model; empty: it is none
    num_params: int | None  # its safetensors weights as the Hub counts them; None: not said
    choices: list[GGUFChoice]  # its GGUF models, smallest first


def list_files(model: str, endpoint: str | None = None) -> RepoFiles:
    """The files of the repo `model` (ORG/NAME[@REVISION]) a pull can fetch; HubError when it offers none."""
    ref = parse_ref(model)
    if ref.file is not None:
        raise HubError(f"{model}: name the repo alone (ORG/NAME[@REVISION]) to list its files")
    listing = repo_files(ref.repo_id, ref.revision, endpoint or constants.ENDPOINT)
    choices = gguf_choices(listing.files)
    wanted = model_files(ref.shown, listing.files) if is_transformers_model(listing.files) or not choices else []
    return RepoFiles(ref, listing.commit, wanted, listing.num_params, choices)


def _pull_model(
    ref: PullRef,
    commit: str,
    files: list[RemoteFile],
    progress: Progress | None,
    endpoint: str,
    cancel: threading.Event | None,
) -> Path:
    repo = repo_dir(ref.repo_id)
    blobs = repo / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    # config.json first: an unsupported architecture should fail before gigabytes of weights arrive
    files.sort(key=lambda f: f.name != "config.json")
    total = sum(f.size for f in files)
    _check_space(blobs, files)
    done = 0
    for file in files:
        blob = blobs / file.etag
        if not blob.is_file():
            if cancel is not None and cancel.is_set():
                raise HubError("cancelled")
            download_file(_url(endpoint, ref, commit, file), file, blob, done, total, progress, cancel)
        done += file.size
        if progress is not None:
            progress(done, total)
        if file.name == "config.json":
            _check_config(blob, ref.repo_id)
            # from here on an interruption leaves a pull worth resuming (after a restart too): say what it fetches
            _write_record(repo / RECORD, ref.shown, files)
    return _finish(repo, ref, commit, files, repo / RECORD)


def _pull_gguf(
    ref: PullRef,
    commit: str,
    choice: GGUFChoice,
    progress: Progress | None,
    endpoint: str,
    cancel: threading.Event | None,
) -> Path:
    [file] = choice.parts  # choose() refuses split models
    repo = repo_dir(ref.repo_id)
    blobs = repo / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    blob = blobs / file.etag
    record = repo / _GGUF_RECORD.format(file.etag)
    if not blob.is_file():
        _check_space(blobs, [file])
        if cancel is not None and cancel.is_set():
            raise HubError("cancelled")
        url = _url(endpoint, ref, commit, file)
        partial = blob.with_name(blob.name + ".incomplete")
        arrived = partial.stat().st_size if partial.is_file() else 0
        if arrived >= HEAD_BYTES:
            with partial.open("rb") as f:
                head = f.read(HEAD_BYTES)
        else:
            head = read_head(url, HEAD_BYTES)
        check_architecture(head, ref.shown, file.name)
        _write_record(record, ref.with_file(choice.ref), [file])
        download_file(url, file, blob, 0, file.size, progress, cancel)
    if progress is not None:
        progress(file.size, file.size)
    return _finish(repo, ref, commit, [file], record) / file.name


def _url(endpoint: str, ref: PullRef, commit: str, file: RemoteFile) -> str:
    return f"{endpoint}/{ref.repo_id}/resolve/{commit}/{urllib.parse.quote(file.name)}"


def _check_space(blobs: Path, files: list[RemoteFile]) -> None:
    missing = [f for f in files if not (blobs / f.etag).is_file()]
    partials = [blobs / (f.etag + ".incomplete") for f in missing]
    check_space(blobs, sum(f.size for f in missing) - sum(p.stat().st_size for p in partials if p.is_file()))


def _finish(repo: Path, ref: PullRef, commit: str, files: list[RemoteFile], record: Path) -> Path:
    """Every file is in blobs/: link them into the snapshot, point the ref at it, drop the pull's record."""
    snapshot = _publish_snapshot(repo, commit, files)
    refs = repo / "refs"
    refs.mkdir(exist_ok=True)
    if ref.revision != commit:
        (refs / (ref.revision or "main")).write_text(commit)
    record.unlink(missing_ok=True)  # complete: nothing left to resume
    return snapshot


def _publish_snapshot(repo: Path, commit: str, files: list[RemoteFile]) -> Path:
    """snapshots/<commit> linking every file (and keeping the links to other files already there, such as another
    GGUF file of the repo), appearing whole or not at all: the links are made in a staging folder beside
    snapshots/ (huggingface_hub's cache scan reads only snapshots/, refs/ and blobs/) and renamed into place.
    Made one by one in place, a pull killed among them left a snapshot the library listed with files missing."""
    snapshot = repo / "snapshots" / commit
    if snapshot.is_dir() and all((snapshot / f.name).exists() for f in files):
        return snapshot
    staging = repo / _STAGING / commit  # as deep as the snapshot: the same relative links work in both
    shutil.rmtree(staging.parent, ignore_errors=True)  # left by a pull that died while linking
    staging.mkdir(parents=True)
    links = {f.name: os.path.relpath(repo / "blobs" / f.etag, (snapshot / f.name).parent) for f in files}
    if snapshot.is_dir():  # links to files this pull does not fetch stay, dangling ones (an earlier removal) go
        for link in snapshot.rglob("*"):
            name = link.relative_to(snapshot).as_posix()
            if link.is_symlink() and link.exists() and name not in links:
                links[name] = os.readlink(link)
    for name, target in links.items():
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        (staging / name).symlink_to(target)
    snapshot.parent.mkdir(exist_ok=True)
    if snapshot.is_dir():
        shutil.rmtree(snapshot)
    os.replace(staging, snapshot)
    staging.parent.rmdir()
    return snapshot


def _check_config(config_file: Path, repo_id: str) -> None:
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


@dataclass(frozen=True)
class InterruptedPull:
    """A pull that stopped before its end (it failed, was cancelled, or the app closed) and can be resumed."""

    model: str  # what was pulled, "org/name[@revision][:file]": pulling it again continues where it stopped
    repo_id: str
    done: int  # bytes of it on disk
    total: int | None  # bytes the whole pull fetches; None when its record cannot be read


def _write_record(record: Path, model: str, files: list[RemoteFile]) -> None:
    partial = record.with_name(record.name + ".tmp")
    try:
        partial.write_text(json.dumps({"model": model, "files": {f.etag: f.size for f in files}}), encoding="utf-8")
        os.replace(partial, record)  # whole or absent, never half a record
    except OSError as e:
        partial.unlink(missing_ok=True)
        raise HubError(f"cannot write {record} ({e}); run the pull again") from None


def _bytes_on_disk(blobs: Path, etag: str, size: int) -> int:
    if (blobs / etag).is_file():
        return size
    partial = blobs / (etag + ".incomplete")
    return min(partial.stat().st_size, size) if partial.is_file() else 0


def _records() -> list[tuple[Path, InterruptedPull, set[str] | None]]:
    """(record, the pull it describes, the blobs it names; None when unreadable) for every unfinished pull."""
    found = []
    for record in sorted(cache_dir().glob("models--*/kvstudio-pull*.json")):
        repo = record.parent
        repo_id = repo.name.removeprefix("models--").replace("--", "/")  # as huggingface_hub reads it
        blobs = repo / "blobs"
        try:
            content = json.loads(record.read_text(encoding="utf-8"))
            sizes = {str(etag): int(size) for etag, size in content["files"].items()}
            model = str(content["model"])
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            # an unreadable record: what arrived is still shown, so it can be resumed from main or discarded
            done = sum(f.stat().st_size for f in blobs.glob("*.incomplete"))
            found.append((record, InterruptedPull(repo_id, repo_id, done, None), None))
            continue
        done = sum(_bytes_on_disk(blobs, etag, size) for etag, size in sizes.items())
        found.append((record, InterruptedPull(model, repo_id, done, sum(sizes.values())), set(sizes)))
    return found


def list_interrupted() -> list[InterruptedPull]:
    """Every pull in the cache that stopped before its end (also in an earlier run of kvstudio), by repo id."""
    return [pull for _, pull, _ in _records()]


def discard_interrupted(model: str) -> int:
    """Delete what the interrupted pull of `model` (as list_interrupted names it) left: its partial files, the
    finished files of it no snapshot links, its record; a model of the repo already in the library stays. Returns
    the bytes freed."""
    found = [(record, names) for record, pull, names in _records() if pull.model == model]
    if not found:
        raise HubError(f"there is no interrupted download of {model} to discard")
    record, names = found[0]
    repo = record.parent
    snapshots = repo / "snapshots"
    others = [r for r in repo.glob("kvstudio-pull*.json") if r != record]
    if not others and (not snapshots.is_dir() or not any(snapshots.iterdir())):  # nothing else of it: all goes
        freed = sum(f.stat().st_size for f in repo.rglob("*") if f.is_file() and not f.is_symlink())
        shutil.rmtree(repo)
        return freed
    linked = {link.resolve() for link in snapshots.rglob("*") if link.is_symlink()} if snapshots.is_dir() else set()
    freed = 0
    for blob in (repo / "blobs").iterdir():
        named = names is None or blob.name.removesuffix(".incomplete") in names
        if named and blob.resolve() not in linked:
            freed += blob.stat().st_size
            blob.unlink()
    shutil.rmtree(repo / _STAGING, ignore_errors=True)  # links only: no bytes to count
    record.unlink()
    return freed
