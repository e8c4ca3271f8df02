"""Decode steps at static shapes, captured as CUDA graphs, one per batch-size bucket.

A step of n rows runs the bucket of b >= n rows and of s >= the longest row's context: padding rows
feed token 0 at position 0 into the free slots n..b-1, attention spans s positions under a mask (the
live context rounded up to a power of two, not max_seq), and every layer runs with exits decided on
the device (state propagation by input replacement), so a step has no host synchronisation and a
graph replays it. Exit checkpoints below L run only in buckets of at most `exit_max_batch` rows; the
trade-off against the eager path is no early stop when every row is confident; the tokens are the
same. Off CUDA the same static function runs eagerly.
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


MIN_LENGTH_BUCKET = 128


def length_buckets(max_seq: int) -> tuple[int, ...]:
    """Attention spans: powers of two from MIN_LENGTH_BUCKET below max_seq, then max_seq itself."""
    sizes = [1 << i for i in range(max_seq.bit_length()) if MIN_LENGTH_BUCKET <= 1 << i < max_seq]
    return (*sizes, max_seq)


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
        result.heads,
    )


@dataclass
class _Bucket:
    tokens: torch.Tensor
    positions: torch.Tensor
    length: int
    checkpoints: bool
    graph: torch.cuda.CUDAGraph | None = None
    output: StepOutput | None = None


class StaticDecoder:
    """The decode step at bucketed static shapes; `capture()` records the CUDA graphs."""

    def __init__(
        self, fam: Family, head: ExitHead, cache: KVCache, rule: ExitRule, exit_max_batch: int | None = None
    ) -> None:
        self._fam, self._head, self._cache, self._rule = fam, head, cache, rule
        self.buckets = batch_buckets(cache.plan.slots)
        self.lengths = length_buckets(cache.plan.max_seq)
        device = cache.k.device

        def bucket(rows: int, length: int) -> _Bucket:
            zeros = torch.zeros(rows, dtype=torch.long, device=device)
            checkpoints = exit_max_batch is None or rows <= exit_max_batch
            return _Bucket(zeros, zeros.clone(), length, checkpoints)

        self._static = {(b, s): bucket(b, s) for b in self.buckets for s in self.lengths}
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
            bucket.length,
            early_stop=False,
            checkpoints=bucket.checkpoints,
        )

    def capture(self) -> None:
        """Record one graph per (batch, length) bucket, largest first so the smaller ones reuse its pool.

        Only while no request runs: the warm-up replays write K/V at position 0 of every slot.
        """
        for key in sorted(self._static, reverse=True):
            bucket = self._static[key]
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
        log.info("captured decode graphs for batch buckets %s and length buckets %s", self.buckets, self.lengths)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, length: int) -> StepOutput:
        """`length`: the longest row's live context (its position + 1), known on the host."""
        n = tokens.shape[0]
        bucket = self._static[(bucket_for(n, self.buckets), bucket_for(length, self.lengths))]
        bucket.tokens.zero_()
        bucket.positions.zero_()
        bucket.tokens[:n].copy_(tokens, non_blocking=True)
        bucket.positions[:n].copy_(positions, non_blocking=True)
        if bucket.graph is not None and bucket.output is not None:
            bucket.graph.replay()
            return _rows(bucket.output, n)
        return _rows(self._run(bucket), n)
