"""The server page: the OpenAI-compatible endpoint switched on and off over the loaded model, its settings (port,
API key, LAN access), the base URL and ready-made snippets to copy, and a live log of the requests it answers.

The endpoint runs on its own event-loop thread (BackgroundServer) over the bridge's engine thread, so the window
and HTTP clients share one model and one KV cache. Its request log is written on that loop's thread; a signal
carries each entry to the UI thread.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import secrets
import socket
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from PySide6.QtCore import Qt, QTimer, Signal, Slot
from PySide6.QtGui import QFont, QFontDatabase, QGuiApplication
from PySide6.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from app.server.app import ServerConfig
from app.server.run import BackgroundServer, default_model_id, model_info
from ui.bridge import EngineBridge, ModelLoaded
from ui.theme import TONES, tone_color
from ui.widgets.cards import card, muted, section
from ui.widgets.status_line import StatusLine

DEFAULT_PORT = 8000
LOG_ROWS = 500
# Switching off means off: requests in flight get a second to finish, then are cut (which aborts them in the
# engine), so the UI thread never waits long on a slow client.
DRAIN_S = 1.0
LOG_COLUMNS = ("Time", "Method", "Path", "Status", "Seconds", "Tokens", "Client")
ON_COLOR = TONES["ok"][0]  # the switch's fill when on, under white text in light and dark alike
NO_KEY = "not-needed"  # the openai client insists on some key; a server without one ignores it


class ServerPage(QWidget):
    request_logged = Signal(object)  # a request-log entry (dict), emitted on the server's thread

    def __init__(self, bridge: EngineBridge, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.bridge = bridge
        self.server: BackgroundServer | None = None
        self._build()
        # Queued: the server emits from its own thread, the row is added on the UI thread.
        self.request_logged.connect(self._append_log, Qt.QueuedConnection)
        bridge.model_loaded.connect(self._on_model_loaded)
        thread = bridge.engine_thread
        if thread is not None:  # the page came after the model
            self._set_default_name(thread.engine.model_config.model)
        self.status.say("Off." if thread is not None else "Load a model to serve it.")
        self._sync()

    # ---- layout -------------------------------------------------------------------------------------------
    def _build(self) -> None:
        self.switch = QPushButton(checkable=True)
        self.switch.setMinimumSize(150, 46)
        font = QFont(self.switch.font())
        font.setPointSizeF(font.pointSizeF() + 3)
        font.setWeight(QFont.Weight.DemiBold)
        self.switch.setFont(font)
        self.switch.setStyleSheet(
            "QPushButton { border-radius: 23px; padding: 0 22px; border: 1px solid palette(mid);"
            " background: palette(button); }"
            f"QPushButton:checked {{ background: {ON_COLOR}; color: white; border-color: {ON_COLOR}; }}"
            "QPushButton:disabled { color: palette(mid); }"
        )
        self.switch.clicked.connect(self.set_serving)
        self.status = StatusLine(rich=True)
        heading = QVBoxLayout()
        heading.setSpacing(2)
        heading.addWidget(section("OpenAI-compatible server"))
        heading.addWidget(self.status)
        top = QHBoxLayout()
        top.setSpacing(16)
        top.addWidget(self.switch)
        top.addLayout(heading, 1)

        settings_card, settings = card("Settings")
        self.port = QSpinBox()
        self.port.setRange(0, 65535)
        self.port.setValue(DEFAULT_PORT)
        self.port.setToolTip("0 picks any free port when the server starts")
        self.api_key = QLineEdit(echoMode=QLineEdit.Password, placeholderText="optional")
        self.generate_key = QPushButton("Generate")
        self.generate_key.clicked.connect(lambda: self.api_key.setText(secrets.token_urlsafe(24)))
        key_row = QHBoxLayout()
        key_row.addWidget(self.api_key, 1)
        key_row.addWidget(self.generate_key)
        self._default_name = ""
        self.model_name = QLineEdit(placeholderText="the model's name")
        self.lan = QCheckBox("Allow other devices on the network (LAN)")
        self.lan_warning = StatusLine(rich=True)
        self.lan_warning.hide()
        form = QFormLayout()
        form.setHorizontalSpacing(12)
        form.addRow("Port", self.port)
        form.addRow("API key", key_row)
        form.addRow("Model name", self.model_name)
        form.addRow(self.lan)
        # What the settings file keeps of this page between runs (the switch itself always starts off).
        self.form = {"port": self.port, "api_key": self.api_key, "lan": self.lan}
        self.settings_hint = muted("Switch the server off to change these.")
        settings.addSpacing(6)
        settings.addLayout(form)
        settings.addWidget(self.lan_warning)  # outside the form, which gives a wrapped label one line
        settings.addWidget(self.settings_hint)
        settings.addStretch(1)

        connect_card, connect = card("Connect")
        self.url = QLineEdit(readOnly=True, placeholderText="a free port is picked when the server starts")
        url_row = QHBoxLayout()
        url_row.addWidget(QLabel("Base URL"))
        url_row.addWidget(self.url, 1)
        self.copy_url = _copy_button(self.url.text, "Copy", "Copy the base URL")
        url_row.addWidget(self.copy_url)
        self.python_snippet = _snippet_box()
        self.ide_snippet = _snippet_box()
        self.snippets = QTabWidget(documentMode=True)
        self.copy_snippet = _copy_button(lambda: self.snippets.currentWidget().toPlainText(), "Copy snippet")
        # the tooltip names the tab shown: the one button copies either snippet
        self.snippets.currentChanged.connect(
            lambda i: self.copy_snippet.setToolTip(f"Copy the {self.snippets.tabText(i)} snippet")
        )
        self.snippets.addTab(self.python_snippet, "Python (openai)")
        self.snippets.addTab(self.ide_snippet, "IDE plugin (Continue)")
        self.snippets.setCornerWidget(self.copy_snippet)
        connect.addSpacing(6)
        connect.addLayout(url_row)
        connect.addWidget(self.snippets, 1)

        cards = QHBoxLayout()
        cards.setSpacing(12)
        cards.addWidget(settings_card, 1)
        cards.addWidget(connect_card, 2)

        self.log = QTableWidget(0, len(LOG_COLUMNS))
        self.log.setHorizontalHeaderLabels(LOG_COLUMNS)
        self.log.verticalHeader().hide()
        self.log.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.log.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.log.setAlternatingRowColors(True)
        self.log.setShowGrid(False)
        header = self.log.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeToContents)
        header.setSectionResizeMode(LOG_COLUMNS.index("Path"), QHeaderView.Stretch)
        self.log_count = muted()
        clear = QPushButton("Clear")
        clear.clicked.connect(lambda: (self.log.setRowCount(0), self._count_log()))
        log_header = QHBoxLayout()
        log_header.addWidget(section("Request log"))
        log_header.addSpacing(8)
        log_header.addWidget(self.log_count)
        log_header.addStretch(1)
        log_header.addWidget(clear)
        self._count_log()

        layout = QVBoxLayout(self)
        layout.setContentsMargins(24, 20, 24, 20)
        layout.setSpacing(12)
        layout.addLayout(top)
        layout.addLayout(cards)
        layout.addSpacing(4)
        layout.addLayout(log_header)
        layout.addWidget(self.log, 1)

        for signal in (self.port.valueChanged, self.api_key.textChanged, self.model_name.textChanged, self.lan.toggled):
            signal.connect(self._sync)

    # ---- settings -------------------------------------------------------------------------------------------
    def settings(self) -> ServerConfig:
        """The server the page's fields describe: loopback only unless LAN access is ticked."""
        return ServerConfig(
            host="0.0.0.0" if self.lan.isChecked() else "127.0.0.1",
            port=self.port.value(),
            api_key=self.api_key.text().strip() or None,
            drain_timeout=DRAIN_S,
        )

    def served_model_name(self) -> str:
        """The name clients pass as `model`: the field, or else the id `kvstudio serve` gives the model."""
        return self.model_name.text().strip() or self._default_name

    def _set_default_name(self, model: str) -> None:
        self._default_name = default_model_id(model)
        self.model_name.setPlaceholderText(self._default_name)

    def base_url(self) -> str:
        """Where clients on this computer reach the endpoint; empty while port 0 has not been given a port yet."""
        if self.server is not None:
            return self.server.url + "/v1"
        port = self.port.value()
        return f"http://127.0.0.1:{port}/v1" if port else ""

    # ---- serving --------------------------------------------------------------------------------------------
    @Slot(bool)
    def set_serving(self, on: bool) -> bool:
        """Start or stop the endpoint (the switch); returns whether it is serving. A failure to start is said
        on the page and leaves the switch off."""
        if on and self.server is None:
            self._start(self.port.value())
        elif not on and self.server is not None:
            self._stop()
            self.status.say("Off.")
        self._sync()
        return self.server is not None

    def shutdown(self) -> None:
        """Stop serving (the window is closing)."""
        self.set_serving(False)

    def _start(self, port: int, context: str = "") -> None:
        thread = self.bridge.engine_thread
        if thread is None:
            self.status.say("Load a model to serve it.", "error")
            return
        config = dataclasses.replace(self.settings(), port=port)
        try:
            self.server = BackgroundServer(
                thread, model_info(thread.engine, self.served_model_name()), config, self.request_logged.emit
            ).start()
        except Exception as e:  # a port in use, a privileged port: said in words, the switch stays off
            self.status.say(context + _start_error(config, e), "error")
            return
        where = "this computer and your network" if self.lan.isChecked() else "this computer only"
        self.status.say(
            f"Serving <b>{_html(self.served_model_name())}</b> at {_html(self.base_url())} ({where}).", "ok"
        )

    def _stop(self) -> None:
        server, self.server = self.server, None
        server.stop()

    @Slot(object)
    def _on_model_loaded(self, loaded: ModelLoaded) -> None:
        self._set_default_name(loaded.model)
        if self.server is None:
            self.status.say("Off.")
        else:
            # The old engine thread is gone: serve the new one on the same port, so clients keep their URL.
            port = urlsplit(self.server.url).port
            self._stop()
            self._start(port, context="The model changed and the server could not restart: ")
        self._sync()

    # ---- log ------------------------------------------------------------------------------------------------
    @Slot(object)
    def _append_log(self, entry: dict) -> None:
        """The newest request on top; only the last LOG_ROWS are kept."""
        self.log.insertRow(0)
        cells = (
            time.strftime("%H:%M:%S", time.localtime(entry["time"])),
            entry["method"],
            entry["path"],
            str(entry["status"]),
            f"{entry['seconds']:.3f}",
            str(entry["completion_tokens"]),
            entry.get("remote") or "",
        )
        for col, text in enumerate(cells):
            item = QTableWidgetItem(text)
            if LOG_COLUMNS[col] in ("Status", "Seconds", "Tokens"):
                item.setTextAlignment(Qt.AlignRight | Qt.AlignVCenter)
            if entry["status"] >= 400:
                item.setForeground(tone_color("error"))
            self.log.setItem(0, col, item)
        if self.log.rowCount() > LOG_ROWS:
            self.log.removeRow(LOG_ROWS)
        self._count_log()

    def _count_log(self) -> None:
        n = self.log.rowCount()
        self.log_count.setText(
            f"{n} request{'s' if n != 1 else ''}" + (f" (the last {LOG_ROWS})" if n == LOG_ROWS else "")
        )

    # ---- state ----------------------------------------------------------------------------------------------
    def _sync(self) -> None:
        serving = self.server is not None
        loaded = self.bridge.engine_thread is not None
        self.switch.setChecked(serving)
        self.switch.setEnabled(loaded or serving)
        self.switch.setText("On" if serving else "Off")
        for w in (self.port, self.api_key, self.generate_key, self.model_name, self.lan):
            w.setEnabled(not serving)
        self.settings_hint.setVisible(serving)
        self.lan_warning.setVisible(self.lan.isChecked())
        if self.lan.isChecked():
            port = urlsplit(self.server.url).port if serving else self.port.value()
            self.lan_warning.say(_lan_warning(port, self.settings().api_key is not None), "warn")
        url = self.base_url()
        self.url.setText(url)
        shown_url = url or "http://127.0.0.1:PORT/v1"
        key, name = self.settings().api_key, self.served_model_name() or "MODEL"
        self.python_snippet.setPlainText(python_snippet(shown_url, key, name))
        self.ide_snippet.setPlainText(continue_snippet(shown_url, key, name))


