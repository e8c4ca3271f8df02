"""Which checkpoints count as having trained exits: the worker's safe default reads only this."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helios_worker.models.metadata import EXIT_ADAPTERS_FILE, METADATA_FILE, exits_kind


@pytest.mark.parametrize(
    ("metadata", "adapters", "kind"),
    [
        (None, False, "untrained"),
        ({"imported_from": "x.gguf", "trained_exits": False}, False, "untrained"),
        ("{not json", False, "untrained"),
        ({"preset": "tiny", "exit_loss_weights": [0.5, 1.0]}, False, "trained"),  # presets cached before the marker
        ({"trained_exits": True}, False, "trained"),
        ({"trained_exits": False}, True, "adapters"),
    ],
)
def test_exits_count_as_trained_only_with_the_marker_or_an_adapters_file(
    tmp_path: Path, metadata: object, adapters: bool, kind: str
) -> None:
    if isinstance(metadata, str):
        (tmp_path / METADATA_FILE).write_text(metadata)
    elif metadata is not None:
        (tmp_path / METADATA_FILE).write_text(json.dumps(metadata))
    if adapters:
        (tmp_path / EXIT_ADAPTERS_FILE).write_bytes(b"")
    assert exits_kind(tmp_path) == kind
