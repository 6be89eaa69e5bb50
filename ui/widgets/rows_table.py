"""Read-only tables of dataclass rows (the models page's library, Hub results and a repo's GGUF files): a
QAbstractTableModel over columns that say how to show each row, testable without a window, and the view that shows
one."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from PySide6.QtCore import QAbstractTableModel, QModelIndex, QObject, QSize, Qt
from PySide6.QtGui import QFont
from PySide6.QtWidgets import QAbstractItemView, QHeaderView, QStyledItemDelegate, QTableView

from app.library.machine import ModelFit
from app.units import byte_size
from ui.theme import tone_color

FIT_TONES = {"fits": "ok", "tight": "warn", "too big": "error"}
ROW_HEIGHT = 28
CELL_GAP = 6  # px added on each side of a cell's content when columns are sized to it
ALIGN = {
    side: int(flag | Qt.AlignmentFlag.AlignVCenter)
    for side, flag in (
        ("left", Qt.AlignmentFlag.AlignLeft),
        ("right", Qt.AlignmentFlag.AlignRight),
        ("center", Qt.AlignmentFlag.AlignHCenter),
    )
}
_ROOT = QModelIndex()  # the invisible parent of every row


def human_count(n: int) -> str:
    """A parameter count as model names say it: 134515008 -> '135M', 1711376384 -> '1.7B'."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            value = n / scale
            return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"
    return str(n)


@dataclass(frozen=True)
class Column:
    title: str
    text: Callable[[Any], str]
    align: str = "left"  # an ALIGN key: "right" for figures, the heading too
    tooltip: Callable[[Any], str | None] | None = None
    tone: Callable[[Any], str | None] | None = (
        None  # a ui.theme.TONES key colouring the text, or None for the palette's
    )
    bold: Callable[[Any], bool] | None = None


