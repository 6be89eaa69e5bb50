"""The chat page's left column: its conversations, searchable, a badge on those whose replies keep to a JSON
schema, and what manages them: New chat, Rename, Delete, Export… (Markdown or JSON), Import… (JSON) and Branch…
(a new conversation holding the open one up to a chosen message).

Renaming, exporting, importing and branching are the history's and the files' business and happen here; opening,
starting and deleting a conversation change what the page shows, so the page does those, on this widget's
signals. Failures are said in the page's status line.
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QSize, Qt, Signal
from PySide6.QtWidgets import (
    QFileDialog,
    QGridLayout,
    QInputDialog,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from app.chat_files import ConversationFileError, export_conversation, import_conversation
from app.history import ChatHistory, HistoryError, title_from
from ui.widgets.json_schema_dialog import badge_icon, schema_summary
from ui.widgets.status_line import StatusLine


class ConversationList(QWidget):
    opened = Signal(int)  # a conversation to open: chosen in the list, imported or branched
    new_requested = Signal()
    delete_requested = Signal()

    def __init__(self, history: ChatHistory, status: StatusLine, parent=None) -> None:
        super().__init__(parent)
        self.history, self.status = history, status
        # The conversation the page has open (None: none), kept here and read by the page (ChatPage.conversation_id)
        # rather than asked of it: a callback into the page would make page and list a reference cycle, which only
        # the cyclic collector frees, on whichever thread runs it, and a QWidget deleted off the UI thread crashes.
        self.current_id: int | None = None
        self.search = QLineEdit(placeholderText="Search conversations")
        self.search.textChanged.connect(self.refresh)
        self.view = QListWidget()
        self.view.setIconSize(QSize(34, 16))  # the JSON badge
        self.view.setTextElideMode(Qt.ElideRight)
        self.view.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        self.view.currentItemChanged.connect(
            lambda item, _: item is not None and self.opened.emit(item.data(Qt.UserRole))
        )
        self.new_button = QPushButton("New chat")
        self.new_button.clicked.connect(self.new_requested)
        self.rename_button = QPushButton("Rename")
        self.rename_button.clicked.connect(self._ask_rename)
        self.delete_button = QPushButton("Delete")
        self.delete_button.clicked.connect(self.delete_requested)
        self.export_button = QPushButton("Export…")
        self.export_button.clicked.connect(self._ask_export)
        self.import_button = QPushButton("Import…")
        self.import_button.clicked.connect(self._ask_import)
        self.branch_button = QPushButton("Branch…")
        self.branch_button.clicked.connect(self._ask_branch)
        layout = QVBoxLayout(self)
        layout.addWidget(self.new_button)
        layout.addWidget(self.search)
        layout.addWidget(self.view, 1)
        # Two buttons a row: three would widen the list's column past what a small window has room for.
        manage = QGridLayout()
        for i, b in enumerate((self.rename_button, self.delete_button, self.export_button, self.import_button)):
            manage.addWidget(b, i // 2, i % 2)
        manage.addWidget(self.branch_button, 2, 0, 1, 2)
        layout.addLayout(manage)

    def refresh(self) -> None:
        """The list again from the history (the search applied), the open conversation highlighted."""
        self.view.blockSignals(True)
        self.view.clear()
        badge = badge_icon(self.palette())
        for conv in self.history.list_conversations(self.search.text() or None):
            item = QListWidgetItem(conv.title)
            item.setData(Qt.UserRole, conv.id)
            if conv.json_schema:  # the badge: its replies keep to a JSON schema
                item.setIcon(badge)
                item.setToolTip(f"Replies keep to a JSON schema ({schema_summary(conv.json_schema)})")
            self.view.addItem(item)
            if conv.id == self.current_id:
                self.view.setCurrentItem(item)
        self.view.blockSignals(False)

    def enable(self, idle: bool, messages: bool) -> None:
        """idle: no reply streams; messages: the open conversation has some."""
        has = self.current_id is not None
        self.rename_button.setEnabled(idle and has)
        self.delete_button.setEnabled(idle and has)
        self.export_button.setEnabled(has)
        self.import_button.setEnabled(idle)
        self.branch_button.setEnabled(idle and messages)

    def rename(self, title: str) -> None:
        conversation_id = self.current_id
        if conversation_id is None or not title.strip():
            return
        try:
            self.history.rename(conversation_id, title.strip())
        except HistoryError as e:
            self.status.say(f"Could not rename the chat: {e}")
            return
        self.refresh()

    def _ask_rename(self) -> None:
        if self.current_id is None:
            return
        title = self.history.conversation(self.current_id).title
        title, ok = QInputDialog.getText(self, "Rename", "Title:", text=title)
        if ok:
            self.rename(title)

    def _ask_export(self) -> None:
        if self.current_id is None:
            return
        title = self.history.conversation(self.current_id).title
        name = "".join(c if c.isalnum() or c in " -_" else "_" for c in title).strip() or "conversation"
        path, chosen = QFileDialog.getSaveFileName(
            self, "Export conversation", f"{name}.md", "Markdown (*.md);;JSON, to import again (*.json)"
        )
        if path:
            if Path(path).suffix.lower() not in (".md", ".json"):  # no suffix typed: the one of the chosen filter
                path += ".json" if "json" in chosen.lower() else ".md"
            self.export_to(Path(path))

    def export_to(self, path: Path) -> None:
        """Write the open conversation to `path` (Markdown for .md, JSON otherwise); a failure is said."""
        try:
            export_conversation(self.history, self.current_id, path)
        except (ConversationFileError, HistoryError) as e:
            self.status.say(f"Could not export the chat: {e}", "error")
            return
        self.status.say(f"Exported to {path}.")

    def _ask_import(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Import conversation", "", "Conversation (*.json)")
        if path:
            self.import_from(Path(path))

    def import_from(self, path: Path) -> None:
        """A conversation from a JSON file as a new one, opened; a malformed file is refused in words."""
        try:
            conv = import_conversation(self.history, path)
        except ConversationFileError as e:
            self.status.say(f"Could not import the chat: {e}", "error")
            return
        self.opened.emit(conv.id)
        self.refresh()
        self.status.say(f"Imported “{conv.title}”.")

    def _ask_branch(self) -> None:
        """Ask which message the branch ends on (the last one offered first) and branch there."""
        if self.current_id is None:
            return
        messages = self.history.messages(self.current_id)
        labels = [f"{i}. {m.role}: {title_from(m.content)}" for i, m in enumerate(messages, 1)]
        label, ok = QInputDialog.getItem(
            self, "Branch", "A new chat with the messages up to and including:", labels, len(labels) - 1, False
        )
        if ok and label in labels:
            self.branch_from(messages[labels.index(label)].id)

    def branch_from(self, message_id: int) -> None:
        """Open a new conversation holding the open one up to and including `message_id`."""
        try:
            conv = self.history.branch(message_id)
        except HistoryError as e:
            self.status.say(f"Could not branch the chat: {e}", "error")
            return
        self.opened.emit(conv.id)
        self.refresh()
