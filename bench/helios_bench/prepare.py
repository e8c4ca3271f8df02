"""The first phase: the models trained and sized, the prompts drawn, the bandwidth measured, the budget
fixed; `Setup` carries them (and the device, the log) to every later phase."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from helios_bench.device import DeviceInfo, EnergyMeter, device_info, measure_copy_bandwidth, resolve_device
from helios_bench.measure import Sizes, default_budget
from helios_bench.options import CPU_PRESETS, GPU_PRESETS, BenchOptions
from helios_bench.systems import NO_EXIT_THRESHOLD, EngineSystem, Prompt
from helios_worker.engine.api import EngineObserver
from helios_worker.models import tasks
from helios_worker.models.cache import train_preset


class BenchLog:
    """The bench's progress lines, stamped with the seconds since it started."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.started = time.perf_counter()

    def __call__(self, message: str) -> None:
        elapsed = time.perf_counter() - self.started
        self.console.print(f"[bench {elapsed:6.1f}s] {message}", highlight=False, markup=False, soft_wrap=True)


@dataclass(frozen=True)
class Prompts:
    """The evaluation and profiling prompts, as examples and as the token ids every candidate shares."""

    eval_examples: list[tasks.Example]
    profile_examples: list[tasks.Example]
    eval_prompts: list[Prompt]
    profile_prompts: list[Prompt]
    context: int  # the longest prompt plus max_new_tokens
    decode_context: int  # the longest prompt plus decode_tokens


def prepare_prompts(options: BenchOptions, model_dirs: Sequence[Path]) -> Prompts:
    """Draw the prompts (neither training nor the evaluation's seeds) and tokenize them once; the
    candidates must tokenize alike, or agreement between them means nothing."""
    from transformers import AutoTokenizer

    o = options
    per_kind = math.ceil(o.prompts / 2)
    eval_examples = interleave(tasks.eval_examples(per_kind, seed=o.seed))[: o.prompts]
    profile_seed = o.seed + 3 * tasks.EVAL_SEED_OFFSET  # neither training nor the evaluation draws here
    easy = tasks.examples(math.ceil(o.profile_requests / 2), "easy", profile_seed)
    hard = tasks.examples(math.ceil(o.profile_requests / 2), "hard", profile_seed + 1)
    profile_examples = interleave([*easy, *hard])[: o.profile_requests]
    tokenizers = [AutoTokenizer.from_pretrained(str(path)) for path in model_dirs]
    texts = [e.prompt for e in eval_examples] + [e.prompt for e in profile_examples]
    encoded = [[tuple(int(i) for i in tok(t)["input_ids"]) for t in texts] for tok in tokenizers]
    if any(e != encoded[0] for e in encoded[1:]):
        raise RuntimeError("the candidates tokenize the prompts differently; agreement needs one tokenizer")
    n = len(eval_examples)
    longest = max(len(p) for p in encoded[0])
    return Prompts(
        eval_examples,
        profile_examples,
        encoded[0][:n],
        encoded[0][n:],
        context=longest + o.max_new_tokens,
        decode_context=longest + o.decode_tokens,
    )


def interleave(examples: list[tasks.Example]) -> list[tasks.Example]:
    """Easy and hard alternately, so any prefix is a mix."""
    easy = [e for e in examples if e.kind == "easy"]
    hard = [e for e in examples if e.kind == "hard"]
    out: list[tasks.Example] = []
    for i in range(max(len(easy), len(hard))):
        out += easy[i : i + 1] + hard[i : i + 1]
    return out


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_model(path: Path, layers: int | None, device: str, dtype: str) -> Any:
    from helios_worker.models.loading import load_partial

    return load_partial(path, layers, device=device, dtype=torch_dtype(dtype))


def sizes_of(model: Any, dtype: str) -> Sizes:
    """The loaded model's own byte counts."""
    return Sizes(
        resident_weight_bytes=int(model.resident_weight_bytes()),
        fixed_weight_bytes=int(model.fixed_weight_bytes()),
        layer_weight_bytes=int(model.layer_weight_bytes()),
        kv_bytes_per_token_per_layer=int(model.kv_bytes_per_token_per_layer(torch_dtype(dtype))),
        loaded_layers=int(model.loaded_layers),
    )


