"""`helios bench engine`: the decode step's structure against the model's minimum, counted on any machine.

Per model and batch B, at full depth L in serving mode (one exit head per row), one decode step is
observed through the engine's own step() in this thread:
- FLOPs, counted by torch's flop counter, beside the minimum 2 x parameters of the L layers x B +
  one LM head per row + attention over each row's live context;
- LM-head evaluations per row (rows that went through the exit head, over B);
- host synchronisations (scalar reads, device-to-host copies, tolist/numpy), counted by a dispatch mode;
- aten ops per layer (the step at depth L minus the step at depth L-1);
- attention FLOPs at live contexts 128 and 2048 under the same max_context (eager and static steps);
- the engine against plain transformers generate() with a static cache, tokens/s, on the same model.
Counts are structural: they hold on a GPU too. Only the tokens/s are timings.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from helios_worker.engine.api import EngineConfig, GenerationRequest, SamplingParams
from helios_worker.engine.blocks import StackModel, family_of
from helios_worker.engine.engine import Engine
from helios_worker.engine.forward import ExitRule, decode
from helios_worker.engine.kvcache import KVCache, plan_cache
from helios_worker.engine.rows import Event
from helios_worker.engine.static import StaticDecoder

aten = torch.ops.aten
# Attention kernels the flop counter does not know (the CPU's fused one) get the same formula as the others.
_SDPA_CPU = aten._scaled_dot_product_flash_attention_for_cpu  # op packets: the flop counter's keys
ATTENTION_OPS = {
    _SDPA_CPU,
    aten._scaled_dot_product_flash_attention,
    aten._scaled_dot_product_efficient_attention,
    aten._scaled_dot_product_cudnn_attention,
    aten.bmm,  # the math fallback; the engine's projections are mm/addmm
}

TARGETS = {
    "flops_ratio": 1.15,  # at most
    "heads_per_row": 1.0,  # at most
    "syncs_per_step": 1.0,  # at most
    "aten_ops_per_layer": 20.0,  # at most, eager
}
CONTEXTS = (128, 2048)


def _sdpa_cpu_flops(query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> int:
    flops: int = sdpa_flop_count(query, key, value)  # type: ignore[no-untyped-call]
    return flops


def flop_counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping={_SDPA_CPU: _sdpa_cpu_flops})


def attention_flops(counter: FlopCounterMode) -> int:
    return sum(n for op, n in counter.get_flop_counts()["Global"].items() if op in ATTENTION_OPS)


class OpCounter(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Every aten op dispatched while active."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


class HostReads(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Host synchronisations: scalar reads (item, bool, int), device-to-host copies, and tolist/numpy
    (counted at the Python level, since on the CPU they dispatch nothing)."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.reads: Counter[str] = Counter()
        self._in_read = False

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is aten._local_scalar_dense.default and not self._in_read:
            self.reads["scalar"] += 1
        elif not self._in_read and func in (aten._to_copy.default, aten.copy_.default):
            source = args[1] if func is aten.copy_.default else args[0]
            target = args[0] if func is aten.copy_.default else out
            if source.device.type != "cpu" and target.device.type == "cpu":
                self.reads["device_to_host"] += 1
        return out

    @property
    def total(self) -> int:
        return sum(self.reads.values())

    @contextmanager
    def python_reads(self) -> Iterator[None]:
        kinds = {"tolist": "tolist", "numpy": "numpy"}
        kinds |= {name: "scalar" for name in ("item", "__bool__", "__int__", "__float__", "__index__")}
        originals = {name: getattr(torch.Tensor, name) for name in kinds}

        def counted(name: str) -> Callable[..., Any]:
            def read(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
                if self._in_read:  # a read inside a counted one (item inside tolist, say)
                    return originals[name](tensor, *args, **kwargs)
                self.reads[kinds[name]] += 1
                self._in_read = True
                try:
                    return originals[name](tensor, *args, **kwargs)
                finally:
                    self._in_read = False

            return read

        for name in originals:
            setattr(torch.Tensor, name, counted(name))
        try:
            yield
        finally:
            for name, original in originals.items():
                setattr(torch.Tensor, name, original)


@dataclass
class CountedHeads:
    """A model whose exit head counts the rows it evaluates."""

    inner: StackModel
    rows: int = 0

    @property
    def family(self) -> str:
        return self.inner.family

    @property
    def hf_model(self) -> Any:
        return self.inner.hf_model

    @property
    def tokenizer(self) -> Any:
        return self.inner.tokenizer

    @property
    def model_layers(self) -> int:
        return self.inner.model_layers

    @property
    def loaded_layers(self) -> int:
        return self.inner.loaded_layers

    def decoder_layers(self) -> list[nn.Module]:
        return self.inner.decoder_layers()

    def exit_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        self.rows += hidden.shape[0]
        return self.inner.exit_logits(hidden)

    def max_context(self) -> int:
        return self.inner.max_context()


@dataclass(frozen=True)
class Shape:
    layers: int
    layer_params: int  # weight matrices of all loaded decoder layers (norm vectors cost no matmul)
    head_params: int
    heads: int
    head_dim: int
    vocab: int

    @classmethod
    def of(cls, model: StackModel) -> Shape:
        fam = family_of(model)
        head = model.hf_model.get_output_embeddings().weight
        return cls(
            layers=len(fam.layers),
            layer_params=sum(p.numel() for layer in model.decoder_layers() for p in layer.parameters() if p.dim() > 1),
            head_params=head.numel(),
            heads=fam.heads,
            head_dim=fam.head_dim,
            vocab=head.shape[0],
        )

    def minimum_flops(self, contexts: Sequence[int]) -> int:
        """2 x the L layers' parameters per row + one LM head per row + QK and AV over each row's context."""
        rows = len(contexts)
        attention = sum(4 * self.heads * self.head_dim * c for c in contexts) * self.layers
        return 2 * self.layer_params * rows + 2 * self.head_params * rows + attention


@dataclass
class StepCounts:
    rows: int
    context: int
    flops: int
    attention_flops: int
    minimum_flops: int
    head_rows: int
    host_reads: dict[str, int]
    aten_ops: int

    @property
    def syncs(self) -> int:
        return sum(self.host_reads.values())


def _prompts(rows: int, length: int, vocab: int, seed: int) -> list[tuple[int, ...]]:
    rng = random.Random(seed)
    return [tuple(rng.randrange(4, vocab) for _ in range(length)) for _ in range(rows)]


def serving_config(batch: int, max_context: int) -> EngineConfig:
    return EngineConfig(
        confidence_threshold=0.9, exit_layers=(), max_batch=batch, max_context=max_context, ignore_eos=True
    )


def count_engine_step(model: StackModel, batch: int, context: int, max_context: int) -> StepCounts:
    """The engine's second decode step for `batch` rows at live context `context`, in serving mode."""
    counted = CountedHeads(model)
    engine = Engine(counted, serving_config(batch, max_context))
    shape = Shape.of(model)
    sink: Callable[[Event], None] = lambda event: None  # noqa: E731
    for prompt in _prompts(batch, context - 2, shape.vocab, seed=batch):
        engine.submit(GenerationRequest(prompt, SamplingParams(max_tokens=8)), sink)
    with torch.inference_mode():
        engine.step()  # admission, prefills and the first decode step
        assert engine.running == batch
        counted.rows = 0
        flops, ops, reads = flop_counter(), OpCounter(), HostReads()
        with flops, ops, reads, reads.python_reads():
            engine.step()
    engine.stop()
    return StepCounts(
        rows=batch,
        context=context,
        flops=flops.get_total_flops(),
        attention_flops=attention_flops(flops),
        minimum_flops=shape.minimum_flops([context] * batch),
        head_rows=counted.rows,
        host_reads=dict(reads.reads),
        aten_ops=ops.total,
    )


