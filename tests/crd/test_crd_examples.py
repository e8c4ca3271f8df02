"""Every file in examples/ is a HeliosDeployment the CRD accepts (schema and CEL rules) and the operator parses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from crd_rules import ROOT, admit, load_crd

from helios_operator.core import names
from helios_operator.core.types import HeliosSpec

EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def _docs(path: Path) -> list[dict[str, Any]]:
    with path.open() as fh:
        return [d for d in yaml.safe_load_all(fh) if d]


def test_the_three_documented_examples_exist_and_the_readme_names_each() -> None:
    assert {p.name for p in EXAMPLES} >= {"open-models-pvc.yaml", "helios-trained-tiny.yaml", "advisory-latency.yaml"}
    readme = (ROOT / "examples" / "README.md").read_text()
    for path in EXAMPLES:
        assert path.name in readme


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_is_admitted_by_the_crd_and_parsed_by_the_operator(path: Path) -> None:
    for doc in _docs(path):
        assert doc["apiVersion"] == names.API_VERSION
        assert doc["kind"] == load_crd()["spec"]["names"]["kind"]
        result = admit(doc)
        assert result.accepted, result.errors
        spec = HeliosSpec.from_dict(result.obj["spec"])
        assert HeliosSpec.from_dict(doc["spec"]) == spec


def test_examples_show_what_the_readme_says() -> None:
    pvc = HeliosSpec.from_dict(_docs(ROOT / "examples" / "open-models-pvc.yaml")[0]["spec"])
    assert pvc.objective == "throughput"
    assert len(pvc.candidates) == 3 and all(c.model.startswith("pvc://models/") for c in pvc.candidates)
    assert pvc.worker.resources["limits"]["nvidia.com/gpu"] == 1
    tiny = HeliosSpec.from_dict(_docs(ROOT / "examples" / "helios-trained-tiny.yaml")[0]["spec"])
    assert [c.name for c in tiny.candidates] == ["tiny", "small"]
    assert all(c.model.startswith("/models/") for c in tiny.candidates)
    advisory = HeliosSpec.from_dict(_docs(ROOT / "examples" / "advisory-latency.yaml")[0]["spec"])
    assert (advisory.mode, advisory.objective) == ("advisory", "latency")
