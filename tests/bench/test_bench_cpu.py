"""`helios bench --quick` on CPU: one real run (tiny models, few prompts), then checks of what it left.

The run trains two small early-exit models for a few steps (cached after the first time), profiles
them, lets the operator's policy choose, and measures HELIOS, the static baseline and plain generate
side by side. No speed is asserted here: speed targets live in the bench's own output.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from helios_bench.options import BenchOptions, add_bench_arguments, bench_options_from_args
from helios_bench.runner import BenchResult, run_bench
from helios_operator.core import policy
from helios_operator.core.types import CandidateProfile

FLOOR = 0.99  # the tiny test models are barely trained: a high floor keeps the choice near full depth
TRAIN_STEPS = 40  # enough for a model that runs; the bench's structure, not the models' quality, is tested
COMMAND = "helios bench --quick --device cpu --presets micro,tiny"
HEADER = "# Bench results\n\nentries below\n"
CONFIGS = ("helios", "static", "generate")


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[BenchResult, str, Path]:
    tmp = tmp_path_factory.mktemp("bench")
    results_md = tmp / "RESULTS.md"
    results_md.write_text(HEADER, encoding="utf-8")
    options = BenchOptions(
        device="cpu",
        presets=("micro", "tiny"),
        out=tmp / "out",
        quick=True,
        results_md=results_md,
        accuracy_floor=FLOOR,
        train_steps=TRAIN_STEPS,
        command=COMMAND,
    )
    buffer = io.StringIO()
    result = run_bench(options, console=Console(file=buffer, width=200, color_system=None))
    return result, buffer.getvalue(), results_md


def _json(bench: tuple[BenchResult, str, Path]) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(bench[0].json_path.read_text(encoding="utf-8"))
    return data


def _positive(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


def test_json_holds_every_section_for_every_configuration(bench: tuple[BenchResult, str, Path]) -> None:
    s = _json(bench)["sections"]
    for config in CONFIGS:
        assert _positive(s["throughput"][config]["tokens_per_second"])
        assert s["throughput"][config]["batch"] >= 1
        for key in ("ttft_p50_s", "ttft_p95_s", "per_token_p50_s", "per_token_p95_s"):
            assert _positive(s["latency"][config][key]), (config, key)
        assert s["latency"][config]["ttft_p95_s"] >= s["latency"][config]["ttft_p50_s"]
        assert s["max_batch"][config]["max_batch"] >= 1
        assert s["memory"][config]["resident_weight_bytes"] > 0
        assert s["memory"][config]["total_bytes"] <= s["max_batch"][config]["budget_bytes"]
        acc = s["accuracy"][config]
        for key in ("agreement", "agreement_with_largest", "exact_match"):
            assert 0.0 <= acc[key] <= 1.0, (config, key)
        for batch in ("1", "64"):
            bw = s["bandwidth"]["batches"][batch][config]
            assert _positive(bw["fraction"]) and _positive(bw["bound_tokens_per_second"]), (config, batch)
    assert _positive(s["latency"]["rate_rps"])
    assert _positive(s["bandwidth"]["bytes_per_second"])


def test_bench_json_is_the_typed_result_with_the_ratios_beside_it(bench: tuple[BenchResult, str, Path]) -> None:
    written = _json(bench)
    typed = bench[0].data
    assert list(written) == [*typed.to_dict(), "ratios"]
    assert written["helios"]["final"] == {
        **dataclasses.asdict(typed.helios.final),
        "model_layers": typed.helios.model_layers,
    }
    assert written["sections"]["max_batch"]["helios"] == dataclasses.asdict(typed.sections.max_batch.helios)
    assert written["models"]["tiny"]["path"] == str(typed.models["tiny"].path)


def test_energy_is_marked_unavailable_on_cpu(bench: tuple[BenchResult, str, Path]) -> None:
    energy = _json(bench)["sections"]["energy"]
    assert energy["available"] is False
    assert "CUDA" in energy["reason"]
    assert all(energy[c]["tokens_per_joule"] is None for c in CONFIGS)
    row = next(r for r in bench[0].ratios if r.key == "tokens_per_joule")
    assert row.ratio is None and "unavailable" in row.note


def test_every_measured_ratio_is_finite_and_positive(bench: tuple[BenchResult, str, Path]) -> None:
    ratios = _json(bench)["ratios"]
    keys = {r["key"] for r in ratios}
    assert {
        "throughput",
        "per_token_p50",
        "ttft_p50",
        "max_batch",
        "agreement",
        "exact_match",
        "bandwidth_static_b1",
        "bandwidth_static_b64",
        "engine_vs_generate",
    } <= keys
    for r in ratios:
        if r["key"] == "tokens_per_joule":
            continue
        if r["unit"] == "points":  # exact-match difference: may be negative, must be a number
            assert math.isfinite(r["ratio"])
        else:
            assert _positive(r["ratio"]), r


def test_helios_keeps_the_accuracy_floor_it_was_given(bench: tuple[BenchResult, str, Path]) -> None:
    """The floor is a promise about a rate that profiling estimated on a few prompts, so the served
    sample must be consistent with it: the floor lies at or below the 95% interval's upper end. A shallow
    placement that ignored the floor (about 90% agreement for these models) lies far outside it."""
    data = _json(bench)
    accuracy = data["sections"]["accuracy"]
    assert accuracy["floor"] == FLOOR
    helios = accuracy["helios"]
    low, high = helios["agreement_ci95"]
    assert low <= helios["agreement"] <= high
    assert high >= FLOOR, (helios, data["helios"]["final"], data["helios"]["adaptations"])
    assert helios["floor_met"] == (helios["agreement"] >= FLOOR)


def test_helios_placement_is_the_operator_policys_choice(bench: tuple[BenchResult, str, Path]) -> None:
    data = _json(bench)
    profiles = tuple(CandidateProfile.from_dict(p) for p in data["profiles"])
    assert [p.candidate for p in profiles] == ["micro", "tiny"]
    cost = policy.CostModel(
        full_batch=data["meta"]["options"]["budget_batch"], context_tokens=data["meta"]["context_tokens"]
    )
    for objective, chosen in data["helios"]["choices"].items():
        expected = policy.choose(profiles, objective, FLOOR, cost)
        assert expected is not None
        assert (chosen["candidate"], chosen["depth"]) == (expected.candidate, expected.depth)


def test_budget_fits_the_static_baseline_and_helios_fits_at_least_as_many_rows(
    bench: tuple[BenchResult, str, Path],
) -> None:
    data = _json(bench)
    max_batch = data["sections"]["max_batch"]
    assert max_batch["static"]["max_batch"] == BenchOptions().for_quick().budget_batch
    assert max_batch["helios"]["max_batch"] >= max_batch["static"]["max_batch"]
    assert data["meta"]["largest"] == "tiny"


def test_plain_generate_emits_the_static_engines_tokens(bench: tuple[BenchResult, str, Path]) -> None:
    """Same weights, greedy, no exits: the engine must reproduce transformers' own decoding."""
    acc = _json(bench)["sections"]["accuracy"]
    assert acc["static"]["agreement"] >= 0.98, acc["static"]
    assert acc["generate"]["agreement"] >= 0.98, acc["generate"]
    assert acc["generate"]["sequence_agreement"] >= 0.75, acc["generate"]


