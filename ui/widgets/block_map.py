"""The KV block map: one cell per physical KV block, coloured by state, with a legend of counts per state.

Cells are painted from a QImage with one pixel per block, scaled up without smoothing, so a repaint costs one
image draw whatever the block count: 100k blocks repaint in a few milliseconds, cheap enough for 10+ frames a second.
A cell's size is fractional: whole pixels would leave up to a row per row unused (a band under the map on a large
window), so neighbouring cells may differ by a pixel.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable

from PySide6.QtCore import QEvent, QLine, QPoint, QRect, QRectF, QSize, Qt
from PySide6.QtGui import QColor, QImage, QPainter, QPalette
from PySide6.QtWidgets import QFrame, QHBoxLayout, QLabel, QScrollArea, QSizePolicy, QToolTip, QVBoxLayout, QWidget

from engine import BlockMap, BlockState
from ui.theme import BLOCK_COLORS, free_color

STATE_NAMES = {
    BlockState.FREE: "free",
    BlockState.USED: "used",
    BlockState.SHARED: "shared",
    BlockState.CACHED: "cached",
}
_PAD = 4  # colour index of the cells after the last block, on the last row: transparent


class BlockGrid(QWidget):
    """The cells alone. Cells grow to fill the widget (up to MAX_CELL px) and shrink as blocks are added; below
    MIN_CELL px they stop shrinking and heightForWidth asks the enclosing scroll area for more height instead."""

    MIN_CELL = 3
    MAX_CELL = 40  # a pool of a few blocks is not drawn as a few huge squares
    GAP_FROM = 6  # cells this large or larger get a 1 px gap, so neighbours of one state still read as blocks

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._states = b""
        self._owners: dict[int, tuple[str, ...]] = {}
        self._hashes: dict[int, bytes] = {}
        self._image: QImage | None = None  # one pixel per cell, rebuilt lazily when states or columns change
        self._image_cols = 0
        policy = QSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        policy.setHeightForWidth(True)
        self.setSizePolicy(policy)

    def set_block_map(self, block_map: BlockMap) -> None:
        resized = len(block_map.states) != len(self._states)
        self._states, self._owners, self._hashes = block_map.states, block_map.owners, block_map.hashes
        self._image = None
        if resized:
            self.updateGeometry()
        self.update()

    def state_color(self, state: int) -> QColor:
        return free_color(self.palette()) if state == BlockState.FREE else BLOCK_COLORS[state]

    # ---- geometry ---------------------------------------------------------------------------------------------
    def cell_layout(self) -> tuple[float, int]:
        """(cell size in px, columns) for the current size: the largest square cell whose rows all fit the
        widget, at most MAX_CELL; at least MIN_CELL, rows past the height then scroll."""
        return fitted_cells(len(self._states), max(1, self.width()), self.height(), self.MIN_CELL, self.MAX_CELL)

    def block_at(self, pos: QPoint) -> int | None:
        cell, cols = self.cell_layout()
        col, row = int(pos.x() // cell), int(pos.y() // cell)
        if pos.x() < 0 or pos.y() < 0 or col >= cols:
            return None
        block = row * cols + col
        return block if block < len(self._states) else None

    def cell_rect(self, block: int) -> QRect:
        cell, cols = self.cell_layout()
        return QRectF((block % cols) * cell, (block // cols) * cell, cell, cell).toAlignedRect()

    def describe(self, block: int) -> str:
        """The tooltip: the block's state, the requests holding it (a request's forks counted, as they share its
        blocks too) and its prefix hash, shortened as git shortens commits: enough to tell prefixes apart."""
        lines = [f"block {block}: {STATE_NAMES[self._states[block]]}"]
        holders = Counter(self._owners.get(block, ()))
        if holders:
            names = [rid if n == 1 else f"{rid} ({n} sequences)" for rid, n in holders.items()]
            lines.append(("request " if len(names) == 1 else "requests ") + ", ".join(names))
        if (block_hash := self._hashes.get(block)) is not None:
            lines.append(f"prefix {block_hash.hex()[:8]}")
        return "\n".join(lines)

    def hasHeightForWidth(self) -> bool:
        return True

    def heightForWidth(self, width: int) -> int:
        # The least height that shows every block at the smallest cell size; the scroll area may give more.
        return math.ceil(len(self._states) / max(1, width // self.MIN_CELL)) * self.MIN_CELL

    def sizeHint(self) -> QSize:
        return QSize(480, 240)

    def minimumSizeHint(self) -> QSize:
        return QSize(self.MIN_CELL * 16, self.MIN_CELL * 4)

    # ---- painting ---------------------------------------------------------------------------------------------
    def _build_image(self, cols: int) -> QImage:
        n = len(self._states)
        rows = math.ceil(n / cols)
        # One byte per cell is exactly an 8-bit indexed image; pad the last row with the transparent index.
        data = self._states + bytes([_PAD]) * (rows * cols - n)
        indexed = QImage(data, cols, rows, cols, QImage.Format.Format_Indexed8)
        table = [0] * (_PAD + 1)
        for state in STATE_NAMES:
            table[state] = self.state_color(state).rgba()
        indexed.setColorTable(table)
        # Converting copies the pixels out of `data` (which QImage only borrows) into the format QPainter
        # scales fastest.
        return indexed.convertToFormat(QImage.Format.Format_ARGB32_Premultiplied)

    def paintEvent(self, event) -> None:
        if not self._states:
            return
        cell, cols = self.cell_layout()
        if self._image is None or self._image_cols != cols:
            self._image, self._image_cols = self._build_image(cols), cols
        rows = self._image.height()
        painter = QPainter(self)
        # Without SmoothPixmapTransform the scale is nearest-neighbour: crisp cells.
        painter.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform, False)
        painter.drawImage(QRectF(0, 0, cols * cell, rows * cell), self._image)
        if cell >= self.GAP_FROM:
            # Gaps are background-coloured lines over the cells' last pixel row and column, on the same whole
            # pixels the scaled image puts the cells' edges.
            painter.setPen(self.palette().color(QPalette.ColorRole.Window))
            w, h = round(cols * cell), round(rows * cell)
            painter.drawLines(
                [QLine(round(c * cell) - 1, 0, round(c * cell) - 1, h) for c in range(1, cols + 1)]
                + [QLine(0, round(r * cell) - 1, w, round(r * cell) - 1) for r in range(1, rows + 1)]
            )
        painter.end()

    def event(self, event: QEvent) -> bool:
        if event.type() == QEvent.Type.ToolTip:
            block = self.block_at(event.pos())
            if block is None:
                QToolTip.hideText()
                event.ignore()
            else:
                QToolTip.showText(event.globalPos(), self.describe(block), self, self.cell_rect(block))
            return True
        return super().event(event)

    def changeEvent(self, event: QEvent) -> None:
        if event.type() == QEvent.Type.PaletteChange:
            self._image = None  # the free colour follows the palette
            self.update()
        super().changeEvent(event)


def fitted_cells(n: int, width: int, height: int, min_cell: float, max_cell: float) -> tuple[float, int]:
    """(cell size, columns) of the largest square cells, at most max_cell, that lay n cells out in rows of
    `columns` within width x height; at least min_cell (the rows then run past the height)."""
    if n == 0:
        return max_cell, max(1, int(width / max_cell))
    # With r rows the cells are min(width / ceil(n / r), height / r): the first term grows with r, the second
    # shrinks, so the best r is where they cross, near sqrt(n * height / width).
    near = math.sqrt(n * height / width)
    best = 0.0
    for rows in range(max(1, int(near) - 2), int(near) + 3):
        best = max(best, min(width / math.ceil(n / rows), height / rows))
    cell = min(max(best, min_cell), max_cell, width)
    # A cell of exactly width / k must give k columns: a float quotient may land a hair under k.
    return cell, max(1, int(width / cell + 1e-9))


class Swatch(QWidget):
    """A small rounded square in a colour asked for at each paint, so it follows palette changes."""

    def __init__(self, color: Callable[[], QColor]) -> None:
        super().__init__()
        self._color = color
        self.setFixedSize(12, 12)

    def paintEvent(self, event) -> None:
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        painter.setPen(Qt.PenStyle.NoPen)
        painter.setBrush(self._color())
        painter.drawRoundedRect(QRect(0, 0, 12, 12), 3, 3)
        painter.end()


class BlockMapWidget(QWidget):
    """The legend (a swatch and a count per state) above the block grid, which scrolls when blocks outnumber
    what fits at the smallest cell size. Hovering a cell shows its state, the requests holding it and its
    prefix hash."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.grid = BlockGrid()
        self.count_labels: dict[int, QLabel] = {}
        self._counts: dict[int, int] = {}

        legend = QHBoxLayout()
        legend.setSpacing(6)
        for state in (BlockState.USED, BlockState.SHARED, BlockState.CACHED, BlockState.FREE):
            label = QLabel()
            self.count_labels[state] = label
            legend.addWidget(Swatch(lambda state=state: self.grid.state_color(state)))
            legend.addWidget(label)
            legend.addSpacing(14)
        legend.addStretch(1)
        self.total_label = QLabel()
        self.total_label.setForegroundRole(QPalette.ColorRole.PlaceholderText)
        legend.addWidget(self.total_label)

        scroll = QScrollArea()
        scroll.setWidget(self.grid)
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        scroll.viewport().setAutoFillBackground(False)  # empty cells and the last row's tail show the page

        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(10)
        layout.addLayout(legend)
        layout.addWidget(scroll, 1)
        self.set_block_map(BlockMap(states=b"", owners={}))

    def set_block_map(self, block_map: BlockMap) -> None:
        self.grid.set_block_map(block_map)
        for state, label in self.count_labels.items():
            count = block_map.states.count(state)  # bytes.count: a C loop, ~20 us per 100k blocks
            if self._counts.get(state) != count:
                self._counts[state] = count
                label.setText(f"{STATE_NAMES[state].capitalize()} {count:,}")
        self.total_label.setText(f"{len(block_map.states):,} blocks")
