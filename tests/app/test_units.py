"""app.units.byte_size: one way to write bytes, on disk and in memory alike."""

from __future__ import annotations

from app.library import model_store
from app.units import byte_size


def test_bytes_are_written_in_binary_units_whole_below_a_gib():
    assert byte_size(512) == "512 B"
    assert byte_size(1536) == "2 KiB"
    assert byte_size(model_store.DEFAULT_MODEL.size) == "94 MiB"  # 98,362,432 bytes: not "98.4 MB", not "94 MB"
    assert byte_size(1023 * 2**20) == "1023 MiB"


def test_a_gib_and_more_are_written_to_a_tenth():
    assert byte_size(2**30) == "1.0 GiB"
    assert byte_size(2.5 * 2**30) == "2.5 GiB"
    assert byte_size(3 * 2**40) == "3.0 TiB"


def test_amounts_compared_in_one_sentence_keep_the_unit_asked_for():
    assert byte_size(0.6 * 2**30, "GiB") == "0.6 GiB"
    assert byte_size(2**29, "MiB") == "512 MiB"
