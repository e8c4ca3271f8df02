"""`helios worker`'s options are the one source of the engine's and the server's settings."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from helios_worker.engine.api import EngineConfig, GenerationRequest, SamplingParams
from helios_worker.engine.engine import Engine
from helios_worker.engine.testing import random_model
from helios_worker.metrics import WorkerIdentity
from helios_worker.serve import WorkerOptions


def test_the_engine_config_takes_every_option_the_engine_shares_by_name() -> None:
    options = WorkerOptions(  # device and dtype as build_app passes them: resolved from `auto`
        model=Path("/m"),
        threshold=0.7,
        profile=True,
        breach_window=40,
        max_batch=3,
        max_queue=9,
        max_context=128,
        device="cuda:1",
        dtype="bfloat16",
    )
    assert options.engine_config() == EngineConfig(
        confidence_threshold=0.7,
        profile=True,
        breach_window=40,
        max_batch=3,
        max_queue=9,
        max_context=128,
        exit_layers=(),  # the worker's serving default: one exit head per token, at its depth
        exit_max_batch=1,
        device="cuda:1",
        dtype="bfloat16",
    )
    # what the flags cannot set keeps the engine's own default
    unset = {f.name for f in fields(EngineConfig)} - {f.name for f in fields(WorkerOptions)} - {"confidence_threshold"}
    assert unset == {"early_stop", "kv_budget_bytes", "cuda_graphs", "prefill_tokens", "ignore_eos"}


def test_the_server_settings_name_the_candidate_and_carry_token_and_drain_timeout() -> None:
    options = WorkerOptions(model=Path("/m"), api_token="s3cret", drain_timeout=7.0)
    identity = WorkerIdentity(deployment="d", candidate="tiny", depth=3, model="m", profile=False)
    settings = options.server_settings(identity, model_layers=6)
    assert (settings.model_name, settings.candidate, settings.depth, settings.model_layers) == ("tiny", "tiny", 3, 6)
    assert settings.api_token == "s3cret" and settings.drain_timeout_seconds == 7.0


def test_exits_off_is_a_threshold_no_layer_meets_so_every_token_comes_from_the_last_loaded_layer() -> None:
    options = WorkerOptions(model=Path("/m"), threshold=0.2, exit_layers=None, max_context=64, device="cpu")
    model = random_model("llama", seed=1)
    prompts = [GenerationRequest((5, 6, 7, 8), SamplingParams(max_tokens=12))]

    def exit_layers(config: EngineConfig) -> set[int]:
        engine = Engine(model, config)
        try:
            return {e.exit_layer for events, _ in engine.generate_batch(prompts) for e in events}
        finally:
            engine.stop()

    assert exit_layers(options.engine_config()) != {model.loaded_layers}  # exits on: some tokens leave early
    off = options.engine_config(exits_on=False)
    assert off.confidence_threshold > 1.0 and off.exit_layers is None  # --exit-layers all, overruled
    assert exit_layers(off) == {model.loaded_layers}
