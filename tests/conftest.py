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
