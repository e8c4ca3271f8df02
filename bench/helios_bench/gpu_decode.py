"""Decode speed on a GPU: the engine against plain generate() and the memory-bandwidth bound.

A ~1B Llama-shaped model with random weights in bfloat16, batch 1 and 64, at full and half depth:
decode tokens/s (prefill excluded: a run of N new tokens minus a run of 1), beside generate() with a
static cache on the same weights and the bound = copy bandwidth / bytes a step must read (the loaded
layers' and the LM head's weights, plus each row's live K/V). Then the engine's structural counts
(engine_bench.measure) on the same model on CUDA. Run by bench/gpu.sh; `--smoke` runs a tiny shape
on the CPU so the code path is tested where no GPU is (it never writes RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

from helios_bench.device import measure_copy_bandwidth, synchronize
from helios_bench.engine_bench import Entry, format_entry, greedy_generate, measure
from helios_worker.engine.api import EngineConfig, GenerationRequest, SamplingParams
from helios_worker.engine.blocks import StackModel
from helios_worker.engine.engine import Engine

LLAMA_1B: dict[str, Any] = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 4096,
}
SMOKE: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 100,
    "max_position_embeddings": 256,
}


class SilentTokenizer:
    """Random weights emit arbitrary ids: no text is produced, only ids are timed."""

    eos_token_id = None

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return ""


@dataclass
class Truncated:
    """The first `depth` decoder layers of an in-memory Llama, seen as a partially loaded model."""

    hf_model: Any
    depth: int
    tokenizer: Any

    @property
    def family(self) -> str:
        return "llama"

    @property
    def model_layers(self) -> int:
        return len(self.hf_model.model.layers)

    @property
    def loaded_layers(self) -> int:
        return self.depth

    def decoder_layers(self) -> list[nn.Module]:
        return list(self.hf_model.model.layers)[: self.depth]

    def exit_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.hf_model.lm_head(self.hf_model.model.norm(hidden))
        return logits

    def max_context(self) -> int:
        return int(self.hf_model.config.max_position_embeddings)


_AUTO: Any = AutoModelForCausalLM  # untyped in transformers


def random_llama(shape: dict[str, Any], device: str, dtype: torch.dtype) -> Any:
    torch.manual_seed(0)
    config = LlamaConfig(**shape, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = _AUTO.from_config(config, attn_implementation="sdpa")
    return model.to(device=device, dtype=dtype).eval()


@dataclass
class Speed:
    depth: int
    batch: int
    engine_tokens_per_second: float
    generate_tokens_per_second: float | None
    bound_tokens_per_second: float
    engine_share_of_bound: float
    engine_vs_generate: float | None


def _timed(run: Any, device: str, repeats: int = 2) -> float:
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        run()
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return best


def _engine_run(model: StackModel, batch: int, prompt: int, new_tokens: int, device: str) -> float:
    config = EngineConfig(
        exit_layers=(), max_batch=batch, max_context=prompt + new_tokens + 8, ignore_eos=True, device=device
    )
    engine = Engine(model, config)
    engine.warmup()
    requests = [GenerationRequest(tuple([5] * prompt), SamplingParams(max_tokens=new_tokens)) for _ in range(batch)]
    try:
        engine.generate_batch(requests)
        return _timed(lambda: engine.generate_batch(requests), device)
    finally:
        engine.stop()


def _generate_run(hf_model: Any, depth: int, batch: int, prompt: int, new_tokens: int, device: str) -> float:
    layers = hf_model.model.layers
    full = hf_model.config.num_hidden_layers
    hf_model.model.layers, hf_model.config.num_hidden_layers = layers[:depth], depth
    ids = torch.full((batch, prompt), 5, device=device)

    def run() -> None:
        greedy_generate(hf_model, ids, new_tokens)

    try:
        run()
        return _timed(run, device)
    finally:
        hf_model.model.layers, hf_model.config.num_hidden_layers = layers, full


def step_bytes(model: StackModel, batch: int, context: int) -> int:
    """What one decode step must read: the loaded layers' and the LM head's weights, and the rows' K/V."""
    weights = sum(p.numel() * p.element_size() for layer in model.decoder_layers() for p in layer.parameters())
    head = model.hf_model.get_output_embeddings().weight
    config = model.hf_model.config
    head_dim = config.hidden_size // config.num_attention_heads
    kv = 2 * model.loaded_layers * config.num_key_value_heads * head_dim * head.element_size()
    return int(weights + head.numel() * head.element_size() + batch * context * kv)


