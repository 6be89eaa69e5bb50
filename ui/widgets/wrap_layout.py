"""A row of widgets that wraps: side by side while the width holds them at their size hints, on more rows when it
does not (the monitor's cards on a narrow window). Each row's widgets share its width by their stretch and take the
row's height; the layout's height follows its width (heightForWidth), so a scroll area around it knows its height.
"""

from __future__ import annotations

from PySide6.QtCore import QRect, QSize, Qt
from PySide6.QtWidgets import QLayout, QLayoutItem, QWidget, QWidgetItem


class WrapLayout(QLayout):
    def __init__(self, parent: QWidget | None = None, spacing: int = 12) -> None:
        super().__init__(parent)
        self._items: list[QLayoutItem] = []
        self._stretches: list[int] = []
        self.setSpacing(spacing)
        self.setContentsMargins(0, 0, 0, 0)

    def add_widget(self, widget: QWidget, stretch: int = 1) -> None:
        self.addChildWidget(widget)
        self._items.append(QWidgetItem(widget))
        self._stretches.append(stretch)
        self.invalidate()

    # ---- QLayout ---------------------------------------------------------------------------------------------
    def addItem(self, item: QLayoutItem) -> None:
        self._items.append(item)
        self._stretches.append(1)

    def count(self) -> int:
        return len(self._items)

    def itemAt(self, index: int) -> QLayoutItem | None:
        return self._items[index] if 0 <= index < len(self._items) else None

    def takeAt(self, index: int) -> QLayoutItem | None:
        if not 0 <= index < len(self._items):
            return None
        del self._stretches[index]
        return self._items.pop(index)

    def expandingDirections(self) -> Qt.Orientation:
        return Qt.Orientation.Horizontal

    def hasHeightForWidth(self) -> bool:
        return True

    def heightForWidth(self, width: int) -> int:
        return self._place(QRect(0, 0, width, 0), move=False)

    def sizeHint(self) -> QSize:
        """All on one row."""
        hints = [item.sizeHint() for item in self._items]
        width = sum(h.width() for h in hints) + self.spacing() * max(0, len(hints) - 1)
        return QSize(width, max((h.height() for h in hints), default=0)) + self._margin_size()

    def minimumSize(self) -> QSize:
        """As narrow as the widest widget's minimum, as low as the tallest's: the height a width really needs is
        heightForWidth's (a minimum height of one widget a row would hold a scroll area that tall at any width)."""
        sizes = [item.minimumSize() for item in self._items]
        return QSize(max((s.width() for s in sizes), default=0), max((s.height() for s in sizes), default=0)) + (
            self._margin_size()
        )

    def setGeometry(self, rect: QRect) -> None:
        super().setGeometry(rect)
        self._place(rect, move=True)

    # ---- placing ---------------------------------------------------------------------------------------------
    def _margin_size(self) -> QSize:
        m = self.contentsMargins()
        return QSize(m.left() + m.right(), m.top() + m.bottom())

    def _rows(self, width: int) -> list[list[int]]:
        """The items' indexes row by row: as many as fit at their size hints (always at least one)."""
        rows: list[list[int]] = []
        used = 0
        for i, item in enumerate(self._items):
            need = item.sizeHint().width()
            if rows and used + self.spacing() + need <= width:
                rows[-1].append(i)
                used += self.spacing() + need
            else:
                rows.append([i])
                used = need
        return rows

    def _place(self, rect: QRect, move: bool) -> int:
        """Lay the items out in `rect` (when `move`); returns the height they take."""
        area = rect.marginsRemoved(self.contentsMargins())
        y = area.y()
        for row in self._rows(area.width()):
            height = max(self._items[i].sizeHint().height() for i in row)
            if move:
                self._place_row(row, area.x(), y, area.width(), height)
            y += height + self.spacing()
        return y - self.spacing() - area.y() + self._margin_size().height() if self._items else 0

    def _place_row(self, row: list[int], x: int, y: int, width: int, height: int) -> None:
        """The row's width beyond the items' size hints is shared by their stretch factors; an item alone on its
        row takes the width, even below its size hint."""
        if len(row) == 1:
            self._items[row[0]].setGeometry(QRect(x, y, width, height))
            return
        hints = [self._items[i].sizeHint().width() for i in row]
        spare = max(0, width - sum(hints) - self.spacing() * (len(row) - 1))
        total = sum(self._stretches[i] for i in row) or 1
        for i, hint in zip(row, hints):
            w = hint + spare * self._stretches[i] // total
            self._items[i].setGeometry(QRect(x, y, w, height))
            x += w + self.spacing()
