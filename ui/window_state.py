"""The window's size, position and splitters kept across restarts as base64 text in the settings (JSON) file.

Restoring trusts nothing from the file: text that is not base64 or not a state Qt saved is ignored (the window
keeps its default layout), and a geometry saved on a screen that is gone (a larger monitor unplugged) is fitted
onto the screen the window opens on rather than left off it.
"""

from __future__ import annotations

import binascii

from PySide6.QtCore import QByteArray, QRect
from PySide6.QtWidgets import QMainWindow, QSplitter


def encode(state: QByteArray) -> str:
    return bytes(state.toBase64()).decode("ascii")


def decode(text: object) -> QByteArray | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        return QByteArray(binascii.a2b_base64(text.encode("ascii"), strict_mode=True))
    except (binascii.Error, UnicodeEncodeError):
        return None


def restore_geometry(window: QMainWindow, text: str) -> bool:
    """Restore the geometry saved as `text`; False where there was none readable (the window keeps its own)."""
    state = decode(text)
    return state is not None and window.restoreGeometry(state)


def fit_on_screen(window: QMainWindow) -> None:
    """Shrink the shown window to its screen's free area where it is larger, and move it wholly inside it. Qt's
    own restoreGeometry moves a window back onto a screen, but can leave its frame a few pixels past the edge."""
    room = window.screen().availableGeometry()
    frame, inner = window.frameGeometry(), window.geometry()
    # The frame's margins around the window's contents.
    left, top = inner.left() - frame.left(), inner.top() - frame.top()
    extra_w, extra_h = frame.width() - inner.width(), frame.height() - inner.height()
    width = min(inner.width(), room.width() - extra_w)
    height = min(inner.height(), room.height() - extra_h)
    x = min(max(inner.x(), room.left() + left), room.right() + 1 - (width + extra_w) + left)
    y = min(max(inner.y(), room.top() + top), room.bottom() + 1 - (height + extra_h) + top)
    if QRect(x, y, width, height) != inner:
        window.setGeometry(x, y, width, height)


def splitter_states(splitters: dict[str, QSplitter]) -> dict[str, str]:
    return {name: encode(splitter.saveState()) for name, splitter in splitters.items()}


def restore_splitters(splitters: dict[str, QSplitter], states: dict) -> None:
    for name, splitter in splitters.items():
        state = decode(states.get(name))
        if state is not None:
            splitter.restoreState(state)
