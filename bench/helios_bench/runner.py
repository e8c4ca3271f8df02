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

import datetime
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from helios_bench import report
from helios_bench.device import EnergyMeter, device_info, free_device_memory, measure_copy_bandwidth, resolve_device
from helios_bench.measure import (
    Sizes,
    System,
    bandwidth_fraction,
    cycle,
    default_budget,
    latency,
    max_batch_in_budget,
    poisson_arrivals,
    throughput,
)
from helios_bench.observe import ProfileCollector, ServeObserver
from helios_bench.options import (
    CPU_PRESETS,
    GPU_PRESETS,
    BenchOptions,
    add_bench_arguments,
    bench_options_from_args,
    validate,
)
from helios_bench.phases import prepare_prompts
from helios_bench.results import BenchResult, CandidateDepth, Served
from helios_bench.stats import (
    agreement_interval,
    exact_match_rates,
    forced_agreement,
    sequence_agreement,
    token_agreement,
)
from helios_bench.systems import NO_EXIT_THRESHOLD, Completion, EngineSystem, GenerateSystem, Prompt
from helios_operator.core import policy
from helios_operator.core.types import CandidateProfile, ExitSpec, Objective, WorkerTelemetry
from helios_worker.models.cache import train_preset

__all__ = ["BenchOptions", "BenchResult", "add_bench_arguments", "bench_options_from_args", "run_bench"]

CONFIGS = ("helios", "static", "generate")
EVAL_CHUNK = 16  # at most this many requests served between two looks at the breach rule
LATENCY_LOAD = 0.8  # default request rate: this share of the static baseline's measured capacity


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


