"""What a bench run leaves behind: the table of ratios, bench.json, bench.png, a RESULTS.md entry."""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from helios_bench.stats import safe_ratio

TARGET_DEVICE = "H100"


@dataclass(frozen=True)
class Ratio:
    """One row of the table: HELIOS against a baseline (or one configuration's own fraction)."""

    key: str
    metric: str
    helios: float | None
    static: float | None
    generate: float | None
    ratio: float | None  # higher is better, always
    target: float | None  # the H100 target for `ratio`; None: reported only
    unit: str  # how to read `ratio`: "x", "points", "fraction"
    note: str = ""
    judged: bool = True  # False off a GPU: the targets are an H100's, a CPU run neither meets nor misses them

    @property
    def met(self) -> bool | None:
        if self.target is None or self.ratio is None or not self.judged:
            return None
        return self.ratio >= self.target - 1e-9


def _get(data: dict[str, Any], section: str, config: str, key: str) -> float | None:
    value = data["sections"][section].get(config, {}).get(key)
    return None if value is None else float(value)


def compute_ratios(data: dict[str, Any], batches: tuple[int, ...]) -> list[Ratio]:
    """The table, from the JSON's sections. Lower-is-better metrics are inverted so that every ratio
    reads 'how many times better HELIOS is'; accuracy rows are values or differences, not ratios."""
    rows: list[Ratio] = []

    def g(section: str, config: str, key: str) -> float | None:
        return _get(data, section, config, key)

    def versus(key: str, metric: str, section: str, field: str, target: float | None, lower_better: bool) -> None:
        h, s, p = g(section, "helios", field), g(section, "static", field), g(section, "generate", field)
        ratio = safe_ratio(s, h) if lower_better else safe_ratio(h, s)
        rows.append(Ratio(key, metric, h, s, p, ratio, target, "x"))

    versus(
        "throughput",
        "throughput at max batch in budget (tok/s), HELIOS/static",
        "throughput",
        "tokens_per_second",
        2.2,
        False,
    )
    versus("per_token_p50", "p50 per-token latency (s), static/HELIOS", "latency", "per_token_p50_s", 1.5, True)
    versus("per_token_p95", "p95 per-token latency (s), static/HELIOS", "latency", "per_token_p95_s", None, True)
    versus("ttft_p50", "p50 time to first token (s), static/HELIOS", "latency", "ttft_p50_s", None, True)
    versus("ttft_p95", "p95 time to first token (s), static/HELIOS", "latency", "ttft_p95_s", None, True)
    energy = data["sections"]["energy"]
    if energy["available"]:
        versus("tokens_per_joule", "tokens per joule, HELIOS/static", "energy", "tokens_per_joule", 1.3, False)
    else:
        rows.append(
            Ratio(
                "tokens_per_joule",
                "tokens per joule, HELIOS/static",
                None,
                None,
                None,
                None,
                1.3,
                "x",
                note=f"unavailable: {energy['reason']}",
            )
        )
    versus("max_batch", "max batch in memory budget, HELIOS/static", "max_batch", "max_batch", 4.0, False)
    versus("resident_weights", "resident weight bytes, static/HELIOS", "memory", "resident_weight_bytes", None, True)

    def fraction(key: str, metric: str, target: float | None = None, note: str = "") -> None:
        """An accuracy share, reported as it is for each system (the ratio column is HELIOS's value)."""
        h = g("accuracy", "helios", key)
        static, generate = g("accuracy", "static", key), g("accuracy", "generate", key)
        rows.append(Ratio(key, metric, h, static, generate, h, target, "fraction", note=note))

    helios_acc = data["sections"]["accuracy"]["helios"]
    low, high = helios_acc.get("agreement_ci95", (None, None))
    interval = f"95% interval {low:.3f}-{high:.3f} over {helios_acc['tokens']} tokens" if low is not None else ""
    fraction("agreement", "agreement with the full model's tokens (HELIOS)", 0.98, interval)
    fraction("strict_agreement", "agreement, no tie tolerance (HELIOS)")
    fraction("agreement_with_largest", "agreement with the largest candidate's tokens (HELIOS)")
    em_h, em_s = g("accuracy", "helios", "exact_match"), g("accuracy", "static", "exact_match")
    em_diff = None if em_h is None or em_s is None else 100.0 * (em_h - em_s)
    rows.append(
        Ratio(
            "exact_match",
            "exact match, HELIOS - static (points)",
            em_h,
            em_s,
            g("accuracy", "generate", "exact_match"),
            em_diff,
            -1.0,
            "points",
        )
    )

    for batch, target in zip(batches, _bandwidth_targets(batches), strict=True):
        bw = data["sections"]["bandwidth"]["batches"].get(str(batch), {})
        frac = {c: (bw.get(c) or {}).get("fraction") for c in ("helios", "static", "generate")}
        rows.append(
            Ratio(
                f"bandwidth_static_b{batch}",
                f"engine's fraction of bandwidth bound, batch {batch} (static)",
                frac["helios"],
                frac["static"],
                frac["generate"],
                frac["static"],
                target,
                "fraction",
            )
        )
        rows.append(
            Ratio(
                f"bandwidth_helios_b{batch}",
                f"engine's fraction of bandwidth bound, batch {batch} (HELIOS)",
                frac["helios"],
                frac["static"],
                frac["generate"],
                frac["helios"],
                target,
                "fraction",
            )
        )
        tps = {c: (bw.get(c) or {}).get("tokens_per_second") for c in ("helios", "static", "generate")}
        rows.append(
            Ratio(
                f"engine_vs_generate_b{batch}",
                f"decode tok/s at batch {batch}, static engine/generate",
                tps["helios"],
                tps["static"],
                tps["generate"],
                safe_ratio(tps["static"], tps["generate"]),
                1.0,
                "x",
            )
        )
    h, s, p = (g("throughput", c, "tokens_per_second") for c in ("helios", "static", "generate"))
    rows.append(
        Ratio(
            "engine_vs_generate",
            "throughput, static engine/generate (same model, same batch)",
            h,
            s,
            p,
            safe_ratio(s, p),
            1.0,
            "x",
        )
    )
    rows.append(Ratio("helios_vs_generate", "throughput, HELIOS/generate", h, s, p, safe_ratio(h, p), None, "x"))
    if data["meta"]["device"]["kind"] != "cuda":
        rows = [replace(r, judged=False) for r in rows]
    return rows


