"""The window's menus, one keyboard shortcut for each common action, and the Help list of them all.

A page action first shows its page, then presses that page's own button, so a shortcut does exactly what the
button would do and nothing when the button is disabled (no model, a run already going).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from PySide6.QtCore import Qt
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import QAbstractButton, QMessageBox, QWidget

if TYPE_CHECKING:
    from ui.main_window import MainWindow


def install_menus(window: MainWindow) -> list[QAction]:
    """Build the menu bar; returns every action (the Help list and the tests read their shortcuts)."""
    chat, batch, server = window.chat, window.batch, window.server
    actions: list[QAction] = []

    def add(
        menu, text: str, shortcut: str, run: Callable[[], None], page: QWidget | None = None, keypad: str = ""
    ) -> None:
        """`keypad`: the same shortcut with the keypad's Enter, which Qt tells apart from Return."""

        def trigger() -> None:
            if page is not None:
                window.show_page(page)
            run()

        action = QAction(text, window, triggered=trigger)
        action.setShortcuts([QKeySequence(s) for s in (shortcut, keypad) if s])
        menu.addAction(action)
        actions.append(action)

    def press(button: QAbstractButton) -> Callable[[], None]:
        return button.click

    bar = window.menuBar()
    file_menu = bar.addMenu("&File")
    add(file_menu, "&Load model…", "Ctrl+O", window.choose_model)
    add(file_menu, "&Connection…", "Ctrl+K", window.choose_connection)
    file_menu.addSeparator()
    add(file_menu, "&Quit", "Ctrl+Q", window.close)

    chat_menu = bar.addMenu("&Chat")
    add(chat_menu, "&New chat", "Ctrl+N", chat.new_conversation, page=chat)
    add(chat_menu, "&Send", "Ctrl+Return", press(chat.send_button), page=chat, keypad="Ctrl+Enter")
    add(chat_menu, "S&top", "Ctrl+.", press(chat.stop_button), page=chat)
    add(chat_menu, "&Regenerate", "Ctrl+R", press(chat.regenerate_button), page=chat)
    add(chat_menu, "&Edit last message", "Ctrl+E", press(chat.edit_button), page=chat)
    add(chat_menu, "&Copy reply", "Ctrl+Shift+C", press(chat.copy_button), page=chat)
    add(chat_menu, "Search &conversations", "Ctrl+F", chat.conversation_list.search.setFocus, page=chat)

    batch_menu = bar.addMenu("&Batch")
    add(batch_menu, "&Import prompts…", "Ctrl+I", press(batch.import_button), page=batch)
    add(batch_menu, "&Run all", "Ctrl+Shift+Return", press(batch.run_button), page=batch)
    add(batch_menu, "&Cancel run", "Ctrl+Shift+X", press(batch.cancel_button), page=batch)
    add(batch_menu, "Export &JSONL…", "Ctrl+Shift+J", press(batch.export_jsonl_button), page=batch)
    add(batch_menu, "Export C&SV…", "Ctrl+Shift+V", press(batch.export_csv_button), page=batch)

    server_menu = bar.addMenu("&Server")
    add(server_menu, "&Switch the server on or off", "Ctrl+Shift+S", press(server.switch), page=server)
    add(server_menu, "&Copy the base URL", "Ctrl+Shift+U", press(server.copy_url), page=server)

    view = bar.addMenu("&View")
    for number, (name, page) in enumerate(window.named_pages, start=1):
        add(view, name, f"Ctrl+{number}", lambda: None, page=page)

    help_menu = bar.addMenu("&Help")
    add(help_menu, "&Keyboard shortcuts", "F1", lambda: show_shortcuts(window, actions))
    return actions


def shortcut_table(actions: list[QAction]) -> str:
    """The shortcuts as an HTML table, in the menus' order."""
    rows = "".join(
        f"<tr><td>{a.text().replace('&', '').rstrip('…')}</td><td>&nbsp;&nbsp;<b>"
        f"{a.shortcut().toString(QKeySequence.SequenceFormat.NativeText)}</b></td></tr>"
        for a in actions
    )
    return f"<table>{rows}</table>"


def show_shortcuts(window: MainWindow, actions: list[QAction]) -> None:
    box = QMessageBox(QMessageBox.Icon.NoIcon, "Keyboard shortcuts", shortcut_table(actions), parent=window)
    box.setAttribute(Qt.WA_DeleteOnClose)
    box.open()
