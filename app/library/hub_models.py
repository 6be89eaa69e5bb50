"""The local model library: list what kvstudio can run, remove a model.

Models live in the standard Hugging Face cache (so other tools share them; app/library/pulls.py fetches them),
beside the default GGUF model in kvstudio's data dir. A transformers repo is one model; each GGUF file pulled
from a repo of quantizations is one model of its own, named `org/name:Q4_K_M` (by the quantization its file name
says, or by the file name when two files say the same), as a pull names it. A corrupt model file is listed with
the problem said, not dropped. No printing here: the CLI and the desktop app report through return values.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from huggingface_hub import scan_cache_dir
from huggingface_hub.errors import CacheNotFound

from app.library import model_store
from app.library.footprint import Weights, gguf_weights, read_weights
from app.library.hub_files import HubError, cache_dir, repo_dir
from app.library.quant_types import label_from_name
from engine.models.hub import ModelLoadError


def options_for(model: LocalModel, options: dict) -> dict:
    """The engine options to load `model` with: a remembered max_model_len longer than the model's own context is
    cut to it (the engine refuses a longer one), the rest as they are."""
    if model.context_length is not None and options.get("max_model_len", 0) > model.context_length:
        return {**options, "max_model_len": model.context_length}
    return options


def shown_name(model: str) -> str:
    """A model path as a person knows it: a Hub snapshot folder (named by its commit hash) as its repo id, anything
    else by its file or folder name. From the path alone, so it costs no cache scan."""
    path = Path(model)
    repo_folder = path.parent.parent.name
    if path.parent.name == "snapshots" and repo_folder.startswith("models--"):
        return repo_folder.removeprefix("models--").replace("--", "/")  # the cache's spelling of org/name
    return path.name


@dataclass(frozen=True)
class LocalModel:
    name: str  # "org/name", "org/name:Q4_K_M" for a GGUF file of a Hub repo, the file name for the default model
    path: Path  # the snapshot directory, or the .gguf file
    size: int  # bytes on disk (a transformers repo: every cached revision)
    family: str  # the Hugging Face architecture, e.g. "LlamaForCausalLM" (also for a GGUF); "?" when unreadable
    context_length: int | None
    is_default: bool = False
    weights: Weights | None = None  # its tensors as the headers say; None: unknown (or the files are corrupt)
    problem: str | None = None  # why it cannot be loaded (a corrupt file), in a sentence naming the file

    @property
    def num_params(self) -> int | None:
        return None if self.weights is None else self.weights.num_params

    @property
    def quant(self) -> str | None:
        """How the file stores its weights: a GGUF's file type ("Q4_K_M"), else the dtype of most ("BF16")."""
        return None if self.weights is None else self.weights.label


def is_supported_architecture(architecture: str) -> bool:
    # imported here: the registry builds every model class, which a pull or a removal does not need
    from engine.models.registry import UnsupportedModelError, model_class

    try:
        model_class(SimpleNamespace(architectures=[architecture]))
    except UnsupportedModelError:
        return False
    return True


# ---------------------------------------------------------------------------------------------------- listing


def _gguf_model(path: Path, name: str, size: int, is_default: bool = False) -> LocalModel:
    # the engine's own reader: it checks the header and that the file holds every tensor (truncation), and takes
    # milliseconds where gguf.GGUFReader takes seconds (it maps each of the ~50k vocabulary strings)
    from engine.models.gguf import GGUFCheckpoint

    try:
        checkpoint = GGUFCheckpoint(path)
        fields = checkpoint.config_fields  # no LlamaConfig: that would import transformers' models
        weights = gguf_weights(checkpoint)
    except ModelLoadError as e:
        return LocalModel(name, path, size, "?", None, is_default, problem=str(e))
    return LocalModel(
        name, path, size, fields["architectures"][0], fields["max_position_embeddings"], is_default, weights
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
        weights = read_weights(snapshot)
    except ModelLoadError as e:
        return LocalModel(name, snapshot, size, family, None, problem=str(e))
    context = config.get("max_position_embeddings")
    return LocalModel(name, snapshot, size, family, context if isinstance(context, int) else None, weights=weights)


def _gguf_files(repo) -> list[tuple[str, Path, int]]:
    """(path in the repo, path in a snapshot, bytes) of each GGUF model file of a cached repo, newest revision
    first where several hold one name; a vision projector (mmproj-*.gguf) is no model."""
    found: dict[str, tuple[str, Path, int]] = {}
    for revision in sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True):
        for file in revision.files:
            name = file.file_path.relative_to(revision.snapshot_path).as_posix()
            base = name.rsplit("/", 1)[-1].lower()
            if base.endswith(".gguf") and not base.startswith("mmproj") and name not in found:
                found[name] = (name, file.file_path, file.size_on_disk)
    return sorted(found.values())


