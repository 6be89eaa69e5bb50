"""System-prompt presets on the chat page: a preset chosen fills the system prompt (undoably), the prompt is saved,
renamed and deleted by name through the real dialogs' answers, built-ins stay, and the presets are there again in a
new page over the same data folder. An unreadable presets file is said in the status line and kept."""

from __future__ import annotations

import pytest
from PySide6.QtWidgets import QInputDialog, QMessageBox

from app.history import ChatHistory
from app.prompt_presets import BUILTIN, FILE_NAME
from ui.bridge import EngineBridge
from ui.pages.chat import ChatPage


@pytest.fixture
def bridge():
    b = EngineBridge()  # no reply is asked for here
    yield b
    b.shutdown()


def new_page(qtbot, bridge, folder) -> ChatPage:
    page = ChatPage(bridge, ChatHistory(folder / "history.sqlite3"))
    qtbot.addWidget(page)
    page.resize(1600, 1000)
    return page


def answer(monkeypatch, text: str | None = None, yes: bool = True) -> None:
    """The name dialog returns `text` (None: cancelled) and a confirmation says yes or no."""
    monkeypatch.setattr(QInputDialog, "getText", staticmethod(lambda *a, **k: (text or "", text is not None)))
    reply = QMessageBox.StandardButton.Yes if yes else QMessageBox.StandardButton.No
    monkeypatch.setattr(QMessageBox, "question", staticmethod(lambda *a, **k: reply))


def listed(page: ChatPage) -> list[str]:
    return [page.presets.combo.itemText(i) for i in range(page.presets.combo.count())]


def test_choose_save_rename_and_delete_presets_which_outlive_the_page(qtbot, bridge, tmp_path, monkeypatch):
    page = new_page(qtbot, bridge, tmp_path)
    presets = page.presets
    assert listed(page) == [f"{p.name} (built in)" for p in BUILTIN] and presets.combo.currentIndex() == -1

    # Choosing fills the system prompt; Ctrl+Z gives back what was there.
    page.system_prompt.setPlainText("My own words.")
    presets.combo.activated.emit(1)
    assert page.system_prompt.toPlainText() == BUILTIN[1].prompt and presets.current == BUILTIN[1]
    assert not presets.rename_action.isEnabled() and not presets.delete_action.isEnabled()  # built in
    page.system_prompt.undo()
    assert page.system_prompt.toPlainText() == "My own words." and presets.current is None

    answer(monkeypatch, "Pirate")
    presets.save_button.click()
    assert listed(page)[-1] == "Pirate" and presets.current.name == "Pirate"
    assert page.status.text() == "Saved the system prompt as “Pirate”."
    assert presets.rename_action.isEnabled() and presets.delete_action.isEnabled()

    # The same name again: replaced once confirmed, kept when not.
    page.system_prompt.setPlainText("Arr, matey.")
    answer(monkeypatch, "pirate", yes=False)
    presets.save_button.click()
    assert presets.store.get("Pirate").prompt == "My own words."
    answer(monkeypatch, "pirate", yes=True)
    presets.save_button.click()
    assert presets.store.get("Pirate").prompt == "Arr, matey." and listed(page)[-1] == "pirate"

    # A built-in's name is refused in words; nothing typed is lost.
    answer(monkeypatch, BUILTIN[0].name)
    presets.save_button.click()
    assert page.status.text() == (
        f"Could not save the preset: “{BUILTIN[0].name}” is the name of a built-in preset; choose another."
    )
    assert page.system_prompt.toPlainText() == "Arr, matey."

    answer(monkeypatch, "Buccaneer")
    presets.rename_action.trigger()
    assert listed(page)[-1] == "Buccaneer" and presets.current.name == "Buccaneer"
    page.system_prompt.setPlainText("A second one.")
    answer(monkeypatch, "Second")
    presets.save_button.click()

    # Another page (a restart) over the same data folder has them.
    again = new_page(qtbot, bridge, tmp_path)
    assert listed(again)[-2:] == ["Buccaneer", "Second"]
    again.presets.combo.activated.emit(len(BUILTIN))
    assert again.system_prompt.toPlainText() == "Arr, matey."
    answer(monkeypatch, yes=False)
    again.presets.delete_action.trigger()
    assert listed(again)[-2:] == ["Buccaneer", "Second"]
    answer(monkeypatch, yes=True)
    again.presets.delete_action.trigger()
    assert listed(again)[-1] == "Second" and again.status.text() == "Deleted the preset “Buccaneer”."
    assert again.system_prompt.toPlainText() == "Arr, matey."  # the prompt stays
    assert listed(new_page(qtbot, bridge, tmp_path))[-1] == "Second"


def test_an_unreadable_presets_file_is_said_and_kept(qtbot, bridge, tmp_path, monkeypatch):
    path = tmp_path / FILE_NAME
    path.write_text("[{broken")
    page = new_page(qtbot, bridge, tmp_path)
    assert page.status.text().startswith(f"Could not read the saved presets: the presets in {path} are not valid JSON")
    assert page.status.text().endswith(f"saving a preset keeps it as {FILE_NAME}.unreadable.")
    assert listed(page) == [f"{p.name} (built in)" for p in BUILTIN] and path.read_text() == "[{broken"
    page.system_prompt.setPlainText("Kept.")
    answer(monkeypatch, "Mine")
    page.presets.save_button.click()
    assert (tmp_path / f"{FILE_NAME}.unreadable").read_text() == "[{broken"
    assert listed(new_page(qtbot, bridge, tmp_path))[-1] == "Mine"