# ---- snippets -----------------------------------------------------------------------------------------------


def _quote(text: str) -> str:
    # A JSON string is also a valid Python literal and a YAML double-quoted scalar, with the same escapes.
    return json.dumps(text, ensure_ascii=False)


def python_snippet(base_url: str, api_key: str | None, model: str) -> str:
    """A runnable script for the official `openai` client."""
    return (
        f"from openai import OpenAI\n\n"
        f"client = OpenAI(base_url={_quote(base_url)}, api_key={_quote(api_key or NO_KEY)})\n"
        f"reply = client.chat.completions.create(\n"
        f"    model={_quote(model)},\n"
        f'    messages=[{{"role": "user", "content": "Hello!"}}],\n'
        f")\n"
        f"print(reply.choices[0].message.content)\n"
    )


def continue_snippet(base_url: str, api_key: str | None, model: str) -> str:
    """A model entry for the Continue IDE plugin's ~/.continue/config.yaml (its OpenAI-compatible provider)."""
    lines = [
        "# ~/.continue/config.yaml",
        "name: kvstudio",
        "version: 0.0.1",
        "schema: v1",
        "models:",
        f"  - name: {_quote(f'{model} (kvstudio)')}",
        "    provider: openai",
        f"    model: {_quote(model)}",
        f"    apiBase: {_quote(base_url)}",
    ]
    if api_key is not None:
        lines.append(f"    apiKey: {_quote(api_key)}")
    lines += ["    roles:", "      - chat", "      - edit", "      - apply"]
    return "\n".join(lines) + "\n"


