"""Exit adapters: exits trained into any checkpoint with its backbone frozen (`helios train --from DIR`).

A tuned-lens style translator per layer l < L, h -> h + up_l(down_l(h)) + b_l (low rank, identity
at initialisation), is put in front of the model's own final norm and LM head. It is trained by
self-distillation: on the model's own greedy answers to the built-in prompts (models.prompts), each
layer's exit is pulled towards the final layer's distribution by KL divergence, computed sparsely
over the union of the teacher's top-k tokens in the batch plus a few random vocabulary tokens, so
the LM head costs a few thousand columns instead of the whole vocabulary. The backbone is never
touched: the model's full-depth answers stay exactly the same.

The adapters are saved as `exit_adapters.safetensors` beside the weights (tensors `down` [n, r, H],
`up` [n, H, r], `bias` [n, H] for layers 1..n = L-1, metadata `rank`, `layers`); the worker loads
the first `depth` of them with the model and uses them at every exit (models.loading).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .adapter import ModelParts, parts_of
from .cache import build_once, cache_root, copy_model
from .metadata import EXIT_ADAPTERS_FILE, METADATA_FILE, read_metadata
from .prompts import HELD_OUT_PROMPTS, TRAIN_PROMPTS
from .training import layer_hidden_states

ADAPTERS_VERSION = "1"  # bump when the adapter, loss, data or loop changes: it is part of the cache key
EVAL_THRESHOLD = 0.9

Log = Callable[[str], None]


@dataclass(frozen=True)
class AdapterSettings:
    rank: int = 32
    steps: int = 300
    batch_tokens: int = 128
    top_k: int = 8  # teacher tokens per position in the sparse KL
    random_tokens: int = 512  # vocabulary tokens added to every batch's columns as negatives
    lr: float = 3e-3
    max_new_tokens: int = 48  # per generated answer
    seed: int = 0


class ExitAdapters(nn.Module):
    """Per layer 1..n, a low-rank affine translator of the hidden state before the shared exit."""

    def __init__(self, layers: int, hidden: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Parameter(torch.randn(layers, rank, hidden) / hidden**0.5)
        self.up = nn.Parameter(torch.zeros(layers, hidden, rank))  # zero: identity before training
        self.bias = nn.Parameter(torch.zeros(layers, hidden))

    @property
    def layers(self) -> int:
        return int(self.down.shape[0])

    @property
    def rank(self) -> int:
        return int(self.down.shape[1])

    def translate(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """`hidden` [..., H] of 1-based `layer`; unchanged past the last adapter (the final layer)."""
        if layer > self.layers:
            return hidden
        i = layer - 1
        low = hidden @ self.down[i].T
        return hidden + low @ self.up[i].T + self.bias[i]

    def translate_all(self, hidden: torch.Tensor) -> torch.Tensor:
        """`hidden` [n, B, H], row l-1 from layer l."""
        low = torch.bmm(hidden, self.down.transpose(1, 2))
        return hidden + torch.bmm(low, self.up.transpose(1, 2)) + self.bias[:, None, :]

    def save(self, path: Path, metadata: dict[str, str] | None = None) -> None:
        tensors = {name: p.detach().to("cpu", torch.float32).contiguous() for name, p in self.named_parameters()}
        save_file(tensors, str(path), metadata={"rank": str(self.rank), "layers": str(self.layers), **(metadata or {})})

    @classmethod
    def load(
        cls,
        path: Path,
        layers: int | None = None,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> ExitAdapters:
        """The first `layers` adapters of the file (all when None); the others are never read."""
        with safe_open(str(path), framework="pt") as handle:
            total = int(handle.get_slice("down").get_shape()[0])
            keep = total if layers is None else min(layers, total)
            parts = {name: handle.get_slice(name)[:keep] for name in ("down", "up", "bias")}
        adapters = cls.__new__(cls)
        nn.Module.__init__(adapters)
        for name, tensor in parts.items():
            setattr(adapters, name, nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False))
        return adapters


# --- self-distillation data ----------------------------------------------------------------------


@dataclass
class Corpus:
    """Teacher-forced states at the positions that predict the model's own answer tokens."""

    hidden: torch.Tensor  # [L, N, H] each layer's output (before the final norm)
    tokens: torch.Tensor  # [N] the final layer's greedy token at each position

    @property
    def size(self) -> int:
        return int(self.tokens.shape[0])


def _chat_ids(tokenizer: Any, prompt: str) -> list[int]:
    messages = [{"role": "user", "content": prompt}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(f"user: {prompt}\nassistant: ")["input_ids"])