def test_the_table_of_ratios_is_printed(bench: tuple[BenchResult, str, Path]) -> None:
    printed = bench[1]
    assert "HELIOS/static" in printed
    assert "H100 target" in printed
    assert bench[0].table in printed


def test_the_plot_is_a_png_image(bench: tuple[BenchResult, str, Path]) -> None:
    import matplotlib.image

    path = bench[0].plot_path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(str(path))
    assert image.shape[0] > 200 and image.shape[1] > 400


def test_a_dated_entry_is_appended_to_the_results_log(bench: tuple[BenchResult, str, Path]) -> None:
    data = _json(bench)
    text = bench[2].read_text(encoding="utf-8")
    assert text.startswith(HEADER)
    entry = text[len(HEADER) :]
    assert f"## {data['meta']['date']}" in entry
    assert data["meta"]["device"]["name"] in entry
    assert f"`{COMMAND}`" in entry
    assert "ratios only" in entry
    assert "tok/s" in entry and "| throughput" in entry


def test_command_line_options_parse_into_bench_options() -> None:
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    ns = parser.parse_args(
        [
            "--quick",
            "--device",
            "cpu",
            "--presets",
            "tiny,small",
            "--batches",
            "1,64",
            "--no-results-md",
            "--max-new-tokens",
            "8",
            "--seed",
            "3",
            "--objectives",
            "latency",
        ]
    )
    options = bench_options_from_args(ns)
    assert options.quick and options.device == "cpu"
    assert options.presets == ("tiny", "small")
    assert options.batches == (1, 64)
    assert options.results_md is None
    assert (options.max_new_tokens, options.seed, options.objectives) == (8, 3, ("latency",))
    with pytest.raises(ValueError, match="two different"):
        bench_options_from_args(parser.parse_args(["--presets", "tiny"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["--batches", "0"])
