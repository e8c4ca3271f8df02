"""Profiles shaped like real models, for the policy and reconcile tests."""

from __future__ import annotations

from helios_operator.core.types import CandidateProfile

GB = 1e9


def profile(
    name: str = "small",
    layers: int = 8,
    depth_agreement: tuple[float, ...] | None = None,
    tokens_per_second: float = 1000.0,
    fixed: float = 0.5 * GB,
    layer: float = 0.06 * GB,
    kv: float = 2048.0,
    joules: float | None = 0.2,
    requests: int = 5,
) -> CandidateProfile:
    """A Llama-1B-like profile (weights 0.5 GB + 60 MB/layer, GQA KV 2 KiB/token/layer)."""
    if depth_agreement is None:
        # Agreement climbs to 1.0 at full depth: each layer closes a share of the remaining gap.
        depth_agreement = tuple(1.0 - 0.5 ** (1 + 6 * d / layers) if d < layers else 1.0 for d in range(1, layers + 1))
    return CandidateProfile(
        candidate=name,
        model_layers=layers,
        profiled_tokens=requests * 100,
        profiled_requests=requests,
        agreement=depth_agreement,
        depth_agreement=depth_agreement,
        first_confident=tuple([1.0 / (layers + 1)] * (layers + 1)),
        tokens_per_second=tokens_per_second,
        fixed_weight_bytes=fixed,
        layer_weight_bytes=layer,
        kv_bytes_per_token_per_layer=kv,
        joules_per_token=joules,
    )
