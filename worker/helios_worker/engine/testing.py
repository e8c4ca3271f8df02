"""Small random-weight models of every family the engine supports, for tests and benchmarks offline.

`random_model` builds one in memory with the project's character tokenizer; `HFStack` exposes an
in-memory HF causal LM through the attributes the engine reads (as models.loading.PartialModel does
for a directory).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

from helios_worker.engine.blocks import Family, family_of
from helios_worker.engine.kvcache import KVCache, plan_cache
from helios_worker.models.adapter import ModelParts, parts_of
from helios_worker.models.tokenizer import build_tokenizer

FAMILY_CONFIGS: dict[str, Any] = {"llama": LlamaConfig, "qwen2": Qwen2Config, "gpt2": GPT2Config}
_AUTO: Any = AutoModelForCausalLM  # untyped in transformers


def random_config(family: str, *, layers: int = 3, hidden: int = 64, heads: int = 4, kv_heads: int = 2) -> Any:
    vocab = len(build_tokenizer())
    if family == "gpt2":
        return GPT2Config(
            vocab_size=vocab,
            n_embd=hidden,
            n_layer=layers,
            n_head=heads,
            n_positions=256,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    return FAMILY_CONFIGS[family](
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )


def random_model(family: str, *, seed: int = 0, **shape: int) -> HFStack:
    """A random-init model of `family` (llama | qwen2 | gpt2) with larger-than-default weights, so that
    its greedy tokens are not near-ties and vary with the input."""
    torch.manual_seed(seed)
    config = random_config(family, **shape)
    config.initializer_range = 0.2
    model = _AUTO.from_config(config, attn_implementation="eager").eval()
    return HFStack(model, build_tokenizer())


@dataclass
class HFStack:
    """An HF causal LM seen the way the engine sees a partially loaded model."""

    hf_model: Any
    tokenizer: Any

    @property
    def family(self) -> str:
        return str(self.hf_model.config.model_type)

    @cached_property
    def parts(self) -> ModelParts:
        return parts_of(self.hf_model)

    @property
    def model_layers(self) -> int:
        return len(self.decoder_layers())

    @property
    def loaded_layers(self) -> int:
        return len(self.decoder_layers())

    def decoder_layers(self) -> list[nn.Module]:
        return list(self.parts.layers)

    def final_norm(self) -> nn.Module:
        return self.parts.final_norm

    def exit_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.parts.exit_logits(hidden)

    def max_context(self) -> int:
        config = self.hf_model.config
        return int(getattr(config, "max_position_embeddings", None) or config.n_positions)


def random_prompts(seed: int, lengths: tuple[int, ...]) -> list[list[int]]:
    """Prompts of the given lengths over the character tokens (ids past the specials)."""
    rng = random.Random(seed)
    vocab = len(build_tokenizer())
    return [[rng.randrange(4, vocab) for _ in range(n)] for n in lengths]


def cpu_cache(model: HFStack, rows: int) -> tuple[Family, KVCache]:
    """A float32 KV cache on the CPU for `rows` sequences of up to 32 tokens over the test stack's
    three layers, with the stack's attention family: what the engine's unit tests step on."""
    fam = family_of(model)
    plan = plan_cache(
        layers=3,
        kv_heads=fam.kv_heads,
        head_dim=fam.head_dim,
        dtype_bytes=4,
        max_batch=rows,
        max_context=32,
        budget_bytes=None,
    )
    return fam, KVCache(plan, torch.device("cpu"), torch.float32)
