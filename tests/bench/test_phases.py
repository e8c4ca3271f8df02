"""The bench's phases as functions, on a hand-built `Setup` and made-up figures: no model is trained or run.

`test_bench_cpu.py` runs every phase for real; these pin what is easy to get wrong and slow to see
there: which placement each section reports, the budget arithmetic, and the JSON's shape.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from helios_bench import report
from helios_bench.accuracy import References
from helios_bench.device import DeviceInfo, EnergyMeter
from helios_bench.measure import DecodeBound, Latency, Sizes, Throughput
from helios_bench.observe import ServeObserver
from helios_bench.options import BenchOptions
from helios_bench.phases import assemble, batches_in_budget, choose, cost_model, serve
from helios_bench.prepare import Prompts, Setup
from helios_bench.results import (
    Batches,
    CandidateDepth,
    Capacity,
    Measured,
    Measurements,
    Memory,
    Served,
)
from helios_bench.systems import Completion, Prompt
from helios_operator.core.types import CandidateProfile
from helios_worker.models import tasks

SIZES = Sizes(
    resident_weight_bytes=10_000,
    fixed_weight_bytes=4_000,
    layer_weight_bytes=1_000,
    kv_bytes_per_token_per_layer=2,
    loaded_layers=6,
)
CONTEXT = 20  # one full-context row: 6 layers x 2 bytes x 20 tokens = 240 bytes of KV
PROMPTS = 4


def _setup(log: list[str], *, budget: int = 10_000 + 8 * 240, **options: object) -> Setup:
    examples = tasks.eval_examples(PROMPTS // 2, seed=0)
    prompts = Prompts(
        eval_examples=examples,
        profile_examples=[],
        eval_prompts=[(1, 2, i) for i in range(PROMPTS)],
        profile_prompts=[],
        context=CONTEXT,
        decode_context=CONTEXT,
    )
    info = DeviceInfo("cpu", "test CPU", "torch", "transformers", "python", None, 1)
    bench_options = BenchOptions(device="cpu", presets=("micro", "tiny"), quick=True, command="test")
    return Setup(
        options=dataclasses.replace(bench_options, **options),
        device="cpu",
        dtype="float32",
        presets=("micro", "tiny"),
        info=info,
        energy=EnergyMeter("cpu"),
        log=log.append,
        paths={"micro": Path("/models/micro"), "tiny": Path("/models/tiny")},
        layers={"micro": 4, "tiny": 6},
        sizes={"micro": dataclasses.replace(SIZES, loaded_layers=4), "tiny": SIZES},
        largest="tiny",
        prompts=prompts,
        bandwidth=1e9,
        budget=budget,
    )


def _profile(candidate: str, layers: int, tokens_per_second: float) -> CandidateProfile:
    agreement = tuple(0.9 + 0.1 * (d + 1) / layers for d in range(layers))
    return CandidateProfile(
        candidate=candidate,
        model_layers=layers,
        profiled_tokens=400,
        profiled_requests=40,
        agreement=agreement,
        depth_agreement=agreement,
        first_confident=(1.0 / (layers + 1),) * (layers + 1),
        tokens_per_second=tokens_per_second,
        fixed_weight_bytes=4_000,
        layer_weight_bytes=1_000,
        kv_bytes_per_token_per_layer=2,
    )


PROFILES = (_profile("micro", 4, 300.0), _profile("tiny", 6, 200.0))


class CannedReferences(References):
    """Full models that agree with whatever was served, without loading one."""

    def full_outputs(self, candidate: str) -> list[Completion]:
        return [Completion([7, 8], "") for _ in self.setup.prompts.eval_prompts]

    def gaps(self, candidate: str, completions: list[Completion]) -> list[list[float]]:
        return [[0.0] * len(c.token_ids) for c in completions]


def _measured(tokens_per_second: float, p50: float) -> Measured:
    """Figures told apart by their tokens/s and latency."""
    throughput = Throughput(tokens_per_second, 1.0, 8, 16, 100, 1.0, None, None)
    bound = DecodeBound(tokens_per_second, 10, "difference", 4.0, 1e4, 2 * tokens_per_second, 0.5)
    capacity = Capacity(
        throughput,
        Batches(8, 8, False, 12_000),
        Memory(10_000, 1_000, 11_000, None),
        {"1": bound, "64": bound},
        SIZES,
    )
    return Measured(capacity, Latency(16, 100, p50, p50, p50, p50))


def test_choose_is_the_operator_policys_choice_per_objective_and_logs_its_reason() -> None:
    log: list[str] = []
    setup = _setup(log, accuracy_floor=0.95)
    choices = choose(setup, PROFILES, cost_model(setup))
    assert list(choices) == list(setup.options.objectives)
    for objective, choice in choices.items():
        assert choice.accuracy >= 0.95
        assert f"policy ({objective}): {choice.reason}" in log


def test_choose_fails_loudly_when_the_policy_has_nothing_to_choose_from() -> None:
    setup = _setup([])
    with pytest.raises(RuntimeError, match="no placement"):
        choose(setup, (), cost_model(setup))


class BreachingSystem:
    """An engine whose every token breaches in a full window: the breach rule fires after every chunk."""

    breach_ratio = 1.0

    def __init__(self, observer: ServeObserver, window: int) -> None:
        self.observer, self.window = observer, window

    def run_batch(self, prompts: Sequence[Prompt], max_new_tokens: int) -> list[Completion]:
        for _ in range(len(prompts) * max_new_tokens):
            self.observer.on_token(1, True, 1.0, self.window)
        return [Completion([7] * max_new_tokens, "") for _ in prompts]

    def close(self) -> None:
        pass


@dataclasses.dataclass(frozen=True)
class BreachingSetup(Setup):
    """Loads nothing; records each (candidate, depth) it is asked to load."""

    loaded: list[tuple[str, int | None]] = dataclasses.field(default_factory=list)

    def load(self, candidate: str, layers: int | None) -> Any:
        self.loaded.append((candidate, layers))
        return None

    def engine(self, model: Any, *, observer: Any = None, **_: Any) -> Any:
        return BreachingSystem(observer, self.options.breach_window)


def test_serving_climbs_through_the_policys_adaptations_while_the_breach_rule_fires() -> None:
    plain = _setup([], breach_window=4, breach_limit=2, accuracy_floor=0.95)
    setup = BreachingSetup(**{f.name: getattr(plain, f.name) for f in dataclasses.fields(plain)})
    start = CandidateDepth("micro", 2)
    served = serve(setup, start, PROFILES, "throughput", cost_model(setup))
    assert len(served.adaptations) == PROMPTS  # one chunk a prompt here, each followed by a firing
    moves = [a.target for a in served.adaptations if a.target is not None]
    assert moves and all(a.depth > b.depth for a, b in zip(moves, [start, *moves], strict=False))
    assert served.adaptations[-1].target is None  # full depth: nothing deeper to go to
    assert [a.source for a in served.adaptations][: len(moves) + 1] == [start, *moves]
    assert served.final == moves[-1]
    assert setup.loaded == [(p.candidate, p.depth) for p in [start, *moves]]
    assert served.served_by == ["micro"] * PROMPTS and len(served.completions) == PROMPTS


def test_the_budget_sets_the_largest_batch_and_the_run_batch_is_capped() -> None:
    batches = batches_in_budget(_setup([], max_run_batch=5), SIZES)
    assert (batches.max_batch, batches.run_batch, batches.capped) == (8, 5, True)  # 8 rows, no spare slot
    assert batches_in_budget(_setup([]), SIZES).max_batch == 8
    with pytest.raises(RuntimeError, match="raise --memory-budget-bytes"):
        batches_in_budget(_setup([], budget=10_000 + 100), SIZES)


def test_each_section_reports_the_placement_chosen_for_its_objective() -> None:
    setup = _setup([], objectives=("throughput", "latency"), accuracy_floor=0.95)
    choices = choose(setup, PROFILES, cost_model(setup))
    fast, quick = CandidateDepth("micro", 3), CandidateDepth("tiny", 5)  # where serving ended, per objective
    final_of = {"throughput": fast, "latency": quick}
    served = {
        CandidateDepth(c.candidate, c.depth): Served(
            final_of[obj], [Completion([7, 8], "")] * PROMPTS, ["micro"] * PROMPTS
        )
        for obj, c in choices.items()
    }
    measured = Measurements(
        static=_measured(100.0, 0.3),
        generate=_measured(50.0, 0.4),
        generate_outputs=[Completion([7, 8], "")] * PROMPTS,
        helios={fast: _measured(400.0, 0.2), quick: _measured(200.0, 0.1)},
        rate=2.0,
        arrivals=[0.0, 0.5, 1.0],
    )
    data = assemble(setup, PROFILES, choices, served, final_of, measured, CannedReferences(setup))
    sections = data.sections
    assert sections.throughput.helios.tokens_per_second == 400.0  # the throughput objective's placement
    assert sections.latency.helios.per_token_p50_s == 0.1  # the latency objective's
    assert sections.bandwidth.batches["64"].helios.tokens_per_second == 400.0
    assert (sections.latency.rate_rps, sections.latency.requests) == (2.0, 3)
    assert data.helios.final == fast and data.helios.model_layers == 4
    assert data.helios.choices["latency"].final == quick
    assert sections.accuracy.helios.agreement == 1.0 and sections.accuracy.helios.floor_met


def test_the_assembled_run_is_written_as_the_json_the_report_reads() -> None:
    setup = _setup([], objectives=("throughput",), accuracy_floor=0.95)
    choices = choose(setup, PROFILES, cost_model(setup))
    start = CandidateDepth(choices["throughput"].candidate, choices["throughput"].depth)
    served = {start: Served(start, [Completion([7, 8], "")] * PROMPTS, ["micro"] * PROMPTS)}
    outputs = [Completion([7, 8], "")] * PROMPTS
    measured = Measurements(
        _measured(100.0, 0.3), _measured(50.0, 0.4), outputs, {start: _measured(400.0, 0.2)}, 2.0, [0.0]
    )
    data = assemble(setup, PROFILES, choices, served, {"throughput": start}, measured, CannedReferences(setup))
    json = data.to_dict()
    assert list(json) == ["meta", "models", "profiles", "helios", "configs", "sections"]
    assert list(json["sections"]) == ["throughput", "max_batch", "memory", "latency", "energy", "accuracy", "bandwidth"]
    assert list(json["sections"]["throughput"]) == ["static", "generate", "helios"]
    assert json["meta"]["options"]["out"] == "bench/out" and json["meta"]["command"] == "test"
    assert json["models"]["tiny"] == {"path": "/models/tiny", "layers": 6, **dataclasses.asdict(SIZES)}
    assert json["profiles"][0]["modelLayers"] == 4  # as the operator writes profiles
    assert json["sections"]["energy"]["available"] is False
    rows = {r.key: r for r in report.compute_ratios(json, setup.options.batches)}
    assert rows["throughput"].ratio == pytest.approx(4.0)
    assert rows["per_token_p50"].ratio == pytest.approx(1.5)
    # The targets are an H100's: a CPU run neither meets nor misses them; on a GPU it is judged.
    assert rows["throughput"].target is not None and rows["throughput"].met is None
    assert report.render_table(list(rows.values()), "t", True).count("MISSED") == 0
    json["meta"]["device"]["kind"] = "cuda"
    judged = {r.key: r for r in report.compute_ratios(json, setup.options.batches)}
    assert judged["throughput"].met is True  # 4.0 >= the 2.2 target