def _bandwidth_targets(batches: tuple[int, ...]) -> list[float | None]:
    """The issue's targets: 50% of the bound at batch 1, 60% at batch 64; other batches reported only."""
    return [0.5 if b == 1 else 0.6 if b == 64 else None for b in batches]


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    magnitude = abs(value)
    if magnitude != 0 and (magnitude >= 1e5 or magnitude < 1e-3):
        return f"{value:.3g}"
    return f"{value:.4g}"


def _fmt_ratio(row: Ratio) -> str:
    if row.ratio is None:
        return "n/a"
    if row.unit == "x":
        return f"{row.ratio:.2f}x"
    if row.unit == "points":
        return f"{row.ratio:+.1f} pt"
    return f"{row.ratio * 100:.1f}%"


def _fmt_target(row: Ratio) -> str:
    if row.target is None:
        return ""
    if row.unit == "x":
        return f">= {row.target:g}x"
    if row.unit == "points":
        return f">= {row.target:+g} pt"
    return f">= {row.target * 100:g}%"


def _met(row: Ratio) -> str:
    met = row.met
    if met is None:
        return "not judged (CPU)" if row.target is not None and not row.judged else ""
    return "yes" if met else "MISSED"


def render_table(rows: list[Ratio], title: str, with_values: bool) -> str:
    """The table as text (rich), also printed by the runner."""
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    if with_values:
        for name in ("HELIOS", "static", "generate"):
            table.add_column(name, justify="right")
    table.add_column("ratio", justify="right")
    table.add_column(f"{TARGET_DEVICE} target", justify="right")
    table.add_column("met")
    for row in rows:
        values = [_fmt(row.helios), _fmt(row.static), _fmt(row.generate)] if with_values else []
        metric = row.metric + (f" [{row.note}]" if row.note else "")
        table.add_row(metric, *values, _fmt_ratio(row), _fmt_target(row), _met(row))
    buffer = io.StringIO()
    Console(file=buffer, width=160, force_terminal=False, color_system=None).print(table)
    return buffer.getvalue()


