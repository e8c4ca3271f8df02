"""Decode steps at static shapes, captured as CUDA graphs, one per batch-size bucket.

A step of n rows runs the bucket of b >= n rows: padding rows feed token 0 at position 0 into the
free slots n..b-1, attention spans the whole max_seq under a mask, and every layer runs with exits
decided on the device (state propagation by input replacement), so a step has no host
synchronisation and a graph replays it. The trade-off against the eager path: no early stop when
every row is confident, and attention over max_seq instead of the longest row; the tokens are the
same. Off CUDA (and when capture fails) the same static function runs eagerly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from helios_worker.engine.blocks import Family
from helios_worker.engine.forward import ExitHead, ExitRule, StepOutput, decode
from helios_worker.engine.kvcache import KVCache

log = logging.getLogger(__name__)


def batch_buckets(max_rows: int) -> tuple[int, ...]:
    """Powers of two below max_rows, then max_rows itself."""
    sizes = [1 << i for i in range(max_rows.bit_length()) if 1 << i < max_rows]
    return (*sizes, max_rows)


def bucket_for(rows: int, buckets: tuple[int, ...]) -> int:
    for size in buckets:
        if size >= rows:
            return size
    raise ValueError(f"{rows} rows exceed the largest bucket {buckets[-1]}")


def _rows(result: StepOutput, n: int) -> StepOutput:
    """The first n rows, copied out of the graph's output buffers before the next replay."""
    tokens = result.layer_tokens[:, :n].clone() if result.layer_tokens is not None else None
    return StepOutput(
        result.exit_layer[:n].clone(),
        result.first_confident[:n].clone(),
        result.confidence[:n].clone(),
        result.greedy[:n].clone(),
        result.logits[:n].clone(),
        tokens,
        result.layers_run,
    )


@dataclass
class _Bucket:
    tokens: torch.Tensor
    positions: torch.Tensor
    graph: torch.cuda.CUDAGraph | None = None
    output: StepOutput | None = None


class StaticDecoder:
    """The decode step at bucketed static shapes; `capture()` records the CUDA graphs."""

    def __init__(self, fam: Family, head: ExitHead, cache: KVCache, rule: ExitRule) -> None:
        self._fam, self._head, self._cache, self._rule = fam, head, cache, rule
        self.buckets = batch_buckets(cache.plan.slots)
        device = cache.k.device
        self._static = {
            b: _Bucket(torch.zeros(b, dtype=torch.long, device=device), torch.zeros(b, dtype=torch.long, device=device))
            for b in self.buckets
        }
        self._pool: Any = None  # the graphs' shared memory pool handle

    @property
    def captured(self) -> bool:
        return any(b.graph is not None for b in self._static.values())

    def _run(self, bucket: _Bucket) -> StepOutput:
        return decode(
            self._fam,
            self._head,
            self._cache,
            self._rule,
            bucket.tokens,
            bucket.positions,
            self._cache.plan.max_seq,
            early_stop=False,
        )

    def capture(self) -> None:
        """Record one graph per bucket, largest first so the smaller ones reuse its memory pool.

        Only while no request runs: the warm-up replays write K/V at position 0 of every slot.
        """
        for size in reversed(self.buckets):
            bucket = self._static[size]
            stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._run(bucket)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                bucket.output = self._run(bucket)
            bucket.graph = graph
            self._pool = graph.pool()
        log.info("captured decode graphs for batch buckets %s", self.buckets)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> StepOutput:
        n = tokens.shape[0]
        bucket = self._static[bucket_for(n, self.buckets)]
        bucket.tokens.zero_()
        bucket.positions.zero_()
        bucket.tokens[:n].copy_(tokens, non_blocking=True)
        bucket.positions[:n].copy_(positions, non_blocking=True)
        if bucket.graph is not None and bucket.output is not None:
            bucket.graph.replay()
            return _rows(bucket.output, n)
        return _rows(self._run(bucket), n)
