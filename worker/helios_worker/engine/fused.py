"""A lean decode layer for the rotary families (Llama, Qwen2): 19 ops per layer on a [B, hidden+1] state.

The model is reparameterised once, exactly in real arithmetic and with no extra memory:
- each RMSNorm's weight w (times sqrt(D), D the hidden size) moves into the projections it feeds,
  whose weights become W diag(w) sqrt(D); the norm's own weight becomes 1/sqrt(D), so the HF modules
  (prefill, and generate() on the same model) compute what they computed before;
- q|k|v and gate|up are concatenated into one matrix each, with one extra zero input column, and
  output and down projections get one extra zero output row; the HF modules' weights become views
  of these matrices.
The decode state then carries a constant last column c = sqrt(D * eps), which the zero rows keep, so
||[x, c]|| = sqrt(D) * sqrt(mean(x^2) + eps) and RMSNorm is one norm and one division. Per layer:
norm, one matmul for q|k|v, rotary positions for q and k in one gather + multiply-add over the row
(v passes with cos 1, sin 0), one write of k|v into the cache, attention over the cache's views, the
output projection added to the residual (addmm), norm, one matmul for gate|up, SiLU, the down
projection added the same way. In bfloat16 the folded weights are rounded once more than the
checkpoint's (computed in float32, stored in the model's dtype).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from helios_worker.engine.kvcache import KVCache

FUSED_ATTRIBUTE = "_helios_fused"  # on an HF layer: its _Layer, so a second engine reuses the reparameterisation


def _eps(norm: Any) -> float | None:
    value = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    return None if value is None else float(value)


def _fold_inputs(modules: list[nn.Linear], norm: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[sum of outputs, D + 1]: the modules' weights times the norm's weight times sqrt(D), a zero last
    column; the modules' weights become row-block views of it and the norm's weight 1/sqrt(D)."""
    weight = norm.weight.detach()
    hidden = weight.shape[0]
    scale = weight.float() * math.sqrt(hidden)
    first = modules[0].weight
    fused = torch.zeros(sum(m.weight.shape[0] for m in modules), hidden + 1, dtype=first.dtype, device=first.device)
    biases = [m.bias for m in modules]
    bias = torch.cat([b.detach() for b in biases if b is not None]) if all(b is not None for b in biases) else None
    start = 0
    for m in modules:
        rows = m.weight.shape[0]
        fused[start : start + rows, :hidden] = (m.weight.detach().float() * scale).to(first.dtype)
        m.weight = nn.Parameter(fused[start : start + rows, :hidden], requires_grad=False)
        if bias is not None:
            m.bias = nn.Parameter(bias[start : start + rows], requires_grad=False)
        start += rows
    norm.weight = nn.Parameter(torch.full_like(weight, 1 / math.sqrt(hidden)), requires_grad=False)
    return fused, bias


def _extend_outputs(module: nn.Linear) -> torch.Tensor:
    """[D + 1, in]: the module's weight and a zero last row; the module's weight becomes a view of it."""
    weight = module.weight.detach()
    extended = torch.zeros(weight.shape[0] + 1, weight.shape[1], dtype=weight.dtype, device=weight.device)
    extended[:-1] = weight
    module.weight = nn.Parameter(extended[:-1], requires_grad=False)
    return extended


@dataclass
class _Layer:
    qkv_t: torch.Tensor  # [hidden + 1, (H + 2 Hkv) head_dim], a transposed view
    qkv_bias: torch.Tensor | None
    o_t: torch.Tensor  # [H head_dim, hidden + 1]
    gate_up_t: torch.Tensor  # [hidden + 1, 2 intermediate]
    down_t: torch.Tensor  # [intermediate, hidden + 1]
    eps: float
    scale: float


@dataclass
class FusedStep:
    """What every layer of one decode step shares."""

    cos: torch.Tensor  # [B, (H + 2 Hkv) D]
    sin: torch.Tensor  # signed for the rotate-half, 0 over v
    mask: torch.Tensor  # [B, 1, 1, S] additive
    keys: tuple[torch.Tensor, ...]  # per layer [B, Hkv, S, D] views of the cache
    values: tuple[torch.Tensor, ...]
    rows: torch.Tensor
    positions: torch.Tensor


