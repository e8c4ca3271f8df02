"""The worker's command line (`helios worker` arguments), built once from the step's action and the
spec: the manifests put it in the container, the local platform starts processes with it."""

from __future__ import annotations

import dataclasses
import hashlib
import json

from helios_operator.core.types import EnsureWorker, HeliosSpec

DRAIN_TIMEOUT_S = 30  # the worker's --drain-timeout: in-flight generations finish


def worker_args(
    deployment: str,
    spec: HeliosSpec,
    action: EnsureWorker,
    *,
    model_path: str,
    host: str,
    port: int,
    drain_timeout_s: int = DRAIN_TIMEOUT_S,
    port_file: str | None = None,
) -> list[str]:
    """Depth 0 (all layers) leaves --layers out; port 0 with a port file: the worker says which port it got."""
    args = ["--model", model_path]
    if action.depth > 0:
        args += ["--layers", str(action.depth)]
    args += ["--threshold", str(spec.exit.confidence_threshold), "--breach-window", str(spec.exit.breach_window)]
    args += ["--max-batch", str(spec.worker.max_batch)]
    if spec.worker.dtype != "auto":  # auto: the worker picks bfloat16 on its GPU, float32 on a CPU
        args += ["--dtype", spec.worker.dtype]
    if action.role == "profile":
        args.append("--profile")
    args += ["--deployment", deployment, "--candidate", action.candidate, "--host", host]
    args += ["--port", str(port), "--drain-timeout", str(drain_timeout_s)]
    if port_file is not None:
        args += ["--port-file", port_file]
    return args


def worker_template(spec: HeliosSpec, model: str) -> str:
    """A fingerprint of what a worker's pods are made of beyond their name, replicas and pool (the
    spec's worker section, its exit settings, the model): when it changes, the pods roll."""
    made_of = {"model": model, "worker": dataclasses.asdict(spec.worker), "exit": dataclasses.asdict(spec.exit)}
    return hashlib.sha256(json.dumps(made_of, sort_keys=True, default=str).encode()).hexdigest()[:16]
