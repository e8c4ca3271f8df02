"""The bench's phases after `prepare`, each a function of the `Setup` and the phases before it:
profile each candidate, choose with the operator's policy, serve with the breach rule live, measure
the three configurations, assemble what bench.json holds."""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from helios_bench.accuracy import References, accuracy
from helios_bench.device import free_device_memory
from helios_bench.measure import (
    DecodeBound,
    Latency,
    Sizes,
    System,
    Throughput,
    bandwidth_fraction,
    cycle,
    latency,
    max_batch_in_budget,
    poisson_arrivals,
    throughput,
)
from helios_bench.observe import ProfileCollector, ServeObserver
from helios_bench.prepare import Setup, sizes_of
from helios_bench.results import (
    AccuracySection,
    Adaptation,
    BandwidthSection,
    Batches,
    BenchData,
    CandidateDepth,
    Capacity,
    Chosen,
    Energy,
    EnergySection,
    HeliosRun,
    LatencySection,
    Measured,
    Measurements,
    Memory,
    Meta,
    ModelEntry,
    Sections,
    Served,
    Trio,
)
from helios_bench.systems import Completion, GenerateSystem
from helios_operator.core import policy
from helios_operator.core.types import CandidateProfile, ExitSpec, Objective, WorkerTelemetry
from helios_worker.engine.engine import eos_ids

EVAL_CHUNK = 16  # at most this many requests served between two looks at the breach rule
LATENCY_LOAD = 0.8  # default request rate: this share of the static baseline's measured capacity
# The objective whose placement each section reports for HELIOS (the first objective where that one was not run).
OBJECTIVE_OF_SECTION: dict[str, Objective] = {
    "throughput": "throughput",
    "max_batch": "throughput",
    "memory": "throughput",
    "bandwidth": "throughput",
    "latency": "latency",
    "energy": "energy",
    "accuracy": "throughput",
}

T = TypeVar("T")


# ---- profile, choose, serve ---------------------------------------------------------------------


def profile(setup: Setup, candidate: str) -> CandidateProfile:
    """The candidate at full depth in the engine's profiling mode, folded into the profile the policy reads."""
    model = setup.load(candidate, None)
    prompts = setup.prompts.profile_prompts
    collector = ProfileCollector(int(model.model_layers))
    system = setup.engine(model, exits=True, max_batch=len(prompts), observer=collector, profile=True)
    try:
        system.run_batch(prompts, 2)  # first calls stay out of the tokens/s the policy reads
        collector.reset()
        joules_before = setup.energy.read_joules()
        started = time.perf_counter()
        completions = system.run_batch(prompts, setup.options.max_new_tokens)
        seconds = time.perf_counter() - started
        joules_after = setup.energy.read_joules()
    finally:
        system.close()
    tokens = sum(len(c.token_ids) for c in completions)
    joules = None if joules_before is None or joules_after is None else joules_after - joules_before
    sizes = sizes_of(model, setup.dtype)
    result = collector.profile(
        candidate,
        tokens_per_second=tokens / seconds,
        fixed_weight_bytes=sizes.fixed_weight_bytes,
        layer_weight_bytes=sizes.layer_weight_bytes,
        kv_bytes_per_token_per_layer=sizes.kv_bytes_per_token_per_layer,
        joules_per_token=joules / tokens if joules and tokens else None,
    )
    setup.log(
        f"profiled {candidate}: {result.profiled_tokens} tokens, depth agreement "
        + " ".join(f"{a:.2f}" for a in result.depth_agreement)
    )
    return result


def cost_model(setup: Setup) -> policy.CostModel:
    """The policy's cost model at the bench's own budget and context."""
    return policy.CostModel(full_batch=setup.options.budget_batch, context_tokens=setup.prompts.context)


def choose(
    setup: Setup, profiles: tuple[CandidateProfile, ...], cost: policy.CostModel
) -> dict[Objective, policy.Choice]:
    """The operator's policy, for each objective, under the accuracy floor."""
    choices: dict[Objective, policy.Choice] = {}
    for objective in setup.options.objectives:
        choice = policy.choose(profiles, objective, setup.options.accuracy_floor, cost)
        if choice is None:
            raise RuntimeError(f"the policy chose no placement for {objective} from {len(profiles)} profile(s)")
        choices[objective] = choice
    for objective, choice in choices.items():
        setup.log(f"policy ({objective}): {choice.reason}")
    return choices