def decode_speed(
    hf_model: Any, depth: int, batch: int, prompt: int, new_tokens: int, device: str, bandwidth: float
) -> Speed:
    model = Truncated(hf_model, depth, SilentTokenizer())
    engine = _engine_run(model, batch, prompt, new_tokens, device) - _engine_run(model, batch, prompt, 1, device)
    generate = _generate_run(hf_model, depth, batch, prompt, new_tokens, device) - _generate_run(
        hf_model, depth, batch, prompt, 1, device
    )
    tokens = batch * (new_tokens - 1)
    engine_tps = tokens / engine
    generate_tps = tokens / generate if generate > 0 else None
    bound = batch * bandwidth / step_bytes(model, batch, prompt + new_tokens // 2)
    return Speed(
        depth,
        batch,
        engine_tps,
        generate_tps,
        bound,
        engine_tps / bound,
        engine_tps / generate_tps if generate_tps else None,
    )


def run(smoke: bool, json_path: Path | None, results_md: Path | None) -> dict[str, Any]:
    device = "cpu" if smoke else "cuda"
    dtype = torch.float32 if smoke else torch.bfloat16
    shape = SMOKE if smoke else LLAMA_1B
    batches, prompt, new_tokens = ((1, 4), 16, 8) if smoke else ((1, 64), 128, 64)
    hf_model = random_llama(shape, device, dtype)
    layers = shape["num_hidden_layers"]
    bandwidth = measure_copy_bandwidth(device, 1 << 24 if smoke else 1 << 30)
    speeds = [
        decode_speed(hf_model, depth, batch, prompt, new_tokens, device, bandwidth)
        for depth in (layers, layers // 2)
        for batch in batches
    ]
    lines = [f"decode, {device}, copy bandwidth {bandwidth / 1e9:.0f} GB/s, shape {shape}"]
    for s in speeds:
        vs = f"x{s.engine_vs_generate:.2f}" if s.engine_vs_generate else "n/a"
        lines.append(
            f"  depth {s.depth:>2}/{layers} batch {s.batch:>3}: engine {s.engine_tokens_per_second:,.0f} tok/s,"
            f" generate {s.generate_tokens_per_second or 0:,.0f} ({vs}), bound {s.bound_tokens_per_second:,.0f}"
            f" ({s.engine_share_of_bound:.0%} of it; goal >= 50% at batch 1, >= 60% at 64)"
        )
    structure: list[Entry] = []
    for batch in batches:
        structure.append(
            measure(
                "llama-1b-random" if not smoke else "smoke",
                lambda depth: Truncated(hf_model, depth or layers, SilentTokenizer()),
                batch,
                max_context=2304 if not smoke else 2100,
                speed=False,
            )
        )
    lines += [format_entry(e) for e in structure]
    for line in lines:
        print(line)
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "bandwidth_bytes_per_second": bandwidth,
        "speeds": [asdict(s) for s in speeds],
        "structure": [asdict(e) for e in structure],
    }
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2) + "\n")
    if results_md is not None and device == "cuda":  # never a GPU section from a CPU run
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        entry = f"\n## {stamp} - {result['device']} (cuda): engine decode (bench/gpu.sh)\n\n"
        entry += f"- command: `bash bench/gpu.sh`; torch {torch.__version__}\n\n```\n" + "\n".join(lines) + "\n```\n"
        with results_md.open("a", encoding="utf-8") as handle:
            handle.write(entry)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m helios_bench.gpu_decode", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="a tiny shape on the CPU: tests the code path")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--results-md", type=Path, help="append a dated entry here (CUDA runs only)")
    ns = parser.parse_args()
    run(ns.smoke, ns.json, ns.results_md)


if __name__ == "__main__":
    main()