def gguf_model_names(repo_id: str, files: list[str]) -> dict[str, str]:
    """{file: its library name}: org/name:LABEL where no other file of the repo says that label, else
    org/name:FILE."""
    labels = [label_from_name(f) for f in files]
    return {
        f: f"{repo_id}:{label if label is not None and labels.count(label) == 1 else f}"
        for f, label in zip(files, labels, strict=True)
    }


def list_local_models() -> list[LocalModel]:
    """The default model (when fetched), every cached transformers repo kvstudio can run and every GGUF file in
    the cache, by name; one whose files are corrupt is listed with its problem said, so the rest still show."""
    models: list[LocalModel] = []
    default = model_store.default_model_path()
    if default.is_file():
        models.append(_gguf_model(default, default.name, default.stat().st_size, is_default=True))
    try:
        repos = scan_cache_dir(cache_dir()).repos
    except CacheNotFound:
        repos = frozenset()
    for repo in sorted(repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model" or not repo.revisions:
            continue
        ggufs = _gguf_files(repo)
        latest = max(repo.revisions, key=lambda r: r.last_modified)
        model = _hf_model(latest.snapshot_path, repo.repo_id, repo.size_on_disk - sum(size for *_, size in ggufs))
        if model is not None:
            models.append(model)
        names = gguf_model_names(repo.repo_id, [name for name, _, _ in ggufs])
        models += [_gguf_model(path, names[name], size) for name, path, size in ggufs]
    return models


# ---------------------------------------------------------------------------------------------------- removing


def remove(name: str, force: bool = False) -> int:
    """Delete a model from the library: every cached revision of a Hub repo, one GGUF file of one
    (`org/name:Q4_K_M`, as the library names it), or (with force) the default GGUF file. Returns the bytes freed."""
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
    if ":" in name:
        model = next((m for m in list_local_models() if m.name == name), None)
        if model is None:
            raise HubError(f"no model {name} in the library (kvstudio models list shows what is there)")
        return _remove_gguf_file(repo_dir(name.partition(":")[0]), model.path)
    try:
        repos = scan_cache_dir(cache_dir()).repos
    except CacheNotFound:
        repos = frozenset()
    repo = next((r for r in repos if r.repo_type == "model" and r.repo_id == name), None)
    leftover = repo_dir(name) if "/" in name else None
    if repo is None and leftover is not None and leftover.is_dir():
        # only the .incomplete blobs of an interrupted pull: the cache scan skips such a folder
        size = sum(f.stat().st_size for f in leftover.rglob("*") if f.is_file() and not f.is_symlink())
        shutil.rmtree(leftover)
        return size
    if repo is None:
        raise HubError(f"no model {name} in the library (kvstudio models list shows what is there)")
    size = repo.size_on_disk
    # The repo's own folder holds its snapshots, refs and blobs (and any .incomplete ones): removing it leaves
    # nothing of the model. Not the cache's delete_revisions: it deletes by commit hash in every repo, and a
    # mirror of a repo shares its commits, so removing one would have removed the other too.
    shutil.rmtree(repo.repo_path, ignore_errors=True)
    return size


def _remove_gguf_file(repo: Path, path: Path) -> int:
    """Unlink one GGUF file from every snapshot of `repo` and delete its blob; a snapshot left empty goes with
    the refs naming it, and the repo folder when nothing of it is left."""
    snapshots = repo / "snapshots"
    relative = Path(*path.relative_to(snapshots).parts[1:])
    blobs = set()
    for snapshot in list(snapshots.iterdir()):
        link = snapshot / relative
        if link.is_symlink():
            blobs.add(link.resolve())
            link.unlink()
            for folder in link.parents:  # subfolders the file was alone in, up to the snapshot itself
                if folder == snapshots or any(folder.iterdir()):
                    break
                folder.rmdir()
        if not snapshot.exists():
            for ref in (repo / "refs").glob("**/*"):
                if ref.is_file() and ref.read_text().strip() == snapshot.name:
                    ref.unlink()
    still_linked = {link.resolve() for link in snapshots.rglob("*") if link.is_symlink()}
    freed = 0
    for blob in blobs - still_linked:
        if blob.is_file():
            freed += blob.stat().st_size
            blob.unlink()
    if not any(snapshots.iterdir()) and not any(repo.glob("kvstudio-pull*.json")):
        shutil.rmtree(repo)
    return freed