def count_attention(model: StackModel, batch: int, context: int, max_context: int, static: bool) -> int:
    """Attention FLOPs of one decode step (forward level) with every row at live context `context`."""
    fam = family_of(model)
    weight = next(model.hf_model.parameters())
    plan = plan_cache(
        layers=len(fam.layers),
        kv_heads=fam.kv_heads,
        head_dim=fam.head_dim,
        dtype_bytes=weight.element_size(),
        max_batch=batch,
        max_context=max_context,
        budget_bytes=None,
    )
    cache = KVCache(plan, weight.device, weight.dtype)
    rule = ExitRule(0.9, "max_prob", False, True, frozenset())
    tokens = torch.full((batch,), 5, dtype=torch.long, device=weight.device)
    positions = torch.full((batch,), context - 1, dtype=torch.long, device=weight.device)
    counter = flop_counter()
    with torch.inference_mode(), counter:
        if static:
            StaticDecoder(fam, model.exit_logits, cache, rule)(tokens, positions, context)
        else:
            decode(fam, model.exit_logits, cache, rule, tokens, positions, context, early_stop=False)
    return attention_flops(counter)


def _hf_generate(model: StackModel, prompts: list[tuple[int, ...]], new_tokens: int) -> None:
    greedy_generate(model.hf_model, torch.tensor(prompts, device=next(model.hf_model.parameters()).device), new_tokens)


def greedy_generate(hf_model: Any, ids: torch.Tensor, new_tokens: int) -> None:
    """transformers' own greedy `generate`, exactly `new_tokens` per row with a static KV cache: the
    baseline every engine figure is divided by."""
    with torch.inference_mode():
        hf_model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            cache_implementation="static",
        )


