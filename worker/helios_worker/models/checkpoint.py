"""Read single tensors from an HF checkpoint directory without reading the rest.

Safetensors (one file or sharded with model.safetensors.index.json) are opened lazily and each
tensor is read by name; pytorch_model.bin is memory-mapped, so untouched tensors stay on disk.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open


class CheckpointError(ValueError):
    """The directory holds no weights we can read."""


class Checkpoint:
    """Tensor names -> where they are; `read` reads one tensor and remembers its name."""

    def __init__(self, files: dict[str, Path], opened: dict[Path, Any]) -> None:
        self._files = files
        self._opened = opened
        self.read_keys: list[str] = []

    def keys(self) -> set[str]:
        return set(self._files)

    def read(self, key: str) -> torch.Tensor:
        self.read_keys.append(key)
        handle = self._opened[self._files[key]]
        tensor: torch.Tensor = handle.get_tensor(key) if hasattr(handle, "get_tensor") else handle[key]
        return tensor


def _weight_map(directory: Path, index_name: str) -> dict[str, Path]:
    index = json.loads((directory / index_name).read_text())
    return {key: directory / name for key, name in index["weight_map"].items()}


def _safetensors_keys(file: Path) -> list[str]:
    with safe_open(str(file), framework="pt") as handle:
        return list(handle.keys())


@contextmanager
def open_checkpoint(directory: Path) -> Iterator[Checkpoint]:
    if (directory / "model.safetensors.index.json").is_file():
        files = _weight_map(directory, "model.safetensors.index.json")
    elif (directory / "model.safetensors").is_file():
        files = dict.fromkeys(_safetensors_keys(directory / "model.safetensors"), directory / "model.safetensors")
    elif (directory / "pytorch_model.bin.index.json").is_file():
        files = _weight_map(directory, "pytorch_model.bin.index.json")
    elif (directory / "pytorch_model.bin").is_file():
        single = directory / "pytorch_model.bin"
        state = torch.load(single, map_location="cpu", mmap=True, weights_only=True)
        yield Checkpoint(dict.fromkeys(state, single), {single: state})
        return
    else:
        raise CheckpointError(
            f"{directory} has no weights: expected model.safetensors, model.safetensors.index.json or pytorch_model.bin"
        )
    missing = sorted({str(f) for f in files.values() if not f.is_file()})
    if missing:
        raise CheckpointError(f"{directory}: weight files named by the index are missing: {', '.join(missing)}")
    with ExitStack() as stack:
        opened: dict[Path, Any] = {}
        for file in set(files.values()):
            if file.suffix == ".safetensors":
                opened[file] = stack.enter_context(safe_open(str(file), framework="pt"))
            else:
                opened[file] = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        yield Checkpoint(files, opened)