@torch.no_grad()
def generate_answers(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int) -> list[list[int]]:
    """Prompt + greedy answer token ids for each prompt (answers end at EOS or the limit)."""
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos_ids))
    sequences: list[list[int]] = []
    for start in range(0, len(prompts), 8):
        batch = [_chat_ids(tokenizer, p) for p in prompts[start : start + 8]]
        width = max(map(len, batch))
        ids = torch.tensor([[pad] * (width - len(b)) + b for b in batch])
        mask = torch.tensor([[0] * (width - len(b)) + [1] * len(b) for b in batch])
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad
        )
        for prompt_ids, row in zip(batch, out[:, width:].tolist(), strict=True):
            answer: list[int] = []
            for token in row:
                answer.append(token)
                if token in eos_ids:
                    break
            sequences.append(prompt_ids + answer)
    return sequences


@torch.no_grad()
def build_corpus(
    model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, log: Log | None = None
) -> Corpus:
    """The model answers `prompts` itself; its states at every answer position are collected."""
    started = time.monotonic()
    sequences = generate_answers(model, tokenizer, prompts, max_new_tokens)
    prompt_lengths = [len(_chat_ids(tokenizer, p)) for p in prompts]
    hidden: list[torch.Tensor] = []
    tokens: list[torch.Tensor] = []
    for seq, plen in zip(sequences, prompt_lengths, strict=True):
        ids = torch.tensor([seq])
        states = torch.stack(layer_hidden_states(model, ids))[:, 0]  # [L, T, H]
        positions = torch.arange(plen - 1, len(seq) - 1)
        hidden.append(states[:, positions])
        tokens.append(ids[0, positions + 1])
    corpus = Corpus(torch.cat(hidden, dim=1).float(), torch.cat(tokens))
    if log:
        log(
            f"self-distillation data: {len(prompts)} prompts, {corpus.size} answer tokens "
            f"({time.monotonic() - started:.0f}s)"
        )
    return corpus


# --- measurement ---------------------------------------------------------------------------------


@torch.no_grad()
def agreement_curves(
    parts: ModelParts, corpus: Corpus, adapters: ExitAdapters | None = None, threshold: float = EVAL_THRESHOLD
) -> dict[str, Any]:
    """Per layer: the share of positions whose exit token (full vocabulary) equals the final layer's,
    the share confident at `threshold`, and per depth the agreement of early-exit decoding (emit at
    the first confident layer, else at the depth), as the worker would serve it."""
    layers = corpus.hidden.shape[0]
    final = parts.exit_logits(corpus.hidden[-1]).argmax(-1)
    tokens, confident = [], []
    for layer in range(1, layers + 1):
        h = corpus.hidden[layer - 1]
        if adapters is not None:
            h = adapters.translate(h, layer)
        probs = parts.exit_logits(h).float().softmax(-1)
        conf, token = probs.max(-1)
        tokens.append(token)
        confident.append(conf >= threshold)
    tok, conf_mask = torch.stack(tokens), torch.stack(confident)  # [L, N]
    agree = tok == final
    first = torch.where(conf_mask, torch.arange(1, layers + 1)[:, None], layers + 1).min(0).values  # [N]
    early: list[float] = []
    for depth in range(1, layers + 1):
        exit_layer = torch.clamp(first, max=depth) - 1
        early.append(float(agree.gather(0, exit_layer[None])[0].float().mean()))
    return {
        "tokens": corpus.size,
        "threshold": threshold,
        "layer_agreement": [round(float(x), 4) for x in agree.float().mean(1)],
        "confident_share": [round(float(x), 4) for x in conf_mask.float().mean(1)],
        "early_exit_agreement": [round(x, 4) for x in early],
        "mean_exit_layer_at_full_depth": round(float(torch.clamp(first, max=layers).float().mean()), 2),
    }


# --- training ------------------------------------------------------------------------------------


def _kl_sparse(
    parts: ModelParts,
    adapters: ExitAdapters,
    hidden: torch.Tensor,
    teacher_top: torch.Tensor,
    settings: AdapterSettings,
    g: torch.Generator,
) -> torch.Tensor:
    """Mean over layers 1..n and positions of KL(teacher || exit), over the batch's sparse columns."""
    head_weight: torch.Tensor = parts.lm_head.weight  # type: ignore[assignment]
    extra = torch.randint(0, int(head_weight.shape[0]), (settings.random_tokens,), generator=g)
    columns = torch.unique(torch.cat([teacher_top.flatten(), extra]))
    weight = head_weight[columns]  # [U, H]
    with torch.no_grad():
        teacher = torch.log_softmax(parts.final_norm(hidden[-1]) @ weight.T, dim=-1)  # [B, U]
    student = torch.log_softmax(parts.final_norm(adapters.translate_all(hidden[:-1])) @ weight.T, dim=-1)
    return (teacher.exp() * (teacher - student)).sum(-1).mean()