class Bench:
    def __init__(self, options: BenchOptions, console: Console) -> None:
        self.o = options
        self.console = console
        self.device = resolve_device(options.device)
        self.dtype = options.dtype or ("bfloat16" if self.device == "cuda" else "float32")
        self.presets = options.presets or (GPU_PRESETS if self.device == "cuda" else CPU_PRESETS)
        self.energy = EnergyMeter(self.device)
        # Probability gap below which two tokens are a tie for the agreement check: rounding, not judgement.
        self.tie_tolerance = 1e-4 if self.dtype == "float32" else 1e-2
        self.started = time.perf_counter()
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # one bar per model load drowns the bench's own lines
        self.paths: dict[str, Path] = {}
        self.layers: dict[str, int] = {}
        self.sizes_full: dict[str, Sizes] = {}
        self._full_outputs: dict[str, list[Completion]] = {}
        self._predicted: dict[tuple[str, Prompt, tuple[int, ...]], list[float]] = {}

    def log(self, message: str) -> None:
        elapsed = time.perf_counter() - self.started
        self.console.print(f"[bench {elapsed:6.1f}s] {message}", highlight=False, markup=False, soft_wrap=True)

    # ---- models -------------------------------------------------------------------------------

    def load(self, candidate: str, layers: int | None) -> Any:
        from helios_worker.models.loading import load_partial

        return load_partial(self.paths[candidate], layers, device=self.device, dtype=_dtype(self.dtype))

    def sizes(self, model: Any) -> Sizes:
        return Sizes(
            resident_weight_bytes=int(model.resident_weight_bytes()),
            fixed_weight_bytes=int(model.fixed_weight_bytes()),
            layer_weight_bytes=int(model.layer_weight_bytes()),
            kv_bytes_per_token_per_layer=int(model.kv_bytes_per_token_per_layer(_dtype(self.dtype))),
            loaded_layers=int(model.loaded_layers),
        )

    def engine(
        self,
        model: Any,
        *,
        exits: bool,
        max_batch: int,
        kv_budget: int | None = None,
        observer: Any = None,
        profile: bool = False,
        ignore_eos: bool = False,
        max_context: int | None = None,
    ) -> EngineSystem:
        return EngineSystem(
            model,
            threshold=self.o.confidence_threshold if exits else NO_EXIT_THRESHOLD,
            early_stop=exits,
            breach_window=self.o.breach_window,
            max_batch=max_batch,
            max_context=max_context or self.prompts.context,
            kv_budget_bytes=kv_budget,
            device=self.device,
            dtype=self.dtype,
            observer=observer,
            profile=profile,
            ignore_eos=ignore_eos,
        )

    # ---- the run ------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        o = self.o
        torch.manual_seed(o.seed)
        if self.device == "cpu":
            torch.set_num_threads(o.cpu_threads)
        info = device_info(self.device)
        threads = f"; {torch.get_num_threads()} torch thread(s)" if self.device == "cpu" else ""
        self.log(f"device: {info.name}; presets {', '.join(self.presets)}; dtype {self.dtype}{threads}")
        for preset in self.presets:
            self.paths[preset] = train_preset(preset, o.seed, device=self.device, steps=o.train_steps, log=self.log)
        self.prompts = prepare_prompts(o, [self.paths[p] for p in self.presets])
        for preset in self.presets:
            model = self.load(preset, None)
            self.layers[preset] = int(model.model_layers)
            self.sizes_full[preset] = self.sizes(model)
            del model
        # The baseline serves the largest candidate; HELIOS may choose any.
        self.largest = max(self.presets, key=lambda p: self.sizes_full[p].resident_weight_bytes)
        bandwidth = measure_copy_bandwidth(self.device, o.bandwidth_probe_bytes)
        self.log(f"copy bandwidth {bandwidth / 1e9:.2f} GB/s (read + write)")
        self.budget = o.memory_budget_bytes or default_budget(
            self.sizes_full[self.largest], self.prompts.context, o.budget_batch
        )

        profiles = tuple(self._profile(p) for p in self.presets)
        cost = policy.CostModel(full_batch=o.budget_batch, context_tokens=self.prompts.context)
        choices = {obj: policy.choose(profiles, obj, o.accuracy_floor, cost) for obj in o.objectives}
        for obj, choice in choices.items():
            assert choice is not None
            self.log(f"policy ({obj}): {choice.reason}")

        served: dict[CandidateDepth, Served] = {}
        for obj, choice in choices.items():
            assert choice is not None
            start = CandidateDepth(choice.candidate, choice.depth)
            if start not in served:
                served[start] = self._serve_eval(start, profiles, obj, cost)
        final_of = {obj: served[CandidateDepth(c.candidate, c.depth)].final for obj, c in choices.items() if c}

        # The static baseline first: its capacity sets the request rate of the latency run.
        self.log(f"measuring the static baseline ({self.largest}, all layers, no exits)")
        static_model = self.load(self.largest, None)
        static_sizes = self.sizes(static_model)
        measured: dict[str, dict[str, Any]] = {}
        measured["static"] = self._measure_engine(static_model, static_sizes, exits=False, bandwidth=bandwidth)
        capacity = measured["static"]["throughput"]["requests_per_second"]
        self.rate = o.rate or LATENCY_LOAD * capacity
        self.arrivals = poisson_arrivals(o.latency_requests, self.rate, o.seed)
        measured["static"]["latency"] = self._latency_engine(
            static_model, static_sizes, exits=False, run_batch=measured["static"]["max_batch"]["run_batch"]
        )
        self.log(f"measuring plain generate ({self.largest}); latency rate {self.rate:.2f} requests/s")
        measured["generate"] = self._measure_generate(static_model, static_sizes, bandwidth)
        del static_model
        free_device_memory(self.device)

        by_placement: dict[CandidateDepth, dict[str, Any]] = {}
        for placement in dict.fromkeys(final_of.values()):
            self.log(f"measuring HELIOS ({placement.candidate} at {placement.depth} layers)")
            model = self.load(placement.candidate, placement.depth)
            sizes = self.sizes(model)
            m = self._measure_engine(model, sizes, exits=True, bandwidth=bandwidth)
            m["latency"] = self._latency_engine(model, sizes, exits=True, run_batch=m["max_batch"]["run_batch"])
            by_placement[placement] = m
            del model
            free_device_memory(self.device)

        return self._assemble(info, bandwidth, profiles, choices, served, final_of, measured, by_placement)

    # ---- profiling and the policy -------------------------------------------------------------

    def _profile(self, candidate: str) -> CandidateProfile:
        model = self.load(candidate, None)
        collector = ProfileCollector(int(model.model_layers))
        system = self.engine(
            model, exits=True, max_batch=len(self.prompts.profile_prompts), observer=collector, profile=True
        )
        try:
            system.run_batch(self.prompts.profile_prompts, 2)  # first calls stay out of the tokens/s the policy reads
            collector.reset()
            joules_before = self.energy.read_joules()
            started = time.perf_counter()
            completions = system.run_batch(self.prompts.profile_prompts, self.o.max_new_tokens)
            seconds = time.perf_counter() - started
            joules_after = self.energy.read_joules()
        finally:
            system.close()
        tokens = sum(len(c.token_ids) for c in completions)
        joules = None if joules_before is None or joules_after is None else joules_after - joules_before
        sizes = self.sizes(model)
        profile = collector.profile(
            candidate,
            tokens_per_second=tokens / seconds,
            fixed_weight_bytes=sizes.fixed_weight_bytes,
            layer_weight_bytes=sizes.layer_weight_bytes,
            kv_bytes_per_token_per_layer=sizes.kv_bytes_per_token_per_layer,
            joules_per_token=joules / tokens if joules and tokens else None,
        )
        self.log(
            f"profiled {candidate}: {profile.profiled_tokens} tokens, depth agreement "
            + " ".join(f"{a:.2f}" for a in profile.depth_agreement)
        )
        return profile

    def _serve_eval(
        self,
        start: CandidateDepth,
        profiles: tuple[CandidateProfile, ...],
        objective: Objective,
        cost: policy.CostModel,
    ) -> Served:
        """The evaluation prompts in chunks; after each, the breach rule, as the operator applies it."""
        exit_spec = ExitSpec(self.o.confidence_threshold, self.o.breach_window, self.o.breach_limit)
        placement = start
        out = Served(final=start, completions=[], served_by=[])
        observer = ServeObserver()
        model = self.load(placement.candidate, placement.depth)
        step = max(1, min(EVAL_CHUNK, len(self.prompts.eval_prompts) // 4))  # at least four looks at the rule
        system = self.engine(model, exits=True, max_batch=step, observer=observer)
        requests_ok = 0
        try:
            for begin in range(0, len(self.prompts.eval_prompts), step):
                chunk = self.prompts.eval_prompts[begin : begin + step]
                out.completions += system.run_batch(chunk, self.o.max_new_tokens)
                out.served_by += [placement.candidate] * len(chunk)
                requests_ok += len(chunk)
                telemetry = WorkerTelemetry(
                    worker="bench",
                    candidate=placement.candidate,
                    depth=placement.depth,
                    model_layers=self.layers[placement.candidate],
                    requests_ok=float(requests_ok),
                    generated_tokens=float(observer.tokens),
                    breach_ratio=system.breach_ratio,
                    window_tokens=float(observer.window_tokens),
                )
                if not policy.breach_triggered(telemetry, exit_spec):
                    continue
                adaptation = policy.adapt(
                    profiles, placement.candidate, placement.depth, objective, self.o.accuracy_floor, cost
                )
                event = {
                    "after_requests": requests_ok,
                    "from": asdict(placement),
                    "breach_ratio": system.breach_ratio,
                    "reason": adaptation.reason,
                    "to": None,
                }
                if adaptation.choice is not None:
                    placement = CandidateDepth(adaptation.choice.candidate, adaptation.choice.depth)
                    event["to"] = asdict(placement)
                    system.close()
                    model = self.load(placement.candidate, placement.depth)
                    system = self.engine(model, exits=True, max_batch=step, observer=observer)
                out.adaptations.append(event)
                self.log(f"breach rule fired: {adaptation.reason}")
            out.breach_ratio = system.breach_ratio
        finally:
            system.close()
        out.final = placement
        out.window_tokens = observer.window_tokens
        out.exit_layers = observer.exit_layers
        return out

    def full_outputs(self, candidate: str) -> list[Completion]:
        """The candidate at full depth with exits off on the evaluation prompts: its own reference."""
        if candidate not in self._full_outputs:
            model = self.load(candidate, None)
            system = self.engine(model, exits=False, max_batch=EVAL_CHUNK)
            try:
                self._full_outputs[candidate] = system.run_batch(self.prompts.eval_prompts, self.o.max_new_tokens)
            finally:
                system.close()
        return self._full_outputs[candidate]

    # ---- measurements -------------------------------------------------------------------------

    def _batches(self, sizes: Sizes, scratch_slot: bool) -> dict[str, Any]:
        max_batch = max_batch_in_budget(sizes, self.budget, self.prompts.context, scratch_slot)
        if max_batch < 1:
            raise RuntimeError(
                f"a memory budget of {self.budget} bytes holds no row of {self.prompts.context} tokens beside "
                f"{sizes.resident_weight_bytes} bytes of weights; raise --memory-budget-bytes"
            )
        run_batch = min(max_batch, self.o.max_run_batch)
        return {
            "max_batch": max_batch,
            "run_batch": run_batch,
            "capped": run_batch < max_batch,
            "budget_bytes": self.budget,
        }

    def _waves(self) -> int:
        return 2 if self.o.quick else 4

    def _measure_engine(self, model: Any, sizes: Sizes, *, exits: bool, bandwidth: float) -> dict[str, Any]:
        batches = self._batches(sizes, scratch_slot=True)
        system = self.engine(
            model, exits=exits, max_batch=batches["run_batch"], kv_budget=self.budget - sizes.resident_weight_bytes
        )
        try:
            tp = throughput(
                system,
                self.prompts.eval_prompts,
                batch=system.slots,
                waves=self._waves(),
                max_new_tokens=self.o.max_new_tokens,
                device=self.device,
                energy=self.energy,
            )
            kv_bytes = system.kv_cache_bytes
        finally:
            system.close()
        memory = {
            "resident_weight_bytes": sizes.resident_weight_bytes,
            "kv_cache_bytes": kv_bytes,
            "total_bytes": sizes.resident_weight_bytes + kv_bytes,
            "peak_allocated_bytes": tp.pop("peak_allocated_bytes"),
        }

        def make(batch: int, observer: ServeObserver) -> System:
            return self.engine(
                model,
                exits=exits,
                max_batch=batch,
                observer=observer,
                ignore_eos=True,
                max_context=self.prompts.decode_context,
            )

        bw = {str(b): self._bandwidth(make, sizes, b, bandwidth, early_exit=exits) for b in self.o.batches}
        return {"throughput": tp, "max_batch": batches, "memory": memory, "bandwidth": bw, "sizes": asdict(sizes)}

    def _bandwidth(self, make: Any, sizes: Sizes, batch: int, bandwidth: float, *, early_exit: bool) -> dict[str, Any]:
        result = bandwidth_fraction(
            make,
            sizes,
            self.prompts.eval_prompts,
            batch=batch,
            new_tokens=self.o.decode_tokens,
            bandwidth=bandwidth,
            device=self.device,
            early_exit=early_exit,
            repeats=self.o.decode_repeats,
        )
        self.log(
            f"  decode at batch {batch}: {result['tokens_per_second']:.1f} tok/s, "
            f"{result['fraction'] * 100:.1f}% of the bandwidth bound"
        )
        return result

    def _latency_engine(self, model: Any, sizes: Sizes, *, exits: bool, run_batch: int) -> dict[str, Any]:
        system = self.engine(
            model, exits=exits, max_batch=run_batch, kv_budget=self.budget - sizes.resident_weight_bytes
        )
        try:
            return latency(
                system, self.arrivals, cycle(self.prompts.eval_prompts, len(self.arrivals)), self.o.max_new_tokens
            )
        finally:
            system.close()

    def _measure_generate(self, model: Any, sizes: Sizes, bandwidth: float) -> dict[str, Any]:
        from helios_worker.engine.engine import eos_ids

        eos = sorted(eos_ids(model))
        batches = self._batches(sizes, scratch_slot=False)
        system = GenerateSystem(model.hf_model, model.tokenizer, self.device, eos, batches["run_batch"])
        tp = throughput(
            system,
            self.prompts.eval_prompts,
            batch=batches["run_batch"],
            waves=self._waves(),
            max_new_tokens=self.o.max_new_tokens,
            device=self.device,
            energy=self.energy,
        )
        kv_bytes = batches["run_batch"] * sizes.kv_bytes_per_token * self.prompts.context
        memory = {
            "resident_weight_bytes": sizes.resident_weight_bytes,
            "kv_cache_bytes": kv_bytes,
            "total_bytes": sizes.resident_weight_bytes + kv_bytes,
            "peak_allocated_bytes": tp.pop("peak_allocated_bytes"),
        }

        def make(batch: int, observer: ServeObserver) -> System:
            return GenerateSystem(model.hf_model, model.tokenizer, self.device, eos, batch, ignore_eos=True)

        bw = {str(b): self._bandwidth(make, sizes, b, bandwidth, early_exit=False) for b in self.o.batches}
        lat = latency(
            system, self.arrivals, cycle(self.prompts.eval_prompts, len(self.arrivals)), self.o.max_new_tokens
        )
        outputs = system.run_batch(self.prompts.eval_prompts, self.o.max_new_tokens)
        return {
            "throughput": tp,
            "max_batch": batches,
            "memory": memory,
            "bandwidth": bw,
            "latency": lat,
            "sizes": asdict(sizes),
            "outputs": outputs,
        }

    # ---- the report ---------------------------------------------------------------------------

    def predictions(self, candidate: str, completions: list[Completion]) -> list[list[float]]:
        """The candidate's full model, teacher-forced on each prompt + served output (the plain
        transformers forward, independent of the engine): at every served position, its probability of
        its own greedy token minus its probability of the served token (0: it agrees)."""
        pairs = zip(self.prompts.eval_prompts, completions, strict=True)
        keys = [(candidate, prompt, tuple(c.token_ids)) for prompt, c in pairs]
        todo = [k for k in dict.fromkeys(keys) if k not in self._predicted and k[2]]
        if todo:
            model = self.load(candidate, None)
            with torch.inference_mode():
                for begin in range(0, len(todo), EVAL_CHUNK):
                    chunk = todo[begin : begin + EVAL_CHUNK]
                    rows = [list(prompt) + list(tokens[:-1]) for _, prompt, tokens in chunk]
                    width = max(len(r) for r in rows)
                    ids = torch.zeros((len(rows), width), dtype=torch.long)
                    mask = torch.zeros((len(rows), width), dtype=torch.long)
                    for i, r in enumerate(rows):  # right-padded: positions stay those of the unpadded row
                        ids[i, : len(r)] = torch.tensor(r)
                        mask[i, : len(r)] = 1
                    logits = model.hf_model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
                    probs = torch.softmax(logits.float(), dim=-1)
                    for i, (_, prompt, tokens) in enumerate(chunk):
                        start = len(prompt) - 1
                        p = probs[i, start : start + len(tokens)]
                        served = torch.tensor(tokens, device=p.device)[:, None]
                        gap = p.max(dim=-1).values - p.gather(1, served)[:, 0]
                        self._predicted[chunk[i]] = [float(x) for x in gap.tolist()]
            del model
        return [self._predicted.get(k, []) for k in keys]

    def _accuracy(self, completions: list[Completion], served_by: list[str]) -> dict[str, Any]:
        """Agreement with the full model of the candidate that served each prompt (what the floor bounds),
        with the largest candidate, free-running and per sequence; and exact match on the tasks."""
        tokens = [c.token_ids for c in completions]
        own_pred: list[list[float]] = [[] for _ in completions]
        for candidate in dict.fromkeys(served_by):
            pred = self.predictions(candidate, completions)
            for i, c in enumerate(served_by):
                if c == candidate:
                    own_pred[i] = pred[i]
        largest_pred = self.predictions(self.largest, completions)
        own_free = [self.full_outputs(c)[i].token_ids for i, c in enumerate(served_by)]
        em = exact_match_rates([e.prompt for e in self.prompts.eval_examples], [c.text for c in completions])
        agreement = forced_agreement(own_pred, self.tie_tolerance)
        n = sum(len(t) for t in tokens)
        return {
            "agreement": agreement,
            "agreement_ci95": list(agreement_interval(round(agreement * n), n)),
            "floor_met": agreement >= self.o.accuracy_floor,
            "agreement_with_largest": forced_agreement(largest_pred, self.tie_tolerance),
            "free_running_agreement": token_agreement(tokens, own_free),
            "sequence_agreement": sequence_agreement(tokens, own_free),
            "exact_match": em["all"],
            "exact_match_easy": em["easy"],
            "exact_match_hard": em["hard"],
            "requests": len(completions),
            "tokens": sum(len(c.token_ids) for c in completions),
        }

    def _assemble(
        self,
        info: Any,
        bandwidth: float,
        profiles: tuple[CandidateProfile, ...],
        choices: dict[Objective, policy.Choice | None],
        served: dict[CandidateDepth, Served],
        final_of: dict[Objective, CandidateDepth],
        measured: dict[str, dict[str, Any]],
        by_placement: dict[CandidateDepth, dict[str, Any]],
    ) -> dict[str, Any]:
        o = self.o
        objective_of_metric: dict[str, Objective] = {
            "throughput": "throughput",
            "max_batch": "throughput",
            "memory": "throughput",
            "bandwidth": "throughput",
            "latency": "latency",
            "energy": "energy",
            "accuracy": "throughput",
        }
        first = o.objectives[0]

        def helios_for(section: str) -> CandidateDepth:
            return final_of.get(objective_of_metric[section], final_of[first])

        accuracy: dict[str, Any] = {
            "floor": o.accuracy_floor,
            "prompts": len(self.prompts.eval_prompts),
            "tie_tolerance": self.tie_tolerance,
        }
        helios_accuracy: dict[str, dict[str, Any]] = {}
        for start, s in served.items():
            helios_accuracy[f"{start.candidate}@{start.depth}"] = self._accuracy(s.completions, s.served_by)
        accuracy_choice = choices.get(objective_of_metric["accuracy"]) or choices[first]
        assert accuracy_choice is not None
        chosen_start = CandidateDepth(accuracy_choice.candidate, accuracy_choice.depth)
        accuracy["helios"] = helios_accuracy[f"{chosen_start.candidate}@{chosen_start.depth}"]
        everywhere = [self.largest] * len(self.prompts.eval_prompts)
        accuracy["static"] = self._accuracy(self.full_outputs(self.largest), everywhere)
        accuracy["generate"] = self._accuracy(measured["generate"].pop("outputs"), everywhere)
        accuracy["helios_by_placement"] = helios_accuracy

        sections: dict[str, Any] = {}
        for section in ("throughput", "max_batch", "memory", "latency"):
            sections[section] = {
                "static": measured["static"][section],
                "generate": measured["generate"][section],
                "helios": by_placement[helios_for(section)][section],
            }
        sections["latency"]["rate_rps"] = self.rate
        sections["latency"]["requests"] = len(self.arrivals)
        energy: dict[str, Any] = {"available": self.energy.available, "reason": self.energy.reason or None}
        for name, m in (
            ("static", measured["static"]),
            ("generate", measured["generate"]),
            ("helios", by_placement[helios_for("energy")]),
        ):
            tp = m["throughput"]
            energy[name] = {"joules": tp["joules"], "tokens_per_joule": tp["tokens_per_joule"]}
        sections["energy"] = energy
        sections["accuracy"] = accuracy
        bw_helios = by_placement[helios_for("bandwidth")]["bandwidth"]
        sections["bandwidth"] = {
            "bytes_per_second": bandwidth,
            "batches": {
                str(b): {
                    "static": measured["static"]["bandwidth"][str(b)],
                    "generate": measured["generate"]["bandwidth"][str(b)],
                    "helios": bw_helios[str(b)],
                }
                for b in o.batches
            },
        }
        final = helios_for("throughput")
        served_final = (
            next(s for s in served.values() if s.final == final)
            if any(s.final == final for s in served.values())
            else next(iter(served.values()))
        )
        return {
            "meta": {
                "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                "device": info.to_dict(),
                "command": o.command,
                "presets": list(self.presets),
                "largest": self.largest,
                "dtype": self.dtype,
                "quick": o.quick,
                "seed": o.seed,
                "context_tokens": self.prompts.context,
                "max_new_tokens": o.max_new_tokens,
                "memory_budget_bytes": self.budget,
                "bandwidth_bytes_per_second": bandwidth,
                "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(o).items()},
            },
            "models": {
                p: {"path": str(self.paths[p]), "layers": self.layers[p], **asdict(self.sizes_full[p])}
                for p in self.presets
            },
            "profiles": [p.to_dict() for p in profiles],
            "helios": {
                "choices": {
                    obj: {
                        "candidate": c.candidate,
                        "depth": c.depth,
                        "model_layers": c.model_layers,
                        "accuracy": c.accuracy,
                        "reason": c.reason,
                        "final": asdict(final_of[obj]),
                    }
                    for obj, c in choices.items()
                    if c
                },
                "final": {
                    "candidate": final.candidate,
                    "depth": final.depth,
                    "model_layers": self.layers[final.candidate],
                },
                "adaptations": [a for s in served.values() for a in s.adaptations],
                "breach_ratio": served_final.breach_ratio,
                "window_tokens": served_final.window_tokens,
                "exit_layers": {str(k): v for k, v in sorted(served_final.exit_layers.items())},
                "first_confident": list(next(p for p in profiles if p.candidate == final.candidate).first_confident),
            },
            "configs": {
                "helios": f"HELIOS engine: {final.candidate} at {final.depth}/{self.layers[final.candidate]} layers, "
                f"exits at confidence {o.confidence_threshold}, breach rule live",
                "static": f"same engine: {self.largest} at all {self.layers[self.largest]} layers, no early exit",
                "generate": f"transformers model.generate (greedy) on {self.largest}, all layers",
            },
            "sections": sections,
        }


def run_bench(options: BenchOptions, console: Console | None = None) -> BenchResult:
    """Run the whole bench; print the table; write bench.json, bench.png and the RESULTS.md entry."""
    opts = options.for_quick() if options.quick else options
    validate(opts)
    console = console or Console(soft_wrap=True)
    bench = Bench(opts, console)
    data = bench.run()
    rows = report.compute_ratios(data, opts.batches)
    dev = data["meta"]["device"]
    title = f"helios bench - {dev['name']} ({dev['kind']}) - {data['meta']['date']}"
    table = report.render_table(rows, title, with_values=True)
    console.print(table, highlight=False, markup=False, soft_wrap=True)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, plot_path = out / "bench.json", out / "bench.png"
    report.write_json(data, rows, json_path)
    final = data["helios"]["final"]
    report.write_plot(
        rows, data["helios"]["exit_layers"], final["depth"], data["helios"]["first_confident"], title, plot_path
    )
    if opts.results_md is not None:
        report.append_results(opts.results_md, report.results_entry(data, rows))
    bench.log(f"wrote {json_path} and {plot_path}" + (f"; appended to {opts.results_md}" if opts.results_md else ""))
    return BenchResult(data, rows, table, json_path, plot_path, opts.results_md)
