"""The two images the chart runs, checked by reading their Dockerfiles.

No Docker engine exists on this machine, so nothing here builds an image: these tests parse Dockerfile.operator,
Dockerfile.worker and .dockerignore and check what the build would do (base images, what gets installed, the
user, ports and entrypoints) against pyproject.toml, core/names.py and the chart. Building and running the images is
left to a machine with a Docker engine (CI with buildx, or a real cluster).
"""

from __future__ import annotations

import fnmatch
import json
import re
import tomllib

import yaml
from chart_render import CHART, ROOT, manifests, one
from tests.support.dockerfile import Stage, parse_dockerfile

from helios_operator.core import names
from helios_operator.settings import Settings

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


OPERATOR = parse_dockerfile(ROOT / "Dockerfile.operator")
WORKER = parse_dockerfile(ROOT / "Dockerfile.worker")


def _installs(stages: list[Stage]) -> list[str]:
    return [r for s in stages for r in s.all("RUN") if "pip install" in r or "pip wheel" in r]


def _uid(user: str) -> int:
    return int(user.split(":")[0])


def test_the_helios_console_script_is_the_entrypoint_of_both_images() -> None:
    assert PYPROJECT["project"]["scripts"]["helios"] == "helios_cli.main:main"
    assert json.loads(OPERATOR[-1].last("ENTRYPOINT")) == ["helios", "operator"]
    assert json.loads(WORKER[-1].last("ENTRYPOINT")) == ["helios", "worker"]


def test_both_images_run_as_the_non_root_user_the_chart_expects() -> None:
    pod = one(manifests("defaults"), "Deployment")["spec"]["template"]["spec"]
    for stages in (OPERATOR, WORKER):
        user = stages[-1].last("USER")
        assert _uid(user) != 0 and user.split(":")[0] != "root"
        assert _uid(user) == 65532
    assert _uid(OPERATOR[-1].last("USER")) == pod["securityContext"]["runAsUser"]


def test_operator_image_is_a_multi_stage_slim_build_of_the_operator_extra_without_torch() -> None:
    assert len(OPERATOR) >= 2
    assert OPERATOR[0].base == OPERATOR[-1].base == "python:3.11-slim"
    installs = _installs(OPERATOR)
    assert any(".[operator]" in r for r in installs) and any('"helios[operator]"' in r for r in installs)
    for line in installs:
        assert "torch" not in line and "[worker]" not in line
    # nothing the operator extra or the core pulls in is torch (so the wheel stage cannot fetch it either)
    deps = PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"]["operator"]
    assert not [d for d in deps if re.match(r"^(torch|transformers)\b", d)]


def test_operator_image_exposes_the_ports_the_chart_probes_and_scrapes() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())["operator"]
    exposed = {int(p) for line in OPERATOR[-1].all("EXPOSE") for p in line.split()}
    assert exposed == {values["metricsPort"], values["healthPort"]}


def test_worker_image_keeps_the_cuda_torch_of_its_base_and_installs_the_worker_extra_without_kopf() -> None:
    base = WORKER[-1].base
    assert re.fullmatch(r"pytorch/pytorch:2\.\d+(\.\d+)?-cuda12\.\d+-cudnn9-runtime", base), base
    installs = _installs(WORKER)
    (final_install,) = [r for r in WORKER[-1].all("RUN") if "pip install" in r]
    assert "[worker]" in final_install
    assert "--constraint" in final_install and "torch==" in final_install  # pinned to the base's torch
    assert not any("kopf" in r or "[operator]" in r for r in installs)
    worker_deps = " ".join(PYPROJECT["project"]["optional-dependencies"]["worker"])
    assert "kopf" not in worker_deps


def test_worker_image_serves_on_the_worker_port_and_reads_models_from_slash_models() -> None:
    exposed = {int(p) for line in WORKER[-1].all("EXPOSE") for p in line.split()}
    assert exposed == {names.WORKER_PORT}
    assert json.loads(WORKER[-1].last("VOLUME")) == ["/models"]


def test_image_versions_follow_the_package_version() -> None:
    version = PYPROJECT["project"]["version"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == version
    assert Settings().worker_image.rsplit(":", 1)[1] == version
    assert Settings().worker_image.rsplit(":", 1)[0].endswith("/helios-worker")


def _ignored(patterns: list[str], path: str) -> bool:
    return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path.split("/")[0], p) for p in patterns)


def test_dockerignore_keeps_the_build_inputs_and_drops_venv_git_caches_and_tests() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for dropped in (
        ".venv",
        ".git",
        ".mypy_cache",
        ".ruff_cache",
        ".pytest_cache",
        ".hypothesis",
        "tests",
        "operator/helios_operator/__pycache__",
        "dist",
    ):
        assert _ignored(patterns, dropped), dropped
    copied = {
        arg.split()[0]
        for stages in (OPERATOR, WORKER)
        for s in stages
        for arg in s.all("COPY")
        if not arg.startswith("--from")
    }
    copied |= {
        a
        for stages in (OPERATOR, WORKER)
        for s in stages
        for line in s.all("COPY")
        for a in line.split()[:-1]
        if not a.startswith("--")
    }
    assert copied == {"pyproject.toml", "README.md", "operator", "local", "worker", "bench", "cli"}
    # every directory the package is found in is copied into the build
    assert set(PYPROJECT["tool"]["setuptools"]["packages"]["find"]["where"]) <= copied
    for source in copied:
        assert not _ignored(patterns, source), source
