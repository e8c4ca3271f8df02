"""bench/gpu.sh's module on a tiny shape on the CPU (`--smoke`): the code path runs where no GPU is.

No figure is asserted beyond its structure: speeds on this machine say nothing about a GPU.
"""

from __future__ import annotations

from pathlib import Path

from helios_bench.gpu_decode import run


def test_the_gpu_decode_bench_runs_on_a_tiny_shape_and_writes_no_results_entry(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    results.write_text("# results\n")
    out = run(smoke=True, json_path=tmp_path / "gpu.json", results_md=results)
    assert results.read_text() == "# results\n"  # a CPU run never writes a GPU entry
    assert {(s["depth"], s["batch"]) for s in out["speeds"]} == {(4, 1), (4, 4), (2, 1), (2, 4)}
    assert all(s["engine_tokens_per_second"] > 0 and s["bound_tokens_per_second"] > 0 for s in out["speeds"])
    assert [e["heads_per_row"] for e in out["structure"]] == [1.0, 1.0]
    assert (tmp_path / "gpu.json").is_file()
