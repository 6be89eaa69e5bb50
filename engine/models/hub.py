"""Turning a model name into a local path: a directory, a .gguf file, or a Hugging Face repo id.

Repo ids resolve through huggingface_hub's standard cache: a cached snapshot is used as is, and only
when there is none does this download one: the files a safetensors model needs (is_model_file), nothing else.
That rule is kvstudio's one answer to "which of a repo's files does a model need", also for the app's pulls.
"""

from __future__ import annotations

import re
from fnmatch import fnmatchcase
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

# The repo files the engine reads from a safetensors model, at the repo's top level: config, generation config,
# weights and their index, tokenizer files, chat template. Everything else (.bin, .onnx, .gguf, README.md, images,
# subfolders) stays on the Hub. Glob patterns, matched case-sensitively as huggingface_hub matches them.
MODEL_FILE_PATTERNS = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "*.jinja",
)
_SUBFOLDERS = "*/*"  # huggingface_hub's "*" matches across "/": this keeps the patterns to the top level


def is_model_file(name: str) -> bool:
    """Whether the engine reads this repo file (`name` relative to the repo root), so a download fetches it."""
    return not fnmatchcase(name, _SUBFOLDERS) and any(fnmatchcase(name, p) for p in MODEL_FILE_PATTERNS)


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
                allow_patterns=list(MODEL_FILE_PATTERNS),
                ignore_patterns=_SUBFOLDERS,
                local_files_only=True,
            )
        )
    except LocalEntryNotFoundError:
        pass  # not cached (or only partly): download it below

    try:
        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=cache_dir,
                allow_patterns=list(MODEL_FILE_PATTERNS),
                ignore_patterns=_SUBFOLDERS,
            )
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
