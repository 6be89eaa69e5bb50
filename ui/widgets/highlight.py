"""Fenced code blocks of a document Qt rendered from markdown, shaded apart from the prose and coloured by
Pygments: Qt's markdown reader keeps each block's language (BlockCodeLanguage) but colours nothing itself.

The colours go into the document as character formats, so they are inline styles in its HTML, and a message
re-rendered (a reply growing, the theme switching) is coloured again from scratch."""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache, lru_cache

from pygments.lexer import Lexer
from pygments.lexers import get_lexer_by_name
from pygments.styles import get_style_by_name
from pygments.token import Text
from pygments.util import ClassNotFound
from PySide6.QtGui import QColor, QFont, QTextBlock, QTextCharFormat, QTextCursor, QTextDocument, QTextFormat

# Pygments styles whose colours read on the light and the dark palette's code shade (ui/theme.py).
LIGHT_STYLE, DARK_STYLE = "default", "github-dark"


def highlight_code(document: QTextDocument, shade: QColor, dark: bool) -> None:
    """Give each fenced code block `shade` as background and, where its language is one Pygments knows, the
    colours of its tokens in the light or dark style."""
    style = DARK_STYLE if dark else LIGHT_STYLE
    cursor = QTextCursor(document)
    cursor.beginEditBlock()  # one relayout for all the formats below, not one per token
    for blocks, language in _code_blocks(document):
        for block in blocks:
            fmt = block.blockFormat()
            fmt.setBackground(shade)
            QTextCursor(block).setBlockFormat(fmt)
        start = blocks[0].position()
        # The code's lines are consecutive blocks, so an offset into their text joined by newlines is an offset
        # from the first block's position.
        for offset, length, token in _tokens(language, "\n".join(b.text() for b in blocks)):
            fmt = _format(style, token)
            if fmt is not None:
                cursor.setPosition(start + offset)
                cursor.setPosition(start + offset + length, QTextCursor.MoveMode.KeepAnchor)
                cursor.mergeCharFormat(fmt)
    cursor.endEditBlock()


def _code_blocks(document: QTextDocument) -> Iterator[tuple[list[QTextBlock], str]]:
    """Each fenced code block as (its lines' text blocks, its language or "")."""
    run: list[QTextBlock] = []
    block = document.begin()
    while block.isValid():
        fmt = block.blockFormat()
        if fmt.hasProperty(QTextFormat.Property.BlockCodeFence):
            run.append(block)
        elif run:
            yield run, run[0].blockFormat().stringProperty(QTextFormat.Property.BlockCodeLanguage)
            run = []
        block = block.next()
    if run:
        yield run, run[0].blockFormat().stringProperty(QTextFormat.Property.BlockCodeLanguage)


@lru_cache(maxsize=64)
def _tokens(language: str, code: str) -> tuple[tuple[int, int, tuple], ...]:
    """The code's tokens as (offset, length, token type); none for a language Pygments does not know. Kept for the
    blocks seen last: while a reply streams, its finished code blocks come back unchanged at every redraw, and
    lexing is most of a redraw's time. get_tokens_unprocessed keeps the offsets (no newline added or stripped)."""
    lexer = _lexer(language)
    if lexer is None:
        return ()
    return tuple((offset, len(value), token) for offset, token, value in lexer.get_tokens_unprocessed(code))


@cache
def _lexer(language: str) -> Lexer | None:
    """Pygments' lexer for a fence's language (None for none or one it does not know: the code stays plain)."""
    if not language:
        return None
    try:
        return get_lexer_by_name(language)
    except ClassNotFound:
        return None


@cache
def _format(style: str, token: tuple) -> QTextCharFormat | None:
    """A token's (a Pygments token type, a tuple) colour, weight and slant in a style; None for plain text, which
    keeps the palette's colour."""
    spec = get_style_by_name(style).style_for_token(token)
    if token in Text or not (spec["color"] or spec["bold"] or spec["italic"]):
        return None
    fmt = QTextCharFormat()
    if spec["color"]:
        fmt.setForeground(QColor(f"#{spec['color']}"))
    if spec["bold"]:
        fmt.setFontWeight(QFont.Weight.Bold)
    if spec["italic"]:
        fmt.setFontItalic(True)
    return fmt
