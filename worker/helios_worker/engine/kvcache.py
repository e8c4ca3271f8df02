"""A static KV cache: one preallocated tensor for K and V, one slot per running request.

Shape [layers, slots, max_seq, 2, kv_heads, head_dim]: a token's K and V of one layer are one
contiguous row, so a decode step writes them with one op; attention reads strided views.
The engine keeps its running rows in slots
0..n-1 (a leaving row's hole is filled by moving the last row), so a step of n rows reads a view of
the first n slots, never a gather, and a step padded to a bucket of b rows writes only free slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CachePlan:
    layers: int
    slots: int  # requests that can run at once
    kv_heads: int
    max_seq: int  # tokens per slot (prompt + generated)
    head_dim: int
    dtype_bytes: int

    @property
    def bytes_per_token(self) -> int:
        """K and V over every layer for one token."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def bytes(self) -> int:
        return self.bytes_per_token * self.slots * self.max_seq


def plan_cache(
    *,
    layers: int,
    kv_heads: int,
    head_dim: int,
    dtype_bytes: int,
    max_batch: int,
    max_context: int,
    budget_bytes: int | None,
) -> CachePlan:
    """Slots and sequence length that fit the budget: full context first, then as many slots as fit.

    Without a budget the cache holds max_batch slots of max_context. A budget too small for one full
    slot shortens the context instead.
    """
    plan = CachePlan(layers, max_batch, kv_heads, max_context, head_dim, dtype_bytes)
    if budget_bytes is None or plan.bytes <= budget_bytes:
        return plan
    per_slot = plan.bytes_per_token * max_context
    slots = budget_bytes // per_slot
    if slots >= 1:
        return CachePlan(layers, int(slots), kv_heads, max_context, head_dim, dtype_bytes)
    max_seq = budget_bytes // plan.bytes_per_token
    if max_seq < 1:
        raise ValueError(f"a KV budget of {budget_bytes} bytes holds not even one token")
    return CachePlan(layers, 1, kv_heads, int(max_seq), head_dim, dtype_bytes)


class KVCache:
    """The cache tensors and the free-slot set; the engine thread is its only user."""

    def __init__(self, plan: CachePlan, device: torch.device, dtype: torch.dtype) -> None:
        self.plan = plan
        shape = (plan.layers, plan.slots, plan.max_seq, 2, plan.kv_heads, plan.head_dim)
        self.kv = torch.zeros(shape, device=device, dtype=dtype)
        # per layer [slots, seq, 2 * kv_heads * head_dim]
        self._rows = self.kv.view(plan.layers, plan.slots, plan.max_seq, -1).unbind(0)
        self._free = set(range(plan.slots))

    @property
    def k(self) -> torch.Tensor:
        """[layers, slots, kv_heads, max_seq, head_dim], a view."""
        return self.kv[:, :, :, 0].transpose(2, 3)

    @property
    def v(self) -> torch.Tensor:
        return self.kv[:, :, :, 1].transpose(2, 3)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def bytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def allocate(self) -> int | None:
        """The lowest free slot: with compaction, the one just past the running rows."""
        if not self._free:
            return None
        slot = min(self._free)
        self._free.remove(slot)
        return slot

    def release(self, slot: int) -> None:
        if slot in self._free or not 0 <= slot < self.plan.slots:
            raise ValueError(f"slot {slot} is not allocated")
        self._free.add(slot)

    def move(self, source: int, target: int, length: int) -> None:
        """Copy the first `length` positions of slot `source` into the free slot `target`, freeing `source`."""
        if target not in self._free:
            raise ValueError(f"slot {target} is not free")
        self.kv[:, target, :length] = self.kv[:, source, :length]
        self._free.remove(target)
        self.release(source)

    def write_prompts(self, layer: int, first_slot: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """K, V [N, kv_heads, T, head_dim] of N prompts, right-padded to T, into slots first_slot..,
        positions 0..T-1."""
        n, length = k.shape[0], k.shape[2]
        self.kv[layer, first_slot : first_slot + n, :length, 0] = k.transpose(1, 2)
        self.kv[layer, first_slot : first_slot + n, :length, 1] = v.transpose(1, 2)

    def write(self, layer: int, rows: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """K, V [B, kv_heads, head_dim] of one new token per row (row i in slot i), at each row's position."""
        self.kv[layer][rows, positions] = torch.stack((k, v), dim=1)

    def write_rows(self, layer: int, rows: torch.Tensor, positions: torch.Tensor, kv: torch.Tensor) -> None:
        """K|V [B, 2 * kv_heads * head_dim] of one new token per row, flat: one op."""
        self._rows[layer].index_put_((rows, positions), kv)

    def read(self, layer: int, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [batch, kv_heads, length, head_dim] of slots 0..batch-1: views, no copy."""
        kv = self.kv[layer, :batch, :length]
        return kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)

    def views(self, batch: int, length: int) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """read() for every layer at once (a few ops per step, none per layer)."""
        kv = self.kv[:, :batch, :length]
        return kv[:, :, :, 0].transpose(2, 3).unbind(0), kv[:, :, :, 1].transpose(2, 3).unbind(0)