def tokens_per_second(
    model: StackModel, batch: int, prompt: int, new_tokens: int, repeats: int = 2
) -> tuple[float, float]:
    """(engine, plain generate with a static cache): tokens/s on the same prompts, the best of `repeats`
    runs each, alternated (engine, generate, engine, ...) after one warm-up run of each."""
    prompts = _prompts(batch, prompt, Shape.of(model).vocab, seed=7)
    engine = Engine(model, serving_config(batch, prompt + new_tokens + 8))
    requests = [GenerationRequest(p, SamplingParams(max_tokens=new_tokens)) for p in prompts]
    engine_seconds, generate_seconds = [], []
    try:
        engine.generate_batch(requests)
        _hf_generate(model, prompts, new_tokens)
        for _ in range(repeats):
            started = time.perf_counter()
            results = engine.generate_batch(requests)
            engine_seconds.append(time.perf_counter() - started)
            assert all(len(events) == new_tokens for events, _ in results)
            started = time.perf_counter()
            _hf_generate(model, prompts, new_tokens)
            generate_seconds.append(time.perf_counter() - started)
    finally:
        engine.stop()
    total = batch * new_tokens
    return total / min(engine_seconds), total / min(generate_seconds)


@dataclass
class Entry:
    """The figures of one (model, batch)."""

    model: str
    batch: int
    layers: int
    flops_per_step: int
    minimum_flops_per_step: int
    flops_ratio: float
    heads_per_row: float
    syncs_per_step: int
    host_reads: dict[str, int]
    aten_ops_per_layer: int
    attention_flops_128: int
    attention_flops_2048: int
    attention_flops_ratio_2048_vs_128: float
    attention_flops_ratio_2048_vs_128_static: float
    engine_tokens_per_second: float | None
    generate_tokens_per_second: float | None
    engine_vs_generate: float | None
    notes: list[str] = field(default_factory=list)


def measure(
    name: str,
    load: Callable[[int | None], StackModel],
    batch: int,
    *,
    max_context: int = 4096,
    speed: bool = True,
    new_tokens: int = 32,
) -> Entry:
    """`load(depth)`: the model cut to `depth` layers (None: every layer)."""
    model = load(None)
    layers = model.loaded_layers
    step = count_engine_step(model, batch, CONTEXTS[0], max_context)
    shallower = count_engine_step(load(layers - 1), batch, CONTEXTS[0], max_context) if layers > 1 else None
    ops_per_layer = step.aten_ops - shallower.aten_ops if shallower is not None else step.aten_ops
    attn = {
        (c, static): count_attention(model, batch, c, max_context, static) for c in CONTEXTS for static in (False, True)
    }
    engine_tps = generate_tps = None
    if speed:
        engine_tps, generate_tps = tokens_per_second(model, batch, CONTEXTS[0] - new_tokens, new_tokens)
    return Entry(
        model=name,
        batch=batch,
        layers=layers,
        flops_per_step=step.flops,
        minimum_flops_per_step=step.minimum_flops,
        flops_ratio=step.flops / step.minimum_flops,
        heads_per_row=step.head_rows / batch,
        syncs_per_step=step.syncs,
        host_reads=step.host_reads,
        aten_ops_per_layer=ops_per_layer,
        attention_flops_128=attn[(128, False)],
        attention_flops_2048=attn[(2048, False)],
        attention_flops_ratio_2048_vs_128=attn[(2048, False)] / attn[(128, False)],
        attention_flops_ratio_2048_vs_128_static=attn[(2048, True)] / attn[(128, True)],
        engine_tokens_per_second=engine_tps,
        generate_tokens_per_second=generate_tps,
        engine_vs_generate=engine_tps / generate_tps if engine_tps and generate_tps else None,
    )


def structural_misses(entry: Entry) -> list[str]:
    """The structural targets (counts, valid on any device) this entry misses."""
    misses = [
        f"{key} {getattr(entry, key):.3g} > {limit:g}" for key, limit in TARGETS.items() if getattr(entry, key) > limit
    ]
    live = (CONTEXTS[1] + 0.0) / CONTEXTS[0]
    if not 0.9 * live <= entry.attention_flops_ratio_2048_vs_128 <= 1.1 * live:
        misses.append(f"attention 2048/128 = {entry.attention_flops_ratio_2048_vs_128:.3g}, not ~{live:g}")
    return misses


