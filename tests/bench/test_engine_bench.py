"""`helios bench engine` on the trained tiny preset: the decode step's structural targets, as counts.

No time is asserted: tokens/s are reported by the bench, not checked here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from helios_bench.engine_bench import CONTEXTS, EngineBenchOptions, HostReads, OpCounter, run_engine_bench
from helios_cli.main import build_parser

KEYS = (
    "flops_ratio",
    "heads_per_row",
    "syncs_per_step",
    "aten_ops_per_layer",
    "attention_flops_ratio_2048_vs_128",
    "engine_vs_generate",
)


@pytest.fixture(scope="module")
def figures(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("engine-bench") / "engine.json"
    lines: list[str] = []
    options = EngineBenchOptions(presets=(), models=(tiny_model_dir,), batches=(1, 4), new_tokens=4, json_path=out)
    run_engine_bench(options, lines.append)
    assert len(lines) == 2 and all("structural targets" in line for line in lines)
    written: dict[str, Any] = json.loads(out.read_text())
    return written["models"][tiny_model_dir.name]


@pytest.mark.parametrize("batch", ["1", "4"])
def test_the_serving_step_meets_the_structural_targets(figures: dict[str, Any], batch: str) -> None:
    entry = figures[batch]
    assert set(KEYS) <= set(entry)
    assert entry["heads_per_row"] == 1.0  # one LM head per row per step
    assert entry["syncs_per_step"] <= 1
    assert 0.95 <= entry["flops_ratio"] <= 1.15
    live = CONTEXTS[1] / CONTEXTS[0]
    assert entry["attention_flops_ratio_2048_vs_128"] == pytest.approx(live, rel=0.02)  # the live context
    assert entry["attention_flops_ratio_2048_vs_128_static"] == pytest.approx(live, rel=0.02)  # length buckets
    assert entry["engine_vs_generate"] > 0
    assert entry["aten_ops_per_layer"] <= 20  # eager, the fused rotary layer (66 with the HF modules)


@pytest.mark.parametrize("inference", [False, True])
def test_the_counters_see_what_a_chatty_step_would_do(inference: bool) -> None:
    with torch.inference_mode(inference):  # where the CPU's scalar reads dispatch nothing
        t = torch.arange(6)
        reads = HostReads()
        with reads, reads.python_reads():
            bool((t > 2).all())
            int(t[0])
            (t > 2).any().item()
            t.tolist()
    assert reads.reads == {"scalar": 3, "tolist": 1}
    with OpCounter() as ops:
        torch.softmax(t.float(), dim=-1)
    assert ops.total == 2  # the cast and the softmax


def test_helios_bench_engine_is_a_subcommand(tmp_path: Path) -> None:
    ns = build_parser().parse_args(["bench", "engine", "--batches", "1,32", "--json", str(tmp_path / "x.json")])
    assert ns.run.__name__ == "_bench_engine"
    assert ns.batches == (1, 32) and ns.json_path == tmp_path / "x.json"
