"""Train a Llama-style causal LM from scratch with a LayerSkip-style early-exit loss, and read every
layer's exit logits of any HF causal LM (for the loss and the exit-shape evaluation).

Every layer's exit (shared final norm + LM head) is trained on the answer tokens, with weights
rising with depth, so easy tokens become confident early and hard ones only late. Deterministic:
one seed fixes the initial weights and the data order.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from .adapter import parts_of
from .presets import Preset
from .tasks import KINDS, Example, eval_examples, exact_match, training_stream
from .tokenizer import build_tokenizer, encode

TRAINING_VERSION = "1"  # bump when the loss, data or loop changes: it is part of the cache key
EVAL_THRESHOLD = 0.9

Log = Callable[[str], None]


# --- exits: every layer's logits through the shared final norm + LM head (models.adapter finds them) ---


def layer_hidden_states(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """The output of each decoder layer (before the final norm), collected with forward hooks so
    the model's own forward (masks, positions) runs unchanged across transformers versions."""
    parts = parts_of(model)
    outputs: list[torch.Tensor] = []

    def keep(_module: nn.Module, _args: Any, output: Any) -> None:
        outputs.append(output[0] if isinstance(output, tuple) else output)

    handles = [layer.register_forward_hook(keep) for layer in parts.layers]
    try:
        parts.base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def exit_logits(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """LayerSkip-style exit: the model's own final norm and LM head on any layer's hidden state."""
    return parts_of(model).exit_logits(hidden)


def all_exit_logits(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[layers, batch, seq, vocab] logits of every layer's exit."""
    parts = parts_of(model)
    return torch.stack([parts.exit_logits(h) for h in layer_hidden_states(model, input_ids, attention_mask)])


def first_confident_layer(confidence: torch.Tensor, threshold: float) -> torch.Tensor:
    """1-based first layer whose confidence reaches `threshold` ([layers, ...] -> [...]);
    layers + 1 where none does (the telemetry contract's convention)."""
    layers = confidence.shape[0]
    passed = confidence >= threshold
    idx = torch.arange(1, layers + 1, device=confidence.device).view(-1, *([1] * (confidence.dim() - 1)))
    masked = torch.where(passed, idx, torch.full_like(idx, layers + 1))
    return masked.min(dim=0).values


def exit_loss_weights(layers: int) -> list[float]:
    """Weight of each layer's exit loss: rising with depth (LayerSkip), the final layer's 1."""
    return [0.2 + 0.8 * (layer / layers) for layer in range(1, layers + 1)]


def build_config(preset: Preset, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(  # type: ignore[call-arg]
        vocab_size=len(tokenizer),
        hidden_size=preset.hidden,
        intermediate_size=preset.intermediate,
        num_hidden_layers=preset.layers,
        num_attention_heads=preset.heads,
        num_key_value_heads=preset.heads,
        max_position_embeddings=preset.max_context,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation="sdpa",
    )


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # [batch, seq]
    targets: torch.Tensor  # [batch, seq], next tokens
    mask: torch.Tensor  # [batch, seq], 1.0 where the target is an answer token or EOS


def example_tokens(tokenizer: PreTrainedTokenizerFast, example: Example) -> tuple[list[int], list[int]]:
    """`<s>prompt answer</s>` and, per position, whether the *next* token is to be learned."""
    prompt = [tokenizer.bos_token_id, *encode(tokenizer, example.prompt)]
    answer = [*encode(tokenizer, example.answer), tokenizer.eos_token_id]
    ids = prompt + answer
    learn = [0] * (len(prompt) - 1) + [1] * len(answer) + [0]
    return ids, learn


def batches(tokenizer: PreTrainedTokenizerFast, seed: int, batch: int, seq_len: int) -> Iterator[Batch]:
    """Whole examples packed into fixed-length rows (padding the rest); a seeded, endless stream."""
    stream = training_stream(seed)
    pending = next(stream)
    pad = tokenizer.pad_token_id
    while True:
        rows_ids, rows_learn = [], []
        for _ in range(batch):
            ids: list[int] = []
            learn: list[int] = []
            while True:
                ex_ids, ex_learn = example_tokens(tokenizer, pending)
                if len(ids) + len(ex_ids) > seq_len + 1:
                    break
                ids += ex_ids
                learn += ex_learn
                pending = next(stream)
            fill = seq_len + 1 - len(ids)
            rows_ids.append(ids + [pad] * fill)
            rows_learn.append(learn + [0] * fill)
        full = torch.tensor(rows_ids)
        learn_t = torch.tensor(rows_learn, dtype=torch.float32)
        yield Batch(full[:, :-1], full[:, 1:], learn_t[:, :-1])


def early_exit_loss(model: LlamaForCausalLM, batch: Batch, weights: list[float]) -> tuple[torch.Tensor, list[float]]:
    """Weighted sum of every layer's exit cross-entropy on the learned tokens, and each layer's CE."""
    hidden = layer_hidden_states(model, batch.input_ids)
    denom = batch.mask.sum().clamp_min(1.0)
    total = torch.zeros((), device=batch.input_ids.device)
    per_layer: list[float] = []
    for weight, h in zip(weights, hidden, strict=True):
        logits = exit_logits(model, h).float()
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), reduction="none")
        layer_loss = (ce * batch.mask.flatten()).sum() / denom
        total = total + weight * layer_loss
        per_layer.append(float(layer_loss.detach()))
    return total / sum(weights), per_layer


def _lr(step: int, steps: int, peak: float) -> float:
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_model(
    preset: Preset, seed: int, device: torch.device, log: Log | None = None, *, evaluate_after: bool = True
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast, dict[str, Any]]:
    """Train `preset` from scratch; returns the model (eval mode), its tokenizer and the metadata
    (with the held-out evaluation unless `evaluate_after` is False)."""
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(build_config(preset, tokenizer))
    model.to(device)  # type: ignore[arg-type]
    model.train()
    weights = exit_loss_weights(preset.layers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=preset.lr, betas=(0.9, 0.98), weight_decay=0.01)
    data = batches(tokenizer, seed, preset.batch, preset.seq_len)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    started = time.monotonic()
    per_layer: list[float] = []
    for step in range(preset.steps):
        batch = next(data)
        batch = Batch(batch.input_ids.to(device), batch.targets.to(device), batch.mask.to(device))
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, preset.steps, preset.lr)
        with autocast:
            loss, per_layer = early_exit_loss(model, batch, weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if log and (step % 100 == 0 or step == preset.steps - 1):
            log(
                f"{preset.name} step {step + 1}/{preset.steps} loss {float(loss.detach()):.3f} "
                f"first/last layer {per_layer[0]:.3f}/{per_layer[-1]:.3f} ({time.monotonic() - started:.0f}s)"
            )
    model.eval()  # type: ignore[no-untyped-call]
    for param in model.parameters():
        param.requires_grad_(False)
    metadata: dict[str, Any] = {
        "preset": preset.name,
        "seed": seed,
        "steps": preset.steps,
        "training_version": TRAINING_VERSION,
        "train_seconds": round(time.monotonic() - started, 1),
        "device": device.type,
        "trained_exits": True,
        "exit_loss_weights": weights,
        "final_layer_losses": [round(x, 4) for x in per_layer],
    }
    if evaluate_after:
        metadata["evaluation"] = evaluate(model, tokenizer, device)
    return model, tokenizer, metadata


@torch.no_grad()
def exit_shape(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    examples: list[Example],
    device: torch.device,
    threshold: float = EVAL_THRESHOLD,
) -> dict[str, dict[str, Any]]:
    """Teacher-forced on `<s>prompt answer</s>`: per kind, the mean first confident layer of the
    answer tokens, the share never confident, and each layer's agreement with the last layer."""
    out: dict[str, dict[str, Any]] = {}
    for kind in KINDS:
        firsts: list[torch.Tensor] = []
        agree: list[torch.Tensor] = []
        for ex in (e for e in examples if e.kind == kind):
            ids, learn = example_tokens(tokenizer, ex)
            logits = all_exit_logits(model, torch.tensor([ids], device=device))[:, 0].float()  # [L, seq, V]
            positions = torch.tensor(learn, device=device).bool()
            probs = logits[:, positions].softmax(-1)
            conf, tokens = probs.max(-1)  # [L, answer]
            firsts.append(first_confident_layer(conf, threshold))
            agree.append((tokens == tokens[-1]).float())
        if not firsts:
            continue
        first = torch.cat(firsts).float()
        layers = model.config.num_hidden_layers
        out[kind] = {
            "mean_first_confident_layer": round(float(first.mean()), 3),
            "never_confident": round(float((first > layers).float().mean()), 3),
            "layer_agreement": [round(float(x), 3) for x in torch.cat(agree, dim=1).mean(1)],
            "tokens": int(first.numel()),
        }
    return out


@torch.no_grad()
def exact_match_accuracy(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    examples: list[Example],
    device: torch.device,
) -> dict[str, float]:
    """Greedy full-depth answers, per kind, the share that match exactly."""
    prompts = [[tokenizer.bos_token_id, *encode(tokenizer, ex.prompt)] for ex in examples]
    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    longest = max(len(ex.answer) for ex in examples) + 2
    generated = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=longest,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad,
    )
    texts = tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
    result: dict[str, float] = {}
    for kind in KINDS:
        hits = [exact_match(ex.prompt, text) for ex, text in zip(examples, texts, strict=True) if ex.kind == kind]
        if hits:
            result[kind] = round(sum(hits) / len(hits), 3)
    return result


def evaluate(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, device: torch.device) -> dict[str, Any]:
    held_out = eval_examples(24)
    return {
        "threshold": EVAL_THRESHOLD,
        "exit_shape": exit_shape(model, tokenizer, held_out, device),
        "exact_match": exact_match_accuracy(model, tokenizer, held_out, device),
    }
