"""WorkerMetrics on a real registry: every contract metric present, fed only through the observer hooks."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from helios_worker import contract
from helios_worker.engine.api import Finished
from helios_worker.metrics import ModelSizes, WorkerIdentity, WorkerMetrics, finish_status

IDENTITY = WorkerIdentity(
    deployment="shop", candidate="tiny", depth=4, model="tiny-model", profile=True, device="cuda:0", dtype="bfloat16"
)
BASE = {"deployment": "shop", "candidate": "tiny", "depth": "4"}


def samples(telemetry: WorkerMetrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = generate_latest(telemetry.registry).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **extra: str) -> float:
    return found[(name, frozenset({**BASE, **extra}.items()))]


class FakeGpu:
    def __init__(self) -> None:
        self.joules = 100.0

    def energy_joules(self) -> float | None:
        return self.joules

    def memory_used_bytes(self) -> int | None:
        return 1234


def test_every_contract_metric_is_exposed_with_base_labels_before_any_traffic() -> None:
    telemetry = WorkerMetrics(IDENTITY, model_layers=4, gpu=FakeGpu())
    names = {name for name, _ in samples(telemetry)}
    for metric in contract.ALL_METRICS:
        expected = metric.series + ("_count" if metric.kind == "histogram" else "")
        assert expected in names, f"{metric.name} is missing"
    found = samples(telemetry)
    for status in contract.REQUEST_STATUSES:
        assert value(found, "helios_requests_total", status=status) == 0
    for layer in range(1, 5):
        assert value(found, "helios_layer_agreement_total", layer=str(layer)) == 0
        assert value(found, "helios_depth_agreement_total", layer=str(layer)) == 0
    assert value(found, "helios_model_layers") == 4
    assert (
        value(
            found,
            "helios_worker_info",
            model="tiny-model",
            profile="true",
            device="cuda:0",
            dtype="bfloat16",
            exits="trained",
        )
        == 1
    )


def test_observer_hooks_drive_the_series() -> None:
    telemetry = WorkerMetrics(IDENTITY, model_layers=4)
    telemetry.on_step(batch_size=3, queue_length=0, seconds=0.5)
    telemetry.on_step(batch_size=1, queue_length=0, seconds=0.25)
    for layer, breach in ((1, False), (2, False), (4, True)):
        telemetry.on_token(layer, breach, breach_ratio=1 / 3, window_tokens=3)
    telemetry.on_profile_token(5, agreeing_layers=(3, 4), agreeing_depths=(4,))
    telemetry.on_first_token(0.02)
    telemetry.on_inter_token(0.003)
    telemetry.on_finished(Finished("length", prompt_tokens=3, completion_tokens=3), profiled=True)
    telemetry.on_finished(Finished("error", 3, 0, error="boom"), profiled=True)
    telemetry.record_request(contract.STATUS_REJECTED)
    found = samples(telemetry)
    assert value(found, "helios_exit_layer_count") == 3
    assert value(found, "helios_exit_layer_sum") == 7
    assert value(found, "helios_exit_layer_bucket", le="2.0") == 2
    assert value(found, "helios_confidence_breaches_total") == 1
    assert value(found, "helios_generated_tokens_total") == 3
    assert value(found, "helios_breach_window_ratio") == 1 / 3
    assert value(found, "helios_breach_window_tokens") == 3
    assert value(found, "helios_batch_size_count") == 2
    assert value(found, "helios_batch_size_bucket", le="2.0") == 1
    assert value(found, "helios_decode_seconds_total") == 0.75
    assert value(found, "helios_first_confident_layer_bucket", le="4.0") == 0
    assert value(found, "helios_first_confident_layer_bucket", le="5.0") == 1
    assert value(found, "helios_layer_agreement_total", layer="3") == 1
    assert value(found, "helios_layer_agreement_total", layer="2") == 0
    assert value(found, "helios_depth_agreement_total", layer="4") == 1
    assert value(found, "helios_profiled_tokens_total") == 1
    assert value(found, "helios_profiled_requests_total") == 2
    assert value(found, "helios_requests_total", status="ok") == 1
    assert value(found, "helios_requests_total", status="error") == 1
    assert value(found, "helios_requests_total", status="rejected") == 1
    assert value(found, "helios_time_to_first_token_seconds_count") == 1
    assert value(found, "helios_inter_token_latency_seconds_bucket", le="0.005") == 1


def test_sizes_and_live_state_are_reported() -> None:
    telemetry = WorkerMetrics(IDENTITY, model_layers=4)
    telemetry.set_model_sizes(ModelSizes(2, 4, 1000, 300, 4096, 64))
    queue = [5]
    telemetry.bind_live_state(lambda: queue[0], lambda: 7)
    found = samples(telemetry)
    assert value(found, "helios_loaded_layers") == 2
    assert value(found, "helios_resident_weight_bytes") == 1000
    assert value(found, "helios_layer_weight_bytes") == 300
    assert value(found, "helios_kv_cache_bytes") == 4096
    assert value(found, "helios_kv_bytes_per_token") == 64
    assert value(found, "helios_queue_length") == 5
    assert value(found, "helios_running_batch") == 7
    queue[0] = 0
    assert value(samples(telemetry), "helios_queue_length") == 0


def test_serving_worker_has_no_profiling_series_and_no_gpu_series_without_a_gpu() -> None:
    serving = WorkerIdentity(deployment="shop", candidate="tiny", depth=2, model="tiny-model", profile=False)
    telemetry = WorkerMetrics(serving, model_layers=4)
    telemetry.on_profile_token(1, (1,), (1,))  # ignored, not an error
    names = {name for name, _ in samples(telemetry)}
    assert not any("agreement" in n or "profiled" in n or "first_confident" in n for n in names)
    assert not any("energy" in n or "gpu_memory" in n for n in names)


def test_energy_counts_from_start_and_gpu_memory_is_reported() -> None:
    gpu = FakeGpu()
    telemetry = WorkerMetrics(IDENTITY, model_layers=4, gpu=gpu)
    gpu.joules = 112.5
    found = samples(telemetry)
    assert value(found, "helios_energy_joules_total") == 12.5
    assert value(found, "helios_gpu_memory_used_bytes") == 1234


def test_two_workers_in_one_process_keep_separate_registries() -> None:
    a = WorkerMetrics(IDENTITY, model_layers=4)
    b = WorkerMetrics(IDENTITY, model_layers=4)
    a.on_token(1, False, 0.0, 1)
    assert value(samples(a), "helios_generated_tokens_total") == 1
    assert value(samples(b), "helios_generated_tokens_total") == 0


def test_finish_reasons_map_to_request_statuses() -> None:
    assert finish_status(Finished("stop", 1, 1)) == contract.STATUS_OK
    assert finish_status(Finished("length", 1, 1)) == contract.STATUS_OK
    assert finish_status(Finished("cancelled", 1, 0)) == contract.STATUS_CLIENT_ERROR
    assert finish_status(Finished("error", 1, 0, "x")) == contract.STATUS_ERROR
