"""A page's input widgets saved to and restored from the settings file as a plain dict, by name.

Restoring trusts nothing from the file: a value of the wrong type is skipped and numbers go through the spin box,
which clamps them to its range, so a hand-edited settings file can never put a widget in a state the UI could not.
"""

from __future__ import annotations

from PySide6.QtWidgets import QAbstractButton, QDoubleSpinBox, QLineEdit, QSpinBox, QWidget

FormWidgets = dict[str, QWidget]


def form_values(widgets: FormWidgets) -> dict:
    values = {}
    for name, widget in widgets.items():
        if isinstance(widget, (QSpinBox, QDoubleSpinBox)):
            values[name] = widget.value()
        elif isinstance(widget, QAbstractButton):
            values[name] = widget.isChecked()
        elif isinstance(widget, QLineEdit):
            values[name] = widget.text()
        else:
            raise TypeError(f"cannot save a {type(widget).__name__} ({name})")
    return values


def restore_form(widgets: FormWidgets, values: dict) -> None:
    for name, value in values.items():
        widget = widgets.get(name)
        if isinstance(widget, QSpinBox) and type(value) is int:
            widget.setValue(value)
        elif isinstance(widget, QDoubleSpinBox) and type(value) in (int, float):
            widget.setValue(float(value))
        elif isinstance(widget, QAbstractButton) and type(value) is bool:
            widget.setChecked(value)
        elif isinstance(widget, QLineEdit) and type(value) is str:
            widget.setText(value)
