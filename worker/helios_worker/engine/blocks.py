"""One decoder layer per model family, on the HF modules' weights but with our attention and KV cache.

The HF layer's forward is not called: its attention is replaced so K/V go to our static cache and a
layer's K/V can be recomputed from another hidden state (state propagation). Norms, projections and
MLPs are the HF modules themselves, so numerics match the model's own forward.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn


class StackModel(Protocol):
    """What the engine needs of a partially loaded model (helios_worker.models.loading.PartialModel)."""

    @property
    def family(self) -> str: ...  # llama | qwen2 | gpt2

    @property
    def hf_model(self) -> Any: ...

    @property
    def tokenizer(self) -> Any: ...

    @property
    def model_layers(self) -> int: ...

    @property
    def loaded_layers(self) -> int: ...

    def decoder_layers(self) -> list[nn.Module]: ...

    def exit_logits(self, hidden: torch.Tensor, layer: int | None = None) -> torch.Tensor: ...

    def max_context(self) -> int: ...


Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin [B, T, head_dim]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    cos, sin = rope[0].unsqueeze(1), rope[1].unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """q [B, H, T, D] over k, v [B, Hkv, S, D]; causal over T when `mask` is None. Returns [B, T, H*D]."""
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


class Family:
    """The per-family pieces of a decoder layer; subclasses read weights from the HF modules."""

    heads: int
    kv_heads: int
    head_dim: int

    def __init__(self, model: StackModel) -> None:
        self.layers: list[Any] = list(model.decoder_layers())  # HF modules: attributes are dynamic
        self.config = model.hf_model.config

    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def rope(self, positions: torch.Tensor, like: torch.Tensor) -> Rope | None:
        return None

    def attn_input(self, i: int, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def qkv(self, i: int, x: torch.Tensor, rope: Rope | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, H, T, D], k and v [B, Hkv, T, D] of normed input x [B, T, hidden]."""
        raise NotImplementedError

    def finish(self, i: int, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """The rest of the layer after attention: output projection, residuals, MLP."""
        raise NotImplementedError

    def scale(self, i: int) -> float:
        raise NotImplementedError


class RotaryFamily(Family):
    """Llama and Qwen2: RMSNorm, rotary positions, grouped-query attention, gated MLP."""

    def __init__(self, model: StackModel) -> None:
        super().__init__(model)
        cfg = self.config
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        base = model.hf_model.model
        self._embed = base.embed_tokens
        self._rotary = base.rotary_emb  # handles every rope type and rope-parameter layout of the config

    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self._embed(ids)
        return out

    def rope(self, positions: torch.Tensor, like: torch.Tensor) -> Rope:
        cos, sin = self._rotary(like, positions)
        return cos, sin

    def attn_input(self, i: int, h: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layers[i].input_layernorm(h)
        return out

    def qkv(self, i: int, x: torch.Tensor, rope: Rope | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn = self.layers[i].self_attn
        b, t = x.shape[:2]
        q = attn.q_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        assert rope is not None
        return _apply_rope(q, rope), _apply_rope(k, rope), v

    def finish(self, i: int, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        layer = self.layers[i]
        h = h + layer.self_attn.o_proj(attn)
        out: torch.Tensor = h + layer.mlp(layer.post_attention_layernorm(h))
        return out

    def scale(self, i: int) -> float:
        return float(getattr(self.layers[i].self_attn, "scaling", self.head_dim**-0.5))


class GPT2Family(Family):
    """GPT-2: LayerNorm, learned positions, fused c_attn (Conv1D), multi-head attention."""

    def __init__(self, model: StackModel) -> None:
        super().__init__(model)
        cfg = self.config
        self.heads = self.kv_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // self.heads
        self._wte = model.hf_model.transformer.wte
        self._wpe = model.hf_model.transformer.wpe

    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self._wte(ids) + self._wpe(positions)
        return out

    def attn_input(self, i: int, h: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layers[i].ln_1(h)
        return out

    def qkv(self, i: int, x: torch.Tensor, rope: Rope | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, hidden = x.shape
        q, k, v = self.layers[i].attn.c_attn(x).split(hidden, dim=2)
        return tuple(y.view(b, t, self.heads, self.head_dim).transpose(1, 2) for y in (q, k, v))  # type: ignore[return-value]

    def finish(self, i: int, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        layer = self.layers[i]
        h = h + layer.attn.c_proj(attn)
        out: torch.Tensor = h + layer.mlp(layer.ln_2(h))
        return out

    def scale(self, i: int) -> float:
        scale = self.head_dim**-0.5 if getattr(self.config, "scale_attn_weights", True) else 1.0
        if getattr(self.config, "scale_attn_by_inverse_layer_idx", False):
            scale /= float(i + 1)
        return scale


FAMILIES: dict[str, type[Family]] = {"llama": RotaryFamily, "qwen2": RotaryFamily, "gpt2": GPT2Family}


def family_of(model: StackModel) -> Family:
    try:
        return FAMILIES[model.family](model)
    except KeyError:
        raise ValueError(f"no decoder block for model family {model.family!r}") from None
