"""Turning a model name into a local path: a directory, a .gguf file, or a Hugging Face repo id.

Repo ids resolve through huggingface_hub's standard cache: a cached snapshot is used as is, and only
when there is none does this download one (the files a safetensors model needs, nothing else).
"""

from __future__ import annotations

import re
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import (
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)


class ModelLoadError(ValueError):
    """A model could not be found, opened or read; the message names the file and the problem.

    It lives here, in the lowest module of the loading layer, so hub.py, gguf.py and loader.py share it.
    """


# `org/name`, optionally `@revision` (a branch, tag or commit hash; branches may hold slashes)
_REPO_ID = re.compile(r"(?P<repo_id>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?")

# What a safetensors model needs: config, generation config, index, tokenizer files, chat template
_DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "merges.txt"]


def resolve_model_path(model: str, *, revision: str | None = None, cache_dir: str | None = None) -> Path:
    """The local path of `model`: an existing path as given, or the cached (else downloaded) snapshot."""
    local = Path(model).expanduser()
    if local.exists():
        return local
    match = _REPO_ID.fullmatch(model)
    if match is None or local.suffix.lower() == ".gguf":
        raise ModelLoadError(f"{model}: no such file or directory")

    repo_id = match["repo_id"]
    if match["revision"] is not None and revision is not None and match["revision"] != revision:
        raise ModelLoadError(f"{model}: the revision after '@' ({match['revision']}) contradicts revision={revision!r}")
    revision = match["revision"] or revision
    shown = f"{repo_id}@{revision}" if revision else repo_id
    cache = cache_dir or constants.HF_HUB_CACHE

    try:
        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=cache_dir,
                allow_patterns=_DOWNLOAD_PATTERNS,
                local_files_only=True,
            )
        )
    except LocalEntryNotFoundError:
        pass  # not cached (or only partly): download it below

    try:
        return Path(
            snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=_DOWNLOAD_PATTERNS)
        )
    except RevisionNotFoundError as error:
        raise ModelLoadError(f"{shown}: the Hugging Face repo has no revision {revision!r}") from error
    except RepositoryNotFoundError as error:
        # also raised for gated and private repos without a token
        raise ModelLoadError(
            f"{shown}: no such Hugging Face repo, or it is private or gated and needs an access token"
        ) from error
    except LocalEntryNotFoundError as error:
        raise ModelLoadError(
            f"{model} is neither a local path nor cached in the Hugging Face cache {cache}, "
            f"and the Hugging Face Hub cannot be reached to download {shown}"
        ) from error
    except OSError as error:
        raise ModelLoadError(f"{shown}: download into {cache} failed: {error}") from error