def serve(
    setup: Setup,
    start: CandidateDepth,
    profiles: tuple[CandidateProfile, ...],
    objective: Objective,
    cost: policy.CostModel,
) -> Served:
    """The evaluation prompts in chunks; after each, the breach rule, as the operator applies it."""
    o = setup.options
    prompts = setup.prompts.eval_prompts
    exit_spec = ExitSpec(o.confidence_threshold, o.breach_window, o.breach_limit)
    placement = start
    out = Served(final=start, completions=[], served_by=[])
    observer = ServeObserver()
    step = max(1, min(EVAL_CHUNK, len(prompts) // 4))  # at least four looks at the rule
    system = setup.engine(
        setup.load(placement.candidate, placement.depth), exits=True, max_batch=step, observer=observer
    )
    requests_ok = 0
    try:
        for begin in range(0, len(prompts), step):
            chunk = prompts[begin : begin + step]
            out.completions += system.run_batch(chunk, o.max_new_tokens)
            out.served_by += [placement.candidate] * len(chunk)
            requests_ok += len(chunk)
            telemetry = WorkerTelemetry(
                worker="bench",
                candidate=placement.candidate,
                depth=placement.depth,
                model_layers=setup.layers[placement.candidate],
                requests_ok=float(requests_ok),
                generated_tokens=float(observer.tokens),
                breach_ratio=system.breach_ratio,
                window_tokens=float(observer.window_tokens),
            )
            if not policy.breach_triggered(telemetry, exit_spec):
                continue
            adaptation = policy.adapt(profiles, placement.candidate, placement.depth, objective, o.accuracy_floor, cost)
            c = adaptation.choice
            target = None if c is None else CandidateDepth(c.candidate, c.depth)
            out.adaptations.append(Adaptation(requests_ok, placement, system.breach_ratio, adaptation.reason, target))
            if target is not None:
                placement = target
                system.close()
                model = setup.load(placement.candidate, placement.depth)
                system = setup.engine(model, exits=True, max_batch=step, observer=observer)
            setup.log(f"breach rule fired: {adaptation.reason}")
        out.breach_ratio = system.breach_ratio
    finally:
        system.close()
    out.final = placement
    out.window_tokens = observer.window_tokens
    out.exit_layers = observer.exit_layers
    return out


# ---- measure ------------------------------------------------------------------------------------


def measure(setup: Setup, placements: Iterable[CandidateDepth]) -> Measurements:
    """The static baseline first (its capacity sets the latency run's request rate), plain generate on
    the same model, then HELIOS at each placement serving ended on."""
    o = setup.options
    setup.log(f"measuring the static baseline ({setup.largest}, all layers, no exits)")
    model = setup.load(setup.largest, None)
    sizes = sizes_of(model, setup.dtype)
    capacity = _engine_capacity(setup, model, sizes, exits=False)
    rate = o.rate or LATENCY_LOAD * capacity.throughput.requests_per_second
    arrivals = poisson_arrivals(o.latency_requests, rate, o.seed)
    static = Measured(capacity, _engine_latency(setup, model, capacity, arrivals, exits=False))
    setup.log(f"measuring plain generate ({setup.largest}); latency rate {rate:.2f} requests/s")
    generate, generate_outputs = _measure_generate(setup, model, sizes, arrivals)
    del model
    free_device_memory(setup.device)

    helios: dict[CandidateDepth, Measured] = {}
    for placement in dict.fromkeys(placements):
        setup.log(f"measuring HELIOS ({placement.candidate} at {placement.depth} layers)")
        model = setup.load(placement.candidate, placement.depth)
        capacity = _engine_capacity(setup, model, sizes_of(model, setup.dtype), exits=True)
        helios[placement] = Measured(capacity, _engine_latency(setup, model, capacity, arrivals, exits=True))
        del model
        free_device_memory(setup.device)
    return Measurements(static, generate, generate_outputs, helios, rate, arrivals)


def batches_in_budget(setup: Setup, sizes: Sizes) -> Batches:
    """The largest batch of full-context rows the budget holds beside these weights, and the one run."""
    max_batch = max_batch_in_budget(sizes, setup.budget, setup.prompts.context)
    if max_batch < 1:
        raise RuntimeError(
            f"a memory budget of {setup.budget} bytes holds no row of {setup.prompts.context} tokens beside "
            f"{sizes.resident_weight_bytes} bytes of weights; raise --memory-budget-bytes"
        )
    run_batch = min(max_batch, setup.options.max_run_batch)
    return Batches(max_batch, run_batch, capped=run_batch < max_batch, budget_bytes=setup.budget)


def _throughput(setup: Setup, system: System, batch: int) -> tuple[Throughput, int | None]:
    """Throughput on the evaluation prompts, with the allocator's peak (quick: fewer waves of `batch`)."""
    waves = 2 if setup.options.quick else 4
    return throughput(
        system,
        setup.prompts.eval_prompts,
        batch=batch,
        waves=waves,
        max_new_tokens=setup.options.max_new_tokens,
        device=setup.device,
        energy=setup.energy,
    )


def _memory(sizes: Sizes, kv_bytes: int, peak: int | None) -> Memory:
    return Memory(sizes.resident_weight_bytes, kv_bytes, sizes.resident_weight_bytes + kv_bytes, peak)


def _engine_capacity(setup: Setup, model: Any, sizes: Sizes, *, exits: bool) -> Capacity:
    o = setup.options
    batches = batches_in_budget(setup, sizes)
    kv_budget = setup.budget - sizes.resident_weight_bytes
    system = setup.engine(model, exits=exits, max_batch=batches.run_batch, kv_budget=kv_budget)
    try:
        tp, peak = _throughput(setup, system, system.slots)
        kv_bytes = system.kv_cache_bytes
    finally:
        system.close()

    def make(batch: int, observer: ServeObserver) -> System:
        return setup.engine(
            model,
            exits=exits,
            max_batch=batch,
            observer=observer,
            ignore_eos=True,
            max_context=setup.prompts.decode_context,
        )

    bw = {str(b): _decode_bound(setup, make, sizes, b, early_exit=exits) for b in o.batches}
    return Capacity(tp, batches, _memory(sizes, kv_bytes, peak), bw, sizes)


def _engine_latency(setup: Setup, model: Any, capacity: Capacity, arrivals: list[float], *, exits: bool) -> Latency:
    kv_budget = setup.budget - capacity.sizes.resident_weight_bytes
    system = setup.engine(model, exits=exits, max_batch=capacity.max_batch.run_batch, kv_budget=kv_budget)
    try:
        prompts = cycle(setup.prompts.eval_prompts, len(arrivals))
        return latency(system, arrivals, prompts, setup.options.max_new_tokens)
    finally:
        system.close()


def _decode_bound(
    setup: Setup, make: Callable[[int, ServeObserver], System], sizes: Sizes, batch: int, *, early_exit: bool
) -> DecodeBound:
    result = bandwidth_fraction(
        make,
        sizes,
        setup.prompts.eval_prompts,
        batch=batch,
        new_tokens=setup.options.decode_tokens,
        bandwidth=setup.bandwidth,
        device=setup.device,
        early_exit=early_exit,
        repeats=setup.options.decode_repeats,
    )
    setup.log(
        f"  decode at batch {batch}: {result.tokens_per_second:.1f} tok/s, "
        f"{result.fraction * 100:.1f}% of the bandwidth bound"
    )
    return result


def _measure_generate(
    setup: Setup, model: Any, sizes: Sizes, arrivals: list[float]
) -> tuple[Measured, list[Completion]]:
    """Plain generate on the static baseline's model: its measurements and its outputs on the evaluation prompts."""
    o = setup.options
    eos = sorted(eos_ids(model))
    batches = batches_in_budget(setup, sizes)
    system = GenerateSystem(model.hf_model, model.tokenizer, setup.device, eos, batches.run_batch)
    tp, peak = _throughput(setup, system, batches.run_batch)
    kv_bytes = batches.run_batch * sizes.kv_bytes_per_token * setup.prompts.context

    def make(batch: int, observer: ServeObserver) -> System:
        return GenerateSystem(model.hf_model, model.tokenizer, setup.device, eos, batch, ignore_eos=True)

    bw = {str(b): _decode_bound(setup, make, sizes, b, early_exit=False) for b in o.batches}
    prompts = cycle(setup.prompts.eval_prompts, len(arrivals))
    lat = latency(system, arrivals, prompts, o.max_new_tokens)
    outputs = system.run_batch(setup.prompts.eval_prompts, o.max_new_tokens)
    return Measured(Capacity(tp, batches, _memory(sizes, kv_bytes, peak), bw, sizes), lat), outputs


# ---- assemble -----------------------------------------------------------------------------------


def assemble(
    setup: Setup,
    profiles: tuple[CandidateProfile, ...],
    choices: dict[Objective, policy.Choice],
    served: dict[CandidateDepth, Served],
    final_of: dict[Objective, CandidateDepth],
    measured: Measurements,
    references: References,
) -> BenchData:
    """Every phase's result where bench.json keeps it; each HELIOS figure is that of the placement
    chosen for the objective its section measures (OBJECTIVE_OF_SECTION)."""
    o = setup.options
    first = o.objectives[0]

    def helios_for(section: str) -> Measured:
        return measured.helios[_final_for(section, final_of, first)]

    def trio(section: str, pick: Callable[[Measured], T]) -> Trio[T]:
        return Trio(pick(measured.static), pick(measured.generate), pick(helios_for(section)))

    helios_accuracy = {
        start.label: accuracy(setup, references, s.completions, s.served_by) for start, s in served.items()
    }
    accuracy_choice = choices.get(OBJECTIVE_OF_SECTION["accuracy"]) or choices[first]
    everywhere = [setup.largest] * len(setup.prompts.eval_prompts)
    static_accuracy = accuracy(setup, references, references.full_outputs(setup.largest), everywhere)
    generate_accuracy = accuracy(setup, references, measured.generate_outputs, everywhere)
    energy = trio("energy", lambda m: Energy(m.capacity.throughput.joules, m.capacity.throughput.tokens_per_joule))
    lat = trio("latency", lambda m: m.latency)
    bw = trio("bandwidth", lambda m: m.capacity.bandwidth)
    sections = Sections(
        throughput=trio("throughput", lambda m: m.capacity.throughput),
        max_batch=trio("max_batch", lambda m: m.capacity.max_batch),
        memory=trio("memory", lambda m: m.capacity.memory),
        latency=LatencySection(lat.static, lat.generate, lat.helios, measured.rate, len(measured.arrivals)),
        energy=EnergySection(
            setup.energy.available, setup.energy.reason or None, energy.static, energy.generate, energy.helios
        ),
        accuracy=AccuracySection(
            floor=o.accuracy_floor,
            prompts=len(setup.prompts.eval_prompts),
            tie_tolerance=setup.tie_tolerance,
            helios=helios_accuracy[CandidateDepth(accuracy_choice.candidate, accuracy_choice.depth).label],
            static=static_accuracy,
            generate=generate_accuracy,
            helios_by_placement=helios_accuracy,
        ),
        bandwidth=BandwidthSection(
            setup.bandwidth,
            {str(b): Trio(bw.static[str(b)], bw.generate[str(b)], bw.helios[str(b)]) for b in o.batches},
        ),
    )
    final = _final_for("throughput", final_of, first)
    served_final = next((s for s in served.values() if s.final == final), next(iter(served.values())))
    layers = setup.layers
    return BenchData(
        meta=Meta(
            date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            device=setup.info,
            presets=setup.presets,
            largest=setup.largest,
            dtype=setup.dtype,
            context_tokens=setup.prompts.context,
            memory_budget_bytes=setup.budget,
            bandwidth_bytes_per_second=setup.bandwidth,
            options=o,
        ),
        models={p: ModelEntry(setup.paths[p], layers[p], setup.sizes[p]) for p in setup.presets},
        profiles=profiles,
        helios=HeliosRun(
            choices={obj: Chosen(c, final_of[obj]) for obj, c in choices.items()},
            final=final,
            model_layers=layers[final.candidate],
            adaptations=[a for s in served.values() for a in s.adaptations],
            breach_ratio=served_final.breach_ratio,
            window_tokens=served_final.window_tokens,
            exit_layers={str(k): v for k, v in sorted(served_final.exit_layers.items())},
            first_confident=next(p for p in profiles if p.candidate == final.candidate).first_confident,
        ),
        configs={
            "helios": f"HELIOS engine: {final.candidate} at {final.depth}/{layers[final.candidate]} layers, "
            f"exits at confidence {o.confidence_threshold}, breach rule live",
            "static": f"same engine: {setup.largest} at all {layers[setup.largest]} layers, no early exit",
            "generate": f"transformers model.generate (greedy) on {setup.largest}, all layers",
        },
        sections=sections,
    )


def _final_for(section: str, final_of: dict[Objective, CandidateDepth], first: Objective) -> CandidateDepth:
    return final_of.get(OBJECTIVE_OF_SECTION[section], final_of[first])