class RowsModel(QAbstractTableModel):
    """Read-only rows of dataclasses shown through `columns`; row(i) gives the dataclass back."""

    def __init__(self, columns: Sequence[Column], parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.columns = tuple(columns)
        self._rows: list = []

    def set_rows(self, rows: Sequence) -> None:
        self.beginResetModel()
        self._rows = list(rows)
        self.endResetModel()

    def row(self, i: int):
        return self._rows[i]

    def rows(self) -> list:
        return list(self._rows)

    def rowCount(self, parent: QModelIndex = _ROOT) -> int:
        return 0 if parent.isValid() else len(self._rows)

    def columnCount(self, parent: QModelIndex = _ROOT) -> int:
        return 0 if parent.isValid() else len(self.columns)

    def data(self, index: QModelIndex, role: int = Qt.DisplayRole):
        if not index.isValid():
            return None
        column, row = self.columns[index.column()], self._rows[index.row()]
        if role == Qt.DisplayRole:
            return column.text(row)
        if role == Qt.ToolTipRole:
            return None if column.tooltip is None else column.tooltip(row)
        if role == Qt.ForegroundRole:
            tone = None if column.tone is None else column.tone(row)
            return None if tone is None else tone_color(tone)
        if role == Qt.TextAlignmentRole:
            return ALIGN[column.align]
        if role == Qt.FontRole and column.bold is not None and column.bold(row):
            font = QFont()
            font.setBold(True)
            return font
        return None

    def headerData(self, section: int, orientation: Qt.Orientation, role: int = Qt.DisplayRole):
        if orientation != Qt.Horizontal:
            return None
        if role == Qt.DisplayRole:
            return self.columns[section].title
        if role == Qt.TextAlignmentRole:  # headings line up with their column's figures
            return ALIGN[self.columns[section].align]
        return None


def fit_column(fit_of: Callable[[Any], ModelFit | None], unknown: Callable[[Any], str | None] | None = None) -> Column:
    """Whether a row's model fits this machine's memory: the verdict, coloured, with the sentences as tooltip;
    unknown(row) says why there is none, where fit_of gives None."""
    return Column(
        "Memory",
        lambda r: "—" if (fit := fit_of(r)) is None else fit.verdict,
        align="center",
        tooltip=lambda r: (unknown(r) if unknown else None) if (fit := fit_of(r)) is None else fit.message,
        tone=lambda r: None if (fit := fit_of(r)) is None else FIT_TONES[fit.verdict],
    )


def _family(model) -> str:
    # "LlamaForCausalLM" -> "Llama": every runnable model is a causal LM, the suffix says nothing
    return "can't load" if model.problem is not None else model.family.removesuffix("ForCausalLM")


def library_model(fit_of: Callable[[Any], ModelFit | None], parent: QObject | None = None) -> RowsModel:
    """Rows of LocalModel; fit_of(model) is its memory verdict (None: unknown)."""

    def problem(m) -> str | None:
        return None if m.problem is None else f"Cannot be loaded: {m.problem}"

    return RowsModel(
        [
            # the default model in bold rather than with a "(default)" that would crowd out its long file name
            Column(
                "Name",
                lambda m: m.name,
                bold=lambda m: m.is_default,
                tooltip=lambda m: problem(m) or ("kvstudio's default model: " if m.is_default else "") + str(m.path),
                tone=lambda m: None if m.problem is None else "error",
            ),
            Column("Family", _family, tooltip=problem, tone=lambda m: None if m.problem is None else "error"),
            Column(
                "Quant",
                lambda m: m.quant or "—",
                tooltip=lambda m: None if m.quant is None else f"Its weights are stored as {m.quant}",
            ),
            Column(
                "Params",
                lambda m: "—" if m.num_params is None else human_count(m.num_params),
                align="right",
                tooltip=lambda m: None if m.num_params is None else f"{m.num_params:,} parameters",
            ),
            Column("Context", lambda m: "—" if m.context_length is None else f"{m.context_length:,}", align="right"),
            Column("Size", lambda m: byte_size(m.size), align="right"),
            fit_column(fit_of),
        ],
        parent,
    )


FORMAT_NAMES = {"safetensors": "safetensors", "gguf": "GGUF"}


def _unknown_fit(model) -> str | None:
    if model.is_gguf:
        return "Select it to see its GGUF files: each quantization needs memory of its own"
    return None


def results_model(fit_of: Callable[[Any], ModelFit | None], parent: QObject | None = None) -> RowsModel:
    """Rows of HubModel; fit_of(model) is its memory verdict (None: the Hub does not say its size, or a repo of GGUF
    files, whose verdicts its files table gives)."""
    return RowsModel(
        [
            Column("Name", lambda m: m.name, tooltip=lambda m: m.name),
            Column(
                "Format",
                lambda m: " + ".join(FORMAT_NAMES[f] for f in m.formats),
                tooltip=lambda m: "GGUF files: choose one to download" if m.is_gguf else "A model to download whole",
            ),
            Column(
                "Params",
                lambda m: "—" if m.num_params is None else human_count(m.num_params),
                align="right",
                tooltip=lambda m: None if m.num_params is None else f"{m.num_params:,} parameters",
            ),
            Column("Downloads", lambda m: f"{m.downloads:,}", align="right"),
            Column("Likes", lambda m: f"{m.likes:,}", align="right"),
            Column(
                "Size",
                lambda m: "—" if m.size is None else byte_size(m.size),
                align="right",
                tooltip=lambda m: "Everything the repo stores on the Hub; a download fetches only what kvstudio runs",
            ),
            fit_column(fit_of, _unknown_fit),
        ],
        parent,
    )


def files_model(
    fit_of: Callable[[Any], ModelFit | None],
    kind_of: Callable[[Any], tuple[str, str | None, bool]],
    parent: QObject | None = None,
) -> RowsModel:
    """Rows of GGUFChoice (app/library/gguf_files.py); fit_of(choice) is its memory verdict (None: it cannot be
    loaded), kind_of(choice) how the engine holds its weights: (in a few words, the sentence, whether that costs
    memory a quantized type would not: a type kvstudio cannot keep quantized)."""

    def name(c) -> str:
        more = len(c.parts) - 1
        return c.name if not more else f"{c.name} (+{more} part{'s' if more > 1 else ''})"

    def tip(c) -> str:
        if c.problem is not None:
            return f"{c.name} {c.problem}."
        return f"{c.name}\nsha256 {c.sha256}" if c.sha256 else c.name

    return RowsModel(
        [
            Column("File", name, tooltip=tip, tone=lambda c: None if c.problem is None else "error"),
            Column("Quant", lambda c: c.label or "?", tooltip=lambda c: kind_of(c)[1]),
            Column(
                "Loads as",
                lambda c: "—" if c.problem is not None else kind_of(c)[0],
                tooltip=lambda c: kind_of(c)[1] if c.problem is None else tip(c),
                tone=lambda c: "warn" if c.problem is None and kind_of(c)[2] else None,
            ),
            Column("Size", lambda c: byte_size(c.size), align="right", tooltip=lambda c: f"{c.size:,} bytes"),
            Column(
                "Memory",
                lambda c: "can't load" if (fit := fit_of(c)) is None else fit.verdict,
                align="center",
                tooltip=lambda c: f"{c.name} {c.problem}." if (fit := fit_of(c)) is None else fit.message,
                tone=lambda c: "error" if (fit := fit_of(c)) is None else FIT_TONES[fit.verdict],
            ),
        ],
        parent,
    )


# Cells and headings are drawn as usual but sized CELL_GAP wider on each side: the room between a right-aligned
# figure and the column before it. (A style sheet's padding would do it too, but freezes the header's colours at
# polish time and misses a switch between light and dark.) The style's own margins keep a heading over its column.


class _SpacedCells(QStyledItemDelegate):
    def sizeHint(self, option, index) -> QSize:
        size = super().sizeHint(option, index)
        return QSize(size.width() + 2 * CELL_GAP, size.height())


class _SpacedHeader(QHeaderView):
    def sectionSizeFromContents(self, logical_index: int) -> QSize:
        size = super().sectionSizeFromContents(logical_index)
        return QSize(size.width() + 2 * CELL_GAP, size.height())


NAME_FLOOR = 160  # px: narrower than this the name column stops giving way, and the table scrolls sideways


class RowsView(QTableView):
    """A read-only table of whole rows, one selected at a time. The name column (the first) takes the width the
    others leave; with too little, it elides in the middle, where model ids differ least (an org prefix, a
    -Instruct or quantisation suffix both stay), down to NAME_FLOOR, and past that the table scrolls sideways
    rather than hide a column. With `whole_names` the view asks its layout for the width that shows every name
    whole (the library: a file name's end is its quantisation); without, for Qt's default (Hub results, which
    can be long and come and go, take the width their card is given)."""

    def __init__(self, model: RowsModel, whole_names: bool = False) -> None:
        super().__init__()
        self.whole_names = whole_names
        self.setHorizontalHeader(_SpacedHeader(Qt.Horizontal, self))
        self.setItemDelegate(_SpacedCells(self))
        self.setModel(model)
        self.verticalHeader().hide()
        self.verticalHeader().setSectionResizeMode(QHeaderView.Fixed)
        self.verticalHeader().setDefaultSectionSize(ROW_HEIGHT)
        self.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.setSelectionMode(QAbstractItemView.SingleSelection)
        self.setTabKeyNavigation(False)  # Tab goes on to the next control; the arrows move between rows
        self.setAlternatingRowColors(True)
        self.setShowGrid(False)
        self.setWordWrap(False)
        self.setTextElideMode(Qt.ElideMiddle)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarAsNeeded)  # only past NAME_FLOOR
        self.setHorizontalScrollMode(QAbstractItemView.ScrollPerPixel)  # per column, a short scroll hid nothing
        header = self.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeToContents)
        header.setSectionResizeMode(0, QHeaderView.Fixed)  # sized by _fit_name_column
        header.setMinimumSectionSize(56)
        header.setFixedHeight(ROW_HEIGHT)
        header.setHighlightSections(False)
        header.sectionResized.connect(self._on_section_resized)
        model.modelReset.connect(self._rows_changed)

    def names_width(self) -> int:
        """The name column's width with every name (and its heading) whole."""
        return max(self.sizeHintForColumn(0), self.horizontalHeader().sectionSizeHint(0))

    def _others_width(self) -> int:
        header = self.horizontalHeader()
        return sum(header.sectionSize(c) for c in range(1, header.count()))

    def _fit_name_column(self) -> None:
        floor = min(self.names_width(), NAME_FLOOR)
        self.horizontalHeader().resizeSection(0, max(self.viewport().width() - self._others_width(), floor))

    def _on_section_resized(self, column: int, _old: int, _new: int) -> None:
        if column != 0:  # another column grew or shrank with its contents: the name column gives or takes it
            self._fit_name_column()

    def _rows_changed(self) -> None:
        self.updateGeometry()  # longer names want a wider view: the layout asks sizeHint again
        self._fit_name_column()

    def resizeEvent(self, event) -> None:
        super().resizeEvent(event)
        self._fit_name_column()

    def sizeHint(self) -> QSize:
        hint = super().sizeHint()
        if not self.whole_names:
            return hint
        header = self.horizontalHeader()
        columns = sum(max(self.sizeHintForColumn(c), header.sectionSizeHint(c)) for c in range(header.count()))
        frame = 2 * self.frameWidth() + self.verticalScrollBar().sizeHint().width()
        return QSize(columns + frame, hint.height())
