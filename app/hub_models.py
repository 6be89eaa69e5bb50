"""The local model library and its Hugging Face side: list what kvstudio can run, pull a repo, remove one.

Models live in the standard Hugging Face cache (so other tools share them), beside the default GGUF model in
kvstudio's data dir. A pull writes the cache layout itself instead of calling hf_hub_download: huggingface_hub
deletes a partial file when a download fails, while here `blobs/<etag>.incomplete` survives so the next pull
resumes it with a Range request. A snapshot's links are made only once every file is complete, so the library
never shows a half-downloaded model. No printing here: the CLI and the desktop app report through callbacks.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import json
import os
import shutil
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import httpx2
from huggingface_hub import HfApi, constants, scan_cache_dir
from huggingface_hub.errors import CacheNotFound, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.hf_api import ModelInfo
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

from app import model_store

# Files the engine reads from a safetensors repo (top level only); everything else (.bin, .onnx, .gguf,
# README.md, images) stays on the Hub.
_EXACT_FILES = {"config.json", "generation_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                "added_tokens.json", "model.safetensors.index.json"}
_CHUNK = 1 << 20
_TIMEOUT_S = 30

Progress = Callable[[int, int], None]  # (bytes done, bytes in all) over the whole pull


class HubError(RuntimeError):
    """A pull or a removal failed; the message says why in words meant for the user."""


class HubOffline(HubError):
    """The Hub could not be reached at all (no network, refused, timed out), as opposed to answering with an error."""


@dataclass(frozen=True)
class LocalModel:
    name: str  # "org/name" for a Hub model, the file name for the default GGUF model
    path: Path  # the snapshot directory, or the .gguf file
    size: int  # bytes on disk (every cached revision of a Hub repo)
    family: str  # architecture, e.g. "LlamaForCausalLM", or the GGUF's "llama"
    context_length: int | None
    is_default: bool = False


def is_supported_architecture(architecture: str) -> bool:
    # imported here: the registry pulls in torch, which listing the library does not otherwise need
    from engine.models.registry import UnsupportedModelError, model_class

    try:
        model_class(SimpleNamespace(architectures=[architecture]))
    except UnsupportedModelError:
        return False
    return True


def wanted_file(name: str) -> bool:
    """Whether a pull downloads this repo file: config, tokenizer, chat template and safetensors weights."""
    if "/" in name:
        return False
    return (name in _EXACT_FILES or name.endswith(".safetensors") or name.startswith("tokenizer")
            or name.endswith(".jinja"))


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

def _gguf_model(path: Path, name: str, size: int, is_default: bool) -> LocalModel | None:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except (OSError, ValueError):
        return None  # not a readable GGUF: not something kvstudio can run

    def field(key: str):
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    family = field("general.architecture")
    if family is None:
        return None
    context = field(f"{family}.context_length")
    return LocalModel(name, path, size, family, None if context is None else int(context), is_default)


def _hf_model(snapshot: Path, name: str, size: int) -> LocalModel | None:
    config_file = snapshot / "config.json"
    if not config_file.is_file() or not any(snapshot.glob("*.safetensors")):
        return None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    family = next((a for a in config.get("architectures") or [] if is_supported_architecture(a)), None)
    if family is None:
        return None
    context = config.get("max_position_embeddings")
    return LocalModel(name, snapshot, size, family, context if isinstance(context, int) else None)


def list_local_models() -> list[LocalModel]:
    """The default model (when fetched) and every cached Hub repo kvstudio can run, by name."""
    models: list[LocalModel] = []
    default = model_store.default_model_path()
    if default.is_file():
        model = _gguf_model(default, default.name, default.stat().st_size, is_default=True)
        if model is not None:
            models.append(model)
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

@dataclass(frozen=True)
class _RemoteFile:
    name: str
    size: int
    etag: str  # the blob's name in the cache: the LFS sha256, else the git blob id (as huggingface_hub names it)
    sha256: str | None  # LFS files only


def _repo_dir(repo_id: str) -> Path:
    return _cache_dir() / ("models--" + repo_id.replace("/", "--"))


def _remote_files(repo_id: str, revision: str | None, endpoint: str) -> tuple[str, list[_RemoteFile]]:
    """(commit hash, the files a pull downloads) for the repo at `revision`."""
    shown = f"{repo_id}@{revision}" if revision else repo_id
    try:
        info = HfApi(endpoint=endpoint).model_info(repo_id, revision=revision, files_metadata=True)
    except RevisionNotFoundError:
        raise HubError(f"the model {repo_id} on the Hub has no revision {revision!r}") from None
    except RepositoryNotFoundError:  # also private and gated repos without a token
        raise HubError(f"no model {repo_id} on the Hub") from None
    except (httpx2.HTTPError, OSError) as e:
        raise HubError(f"cannot reach the Hugging Face Hub at {endpoint} to look up {shown}: {e}") from None
    files = []
    for sibling in info.siblings or []:
        if not wanted_file(sibling.rfilename):
            continue
        lfs = sibling.lfs
        etag = lfs.sha256 if lfs is not None else sibling.blob_id
        if etag is None or sibling.size is None:
            raise HubError(f"the Hub gave no size or hash for {shown}/{sibling.rfilename}")
        files.append(_RemoteFile(sibling.rfilename, sibling.size, etag, lfs.sha256 if lfs is not None else None))
    names = {f.name for f in files}
    if "config.json" not in names:
        raise HubError(f"{shown} has no config.json, so it is not a transformers model kvstudio can run")
    if not any(n.endswith(".safetensors") for n in names):
        raise HubError(f"{shown} has no .safetensors weights; kvstudio reads only safetensors (or a local .gguf)")
    return info.sha, files


def _download(url: str, file: _RemoteFile, blob: Path, done_before: int, total: int,
              progress: Progress | None, cancel: threading.Event | None) -> None:
    """Fetch one file to `blob`, resuming `blob`.incomplete from its length; verified before it is renamed."""
    partial = blob.with_name(blob.name + ".incomplete")
    have = partial.stat().st_size if partial.exists() else 0
    if have > file.size:  # not a prefix of this file: start over
        partial.unlink()
        have = 0
    request = urllib.request.Request(url, headers={"Accept-Encoding": "identity"})
    if 0 < have < file.size:
        request.add_header("Range", f"bytes={have}-")
    try:
        if have < file.size:
            with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
                mode = "ab" if response.status == 206 else "wb"  # 200: the server ignored Range, so from byte 0
                if mode == "wb":
                    have = 0
                with partial.open(mode) as out:
                    while chunk := response.read(_CHUNK):
                        out.write(chunk)
                        have += len(chunk)
                        if progress is not None:
                            progress(done_before + have, total)
                        if cancel is not None and cancel.is_set():
                            raise HubError("cancelled")  # .incomplete stays, so the next pull resumes it
    except urllib.error.HTTPError as e:
        raise HubError(f"downloading {file.name} failed: HTTP {e.code} {e.reason}") from None
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise HubError(f"the disk holding {blob.parent} is full while downloading {file.name}") from None
        raise HubError(f"downloading {file.name} failed ({e}); run the pull again to resume it") from None
    except http.client.HTTPException as e:  # the connection dropped mid-body
        raise HubError(f"downloading {file.name} broke off after {have} of {file.size} bytes ({e!r}); "
                       "run the pull again to resume it") from None
    if have != file.size:
        raise HubError(f"downloading {file.name} broke off after {have} of {file.size} bytes; "
                       "run the pull again to resume it")
    if file.sha256 is not None and _sha256(partial) != file.sha256:
        partial.unlink()  # corrupt: resuming it would only keep the corruption
        raise HubError(f"{file.name} arrived corrupted (sha256 mismatch) and was discarded; run the pull again")
    os.replace(partial, blob)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _check_space(directory: Path, needed: int) -> None:
    free = shutil.disk_usage(directory).free
    if needed > free:
        raise HubError(f"not enough disk space in {directory}: the download needs {needed} more bytes, "
                       f"{free} are free")


def pull(model: str, revision: str | None = None, progress: Progress | None = None,
         endpoint: str | None = None, cancel: threading.Event | None = None) -> Path:
    """Download `model` ("org/name" or "org/name@rev") into the Hugging Face cache; returns the snapshot dir.

    Only what the engine reads is fetched. An interrupted pull leaves `.incomplete` blobs that the next pull
    resumes; the snapshot (what the library lists) appears only once every file is complete. Setting `cancel`
    stops the pull between chunks with HubError("cancelled"), keeping what arrived for the next pull.
    """
    repo_id, _, at = model.partition("@")
    if at and revision is not None and at != revision:
        raise HubError(f"{model}: the revision after '@' contradicts revision={revision!r}")
    revision = at or revision
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise HubError(f"{model!r} is not a Hub model id: expected ORG/NAME[@REVISION]")
    endpoint = endpoint or constants.ENDPOINT
    commit, files = _remote_files(repo_id, revision, endpoint)

    repo_dir = _repo_dir(repo_id)
    blobs = repo_dir / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    # config.json first: an unsupported architecture should fail before gigabytes of weights arrive
    files.sort(key=lambda f: f.name != "config.json")
    total = sum(f.size for f in files)
    missing = [f for f in files if not (blobs / f.etag).is_file()]
    partial_bytes = sum((blobs / (f.etag + ".incomplete")).stat().st_size for f in missing
                        if (blobs / (f.etag + ".incomplete")).is_file())
    _check_space(blobs, sum(f.size for f in missing) - partial_bytes)

    done = 0
    for file in files:
        blob = blobs / file.etag
        if not blob.is_file():
            url = f"{endpoint}/{repo_id}/resolve/{commit}/{urllib.parse.quote(file.name)}"
            if cancel is not None and cancel.is_set():
                raise HubError("cancelled")
            _download(url, file, blob, done, total, progress, cancel)
        done += file.size
        if progress is not None:
            progress(done, total)
        if file.name == "config.json":
            _check_architecture(blob, repo_id)

    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for file in files:
        link = snapshot / file.name
        if not link.exists():
            link.unlink(missing_ok=True)  # a dangling link left by an earlier removal
            link.symlink_to(os.path.relpath(blobs / file.etag, snapshot))
    refs = repo_dir / "refs"
    refs.mkdir(exist_ok=True)
    if revision != commit:
        (refs / (revision or "main")).write_text(commit)
    return snapshot


def _check_architecture(config_file: Path, repo_id: str) -> None:
    try:
        architectures = json.loads(config_file.read_text(encoding="utf-8")).get("architectures") or []
    except ValueError as e:
        raise HubError(f"{repo_id}'s config.json is not valid JSON: {e}") from None
    if not any(is_supported_architecture(a) for a in architectures):
        raise HubError(f"{repo_id} is a {', '.join(architectures) or 'model naming no architecture'}, "
                       "an architecture kvstudio cannot run")


# ---------------------------------------------------------------------------------------------------- searching

@dataclass(frozen=True)
class HubModel:
    name: str  # "org/name"
    downloads: int  # over the last 30 days, as the Hub counts them
    likes: int
    size: int | None  # bytes the repo stores on the Hub (every file, not only what a pull fetches); None: not said


def search_hub(query: str, limit: int = 20, endpoint: str | None = None) -> list[HubModel]:
    """Text-generation models with safetensors weights whose id contains `query`, most downloaded first.

    One request without retries: huggingface_hub's list_models backs off for half a minute when the network is
    down, and a search box should say "offline" at once. Raises HubOffline when the Hub cannot be reached and
    HubError when it answers with an error.
    """
    if not 1 <= limit <= 100:  # the Hub's page size: more would need pagination
        raise ValueError(f"limit must be between 1 and 100, got {limit}")
    endpoint = endpoint or constants.ENDPOINT
    params = {"search": query.strip(), "pipeline_tag": "text-generation", "filter": "safetensors",
              "sort": "downloads", "limit": limit, "expand": ["downloads", "likes", "usedStorage"]}
    try:
        response = get_session().get(f"{endpoint}/api/models", params=params, headers=build_hf_headers(),
                                     timeout=_TIMEOUT_S)
        hf_raise_for_status(response)
        items = response.json()
    except httpx2.TransportError as e:
        raise HubOffline(f"cannot reach the Hugging Face Hub at {endpoint}: {e}") from None
    except HfHubHTTPError as e:
        raise HubError(f"the Hub search for {query!r} failed: {e}") from None
    except OSError as e:
        raise HubOffline(f"cannot reach the Hugging Face Hub at {endpoint}: {e}") from None
    except ValueError as e:
        raise HubError(f"the Hub answered the search for {query!r} with something that is not JSON: {e}") from None
    models = []
    for item in items[:limit]:
        info = ModelInfo(**item)
        models.append(HubModel(info.id, info.downloads or 0, info.likes or 0, info.used_storage))
    return models


# ---------------------------------------------------------------------------------------------------- removing

def remove(name: str, force: bool = False) -> int:
    """Delete a model from the library: every cached revision of a Hub repo, or (with force) the default
    GGUF file. Returns the bytes freed."""
    default = model_store.default_model_path()
    if name in (default.name, str(default)):
        if not default.is_file():
            raise HubError(f"the default model {default.name} is not in the library")
        if not force:
            raise HubError(f"{default.name} is the default model (kvstudio fetches it again on next use); "
                           "pass --force to remove it anyway")
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