@dataclass(frozen=True)
class Setup:
    """What every later phase reads; nothing in it changes after `prepare`."""

    options: BenchOptions  # already sized by --quick
    device: str  # cpu | cuda
    dtype: str
    presets: tuple[str, ...]
    info: DeviceInfo
    energy: EnergyMeter
    log: Callable[[str], None]
    paths: dict[str, Path]  # trained model per preset
    layers: dict[str, int]  # decoder layers per preset
    sizes: dict[str, Sizes]  # per preset, at full depth
    largest: str  # the baseline serves the largest candidate; HELIOS may choose any
    prompts: Prompts
    bandwidth: float  # measured copy bandwidth, bytes/s read + written
    budget: int  # memory budget for weights + KV cache, bytes

    @property
    def tie_tolerance(self) -> float:
        """Probability gap below which two tokens are a tie for the agreement check: rounding, not judgement."""
        return 1e-4 if self.dtype == "float32" else 1e-2

    def load(self, candidate: str, layers: int | None) -> Any:
        return load_model(self.paths[candidate], layers, self.device, self.dtype)

    def engine(
        self,
        model: Any,
        *,
        exits: bool,
        max_batch: int,
        kv_budget: int | None = None,
        observer: EngineObserver | None = None,
        profile: bool = False,
        ignore_eos: bool = False,
        max_context: int | None = None,
    ) -> EngineSystem:
        """The engine over `model` as the bench runs it: exits at the threshold, or none at all."""
        o = self.options
        return EngineSystem(
            model,
            threshold=o.confidence_threshold if exits else NO_EXIT_THRESHOLD,
            early_stop=exits,
            breach_window=o.breach_window,
            max_batch=max_batch,
            max_context=max_context or self.prompts.context,
            kv_budget_bytes=kv_budget,
            device=self.device,
            dtype=self.dtype,
            observer=observer,
            profile=profile,
            ignore_eos=ignore_eos,
        )


def prepare(options: BenchOptions, log: Callable[[str], None]) -> Setup:
    """Seed, train (or reuse) every preset, draw the prompts, size each model at full depth, measure the
    copy bandwidth and fix the memory budget (by default: the static baseline's weights plus its KV)."""
    o = options
    device = resolve_device(o.device)
    dtype = o.dtype or ("bfloat16" if device == "cuda" else "float32")
    presets = o.presets or (GPU_PRESETS if device == "cuda" else CPU_PRESETS)
    energy = EnergyMeter(device)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # one bar per model load drowns the bench's own lines
    torch.manual_seed(o.seed)
    if device == "cpu":
        torch.set_num_threads(o.cpu_threads)
    info = device_info(device)
    threads = f"; {torch.get_num_threads()} torch thread(s)" if device == "cpu" else ""
    log(f"device: {info.name}; presets {', '.join(presets)}; dtype {dtype}{threads}")
    paths = {p: train_preset(p, o.seed, device=device, steps=o.train_steps, log=log) for p in presets}
    prompts = prepare_prompts(o, [paths[p] for p in presets])
    layers: dict[str, int] = {}
    sizes: dict[str, Sizes] = {}
    for preset in presets:
        model = load_model(paths[preset], None, device, dtype)
        layers[preset] = int(model.model_layers)
        sizes[preset] = sizes_of(model, dtype)
        del model
    largest = max(presets, key=lambda p: sizes[p].resident_weight_bytes)
    bandwidth = measure_copy_bandwidth(device, o.bandwidth_probe_bytes)
    log(f"copy bandwidth {bandwidth / 1e9:.2f} GB/s (read + write)")
    budget = o.memory_budget_bytes or default_budget(sizes[largest], prompts.context, o.budget_batch)
    return Setup(
        o, device, dtype, presets, info, energy, log, paths, layers, sizes, largest, prompts, bandwidth, budget
    )
