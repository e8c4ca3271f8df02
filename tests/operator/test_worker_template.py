"""A spec change that shapes the worker's pods (env, image, dtype, threshold, model cache, model) rolls the workers
it concerns; a change of replicas only scales; the Deployment carries the fingerprint."""

from __future__ import annotations

from dataclasses import replace

import pytest

from helios_operator.core.manifests import worker_deployment
from helios_operator.core.names import ANNOTATION_TEMPLATE
from helios_operator.core.types import EnsureWorker, HeliosSpec, ModelCacheSpec, SpecError
from helios_operator.core.worker_args import worker_args, worker_template

from .test_reconcile import SPEC, Platform, profiled


def test_the_template_changes_with_what_shapes_the_pods_and_not_with_replicas() -> None:
    base = worker_template(SPEC, "/models/small")
    env = replace(SPEC, worker=replace(SPEC.worker, env=({"name": "HF_TOKEN", "value": "x"},)))
    dtype = replace(SPEC, worker=replace(SPEC.worker, dtype="float16"))
    threshold = replace(SPEC, exit=replace(SPEC.exit, confidence_threshold=0.8))
    claim = replace(SPEC, worker=replace(SPEC.worker, model_cache=ModelCacheSpec(claim_name="hf-cache")))
    size = replace(SPEC, worker=replace(SPEC.worker, model_cache=ModelCacheSpec(size_limit="8Gi")))
    changed = [worker_template(s, "/models/small") for s in (env, dtype, threshold, claim, size)]
    assert len({base, *changed, worker_template(SPEC, "/models/other")}) == 7
    assert worker_template(replace(SPEC, replicas=7), "/models/small") == base


def test_a_changed_env_rolls_the_active_worker_and_only_it() -> None:
    p = Platform()
    profiled(p)
    p.settle()
    assert p.status.active is not None
    active = p.status.active.worker
    before = p.workers[active].template
    p.spec = replace(SPEC, worker=replace(SPEC.worker, env=({"name": "LOG", "value": "debug"},)))
    result = p.step()
    ensures = [a for a in result.actions if isinstance(a, EnsureWorker)]
    assert [(e.name, e.replicas) for e in ensures] == [(active, SPEC.replicas)]
    assert ensures[0].template != before
    p.settle()
    assert p.status.active is not None and p.status.active.worker == active  # no switch: a roll in place
    assert p.workers[active].template == ensures[0].template


def test_the_deployment_carries_the_fingerprint_and_the_dtype_flag() -> None:
    spec = replace(SPEC, worker=replace(SPEC.worker, image="img:1", dtype="float16"))
    action = EnsureWorker("chat-small-l5", "small", "/models/small", 5, "serve", "chat-small-l5", 2, "abc123")
    d = worker_deployment("chat", "ns", spec, action)
    assert d["metadata"]["annotations"] == {ANNOTATION_TEMPLATE: "abc123"}
    args = d["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--dtype") + 1] == "float16"
    auto = worker_args("chat", SPEC, action, model_path="/m", host="0.0.0.0", port=8000)
    assert "--dtype" not in auto  # auto: the worker picks bfloat16 on its GPU, float32 on a CPU


def test_an_unknown_dtype_is_a_spec_error() -> None:
    with pytest.raises(SpecError, match=r"spec\.worker\.dtype"):
        HeliosSpec.from_dict({"candidates": [{"name": "a", "model": "/m"}], "worker": {"dtype": "int4"}})
