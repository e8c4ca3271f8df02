"""The HeliosDeployment's API contract on a real API server, with kubectl: the name rule, strict field
validation, the status subresource, printer columns, the scale subresource and an HPA on it.

No operator runs here: where a status is needed the test writes it through the status subresource,
as the operator would, and says so. Runs on every target (the project's plane or HELIOS_E2E=1).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import yaml
from e2e_support import Kubectl, wait_for

from helios_operator.core import names

pytestmark = [pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def space(kube_factory: Callable[[str], Kubectl]) -> Kubectl:
    """A namespace of this module's own (the session's namespace is the e2e suite's)."""
    return kube_factory("helios-contract")


SPEC: dict[str, Any] = {
    "candidates": [{"name": "small", "model": "/models/tiny", "layers": 8}],
    "replicas": 1,
}
NAME_MESSAGE = "metadata.name must be a DNS-1035 label of at most 63 characters"


def hd(namespace: str, name: str, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": names.API_VERSION,
        "kind": names.KIND,
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec or SPEC,
    }


def create(space: Kubectl, obj: dict[str, Any], *flags: str) -> Any:
    return space.run("create", *flags, "-f", "-", stdin=yaml.safe_dump(obj))


@pytest.mark.parametrize(
    "name",
    ["a" * 64, "Small", "1st-model", "my.model", "model-"],
    ids=["64 characters", "upper case", "starts with a digit", "a dot (a DNS-1123 subdomain)", "ends in '-'"],
)
def test_a_name_that_is_no_dns_1035_label_is_refused_with_the_rule_message(
    space: Kubectl, crd: dict[str, Any], name: str
) -> None:
    done = create(space, hd(space.namespace, name), "--dry-run=server")
    assert done.returncode != 0, f"the API server accepted the name {name!r}"
    # Upper case and a trailing '-' are refused by the API server's own name check already
    # (DNS-1123 subdomain); the others pass it and only the CRD's root rule refuses them.
    if name[0].isdigit() or "." in name or len(name) == 64:
        assert NAME_MESSAGE in done.stderr, done.stderr


def test_a_63_character_dns_1035_name_is_accepted(space: Kubectl, crd: dict[str, Any]) -> None:
    done = create(space, hd(space.namespace, "a" + "-b" * 31), "--dry-run=server")
    assert done.returncode == 0, done.stderr


def test_strict_field_validation_refuses_an_unknown_field_by_name(space: Kubectl, crd: dict[str, Any]) -> None:
    obj = hd(space.namespace, "strict", {**SPEC, "objetive": "latency"})
    done = space.run("apply", "--dry-run=server", "--validate=strict", "-f", "-", stdin=yaml.safe_dump(obj))
    assert done.returncode != 0 and 'unknown field "spec.objetive"' in done.stderr, done.stderr
    # ... where a client that does not ask for it gets the field silently dropped.
    done = space.run(
        "apply", "--dry-run=server", "--validate=false", "-o", "json", "-f", "-", stdin=yaml.safe_dump(obj)
    )
    assert done.returncode == 0 and "objetive" not in json.loads(done.stdout)["spec"]


@pytest.fixture(scope="module")
def scaled(space: Kubectl, crd: dict[str, Any]) -> str:
    """A HeliosDeployment whose status the test writes as the operator would (no operator here)."""
    space.apply([hd(space.namespace, "contract")])
    status = {
        "status": {
            "phase": "Serving",
            "active": {"candidate": "small", "depth": 6, "worker": "contract-small-d6"},
            "replicas": 1,
            "readyReplicas": 1,
            "selector": f"{names.LABEL_DEPLOYMENT}=contract",
        }
    }
    space.ns("patch", "hd", "contract", "--subresource=status", "--type=merge", "-p", json.dumps(status))
    return "contract"


def test_status_is_a_subresource_the_main_resource_cannot_write(space: Kubectl, scaled: str) -> None:
    space.ns("patch", "hd", scaled, "--type=merge", "-p", json.dumps({"status": {"phase": "Failed"}}))
    got = space.ns_json("get", "hd", scaled)
    assert got["status"]["phase"] == "Serving"  # the write to the main resource dropped status
    assert got["metadata"]["generation"] == 1  # and a status write does not bump the generation


def test_kubectl_get_hd_prints_the_crd_columns(space: Kubectl, scaled: str) -> None:
    header, row = space.ns("get", "hd", scaled).strip().splitlines()[:2]
    assert header.split() == ["NAME", "PHASE", "CANDIDATE", "DEPTH", "REPLICAS", "READY", "AGE"]
    assert row.split()[:6] == [scaled, "Serving", "small", "6", "1", "1"]
    wide = space.ns("get", "hd", scaled, "-o", "wide").strip().splitlines()[0].split()
    assert wide[-3:] == ["OBJECTIVE", "MODE", "AGE"]  # priority-1 columns, in the CRD's order


def test_kubectl_scale_acts_through_the_scale_subresource(space: Kubectl, scaled: str) -> None:
    space.ns("scale", f"hd/{scaled}", "--replicas=3")
    assert space.ns_json("get", "hd", scaled)["spec"]["replicas"] == 3
    scale = json.loads(
        space.ok(
            "get", "--raw", f"/apis/{names.API_VERSION}/namespaces/{space.namespace}/{names.PLURAL}/{scaled}/scale"
        )
    )
    assert scale["kind"] == "Scale" and scale["spec"]["replicas"] == 3
    assert scale["status"] == {"replicas": 1, "selector": f"{names.LABEL_DEPLOYMENT}=contract"}


def hpa(namespace: str, target: str) -> dict[str, Any]:
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": target, "namespace": namespace},
        "spec": {
            "scaleTargetRef": {"apiVersion": names.API_VERSION, "kind": names.KIND, "name": target},
            "minReplicas": 1,
            "maxReplicas": 4,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}},
                }
            ],
        },
    }


def hpa_conditions(space: Kubectl, name: str) -> dict[str, dict[str, Any]]:
    got = space.ns_json("get", "hpa", name)
    return {c["type"]: c for c in (got.get("status") or {}).get("conditions") or ()}


def test_an_hpa_on_a_heliosdeployment_reads_its_scale_and_resolves_its_selector(space: Kubectl, scaled: str) -> None:
    """The real HPA controller reads /scale (AbleToScale) and parses status.selector; what it then
    lacks is a metrics API (none is installed), not the selector."""
    space.apply([hpa(space.namespace, scaled)])

    def settled() -> dict[str, dict[str, Any]] | None:
        conds = hpa_conditions(space, scaled)
        return conds if "AbleToScale" in conds and "ScalingActive" in conds else None

    conds = wait_for("the HPA controller to read the scale", settled, timeout=90, interval=2)
    assert conds["AbleToScale"]["status"] == "True", conds
    assert conds["ScalingActive"]["reason"] != "InvalidSelector", conds
    assert "selector" not in conds["ScalingActive"]["message"].lower(), conds


def test_an_hpa_on_a_heliosdeployment_without_status_selector_reports_it(space: Kubectl, crd: dict[str, Any]) -> None:
    """The counter-test: with no status.selector the same HPA cannot pick pods, and says so."""
    space.apply([hd(space.namespace, "noselector"), hpa(space.namespace, "noselector")])

    def refused() -> dict[str, Any] | None:
        cond = hpa_conditions(space, "noselector").get("ScalingActive")
        return cond if cond and cond["status"] == "False" and cond["reason"] == "InvalidSelector" else None

    cond = wait_for("the HPA controller to report the missing selector", refused, timeout=90, interval=2)
    assert "selector" in cond["message"].lower()
