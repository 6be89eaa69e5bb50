"""Fixtures shared by the whole suite: the default model, its tokenizer, and the environment the suite runs in."""
from __future__ import annotations

import os

# Triton kernels run on its interpreter when there is no GPU; this must be set before any @triton.jit runs.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
# Idle OpenMP threads sleep instead of spinning: a test that shares the cores with anything else (another
# process, a Qt thread) would otherwise crawl.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# Both cores for each test's matmuls; the suite runs tests one at a time.
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from app.model_store import default_model_path

    path = default_model_path()
    if not path.is_file():
        pytest.fail(f"the default model is missing at {path}: run `make setup` (it fetches it)")
    return path


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf):
    from engine.models.loader import open_model

    return open_model(str(smollm2_gguf)).tokenizer
