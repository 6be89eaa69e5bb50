"""The desktop app's settings: a small JSON file in the platform's config folder, written atomically.

A missing or unreadable file gives the defaults (the app must start whatever the disk holds); writes go to a
temporary file in the same folder and replace the old one in one step, so a crash never leaves half a file and a
write that fails (a full disk) leaves the old file as it was, raising SettingsError in words.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import platformdirs

CONFIG_DIR_ENV = "KVSTUDIO_CONFIG_DIR"
logger = logging.getLogger(__name__)


class SettingsError(RuntimeError):
    """The settings could not be saved; the file on disk still holds the settings saved before."""


@dataclass
class Settings:
    last_model: str | None = None  # loaded at start-up (None: the default model)
    engine_options: dict = field(default_factory=dict)  # LLM(...) keyword arguments the user chose
    last_page: int = 0  # the window's page when it closed
    pages: dict = field(default_factory=dict)  # each page's own fields by page name ("chat": {...})
    # Qt's saved window geometry and splitter states (by page name), as base64 text: the file is JSON.
    window_geometry: str = ""
    splitters: dict = field(default_factory=dict)
    # A remote OpenAI-compatible endpoint for chat and batch; the key is kept in this file, which only its owner
    # can read (mkstemp creates it 0600 and the replace keeps that).
    remote_url: str = ""
    remote_api_key: str = ""
    remote_model: str = ""
    use_remote: bool = False


def config_dir() -> Path:
    """$KVSTUDIO_CONFIG_DIR when set, else the platform's user config folder."""
    override = os.environ.get(CONFIG_DIR_ENV)
    return Path(override).expanduser() if override else Path(platformdirs.user_config_dir("kvstudio"))


def default_path() -> Path:
    return config_dir() / "settings.json"


def load_settings(path: Path | None = None) -> Settings:
    path = path or default_path()
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return Settings()
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        logger.warning("ignoring unreadable settings %s: %s", path, e)
        return Settings()
    if not isinstance(raw, dict):
        logger.warning("ignoring settings %s: not a JSON object", path)
        return Settings()
    # A value of the wrong type (a hand edit, an older version) falls back to its default, field by field.
    settings = Settings()
    for f in fields(Settings):
        if f.name not in raw:
            continue
        value, default = raw[f.name], getattr(settings, f.name)
        expected = str if f.name == "last_model" else type(default)
        if (value is None and f.name == "last_model") or type(value) is expected:
            setattr(settings, f.name, value)
        else:
            logger.warning("ignoring setting %s=%r in %s: not a %s", f.name, value, path, expected.__name__)
    return settings


def save_settings(settings: Settings, path: Path | None = None) -> None:
    """Write `settings` to `path` whole or not at all; raises SettingsError saying why it could not."""
    path = path or default_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(json.dumps(asdict(settings), indent=2), path)
    except OSError as e:
        reason = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise SettingsError(f"cannot save the settings to {path}: {reason}; it keeps the settings saved before") from e


def _write_atomically(text: str, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
