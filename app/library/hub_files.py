"""One Hub repo's files as a pull fetches them: their sizes and hashes, the ones the engine needs of a transformers
repo (engine.models.hub.is_model_file, the rule the engine's own downloads follow), and one file's download into
the Hugging Face cache's blobs folder, resumable and verified.

A file arrives as `blobs/<etag>.incomplete` and is renamed to its blob only once complete and its sha256 checked,
so a failure leaves a prefix that the next download continues with a Range request.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import os
import shutil
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx2
from huggingface_hub import HfApi, constants
from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

from engine.models.hub import is_model_file

_CHUNK = 1 << 20
_TIMEOUT_S = 30

Progress = Callable[[int, int], None]  # (bytes done, bytes in all) over the whole pull


class HubError(RuntimeError):
    """A pull or a removal failed; the message says why in words meant for the user."""


class HubOffline(HubError):
    """The Hub could not be reached at all (no network, refused, timed out), as opposed to answering with an error."""


def cache_dir() -> Path:
    """The Hugging Face cache models are pulled into (read at call time, so HF_HUB_CACHE set by a test or the user
    counts)."""
    return Path(constants.HF_HUB_CACHE)


def repo_dir(repo_id: str) -> Path:
    return cache_dir() / ("models--" + repo_id.replace("/", "--"))


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int
    etag: str  # the blob's name in the cache: the LFS sha256, else the git blob id (as huggingface_hub names it)
    sha256: str | None  # LFS files only


@dataclass(frozen=True)
class RepoListing:
    commit: str  # the hash `revision` resolved to
    files: list[RemoteFile]  # every file of the repo
    num_params: int | None  # weights in its safetensors files, as the Hub counts them; None: not said


def repo_files(repo_id: str, revision: str | None, endpoint: str) -> RepoListing:
    """Every file of the repo at `revision`, with sizes and hashes."""
    shown = f"{repo_id}@{revision}" if revision else repo_id
    try:
        info = HfApi(endpoint=endpoint).model_info(repo_id, revision=revision, files_metadata=True)
    except RevisionNotFoundError:
        raise HubError(f"the model {repo_id} on the Hub has no revision {revision!r}") from None
    except RepositoryNotFoundError:  # also private and gated repos without a token
        raise HubError(f"no model {repo_id} on the Hub") from None
    except (httpx2.TransportError, OSError) as e:
        raise HubOffline(f"cannot reach the Hugging Face Hub at {endpoint} to look up {shown}: {e}") from None
    except httpx2.HTTPError as e:
        raise HubError(f"the Hub answered the look-up of {shown} with an error: {e}") from None
    files = []
    for sibling in info.siblings or []:
        lfs = sibling.lfs
        etag = lfs.sha256 if lfs is not None else sibling.blob_id
        if etag is None or sibling.size is None:
            raise HubError(f"the Hub gave no size or hash for {shown}/{sibling.rfilename}")
        files.append(RemoteFile(sibling.rfilename, sibling.size, etag, lfs.sha256 if lfs is not None else None))
    return RepoListing(info.sha, files, info.safetensors.total if info.safetensors is not None else None)


def is_transformers_model(files: list[RemoteFile]) -> bool:
    """Whether a repo holding `files` is a model a plain pull fetches: config.json beside safetensors weights."""
    names = {f.name for f in files}
    return "config.json" in names and any(n.endswith(".safetensors") and is_model_file(n) for n in names)


def model_files(shown: str, files: list[RemoteFile]) -> list[RemoteFile]:
    """The files of a transformers repo a pull downloads (what the engine reads), or HubError saying why the repo
    is not one kvstudio can run."""
    wanted = [f for f in files if is_model_file(f.name)]
    names = {f.name for f in wanted}
    if "config.json" not in names:
        raise HubError(f"{shown} has no config.json and no GGUF file, so it is not a model kvstudio can run")
    if not any(n.endswith(".safetensors") for n in names):
        raise HubError(f"{shown} has no .safetensors weights; kvstudio reads only safetensors (or a local .gguf)")
    return wanted


def read_head(url: str, length: int) -> bytes:
    """The first `length` bytes of a Hub file (fewer when it is shorter), by a Range request."""
    request = urllib.request.Request(url, headers={"Accept-Encoding": "identity", "Range": f"bytes=0-{length - 1}"})
    try:
        with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
            return response.read(length)
    except urllib.error.HTTPError as e:
        raise HubError(f"reading the start of {url} failed: HTTP {e.code} {e.reason}") from None
    except (OSError, http.client.HTTPException) as e:
        raise HubError(f"reading the start of {url} failed ({e}); run the pull again") from None


def download_file(
    url: str,
    file: RemoteFile,
    blob: Path,
    done_before: int,
    total: int,
    progress: Progress | None,
    cancel: threading.Event | None,
) -> None:
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
        raise HubError(
            f"downloading {file.name} broke off after {have} of {file.size} bytes ({e!r}); "
            "run the pull again to resume it"
        ) from None
    if have != file.size:
        raise HubError(
            f"downloading {file.name} broke off after {have} of {file.size} bytes; run the pull again to resume it"
        )
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


def check_space(directory: Path, needed: int) -> None:
    free = shutil.disk_usage(directory).free
    if needed > free:
        raise HubError(f"not enough disk space in {directory}: the download needs {needed} more bytes, {free} are free")
