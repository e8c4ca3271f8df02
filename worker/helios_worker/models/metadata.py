"""helios.json, the file HELIOS writes beside a model's weights: where the model came from and
whether its exits were trained. Imports nothing heavy, so the worker can read it before loading.

A model's exits count as trained when helios.json says so (`"trained_exits": true`, or the
`exit_loss_weights` of a preset trained with the early-exit loss) or when an exit-adapters file
lies beside the weights. Anything else (an imported or hand-converted checkpoint) is vanilla: its
intermediate layers' logit lens is confidently wrong, so the worker serves it with exits off.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

METADATA_FILE = "helios.json"
EXIT_ADAPTERS_FILE = "exit_adapters.safetensors"

ExitsKind = Literal["trained", "adapters", "untrained"]


def read_metadata(directory: Path) -> dict[str, Any]:
    """helios.json as a dict; {} when absent or unreadable."""
    try:
        data = json.loads((directory / METADATA_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def exits_kind(directory: Path) -> ExitsKind:
    """How the exits inside the stack of the model at `directory` were trained, if at all."""
    if (directory / EXIT_ADAPTERS_FILE).is_file():
        return "adapters"
    metadata = read_metadata(directory)
    if metadata.get("trained_exits") is True or "exit_loss_weights" in metadata:
        return "trained"
    return "untrained"
