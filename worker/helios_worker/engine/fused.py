"""A lean decode layer for the rotary families (Llama, Qwen2): few ops per layer on a [B, hidden] state.

The layer's q, k and v weights (and gate and up) are concatenated into one matrix each, and the HF
modules' weights become views into it, so memory does not grow and prefill (the HF modules) reads
the same numbers. Per layer and step: RMSNorm as x * w / hypot(||x||, sqrt(D * eps)) (times sqrt(D),
folded into the norm weight), one matmul for q|k|v, rotary positions for q and k in one
gather + multiply-add over the whole row (v passes through with cos 1 and sin 0), one write of the
token's k|v into the cache, attention over the cache's views, the output projection added in place
of the residual (addmm), one matmul for gate|up, and the down projection added the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from helios_worker.engine.kvcache import KVCache


def _fuse(modules: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One [sum of outputs, in] weight (and bias) whose row blocks become the modules' own weights."""
    weight = torch.cat([m.weight.detach() for m in modules])
    biases = [m.bias for m in modules]
    bias = torch.cat([b.detach() for b in biases if b is not None]) if all(b is not None for b in biases) else None
    start = 0
    for m in modules:
        rows = m.weight.shape[0]
        m.weight = nn.Parameter(weight[start : start + rows], requires_grad=False)
        if bias is not None:
            m.bias = nn.Parameter(bias[start : start + rows], requires_grad=False)
        start += rows
    return weight, bias


@dataclass
class _Layer:
    norm1: torch.Tensor  # input_layernorm weight x sqrt(hidden)
    norm2: torch.Tensor
    eps: torch.Tensor  # sqrt(hidden * eps), a scalar tensor
    qkv_t: torch.Tensor  # [hidden, (H + 2 Hkv) D], a transposed view
    qkv_bias: torch.Tensor | None
    o_t: torch.Tensor
    gate_up_t: torch.Tensor
    down_t: torch.Tensor
    intermediate: int
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
        act = getattr(config, "hidden_act", None)
        return act == "silu" and all(
            hasattr(layer, "mlp") and hasattr(layer.mlp, "gate_proj") and hasattr(layer, "input_layernorm")
            for layer in layers
        )

    def __init__(self, layers: list[Any], heads: int, kv_heads: int, head_dim: int, scales: list[float]) -> None:
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.layers: list[_Layer] = []
        for layer, scale in zip(layers, scales, strict=True):
            attn, mlp = layer.self_attn, layer.mlp
            qkv, qkv_bias = _fuse([attn.q_proj, attn.k_proj, attn.v_proj])
            gate_up, _ = _fuse([mlp.gate_proj, mlp.up_proj])
            hidden = qkv.shape[1]
            eps = float(getattr(layer.input_layernorm, "variance_epsilon", getattr(layer.input_layernorm, "eps", 1e-6)))
            root = math.sqrt(hidden)
            self.layers.append(
                _Layer(
                    norm1=layer.input_layernorm.weight.detach() * root,
                    norm2=layer.post_attention_layernorm.weight.detach() * root,
                    eps=torch.tensor(math.sqrt(hidden * eps), dtype=qkv.dtype, device=qkv.device),
                    qkv_t=qkv.t(),
                    qkv_bias=qkv_bias,
                    o_t=attn.o_proj.weight.detach().t(),
                    gate_up_t=gate_up.t(),
                    down_t=mlp.down_proj.weight.detach().t(),
                    intermediate=mlp.gate_proj.weight.shape[0],
                    scale=scale,
                )
            )
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

    def layer(self, i: int, h: torch.Tensor, step: FusedStep, cache: KVCache) -> torch.Tensor:
        """Layer i on h [B, hidden]: writes the token's k|v into the cache, returns the layer's output."""
        w = self.layers[i]
        x = h * w.norm1 / torch.hypot(torch.linalg.vector_norm(h, dim=-1, keepdim=True), w.eps)
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
        x = h * w.norm2 / torch.hypot(torch.linalg.vector_norm(h, dim=-1, keepdim=True), w.eps)
        gate, up = torch.mm(x, w.gate_up_t).chunk(2, dim=1)
        return torch.addmm(h, F.silu(gate) * up, w.down_t)