class FusedRotary:
    """Built from a RotaryFamily whose MLP is SiLU-gated; `supports` says whether a model qualifies."""

    @staticmethod
    def supports(layers: list[Any], config: Any) -> bool:
        def eps(norm: Any) -> float | None:
            value = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
            return None if value is None else float(value)

        if getattr(config, "hidden_act", None) != "silu" or not layers:
            return False
        norms = [n for layer in layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
        if len({eps(n) for n in norms}) != 1 or eps(norms[0]) is None:
            return False  # one constant column carries one epsilon
        return all(
            hasattr(layer.mlp, "gate_proj") and getattr(layer.mlp, "act_fn", F.silu) is not None for layer in layers
        )

    def __init__(self, layers: list[Any], heads: int, kv_heads: int, head_dim: int, scales: list[float]) -> None:
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.layers: list[_Layer] = []
        for layer, scale in zip(layers, scales, strict=True):
            fused = getattr(layer, FUSED_ATTRIBUTE, None)
            if fused is None:
                attn, mlp = layer.self_attn, layer.mlp
                eps = float(
                    getattr(layer.input_layernorm, "variance_epsilon", getattr(layer.input_layernorm, "eps", 0))
                )
                qkv, qkv_bias = _fold_inputs([attn.q_proj, attn.k_proj, attn.v_proj], layer.input_layernorm)
                gate_up, _ = _fold_inputs([mlp.gate_proj, mlp.up_proj], layer.post_attention_layernorm)
                o, down = _extend_outputs(attn.o_proj), _extend_outputs(mlp.down_proj)
                fused = _Layer(qkv.t(), qkv_bias, o.t(), gate_up.t(), down.t(), eps, scale)
                setattr(layer, FUSED_ATTRIBUTE, fused)
            self.layers.append(fused)
        qkv = self.layers[0].qkv_t
        self.hidden = qkv.shape[0] - 1
        self.constant = math.sqrt(self.hidden * self.layers[0].eps)
        d, rotated = head_dim, heads + kv_heads
        within = torch.arange(d)
        partner = torch.where(within < d // 2, within + d // 2, within - d // 2)
        perm = torch.cat([h * d + partner for h in range(rotated)] + [rotated * d + torch.arange(kv_heads * d)])
        device = qkv.device
        self._perm = perm.to(device)
        self._sign = torch.where(within < d // 2, -1.0, 1.0).to(device=device, dtype=qkv.dtype)

    def prepare(
        self, rope: tuple[torch.Tensor, torch.Tensor], cache: KVCache, positions: torch.Tensor, length: int
    ) -> FusedStep:
        cos, sin = rope[0][:, 0], rope[1][:, 0]  # [B, D]
        batch = positions.shape[0]
        rotated, passing = self.heads + self.kv_heads, self.kv_heads * self.head_dim
        ones = cos.new_ones(batch, passing)
        cos_row = torch.cat([cos.repeat(1, rotated), ones], dim=1)
        sin_row = torch.cat([(sin * self._sign).repeat(1, rotated), torch.zeros_like(ones)], dim=1)
        keys = torch.arange(length, device=positions.device)
        visible = (keys[None, :] <= positions[:, None])[:, None, None, :]
        mask = torch.zeros(visible.shape, dtype=cos.dtype, device=cos.device).masked_fill_(~visible, float("-inf"))
        k, v = cache.views(batch, length)
        rows = torch.arange(batch, device=positions.device)
        return FusedStep(cos_row, sin_row, mask, k, v, rows, positions)

    def extend(self, h: torch.Tensor) -> torch.Tensor:
        """[B, hidden] -> the decode state [B, hidden + 1], its last column the constant."""
        return F.pad(h, (0, 1), value=self.constant)

    def hidden_of(self, state: torch.Tensor) -> torch.Tensor:
        """The decode state's hidden vectors [B, hidden], a view."""
        return state[:, : self.hidden]

    def layer(self, i: int, h: torch.Tensor, step: FusedStep, cache: KVCache) -> torch.Tensor:
        """Layer i on the decode state h [B, hidden + 1]: writes the token's k|v into the cache, returns
        the layer's output state."""
        w = self.layers[i]
        x = h / torch.linalg.vector_norm(h, dim=-1, keepdim=True)
        qkv = torch.mm(x, w.qkv_t) if w.qkv_bias is None else torch.addmm(w.qkv_bias, x, w.qkv_t)
        roped = torch.addcmul(qkv * step.cos, qkv.index_select(1, self._perm), step.sin)
        q_width = self.heads * self.head_dim
        cache.write_rows(i, step.rows, step.positions, roped[:, q_width:])
        batch, group = h.shape[0], self.heads // self.kv_heads
        width = roped.shape[1]
        d = self.head_dim
        q = roped.as_strided((batch, self.kv_heads, group, d), (width, group * d, d, 1))  # the query group folded
        attn = F.scaled_dot_product_attention(q, step.keys[i], step.values[i], attn_mask=step.mask, scale=w.scale)
        h = torch.addmm(h, attn.reshape(batch, q_width), w.o_t)
        x = h / torch.linalg.vector_norm(h, dim=-1, keepdim=True)
        gate, up = torch.mm(x, w.gate_up_t).chunk(2, dim=1)
        return torch.addmm(h, F.silu(gate) * up, w.down_t)
