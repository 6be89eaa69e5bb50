"""Every colour the window uses: light or dark as the system says (the Fusion style with a palette for the
system's colour scheme, redone when the scheme changes while the app runs), and the few fixed hues on top of it
(KV block states, the throughput chart's lines, status tones).

Qt follows the scheme by itself only where its platform theme does (Windows, macOS, some Linux desktops); the
Fusion style with an explicit palette looks the same everywhere. Widgets take every other colour from the palette
(ui/widgets/cards.py, block_map.py, throughput_chart.py), so they follow a switch without a restart.
"""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtGui import QColor, QGuiApplication, QPalette
from PySide6.QtWidgets import QApplication, QStyleFactory

from engine import BlockState

# The one accent: selections and highlights in both palettes, the used KV blocks, the running batch rows.
ACCENT = QColor("#3b82f6")

# KV block states: hues that stay distinct on light and dark backgrounds (and for red-green colour blindness:
# blue vs orange). Free blocks take their colour from the palette instead (free_color), so an empty pool looks
# calm in either theme.
BLOCK_COLORS = {
    BlockState.USED: ACCENT,
    BlockState.SHARED: QColor("#f59e0b"),
    BlockState.CACHED: QColor("#14b8a6"),
}
# The throughput chart's lines: two of the block map's hues, so the monitor page reads as one palette.
PROMPT_COLOR, GENERATION_COLOR = BLOCK_COLORS[BlockState.USED], BLOCK_COLORS[BlockState.SHARED]
# The usage chart's lines: KV usage in the used blocks' blue, running requests in teal, waiting ones in orange.
KV_USAGE_COLOR, RUNNING_COLOR, WAITING_COLOR = (
    BLOCK_COLORS[s] for s in (BlockState.USED, BlockState.CACHED, BlockState.SHARED)
)
# Status tones (a sentence, a verdict) as (on a light base, on a dark base): lighter where the base is dark.
TONES = {"ok": ("#16a34a", "#4ade80"), "warn": ("#b45309", "#fbbf24"), "error": ("#dc2626", "#f87171")}
# The batch table's row states (fixed: the table's model looks them up per cell, and a palette look-up there
# would cost a large batch's repaints dearly).
BATCH_STATUS_COLORS = {"running": ACCENT, "done": QColor("#2e9d57"), "failed": QColor("#d64541")}

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
    """Fusion's own light palette, or kvstudio's dark one; the accent is kvstudio's in both."""
    palette = QStyleFactory.create("Fusion").standardPalette()
    palette.setColor(QPalette.ColorRole.Highlight, ACCENT)
    palette.setColor(QPalette.ColorRole.HighlightedText, QColor("#ffffff"))
    if scheme != Qt.ColorScheme.Dark:
        return palette
    for role, colour in _DARK.items():
        palette.setColor(role, QColor(colour))
    for role in (QPalette.ColorRole.WindowText, QPalette.ColorRole.Text, QPalette.ColorRole.ButtonText):
        palette.setColor(QPalette.ColorGroup.Disabled, role, QColor(_DARK_DISABLED))
    return palette


def free_color(palette: QPalette) -> QColor:
    """A free KV block: the window colour nudged towards the text colour, a faint grey on light palettes, a lifted
    one on dark."""
    bg, fg = palette.color(QPalette.ColorRole.Window), palette.color(QPalette.ColorRole.WindowText)
    t = 0.16
    return QColor.fromRgbF(
        bg.redF() + (fg.redF() - bg.redF()) * t,
        bg.greenF() + (fg.greenF() - bg.greenF()) * t,
        bg.blueF() + (fg.blueF() - bg.blueF()) * t,
    )


def tone_color(tone: str) -> QColor:
    """The colour of a tone ("ok", "warn", "error") readable on the application palette's base."""
    light, dark = TONES[tone]
    return QColor(dark if QGuiApplication.palette().color(QPalette.ColorRole.Base).lightness() < 128 else light)


def follow_system_scheme(app: QApplication) -> None:
    """Use Fusion with the system's scheme now and whenever it changes."""
    app.setStyle("Fusion")
    hints = app.styleHints()
    app.setPalette(palette_for(hints.colorScheme()))
    hints.colorSchemeChanged.connect(lambda scheme: app.setPalette(palette_for(scheme)))
