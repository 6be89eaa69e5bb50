"""The small widgets the pages share, without a page around them: the sampling form and the status line."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QFormLayout

from engine import SamplingParams
from ui.theme import tone_color
from ui.widgets.sampling_form import FIELDS, SamplingForm
from ui.widgets.status_line import StatusLine


def labels(form: SamplingForm) -> list[str]:
    layout: QFormLayout = form.layout()
    return [layout.itemAt(row, QFormLayout.ItemRole.LabelRole).widget().text() for row in range(layout.rowCount())]


def test_the_sampling_form_shows_a_pages_fields_and_reads_them_as_sampling_params(qtbot):
    form = SamplingForm(("temperature", "top_p", "max_tokens"), max_tokens=256)
    qtbot.addWidget(form)
    assert labels(form) == ["Temperature", "Top p", "Max tokens", "Seed"]
    assert form.params() == {"temperature": 0.7, "top_p": 1.0, "max_tokens": 256, "seed": None}
    assert not form.seed.isEnabled()  # counts only once ticked
    form.use_seed.setChecked(True)
    form.seed.setValue(42)
    form.temperature.setValue(5.0)  # clamped to the field's range
    assert form.seed.isEnabled() and form.params() == {"temperature": 2.0, "top_p": 1.0, "max_tokens": 256, "seed": 42}
    assert list(form.form) == ["temperature", "top_p", "max_tokens", "use_seed", "seed"]  # what the settings keep
    assert SamplingParams(**form.params()).seed == 42


def test_every_field_the_form_offers_is_a_sampling_param_with_its_default(qtbot):
    form = SamplingForm(tuple(FIELDS))
    qtbot.addWidget(form)
    assert labels(form)[:-1] == [label for label, *_ in FIELDS.values()]
    params = SamplingParams(**form.params())
    defaults = SamplingParams()
    assert [getattr(params, name) for name in FIELDS if name not in ("temperature", "max_tokens")] == [
        getattr(defaults, name) for name in FIELDS if name not in ("temperature", "max_tokens")
    ]
    assert (params.temperature, params.max_tokens) == (0.7, 512)


def test_the_status_line_shows_text_as_written_in_its_tones_colour(qtbot):
    line = StatusLine()
    qtbot.addWidget(line)
    line.say("Could not send: <b> is not a prompt", "error")
    assert line.text() == "Could not send: <b> is not a prompt" and line.textFormat() == Qt.TextFormat.PlainText
    assert line.styleSheet() == f"color: {tone_color('error').name()};"
    line.say("Generating…")
    assert line.styleSheet() == "" and line.text() == "Generating…"
    assert StatusLine(rich=True).textFormat() == Qt.TextFormat.RichText
