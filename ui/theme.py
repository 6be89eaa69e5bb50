"""Light or dark, as the system says: the Fusion style with a palette for the system's colour scheme, redone
when the scheme changes while the app runs.

Qt follows the scheme by itself only where its platform theme does (Windows, macOS, some Linux desktops); the
Fusion style with an explicit palette looks the same everywhere. Widgets take every colour from the palette
(ui/widgets/cards.py, block_map.py, throughput_chart.py), so they follow a switch without a restart.
"""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtGui import QColor, QPalette
from PySide6.QtWidgets import QApplication, QStyleFactory

# (role, colour) for the dark palette. Fields and cards (Base) sit lighter than the window: Fusion draws outlines
# darker than the window, which would vanish against a darker field. The disabled group dims text so greyed-out
# buttons read as such.
_DARK = {
    QPalette.ColorRole.Window: "#26282c",
    QPalette.ColorRole.WindowText: "#e8eaed",
    QPalette.ColorRole.Base: "#33363b",
    QPalette.ColorRole.AlternateBase: "#393c42",
    QPalette.ColorRole.Text: "#e8eaed",
    QPalette.ColorRole.Button: "#3d4046",
    QPalette.ColorRole.ButtonText: "#e8eaed",
    QPalette.ColorRole.BrightText: "#ffffff",
    QPalette.ColorRole.Highlight: "#3b82f6",
    QPalette.ColorRole.HighlightedText: "#ffffff",
    QPalette.ColorRole.ToolTipBase: "#2b2d31",
    QPalette.ColorRole.ToolTipText: "#e8eaed",
    QPalette.ColorRole.PlaceholderText: "#8a8f98",
    QPalette.ColorRole.Link: "#7aa7ff",
    QPalette.ColorRole.Light: "#50535a",
    QPalette.ColorRole.Midlight: "#44474d",
    QPalette.ColorRole.Mid: "#5f636b",
    QPalette.ColorRole.Dark: "#1a1b1e",
    QPalette.ColorRole.Shadow: "#000000",
}
_DARK_DISABLED = "#6b7078"


def palette_for(scheme: Qt.ColorScheme) -> QPalette:
    """Fusion's own light palette, or kvstudio's dark one."""
    palette = QStyleFactory.create("Fusion").standardPalette()
    if scheme != Qt.ColorScheme.Dark:
        return palette
    for role, colour in _DARK.items():
        palette.setColor(role, QColor(colour))
    for role in (QPalette.ColorRole.WindowText, QPalette.ColorRole.Text, QPalette.ColorRole.ButtonText):
        palette.setColor(QPalette.ColorGroup.Disabled, role, QColor(_DARK_DISABLED))
    return palette


def follow_system_scheme(app: QApplication) -> None:
    """Use Fusion with the system's scheme now and whenever it changes."""
    app.setStyle("Fusion")
    hints = app.styleHints()
    app.setPalette(palette_for(hints.colorScheme()))
    hints.colorSchemeChanged.connect(lambda scheme: app.setPalette(palette_for(scheme)))
