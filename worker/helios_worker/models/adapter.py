"""Where an HF causal LM keeps the parts HELIOS uses: decoder layers, rotary embedding, final norm, LM head.

One place for the families' attribute paths, used by the partial loader (models.loading), exit
training (models.training) and the engine's in-memory test stack (engine.testing). Proven on
Llama (SmolLM2), Qwen2 and GPT-2; other families that keep the same names work too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# Relative to the model's base (model.model for Llama/Qwen2, model.transformer for GPT-2).
LAYER_PATHS = ("layers", "h", "decoder.layers", "blocks")
NORM_PATHS = ("norm", "ln_f", "final_layernorm", "decoder.final_layer_norm", "final_norm")
ROTARY_PATHS = ("rotary_emb", "rotary_embedding")


class AdapterError(ValueError):
    """The model does not keep its parts where any supported family does."""


def _get(module: nn.Module, dotted: str) -> nn.Module | None:
    for part in dotted.split("."):
        found = getattr(module, part, None)
        if not isinstance(found, nn.Module):
            return None
        module = found
    return module


@dataclass(frozen=True)
class ModelParts:
    """The pieces of one HF causal LM (the modules themselves, not copies)."""

    family: str
    base: nn.Module  # runs embeddings + decoder layers (+ final norm): model.model, model.transformer
    layers: nn.ModuleList
    final_norm: nn.Module
    lm_head: nn.Module
    embed_tokens: nn.Module
    rotary: nn.Module | None  # None for families with learned positions (GPT-2)

    def exit_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LayerSkip-style exit: the model's own final norm and LM head on any layer's hidden state."""
        logits: torch.Tensor = self.lm_head(self.final_norm(hidden))
        return logits


def parts_of(hf_model: Any) -> ModelParts:
    """The parts of `hf_model`; AdapterError names what could not be found."""
    family = str(hf_model.config.model_type)
    base = hf_model.base_model
    if not isinstance(base, nn.Module):
        raise AdapterError(f"{family}: the model has no base module")
    layers = next((m for p in LAYER_PATHS if isinstance(m := _get(base, p), nn.ModuleList)), None)
    if layers is None:
        raise AdapterError(f"{family}: cannot find the decoder layers (looked for {', '.join(LAYER_PATHS)})")
    norm = next((m for p in NORM_PATHS if (m := _get(base, p)) is not None), None)
    if norm is None:
        raise AdapterError(f"{family}: cannot find the final norm (looked for {', '.join(NORM_PATHS)})")
    head, embed = hf_model.get_output_embeddings(), hf_model.get_input_embeddings()
    if not isinstance(head, nn.Module) or not isinstance(embed, nn.Module):
        raise AdapterError(f"{family}: the model has no LM head or no input embeddings")
    rotary = next((m for p in ROTARY_PATHS if (m := _get(base, p)) is not None), None)
    return ModelParts(family, base, layers, norm, head, embed, rotary)
