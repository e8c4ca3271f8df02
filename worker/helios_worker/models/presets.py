"""Sizes of the project's own early-exit models and how long each trains.

`tiny` and `small` train on a 2-core CPU in minutes (tests, the local demo); `medium` and `large`
are meant for a GPU (benchmarks). Changing a preset changes its cache fingerprint.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    layers: int
    hidden: int
    heads: int
    intermediate: int
    steps: int
    batch: int  # sequences per step
    seq_len: int  # tokens per packed sequence
    lr: float
    max_context: int  # max_position_embeddings of the saved config
    gpu: bool = False  # meant for CUDA (bf16 autocast); trains on CPU only very slowly

    def with_steps(self, steps: int | None) -> Preset:
        return self if steps is None else dataclasses.replace(self, steps=steps)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "micro",
            "4 layers x 64, ~0.2M parameters; under a minute on 2 CPU cores (the demo's small candidate)",
            layers=4,
            hidden=64,
            heads=4,
            intermediate=176,
            steps=400,
            batch=24,
            seq_len=96,
            lr=5e-3,
            max_context=256,
        ),
        Preset(
            "tiny",
            "6 layers x 96, 0.7M parameters; about a minute on 2 CPU cores",
            layers=6,
            hidden=96,
            heads=4,
            intermediate=256,
            steps=500,
            batch=24,
            seq_len=96,
            lr=4e-3,
            max_context=256,
        ),
        Preset(
            "small",
            "10 layers x 128, 2M parameters; a few minutes on 2 CPU cores",
            layers=10,
            hidden=128,
            heads=4,
            intermediate=352,
            steps=600,
            batch=24,
            seq_len=96,
            lr=3e-3,
            max_context=256,
        ),
        Preset(
            "medium",
            "16 layers x 512, 51M parameters; a few minutes on one GPU",
            layers=16,
            hidden=512,
            heads=8,
            intermediate=1408,
            steps=2000,
            batch=64,
            seq_len=128,
            lr=1.5e-3,
            max_context=1024,
            gpu=True,
        ),
        Preset(
            "large",
            "24 layers x 1024, 308M parameters; a few minutes more on one GPU",
            layers=24,
            hidden=1024,
            heads=16,
            intermediate=2816,
            steps=2000,
            batch=64,
            seq_len=128,
            lr=8e-4,
            max_context=2048,
            gpu=True,
        ),
    )
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