def train_adapters(
    parts: ModelParts, corpus: Corpus, settings: AdapterSettings, log: Log | None = None
) -> ExitAdapters:
    """Adapters for layers 1..L-1, trained on `corpus` with the backbone frozen; deterministic per seed."""
    torch.manual_seed(settings.seed)
    layers, _, hidden_size = corpus.hidden.shape
    adapters = ExitAdapters(layers - 1, hidden_size, settings.rank)
    for module in (parts.final_norm, parts.lm_head):
        for p in module.parameters():
            p.requires_grad_(False)
    with torch.no_grad():
        teacher_top = parts.exit_logits(corpus.hidden[-1]).topk(settings.top_k, dim=-1).indices  # [N, k]
    optimizer = torch.optim.Adam(adapters.parameters(), lr=settings.lr)
    g = torch.Generator().manual_seed(settings.seed)
    started, shown = time.monotonic(), 0.0
    for step in range(settings.steps):
        idx = torch.randint(0, corpus.size, (settings.batch_tokens,), generator=g)
        lr = settings.lr * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * (1 - step / settings.steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = _kl_sparse(parts, adapters, corpus.hidden[:, idx], teacher_top[idx], settings, g)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        elapsed = time.monotonic() - started
        if log and (elapsed - shown >= 10 or step in (0, settings.steps - 1)):
            shown = elapsed
            eta = elapsed / (step + 1) * (settings.steps - step - 1)
            log(
                f"exit adapters: step {step + 1}/{settings.steps} KL {float(loss.detach()):.3f} "
                f"({elapsed:.0f}s, ~{eta:.0f}s left)"
            )
    for p in adapters.parameters():
        p.requires_grad_(False)
    return adapters


# --- the command -----------------------------------------------------------------------------------


def _source_digest(directory: Path) -> str:
    digest = hashlib.sha256()
    for name in sorted(p.name for p in directory.iterdir() if p.suffix in (".safetensors", ".json", ".bin")):
        if name in (EXIT_ADAPTERS_FILE, METADATA_FILE):
            continue
        digest.update(name.encode())
        with (directory / name).open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def adapters_cache_path(source: Path, settings: AdapterSettings, root: Path | None = None) -> Path:
    facts = {"source": _source_digest(source), "settings": asdict(settings), "version": ADAPTERS_VERSION}
    key = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:12]
    return (root or cache_root()) / f"exits-{source.resolve().name}-seed{settings.seed}-{key}"


def train_exits(
    source: str | Path,
    settings: AdapterSettings | None = None,
    *,
    log: Log | None = None,
    cache_dir: Path | None = None,
) -> Path:
    """The cached directory of `source`'s model with trained exit adapters beside its weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    settings = settings or AdapterSettings()
    source = Path(source)
    final = adapters_cache_path(source, settings, cache_dir)
    final.parent.mkdir(parents=True, exist_ok=True)

    def write(staging: Path) -> None:
        started = time.monotonic()
        auto: Any = AutoModelForCausalLM
        model = auto.from_pretrained(str(source), dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(source))
        parts = parts_of(model)
        train = build_corpus(model, tokenizer, TRAIN_PROMPTS, settings.max_new_tokens, log)
        held_out = build_corpus(model, tokenizer, HELD_OUT_PROMPTS, settings.max_new_tokens, log)
        before = agreement_curves(parts, held_out)
        adapters = train_adapters(parts, train, settings, log)
        after = agreement_curves(parts, held_out, adapters)
        if log:
            log("held-out layer agreement before: " + " ".join(f"{x:.2f}" for x in before["layer_agreement"]))
            log("held-out layer agreement after:  " + " ".join(f"{x:.2f}" for x in after["layer_agreement"]))
        copy_model(source, staging)
        (staging / METADATA_FILE).unlink(missing_ok=True)
        adapters.save(staging / EXIT_ADAPTERS_FILE, {"adapters_version": ADAPTERS_VERSION})
        metadata = {
            **read_metadata(source),
            "exit_adapters": {
                "file": EXIT_ADAPTERS_FILE,
                "version": ADAPTERS_VERSION,
                "settings": asdict(settings),
                "train_tokens": train.size,
                "train_seconds": round(time.monotonic() - started, 1),
                "held_out_before": before,
                "held_out_after": after,
            },
        }
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")

    return build_once(final, write)


def run_train_exits(source: Path, out: Path, seed: int = 0, steps: int | None = None, log: Log | None = print) -> int:
    """`helios train --from DIR --out DIR`."""
    if not (source / "config.json").is_file():
        print(f"helios train: error: --from {source}: not a Hugging Face model directory", file=sys.stderr)
        return 2
    settings = AdapterSettings(seed=seed, **({"steps": steps} if steps else {}))
    path = train_exits(source, settings, log=log)
    copy_model(path, out)
    if log:
        log(f"trained exit adapters into {out} (cached at {path})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="helios train --from", description="Train exit adapters into a checkpoint.")
    parser.add_argument("--from", dest="source", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int)
    ns = parser.parse_args(argv)
    return run_train_exits(ns.source, ns.out, ns.seed, ns.steps)


if __name__ == "__main__":
    sys.exit(main())
