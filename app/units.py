"""How kvstudio writes an amount of bytes, in the window and on the command line alike.

One convention for files on disk and for memory: binary units named as such (KiB, MiB, GiB). A model file's size
is read beside the memory its weights will take and the RAM free, which the system counts in binary units, so the
three compare at a glance; a decimal "98.4 MB" beside "92 MiB" of weights read as two different files.
"""

from __future__ import annotations

# (name, bytes), largest first
UNITS = (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))
# Below a GiB whole units are precise enough (a 94 MiB file); above it a tenth tells 1.4 GiB from 1.9.
TENTHS = frozenset(("GiB", "TiB"))


def byte_size(n: float, unit: str | None = None) -> str:
    """98362432 -> '94 MiB', 2.5 * 2**30 -> '2.5 GiB', 512 -> '512 B'. `unit` ("GiB") writes it in that unit:
    for amounts compared in one sentence ("needs about 0.6 GiB, 0.8 GiB is free")."""
    if unit is None:
        unit = next((name for name, scale in UNITS if n >= scale), "B")
    if unit == "B":
        return f"{n:.0f} B"
    value = n / dict(UNITS)[unit]
    return f"{value:.1f} {unit}" if unit in TENTHS else f"{value:.0f} {unit}"
