"""The project's own control plane (scripts/cluster.sh) as the cluster suite sees it: where it is,
how to start it, who may use it. Plain functions; the fixtures are in conftest.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.kubelet import ApiCredentials, TestKubelet

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "cluster.sh"
GO_MINIMUM = (1, 25)
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "helm", "prometheus")


def _script(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, check=False)


def go_version() -> tuple[int, int] | None:
    go = shutil.which("go")
    if go is None:
        return None
    try:
        out = subprocess.run([go, "env", "GOVERSION"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    parts = out.stdout.strip().removeprefix("go").split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None


def binaries() -> Path:
    return Path(_script("bin").stdout.strip())


def crds() -> Path:
    """Other projects' CRDs, as published (scripts/cluster.sh build fetches them)."""
    return Path(_script("crds").stdout.strip())


def built() -> bool:
    bin_dir = binaries()
    return all((bin_dir / b).is_file() for b in BINARIES)


def unavailable() -> str | None:
    """Why the project's own plane cannot run here, or None."""
    if os.environ.get("HELIOS_CLUSTER") == "0":
        return "HELIOS_CLUSTER=0: the project's own control plane is turned off"
    if built():
        return None
    version = go_version()
    if version is None or version < GO_MINIMUM:
        found = "no Go" if version is None else f"Go {version[0]}.{version[1]}"
        return (
            f"the cluster suite builds a real control plane from Go modules and needs Go >= 1.25 ({found} here); "
            "or run it against any cluster: HELIOS_E2E=1 KUBECONFIG=... (docs/cluster-testing.md)"
        )
    return None


@dataclass(frozen=True)
class Plane:
    """A running plane: its admin kubeconfig, binaries and state directory."""

    kubeconfig: Path
    bin_dir: Path
    state: Path
    started_here: bool

    @property
    def audit_log(self) -> Path:
        return self.state / "audit.log"

    @property
    def pod_prefix(self) -> str:
        """The first two octets of the test kubelet's pod addresses: 10.244 where the pod CIDR is
        routed locally, 127.0 where it could not be (EndpointSlices then refuse the addresses)."""
        path = self.state / "pod-prefix"
        return path.read_text().strip() if path.is_file() else "127.0"

    @property
    def routable_pods(self) -> bool:
        return self.pod_prefix != "127.0"

    @property
    def kubectl(self) -> str:
        return str(self.bin_dir / "kubectl")

    @property
    def helm(self) -> str:
        return str(self.bin_dir / "helm")

    def env(self, kubeconfig: Path | str | None = None) -> dict[str, str]:
        """The environment for real clients of this plane (kubectl, helm, the operator)."""
        return {
            **os.environ,
            "KUBECONFIG": str(kubeconfig or self.kubeconfig),
            "PATH": f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "HELM_CACHE_HOME": str(self.state / "helm" / "cache"),
            "HELM_CONFIG_HOME": str(self.state / "helm" / "config"),
            "HELM_DATA_HOME": str(self.state / "helm" / "data"),
        }

    def node_kubeconfig(self, node: str) -> Path:
        done = _script("node-kubeconfig", node)
        assert done.returncode == 0, f"cluster.sh node-kubeconfig {node}: {done.stderr}"
        return Path(done.stdout.strip())

    def test_node(
        self,
        name: str,
        scratch: Path,
        images: Mapping[str, Sequence[str] | None],
        *,
        capacity: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> TestKubelet:
        """A test kubelet registered as node `name` that runs its pods' containers as this machine's
        processes, with this venv's commands (helios) on PATH and `env` over the suite's own."""
        creds = ApiCredentials.from_kubeconfig(self.node_kubeconfig(name), scratch / "creds")
        run_env = {**os.environ, **(env or {})}
        run_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        return TestKubelet(
            creds,
            name,
            capacity=capacity or {"cpu": "16", "memory": "64Gi", "nvidia.com/gpu": "8"},
            images=images,
            labels=labels,
            env=run_env,
            workdir=scratch / "pods",
            pod_prefix=self.pod_prefix,
            pid_file=self.state / "kubelet.pids",
        )

    def audit_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.audit_log.read_text().splitlines():
            if line.strip():
                events.append(json.loads(line))
        return events


def up(timeout: float = 2400.0) -> Plane:
    """`cluster.sh up` (building first if nothing is cached: up to half an hour on 2 cores)."""
    was_running = _script("status").returncode == 0
    done = _script("up", timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"scripts/cluster.sh up failed:\n{done.stderr[-4000:]}")
    kubeconfig = Path(done.stdout.strip().splitlines()[-1])
    return Plane(kubeconfig=kubeconfig, bin_dir=binaries(), state=kubeconfig.parent, started_here=not was_running)


def api_server(plane: Plane) -> str:
    """The API server's URL, from the admin kubeconfig."""
    import yaml

    config = yaml.safe_load(plane.kubeconfig.read_text())
    return str(config["clusters"][0]["cluster"]["server"])


def down() -> None:
    _script("down")