def format_entry(entry: Entry) -> str:
    live = CONTEXTS[1] / CONTEXTS[0]
    lines = [
        f"{entry.model} at {entry.layers}/{entry.layers} layers, batch {entry.batch}, one decode step at context 128:",
        f"  FLOPs/step          {entry.flops_per_step:>14,}  minimum {entry.minimum_flops_per_step:,}"
        f"  ratio {entry.flops_ratio:.3f}  (target <= {TARGETS['flops_ratio']})",
        f"  LM heads per row    {entry.heads_per_row:>14.2f}  (target 1)",
        f"  host syncs/step     {entry.syncs_per_step:>14}  {entry.host_reads}  (target <= 1)",
        f"  aten ops per layer  {entry.aten_ops_per_layer:>14}  (target <= {TARGETS['aten_ops_per_layer']:g}, eager)",
        f"  attention FLOPs     {entry.attention_flops_128:>14,} at 128, {entry.attention_flops_2048:,} at 2048:"
        f" x{entry.attention_flops_ratio_2048_vs_128:.2f} eager, x{entry.attention_flops_ratio_2048_vs_128_static:.2f}"
        f" static (live context: x{live:g})",
    ]
    if entry.engine_vs_generate is not None:
        lines.append(
            f"  tokens/s            engine {entry.engine_tokens_per_second:,.0f}, generate (static cache)"
            f" {entry.generate_tokens_per_second:,.0f}: x{entry.engine_vs_generate:.2f}"
            " (a timing; the issue's CPU goal at full depth: >= x1.3 at batch 1, >= x2 at batch 32)"
        )
    misses = structural_misses(entry)
    lines.append("  structural targets: " + ("all met" if not misses else "MISSED: " + "; ".join(misses)))
    return "\n".join(lines)


@dataclass(frozen=True)
class EngineBenchOptions:
    presets: tuple[str, ...] = ("tiny",)
    models: tuple[Path, ...] = ()  # HF directories (e.g. the imported SmolLM2)
    batches: tuple[int, ...] = (1, 8, 32)
    max_context: int = 4096
    new_tokens: int = 32
    speed: bool = True
    json_path: Path | None = None
    threads: int | None = None  # torch's intra-op threads; None: torch's default


def add_engine_bench_arguments(parser: argparse.ArgumentParser) -> None:
    d = EngineBenchOptions()
    add = parser.add_argument
    add("--presets", type=lambda s: tuple(x for x in s.split(",") if x), default=d.presets, help="trained presets")
    add("--model", dest="models", type=Path, action="append", default=[], help="an HF model directory (repeatable)")
    add("--batches", type=lambda s: tuple(int(x) for x in s.split(",")), default=d.batches, help="e.g. 1,8,32")
    add("--max-context", type=int, default=d.max_context, help="the KV cache's context (default: the serving one)")
    add("--new-tokens", type=int, default=d.new_tokens, help="tokens per request in the tokens/s runs")
    add("--no-speed", dest="speed", action="store_false", help="counts only: skip the tokens/s runs")
    add("--json", dest="json_path", type=Path, help="write the figures here")
    add("--threads", type=int, help="torch threads (1 on a shared machine, where spinning threads stall)")


def engine_bench_options_from_args(ns: argparse.Namespace) -> EngineBenchOptions:
    return EngineBenchOptions(
        presets=tuple(ns.presets),
        models=tuple(ns.models),
        batches=tuple(ns.batches),
        max_context=ns.max_context,
        new_tokens=ns.new_tokens,
        speed=ns.speed,
        json_path=ns.json_path,
        threads=ns.threads,
    )


def _loader(directory: Path) -> Callable[[int | None], StackModel]:
    from helios_worker.models.loading import load_partial

    return lambda depth: load_partial(directory, depth)


def run_engine_bench(options: EngineBenchOptions, print_line: Callable[[str], None] = print) -> dict[str, Any]:
    """No autograd and the bench's thread count while it measures; both restored after (it also runs
    inside other processes, such as the test suite)."""
    threads = torch.get_num_threads()
    try:
        with torch.no_grad():
            return _run_engine_bench(options, print_line)
    finally:
        torch.set_num_threads(threads)


def _run_engine_bench(options: EngineBenchOptions, print_line: Callable[[str], None]) -> dict[str, Any]:
    from helios_worker.models.cache import train_preset

    sources = [(name, train_preset(name)) for name in options.presets] + [(p.name, p) for p in options.models]
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    results: dict[str, Any] = {
        "device": "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "models": {},
    }
    for name, directory in sources:
        load = _loader(directory)
        for batch in options.batches:
            entry = measure(
                name, load, batch, max_context=options.max_context, speed=options.speed, new_tokens=options.new_tokens
            )
            print_line(format_entry(entry))
            results["models"].setdefault(name, {})[str(batch)] = asdict(entry)
    if options.json_path is not None:
        options.json_path.write_text(json.dumps(results, indent=2) + "\n")
    return results
