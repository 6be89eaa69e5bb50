"""Where chat and batch requests go: this machine's engine, or an OpenAI-compatible endpoint (URL, API key,
model). "Connect" checks the endpoint through the bridge (on a worker) and closes the dialog only once it
answers; a failure is said in the dialog, which stays open to fix the URL or key.
"""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QButtonGroup,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QLabel,
    QLineEdit,
    QRadioButton,
    QVBoxLayout,
    QWidget,
)

from app.remote_client import Endpoint
from ui.bridge import ConnectionFailed, EngineBridge
from ui.widgets.cards import muted
from ui.widgets.status_line import StatusLine


class ConnectionDialog(QDialog):
    def __init__(
        self, bridge: EngineBridge, url: str = "", api_key: str = "", model: str = "", parent: QWidget | None = None
    ) -> None:
        super().__init__(parent)
        self.bridge = bridge
        self.setAttribute(Qt.WA_DeleteOnClose)  # its slots go with it
        self.setWindowTitle("Connection")
        self.setMinimumWidth(520)
        self.local = QRadioButton("This computer: the model loaded in kvstudio")
        self.remote = QRadioButton("An OpenAI-compatible endpoint (vLLM, another kvstudio, a hosted API)")
        group = QButtonGroup(self)
        group.addButton(self.local)
        group.addButton(self.remote)
        current = bridge.remote
        self.url = QLineEdit(current.base_url if current else url, placeholderText="http://gpu-server:8000/v1")
        self.api_key = QLineEdit(
            current.api_key if current else api_key, echoMode=QLineEdit.Password, placeholderText="optional"
        )
        self.model = QComboBox(editable=True)
        self.model.lineEdit().setPlaceholderText("the first model the endpoint lists")
        self.model.setEditText(current.model if current else model)
        form = QFormLayout()
        form.addRow("URL", self.url)
        form.addRow("API key", self.api_key)
        form.addRow("Model", self.model)
        self.endpoint_fields = QWidget()
        self.endpoint_fields.setLayout(form)
        self.message = StatusLine()
        self.buttons = QDialogButtonBox(QDialogButtonBox.Ok | QDialogButtonBox.Cancel)
        self.buttons.accepted.connect(self.apply)
        self.buttons.rejected.connect(self.reject)

        layout = QVBoxLayout(self)
        layout.addWidget(QLabel("<b>Chat and Batch send their requests to</b>"))
        layout.addWidget(self.local)
        layout.addWidget(self.remote)
        layout.addWidget(self.endpoint_fields)
        layout.addWidget(muted("The Models, Monitor and Server pages always work on this computer's engine."))
        layout.addWidget(self.message)
        layout.addWidget(self.buttons)
        (self.remote if current else self.local).setChecked(True)
        self.remote.toggled.connect(self._sync)
        self._sync()
        bridge.connection_changed.connect(self._on_connected)
        bridge.connection_failed.connect(self._on_failed)
        self._asked: Endpoint | None = None  # the endpoint being checked

    def apply(self) -> None:
        """OK: switch to this computer at once, or check the endpoint and switch once it answers."""
        if self.local.isChecked():
            self.bridge.use_local()
            self.accept()
            return
        try:
            endpoint = Endpoint(self.url.text(), self.api_key.text().strip(), self.model.currentText().strip())
        except ValueError as e:
            self.message.say(str(e)[0].upper() + str(e)[1:] + ".", "error")
            return
        self._asked = endpoint
        self.message.say(f"Connecting to {endpoint.base_url}…")
        self.buttons.button(QDialogButtonBox.Ok).setEnabled(False)
        self.bridge.connect_remote(endpoint)

    def reject(self) -> None:
        """Cancel: a check still running is forgotten, and requests keep going where they went."""
        if self._asked is not None:
            self.bridge.cancel_connect()
            self._asked = None
        super().reject()

    def _answers_us(self, endpoint: Endpoint | None) -> bool:
        asked = self._asked
        return (
            asked is not None
            and endpoint is not None
            and endpoint.base_url == asked.base_url
            and endpoint.api_key == asked.api_key
            and (not asked.model or endpoint.model == asked.model)
        )

    def _on_connected(self, endpoint: Endpoint | None) -> None:
        if self._answers_us(endpoint):
            self._asked = None
            self.accept()

    def _on_failed(self, failure: ConnectionFailed) -> None:
        if not self._answers_us(failure.endpoint):
            return
        self._asked = None
        self.buttons.button(QDialogButtonBox.Ok).setEnabled(True)
        self.message.say(f"Could not connect: {failure.message}", "error")

    def _sync(self) -> None:
        self.endpoint_fields.setEnabled(self.remote.isChecked())
