"""`helios bench`: everything side by side in one process.

1. Train (or reuse) the model family; measure the device's copy bandwidth.
2. Profile every candidate at full depth on a handful of prompts (as the operator's profile workers do)
   and let the operator's own policy choose (candidate, depth) for each objective.
3. Serve the evaluation prompts with HELIOS at that placement, the breach rule live (a breach adapts
   through the same policy), and measure HELIOS, the static baseline (the same engine, the largest
   candidate at full depth, exits off) and plain `generate` on that model: throughput at the largest
   batch a fixed memory budget holds, latency at a fixed request rate, tokens per joule, max batch,
   memory, accuracy, and the fraction of the memory-bandwidth bound reached at each batch size.
4. Print the table of ratios, write bench.json and bench.png, append a dated entry to RESULTS.md.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from helios_bench import report
from helios_bench.accuracy import References
from helios_bench.options import BenchOptions, add_bench_arguments, bench_options_from_args, validate
from helios_bench.phases import assemble, choose, cost_model, measure, profile, serve
from helios_bench.prepare import BenchLog, prepare
from helios_bench.results import BenchData, BenchResult, CandidateDepth, Served

__all__ = ["BenchOptions", "BenchResult", "add_bench_arguments", "bench_options_from_args", "run_bench"]


def run_phases(options: BenchOptions, log: BenchLog) -> BenchData:
    """Prepare, profile, choose, serve, measure, assemble; `options` already sized by --quick."""
    setup = prepare(options, log)
    profiles = tuple(profile(setup, p) for p in setup.presets)
    cost = cost_model(setup)
    choices = choose(setup, profiles, cost)
    served: dict[CandidateDepth, Served] = {}
    for objective, choice in choices.items():
        start = CandidateDepth(choice.candidate, choice.depth)
        if start not in served:  # two objectives choosing alike share one serving run
            served[start] = serve(setup, start, profiles, objective, cost)
    final_of = {obj: served[CandidateDepth(c.candidate, c.depth)].final for obj, c in choices.items()}
    measured = measure(setup, final_of.values())
    return assemble(setup, profiles, choices, served, final_of, measured, References(setup))


def run_bench(options: BenchOptions, console: Console | None = None) -> BenchResult:
    """Run the whole bench; print the table; write bench.json, bench.png and the RESULTS.md entry."""
    opts = options.for_quick() if options.quick else options
    validate(opts)
    console = console or Console(soft_wrap=True)
    log = BenchLog(console)
    result = run_phases(opts, log)
    data = result.to_dict()
    rows = report.compute_ratios(data, opts.batches)
    dev = result.meta.device
    title = f"helios bench - {dev.name} ({dev.kind}) - {result.meta.date}"
    table = report.render_table(rows, title, with_values=True)
    console.print(table, highlight=False, markup=False, soft_wrap=True)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, plot_path = out / "bench.json", out / "bench.png"
    report.write_json(data, rows, json_path)
    helios = result.helios
    report.write_plot(rows, helios.exit_layers, helios.final.depth, list(helios.first_confident), title, plot_path)
    if opts.results_md is not None:
        report.append_results(opts.results_md, report.results_entry(data, rows))
    log(f"wrote {json_path} and {plot_path}" + (f"; appended to {opts.results_md}" if opts.results_md else ""))
    return BenchResult(result, rows, table, json_path, plot_path, opts.results_md)
