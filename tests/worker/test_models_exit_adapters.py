"""Exit adapters trained into a checkpoint with its backbone frozen, on a small random Llama saved as
an HF directory: identity before training, closer to the final layer after, deterministic per seed,
cached, loaded by the partial loader (only the loaded layers' adapters) and used at every exit."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch
from safetensors import safe_open
from tests.support.workers import serve_worker

from helios_worker.engine.api import EngineConfig, GenerationRequest, SamplingParams
from helios_worker.engine.engine import Engine
from helios_worker.engine.testing import random_model
from helios_worker.models.adapter import parts_of
from helios_worker.models.exit_adapters import (
    AdapterSettings,
    ExitAdapters,
    agreement_curves,
    build_corpus,
    train_adapters,
    train_exits,
)
from helios_worker.models.loading import load_partial
from helios_worker.models.metadata import EXIT_ADAPTERS_FILE, exits_kind, read_metadata
from helios_worker.models.prompts import HELD_OUT_PROMPTS, TRAIN_PROMPTS
from helios_worker.models.training import layer_hidden_states
from helios_worker.serve import WorkerOptions

LAYERS = 4
QUICK = AdapterSettings(rank=8, steps=60, batch_tokens=64, top_k=4, random_tokens=32, lr=1e-2, max_new_tokens=8)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    stack = random_model("llama", layers=LAYERS, hidden=64, seed=3)
    directory = tmp_path_factory.mktemp("random-llama")
    stack.hf_model.save_pretrained(str(directory))
    stack.tokenizer.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def trained(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_exits(source, QUICK, cache_dir=tmp_path_factory.mktemp("cache"))


def test_adapters_are_the_identity_before_training_and_load_only_the_first_layers(tmp_path: Path) -> None:
    adapters = ExitAdapters(layers=5, hidden=16, rank=4)
    h = torch.randn(3, 16)
    assert torch.equal(adapters.translate(h, 2), h)
    assert torch.equal(adapters.translate(h, 6), h)  # the final layer's exit is the model's own
    with torch.no_grad():
        adapters.up.normal_()
    adapters.save(tmp_path / EXIT_ADAPTERS_FILE)
    loaded = ExitAdapters.load(tmp_path / EXIT_ADAPTERS_FILE, layers=2)
    assert loaded.layers == 2
    torch.testing.assert_close(loaded.translate(h, 2), adapters.translate(h, 2))
    assert torch.equal(loaded.translate(h, 3), h)


def test_training_raises_the_exits_agreement_with_the_final_layer_and_leaves_the_backbone(source: Path) -> None:
    model = load_partial(source).hf_model
    before_weights = {k: v.clone() for k, v in model.state_dict().items()}
    corpus = build_corpus(model, load_partial(source).tokenizer, TRAIN_PROMPTS[:16], max_new_tokens=8)
    parts = parts_of(model)
    before = agreement_curves(parts, corpus)
    adapters = train_adapters(parts, corpus, QUICK)
    after = agreement_curves(parts, corpus, adapters)
    assert before["layer_agreement"][-1] == after["layer_agreement"][-1] == 1.0
    assert sum(after["layer_agreement"][:-1]) > sum(before["layer_agreement"][:-1]) + 0.3
    for key, value in model.state_dict().items():
        assert torch.equal(value, before_weights[key]), key
    again = train_adapters(parts, corpus, QUICK)
    for name, param in adapters.named_parameters():
        assert torch.equal(param, dict(again.named_parameters())[name]), "not deterministic per seed"


def test_train_exits_writes_the_adapters_beside_the_weights_with_the_curves_and_caches(
    source: Path, trained: Path, tmp_path: Path
) -> None:
    assert exits_kind(trained) == "adapters"
    with safe_open(str(trained / EXIT_ADAPTERS_FILE), framework="pt") as handle:
        assert handle.get_slice("down").get_shape() == [LAYERS - 1, QUICK.rank, 64]
    info = read_metadata(trained)["exit_adapters"]
    assert len(info["held_out_before"]["layer_agreement"]) == LAYERS
    assert info["held_out_before"]["tokens"] == info["held_out_after"]["tokens"] > len(HELD_OUT_PROMPTS)
    assert train_exits(source, QUICK, cache_dir=trained.parent) == trained  # cached


def test_the_partial_loader_uses_the_adapters_at_every_exit_below_the_last_layer(trained: Path) -> None:
    partial = load_partial(trained, 2)
    assert partial.exit_adapters is not None and partial.exit_adapters.layers == 2
    h = torch.randn(2, 64)
    plain = partial.exit_logits(h)
    assert not torch.allclose(partial.exit_logits(h, 1), plain)
    full = load_partial(trained)
    torch.testing.assert_close(full.exit_logits(h, LAYERS), full.exit_logits(h))


def test_the_worker_serves_a_checkpoint_with_adapters_with_exits_on_and_says_so(trained: Path) -> None:
    options = WorkerOptions(model=trained, candidate="adapted", max_context=64, max_batch=2, threshold=0.5)
    with serve_worker(options) as url:
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["helios"]["exits"] == "adapters"
        body = {"prompt": "copy abc", "max_tokens": 4, "temperature": 0}
        answer = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
        assert len(answer["choices"][0]["helios"]["exit_layers"]) >= 1
        assert 'exits="adapters"' in httpx.get(f"{url}/metrics").text


def test_the_engine_exits_through_the_adapters_in_prefill_and_in_the_fused_decode_step(trained: Path) -> None:
    """At depth 2 of 4 every token comes from layer 2 (no layer is ever confident at threshold 2): its
    confidence is that of layer 2's adapter exit, not of the plain logit lens, in both steps."""
    partial = load_partial(trained, 2)
    prompt = list(partial.tokenizer("copy abc")["input_ids"])
    engine = Engine(partial, EngineConfig(confidence_threshold=2.0, max_batch=1, max_context=64))
    engine.start()
    try:
        (events, _), *_ = engine.generate_batch([GenerationRequest(tuple(prompt), SamplingParams(max_tokens=2))])
    finally:
        engine.stop()
    ids = torch.tensor([[*prompt, events[0].token_id]])
    with torch.no_grad():
        hidden = layer_hidden_states(partial.hf_model, ids)[-1][0]  # layer 2's output, every position
        adapted = partial.exit_logits(hidden, 2).float().softmax(-1).max(-1).values
        plain = partial.exit_logits(hidden).float().softmax(-1).max(-1).values
    for event, position in zip(events, (len(prompt) - 1, len(prompt)), strict=True):
        assert event.exit_layer == 2
        assert event.confidence == pytest.approx(adapted[position].item(), abs=1e-4)
        assert event.confidence != pytest.approx(plain[position].item(), abs=1e-4)