# ---- helpers ------------------------------------------------------------------------------------------------


def _start_error(config: ServerConfig, e: Exception) -> str:
    if isinstance(e, OSError) and e.errno == errno.EADDRINUSE:
        return f"Port {config.port} is already in use by another program: pick another port, or 0 for any free one."
    if isinstance(e, PermissionError) or (isinstance(e, OSError) and e.errno == errno.EACCES):
        return f"Port {config.port} needs administrator rights: pick one above 1023."
    return f"The server could not start: {_html(str(e) or type(e).__name__)}"


def _lan_warning(port: int, has_key: bool) -> str:
    where = _lan_address()
    reach = f"<br>They reach it at <b>http://{where}:{port}/v1</b>" if where and port else ""
    advice = (
        "Switch LAN off on networks you do not trust."
        if has_key
        else "<b>Set an API key</b>, and switch LAN off on networks you do not trust."
    )
    return f"⚠ Any device on your network can use the model. {advice}{reach}"


def _lan_address() -> str | None:
    """This computer's address on its network: the source address of its route out (a UDP connect sends
    nothing), or None when it has no network."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: never routed anywhere real
            return s.getsockname()[0]
        except OSError:
            return None


def _html(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _snippet_box() -> QPlainTextEdit:
    box = QPlainTextEdit(readOnly=True)
    box.setFont(QFontDatabase.systemFont(QFontDatabase.FixedFont))
    # Code keeps its lines: a URL or key wrapped inside its string reads as two, and copies as one anyway.
    # A narrow box scrolls sideways instead.
    box.setLineWrapMode(QPlainTextEdit.LineWrapMode.NoWrap)
    box.setMinimumHeight(140)
    return box


def _copy_button(text: Callable[[], str], label: str, tooltip: str = "") -> QPushButton:
    """A button that copies text() and says "Copied" for a moment, then its label again."""
    button = QPushButton(label, toolTip=tooltip)

    def copy() -> None:
        QGuiApplication.clipboard().setText(text())
        button.setText("Copied")
        QTimer.singleShot(1200, button, lambda: button.setText(label))

    button.clicked.connect(copy)
    return button
