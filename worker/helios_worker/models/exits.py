"""Exit logits of every layer of a Llama-style causal LM (shared final norm + LM head).

Used by the training loss and by the exit-shape evaluation; the serving engine has its own path.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def decoder_layers_of(model: Any) -> nn.ModuleList:
    layers = model.model.layers
    assert isinstance(layers, nn.ModuleList)
    return layers


def layer_hidden_states(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """The output of each decoder layer (before the final norm), collected with forward hooks so
    the model's own forward (masks, positions) runs unchanged across transformers versions."""
    outputs: list[torch.Tensor] = []

    def keep(_module: nn.Module, _args: Any, output: Any) -> None:
        outputs.append(output[0] if isinstance(output, tuple) else output)

    handles = [layer.register_forward_hook(keep) for layer in decoder_layers_of(model)]
    try:
        model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def exit_logits(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """LayerSkip-style exit: the model's own final norm and LM head on any layer's hidden state."""
    logits: torch.Tensor = model.lm_head(model.model.norm(hidden))
    return logits


def all_exit_logits(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[layers, batch, seq, vocab] logits of every layer's exit."""
    return torch.stack([exit_logits(model, h) for h in layer_hidden_states(model, input_ids, attention_mask)])


def first_confident_layer(confidence: torch.Tensor, threshold: float) -> torch.Tensor:
    """1-based first layer whose confidence reaches `threshold` ([layers, ...] -> [...]);
    layers + 1 where none does (the telemetry contract's convention)."""
    layers = confidence.shape[0]
    passed = confidence >= threshold
    idx = torch.arange(1, layers + 1, device=confidence.device).view(-1, *([1] * (confidence.dim() - 1)))
    masked = torch.where(passed, idx, torch.full_like(idx, layers + 1))
    return masked.min(dim=0).values