def write_json(data: dict[str, Any], rows: list[Ratio], path: Path) -> None:
    payload = dict(data)
    payload["ratios"] = [{**asdict(r), "met": r.met} for r in rows]
    path.write_text(json.dumps(payload, indent=2, sort_keys=False, default=_json_default) + "\n", encoding="utf-8")


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_plot(
    rows: list[Ratio], exit_layers: dict[str, int], depth: int, first_confident: list[float], title: str, path: Path
) -> None:
    """Bars of the HELIOS-vs-baseline ratios (targets marked) and the exit-layer distribution."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ratio, ax_exit) = plt.subplots(1, 2, figsize=(14, 5.5), gridspec_kw={"width_ratios": [3, 2]})
    shown = [r for r in rows if r.unit == "x" and r.ratio is not None]
    labels = [r.key for r in shown]
    values = [float(r.ratio) for r in shown if r.ratio is not None]
    colors = ["tab:green" if r.met else "tab:red" if r.met is False else "tab:gray" for r in shown]
    ax_ratio.barh(labels, values, color=colors)
    for i, r in enumerate(shown):
        if r.target is not None:
            ax_ratio.plot([r.target, r.target], [i - 0.4, i + 0.4], color="black", linewidth=2)
    ax_ratio.axvline(1.0, color="gray", linestyle="--", linewidth=1)
    ax_ratio.set_xscale("log")
    ax_ratio.invert_yaxis()
    ax_ratio.set_xlabel("ratio (higher is better; black tick: H100 target; green met, red missed)")
    ax_ratio.set_title("HELIOS vs static baseline (and engine vs generate)")

    layers = sorted(int(k) for k in exit_layers)
    total = sum(exit_layers.values()) or 1
    ax_exit.bar(
        [x - 0.2 for x in layers], [exit_layers[str(x)] / total for x in layers], width=0.4, label="served: exit layer"
    )
    if first_confident:
        xs = list(range(1, len(first_confident) + 1))
        ax_exit.bar([x + 0.2 for x in xs], first_confident, width=0.4, label="profiling: first confident layer")
    ax_exit.axvline(depth + 0.5, color="black", linestyle=":", label=f"chosen depth {depth}")
    ax_exit.set_xlabel("layer (last bar of profiling: never confident)")
    ax_exit.set_ylabel("share of tokens")
    ax_exit.set_title("HELIOS exits")
    ax_exit.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def results_entry(data: dict[str, Any], rows: list[Ratio]) -> str:
    """A dated Markdown entry: device, command, versions, the choice, and the table.

    On CPU the models are tiny and only the ratios mean anything, so the entry carries ratios only.
    """
    meta = data["meta"]
    dev = meta["device"]
    choice = data["helios"]["final"]
    events = data["helios"]["adaptations"]
    applied = sum(1 for e in events if e["to"] is not None)
    chosen = "; ".join(
        f"{obj}: {c['candidate']}@{c['depth']}"
        + (
            f" -> {c['final']['candidate']}@{c['final']['depth']}"
            if (c["final"]["candidate"], c["final"]["depth"]) != (c["candidate"], c["depth"])
            else ""
        )
        for obj, c in data["helios"]["choices"].items()
    )
    lines = [
        f"## {meta['date']} - {dev['name']} ({dev['kind']})",
        "",
        f"- command: `{meta['command']}`",
        f"- torch {dev['torch_version']}, transformers {dev['transformers_version']}, python {dev['python_version']}"
        + (f", CUDA {dev['cuda_version']}" if dev.get("cuda_version") else ""),
        f"- presets: {', '.join(meta['presets'])}; dtype {meta['dtype']}; quick: {meta['quick']}",
        f"- HELIOS served {choice['candidate']} at {choice['depth']}/{choice['model_layers']} layers"
        f" (policy per objective: {chosen}); the breach rule fired {len(events)} time(s), {applied} adaptation(s)",
        f"- measured copy bandwidth: {meta['bandwidth_bytes_per_second'] / 1e9:.1f} GB/s;"
        f" memory budget {meta['memory_budget_bytes'] / 1e6:.2f} MB",
        "",
    ]
    if dev["kind"] == "cpu":
        lines.append("CPU run with tiny models: ratios only; the targets are for an H100 and are not tested here.")
        lines.append("")
    lines.append("| metric | ratio | H100 target | met |")
    lines.append("|---|---:|---:|---|")
    for row in rows:
        note = f" ({row.note})" if row.note else ""
        lines.append(f"| {row.metric}{note} | {_fmt_ratio(row)} | {_fmt_target(row)} | {_met(row)} |")
    lines.append("")
    return "\n".join(lines) + "\n"


def append_results(path: Path, entry: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write("\n" + entry)
