"""The C++ CPU kernels, compiled for this machine on first use by torch's extension builder (cached after).

Why C++ on the CPU at all: attention over a paged cache in torch ops must first gather every sequence's blocks
into a padded copy, and on two cores that copy (written, then read again by the matmul) costs as much as the
model's own matmuls at batch 64. The kernel reads K/V in place through the block table instead. Quantized
weights (kernels/quant.py) need kernels of their own too: torch has no int8 x int8 matmul with per-32 scales.

Three extensions, each built on first use: an edit to one source rebuilds only the extensions that include it,
and a source that fails to compile here takes only its own kernels away. The fused decode step (one call for
every decoder layer of a decode step, engine/models/cpu_decode.py) reuses the other two's inner loops, which live
in headers for that.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from types import ModuleType

_CSRC = Path(__file__).parent / "csrc"
# Each extension's sources: the file compiled first, then the headers it includes (part of its build's name).
_ATTENTION_SOURCES = [_CSRC / "paged_decode_attention.cpp", _CSRC / "paged_decode_attention.h"]
_QUANT_SOURCES = [_CSRC / "quant_gemm.cpp", _CSRC / "quant_gemm.h"]
_FUSED_SOURCES = [_CSRC / "fused_decode.cpp", _CSRC / "paged_decode_attention.h", _CSRC / "quant_gemm.h"]
_SOURCES = sorted(set(_ATTENTION_SOURCES + _QUANT_SOURCES + _FUSED_SOURCES))


class KernelBuildError(RuntimeError):
    pass


# Built where it runs, so it may use every instruction this CPU has.
_CFLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp"]


def build_name(stem: str, sources: list[Path]) -> str:
    """The extension's name: stem and a digest of what the build depends on (the sources, the flags, torch's and
    Python's versions). torch caches builds by name, so two checkouts, or one checkout before and after an
    upgrade, never take each other's build (and never rebuild over each other), while the same code on the same
    torch builds once."""
    import sys

    import torch

    digest = hashlib.sha256()
    for source in sources:
        digest.update(source.read_bytes())
    digest.update(" ".join([*_CFLAGS, torch.__version__, sys.version]).encode())
    return f"{stem}_{digest.hexdigest()[:12]}"


def _build(stem: str, sources: list[Path]) -> ModuleType:
    """sources[0] is compiled; the rest are the headers it includes."""
    from torch.utils import cpp_extension

    # Without torch's C++ headers (the PyInstaller bundle leaves them out) the compiler could only fail, noisily.
    headers = [Path(d) / "torch" / "extension.h" for d in cpp_extension.include_paths()]
    if not any(h.is_file() for h in headers):
        raise KernelBuildError(
            "could not build kvstudio's CPU kernels: torch's C++ headers (torch/extension.h) are "
            "not installed with this torch"
        )
    try:
        return cpp_extension.load(
            name=build_name(stem, sources),
            sources=[str(sources[0])],
            extra_cflags=_CFLAGS,
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except (RuntimeError, OSError, ImportError) as e:
        raise KernelBuildError(f"could not build kvstudio's CPU kernels (needs g++ and ninja): {e}") from e


@functools.cache
def load() -> ModuleType:
    """The paged-attention module; the first call on a machine builds it (about a minute), later ones load it."""
    return _build("kvstudio_cpu_ops", _ATTENTION_SOURCES)


@functools.cache
def load_quant() -> ModuleType:
    """The quantized-matmul module (kernels/quant.py calls it), built on first use like load()'s."""
    return _build("kvstudio_quant_ops", _QUANT_SOURCES)


@functools.cache
def load_fused() -> ModuleType:
    """The fused decode step's module (kernels/fused_decode.py calls it), built on first use like load()'s."""
    return _build("kvstudio_fused_decode", _FUSED_SOURCES)
