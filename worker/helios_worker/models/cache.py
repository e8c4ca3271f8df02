"""Trained models, cached by preset, seed and a fingerprint of everything that shapes the weights.

A model is written into a temporary directory and renamed into place, so an interrupted training
leaves nothing that looks finished; a file lock makes concurrent callers (parallel test
processes) wait for one training instead of running several.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from .metadata import METADATA_FILE
from .presets import Preset, get_preset
from .training import TRAINING_VERSION, train_model

CACHE_ENV = "HELIOS_CACHE_DIR"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "helios" / "models")


def default_device(preset: Preset) -> torch.device:
    """CUDA when present; the CPU presets stay on the CPU, where their training is reproducible."""
    return torch.device("cuda" if preset.gpu and torch.cuda.is_available() else "cpu")


def fingerprint(preset: Preset, device: torch.device) -> str:
    """A hash of what shapes the weights (not the preset's description)."""
    settings = {k: v for k, v in dataclasses.asdict(preset).items() if k != "description"}
    facts = {"preset": settings, "version": TRAINING_VERSION, "device": device.type}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:12]


def cache_path(preset: Preset, seed: int, device: torch.device, root: Path | None = None) -> Path:
    return (root or cache_root()) / f"{preset.name}-seed{seed}-{fingerprint(preset, device)}"


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def is_complete(directory: Path) -> bool:
    return (directory / METADATA_FILE).is_file()


def build_once(final: Path, write: Callable[[Path], None]) -> Path:
    """`final`, made by `write(staging)` into a staging directory renamed into place, the first time
    only; `write` must leave helios.json in it, which marks the directory complete."""
    if is_complete(final):
        return final
    with _locked(final.with_name(final.name + ".lock")):
        if is_complete(final):  # another process finished it while we waited
            return final
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        try:
            write(staging)
            if not is_complete(staging):
                raise RuntimeError(f"{final.name}: nothing wrote {METADATA_FILE}")
            staging.chmod(0o755)  # mkdtemp makes it private; the model is meant to be shared
            for file in staging.iterdir():
                file.chmod(0o644)
            if final.exists():  # a leftover without metadata: never a finished model
                shutil.rmtree(final)
            staging.rename(final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return final


def train_preset(
    preset: str | Preset,
    seed: int = 0,
    *,
    device: str | None = None,
    steps: int | None = None,
    log: Callable[[str], None] | None = None,
    cache_dir: Path | None = None,
    evaluate: bool = True,
) -> Path:
    """The directory of the trained model (HF config, safetensors, tokenizer, helios.json);
    trains it on the first call, returns at once afterwards. `preset` is a name of PRESETS or a
    Preset of one's own (tests). `evaluate=False` skips the held-out
    evaluation in helios.json (quick test trainings)."""
    chosen = (get_preset(preset) if isinstance(preset, str) else preset).with_steps(steps)
    target = torch.device(device) if device else default_device(chosen)
    final = cache_path(chosen, seed, target, cache_dir)
    if is_complete(final):
        return final

    def write(staging: Path) -> None:
        model, tokenizer, metadata = train_model(chosen, seed, target, log, evaluate_after=evaluate)
        model.to("cpu")  # type: ignore[arg-type]
        model.save_pretrained(str(staging), safe_serialization=True)
        tokenizer.save_pretrained(str(staging))
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")

    build_once(final, write)
    if log:
        log(f"{chosen.name}: saved to {final}")
    return final


def copy_model(source: Path, out: Path) -> Path:
    """The files of a cached model copied to `out` (created; existing files replaced)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.is_file():
            shutil.copy2(item, out / item.name)
    return out


def train_command(preset: str, out: Path, seed: int = 0, log: Callable[[str], None] | None = None) -> Path:
    """`helios train`: the cached model copied to `out` (created; existing files replaced)."""
    return copy_model(train_preset(preset, seed, log=log), out)
