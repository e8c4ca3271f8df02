"""Pods run locked down: the chart's operator pod (every value set, rendered by the real Helm engine)
and every worker pod the operator builds (serve, profile, and the hf:// download init container)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from helios_operator.core import manifests
from helios_operator.core.types import EnsureWorker, HeliosSpec

CHART = Path(__file__).resolve().parents[2] / "charts" / "helios"
VALUES: dict[str, dict[str, Any]] = {
    "defaults": {},
    "monitoring": {"serviceMonitor": {"enabled": True}},
    "namespaced": {"watchNamespaces": ["team-a"]},
}


def _locked_down(pod: dict[str, Any], where: str) -> None:
    pod_sc = pod.get("securityContext") or {}
    for c in [*pod.get("initContainers", []), *pod["containers"]]:
        sc = c.get("securityContext") or {}
        assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, (where, c["name"])
        assert sc.get("readOnlyRootFilesystem") is True, (where, c["name"])
        assert sc.get("allowPrivilegeEscalation") is False, (where, c["name"])
        assert sc.get("privileged", False) is False, (where, c["name"])
        assert sc.get("capabilities") == {"drop": ["ALL"]}, (where, c["name"])


@pytest.mark.parametrize("value_set", sorted(VALUES))
def test_the_charts_operator_pod_is_non_root_read_only_unprivileged_and_drops_all_capabilities(value_set: str) -> None:
    rendered = helm.Chart.load(str(CHART)).render(VALUES[value_set], name="helios", namespace="ops", is_install=True)
    texts = [text for path, text in rendered.items() if path.endswith(".yaml")]
    docs = [d for text in texts for d in yaml.safe_load_all(text) if isinstance(d, dict)]
    (deployment,) = [d for d in docs if d.get("kind") == "Deployment"]
    _locked_down(deployment["spec"]["template"]["spec"], f"chart {value_set}")


@pytest.mark.parametrize(
    "action",
    [
        EnsureWorker("chat-small-l5", "small", "pvc://models/small", 5, "serve", "chat-small-l5", 2),
        EnsureWorker("chat-p1-small", "small", "/models/small", 0, "profile", "chat-p1", 1),
        EnsureWorker("chat-big-l9", "big", "hf://org/big", 9, "serve", "chat-big-l9", 1),
    ],
    ids=["serve-pvc", "profile-path", "serve-hf-init-container"],
)
def test_every_worker_pod_is_non_root_read_only_unprivileged_and_drops_all_capabilities(action: EnsureWorker) -> None:
    spec = HeliosSpec.from_dict(
        {"candidates": [{"name": action.candidate, "model": action.model}], "worker": {"image": "w:1"}}
    )
    pod = manifests.worker_deployment("chat", "ml", spec, action)["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    if action.model.startswith("hf://"):
        assert pod["initContainers"], "the hf:// download runs in an init container"
    _locked_down(pod, action.name)
