"""The window comes back as it was left: its size, position and the chat's splitter are saved to the settings
file on closing and restored by the next window; a geometry saved on a larger screen is fitted onto this one.
And each page in the list on the left has an icon."""

from __future__ import annotations

from PySide6.QtCore import QPoint, QRect, QSize
from PySide6.QtWidgets import QApplication

from app.history import ChatHistory
from app.settings import Settings, load_settings
from ui.bridge import EngineBridge
from ui.main_window import MainWindow
from ui.window_state import encode


def shown_window(qtbot, tmp_path, settings: Settings) -> MainWindow:
    window = MainWindow(EngineBridge(), ChatHistory(tmp_path / "history.sqlite3"), settings, tmp_path / "settings.json")
    qtbot.addWidget(window)
    window.show()
    qtbot.waitExposed(window)
    QApplication.sendPostedEvents()  # the layouts follow the size in posted events
    QApplication.processEvents()
    return window


def test_size_position_and_splitter_come_back_after_a_restart(qtbot, tmp_path):
    first = shown_window(qtbot, tmp_path, Settings())
    first.setGeometry(QRect(QPoint(2, 40), QSize(700, 620)))  # widened to its least width
    QApplication.processEvents()
    first.chat.splitter.setSizes([120, 640, 0])  # the conversations narrowed, the settings dragged shut
    sizes, geometry = first.chat.splitter.sizes(), first.geometry()
    first.close()

    saved = load_settings(tmp_path / "settings.json")
    assert saved.window_geometry and set(saved.splitters) == {"chat"}
    second = shown_window(qtbot, tmp_path, saved)
    assert second.geometry() == geometry
    assert second.chat.splitter.sizes() == sizes
    second.bridge.shutdown()


def test_a_geometry_saved_on_a_larger_screen_is_fitted_onto_this_one(qtbot, tmp_path):
    big = shown_window(qtbot, tmp_path, Settings())
    room = big.screen().availableGeometry()
    # As if saved on a screen twice as large, the window on its far half.
    big.setGeometry(QRect(room.topLeft() + QPoint(room.width(), room.height()), room.size() * 1.5))
    QApplication.processEvents()
    saved = Settings(window_geometry=encode(big.saveGeometry()))
    big.bridge.shutdown()

    window = shown_window(qtbot, tmp_path, saved)
    assert room.contains(window.frameGeometry()), (window.frameGeometry(), room)
    window.bridge.shutdown()


def test_every_page_in_the_list_has_an_icon(qtbot, tmp_path):
    window = shown_window(qtbot, tmp_path, Settings())
    items = [window.nav.item(row) for row in range(window.nav.count())]
    assert [item.text() for item in items] == [name for name, _ in window.named_pages]
    assert all(not item.icon().isNull() for item in items)
    window.bridge.shutdown()


def test_unreadable_saved_states_leave_the_default_layout(qtbot, tmp_path):
    default = shown_window(qtbot, tmp_path, Settings())
    # Not base64, and base64 of bytes that are no state Qt saved (a hand edit, a broken file).
    window = shown_window(qtbot, tmp_path, Settings(window_geometry="not base64!", splitters={"chat": "AAAA"}))
    assert window.size() == default.size()
    assert window.chat.splitter.sizes() == default.chat.splitter.sizes()
    for w in (default, window):
        w.bridge.shutdown()
