"""Light and dark: the window follows the system's colour scheme when it changes, and the pages' own colours
(the block map's free cells) follow the palette."""

from __future__ import annotations

import pytest
from PySide6.QtCore import Qt
from PySide6.QtGui import QPalette
from PySide6.QtWidgets import QApplication

from engine import BlockState
from ui.theme import ACCENT, BATCH_STATUS_COLORS, BLOCK_COLORS, follow_system_scheme, free_color, palette_for


@pytest.fixture
def app(qapp):
    style, palette = qapp.style().name(), qapp.palette()
    yield qapp
    qapp.styleHints().colorSchemeChanged.disconnect()
    qapp.setStyle(style)
    qapp.setPalette(palette)


def lightness(palette: QPalette, role: QPalette.ColorRole) -> float:
    return palette.color(role).lightnessF()


def test_the_dark_palette_is_dark_with_readable_text_and_visible_fields():
    dark, light = palette_for(Qt.ColorScheme.Dark), palette_for(Qt.ColorScheme.Light)
    window = QPalette.ColorRole.Window
    assert lightness(dark, window) < 0.25 and lightness(light, window) > 0.75
    assert lightness(dark, QPalette.ColorRole.WindowText) > 0.85 and lightness(dark, QPalette.ColorRole.Text) > 0.85
    # Fusion outlines fields in the window colour darkened; a field darker than that would lose its frame.
    assert lightness(dark, QPalette.ColorRole.Base) > lightness(dark, window)
    disabled = dark.color(QPalette.ColorGroup.Disabled, QPalette.ColorRole.ButtonText).lightnessF()
    assert disabled < lightness(dark, QPalette.ColorRole.ButtonText)


def test_the_app_follows_a_scheme_change_while_it_runs(app: QApplication):
    follow_system_scheme(app)
    assert app.style().name().lower() == "fusion"
    app.styleHints().colorSchemeChanged.emit(Qt.ColorScheme.Dark)
    assert app.palette().color(QPalette.ColorRole.Window) == palette_for(Qt.ColorScheme.Dark).color(
        QPalette.ColorRole.Window
    )
    dark_free = free_color(app.palette())
    app.styleHints().colorSchemeChanged.emit(Qt.ColorScheme.Light)
    assert lightness(app.palette(), QPalette.ColorRole.Window) > 0.75
    assert free_color(app.palette()).lightnessF() > dark_free.lightnessF()


def test_one_accent_colour_in_both_palettes_and_on_the_pages():
    for scheme in (Qt.ColorScheme.Light, Qt.ColorScheme.Dark):
        palette = palette_for(scheme)
        assert palette.color(QPalette.ColorRole.Highlight) == ACCENT
        assert palette.color(QPalette.ColorRole.HighlightedText).lightnessF() == 1.0
    assert BLOCK_COLORS[BlockState.USED] == ACCENT and BATCH_STATUS_COLORS["running"] == ACCENT
