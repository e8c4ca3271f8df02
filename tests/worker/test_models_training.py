"""Early-exit training: deterministic, cached atomically, and the exit shape the paper relies on."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from helios_worker.models.cache import METADATA_FILE, train_command, train_preset
from helios_worker.models.presets import PRESETS
from helios_worker.models.tasks import eval_examples
from helios_worker.models.training import exit_loss_weights, exit_shape, first_confident_layer, train_model

CPU = torch.device("cpu")


MICRO = dataclasses.replace(PRESETS["tiny"], name="micro", layers=2, steps=3, batch=4, seq_len=48)


def _weights(seed: int) -> dict[str, torch.Tensor]:
    model, _, _ = train_model(MICRO, seed, CPU, evaluate_after=False)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_the_same_seed_trains_identical_weights_and_another_seed_does_not() -> None:
    first, again, other = _weights(0), _weights(0), _weights(1)
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_exit_loss_weights_rise_with_depth_to_one_at_the_last_layer() -> None:
    weights = exit_loss_weights(6)
    assert weights == sorted(weights) and weights[-1] == 1.0 and weights[0] > 0


def test_a_second_call_is_a_cache_hit(tmp_path: Path) -> None:
    first = train_preset(MICRO, seed=5, cache_dir=tmp_path, evaluate=False)
    started = time.monotonic()
    second = train_preset(MICRO, seed=5, cache_dir=tmp_path, evaluate=False)
    assert second == first and time.monotonic() - started < 0.5
    assert train_preset(MICRO, seed=6, cache_dir=tmp_path, evaluate=False) != first  # keyed by seed
    assert json.loads((first / METADATA_FILE).read_text())["steps"] == MICRO.steps


def test_an_interrupted_training_leaves_no_model_behind(tmp_path: Path) -> None:
    def interrupt(_message: str) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_preset(MICRO, cache_dir=tmp_path, evaluate=False, log=interrupt)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_an_interrupted_save_leaves_no_model_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail_rename(self: Path, target: Path) -> Path:
        raise OSError("disk full")

    monkeypatch.setattr(Path, "rename", fail_rename)
    with pytest.raises(OSError, match="disk full"):
        train_preset(MICRO, cache_dir=tmp_path, evaluate=False)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_train_command_writes_a_hf_directory_that_transformers_loads(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = train_command("tiny", tmp_path / "model")
    assert {"config.json", "model.safetensors", "tokenizer.json", METADATA_FILE} <= {p.name for p in out.iterdir()}
    model = AutoModelForCausalLM.from_pretrained(str(out))
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == PRESETS["tiny"].layers
    ids = tokenizer("copy cat dog=", return_tensors="pt")["input_ids"]
    generated = model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=tokenizer.eos_token_id)
    assert tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True) == "cat dog"


def test_the_trained_tiny_model_exits_easy_tokens_early_and_hard_ones_late(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    shape = exit_shape(model, tokenizer, eval_examples(16, seed=123), CPU, threshold=0.9)
    easy, hard = shape["easy"]["mean_first_confident_layer"], shape["hard"]["mean_first_confident_layer"]
    assert easy < 2.0, shape
    assert hard - easy > 1.5, shape
    assert shape["hard"]["never_confident"] > shape["easy"]["never_confident"]
    metadata = json.loads((tiny_model_dir / METADATA_FILE).read_text())
    assert metadata["preset"] == "tiny" and metadata["evaluation"]["exact_match"]["easy"] > 0.8
    assert len(metadata["final_layer_losses"]) == PRESETS["tiny"].layers


def test_first_confident_layer_is_one_based_and_depth_plus_one_when_never_confident() -> None:
    confidence = torch.tensor([[0.95, 0.2, 0.1], [0.5, 0.91, 0.3], [0.99, 0.5, 0.89]])  # [layers, tokens]
    assert first_confident_layer(confidence, 0.9).tolist() == [1, 2, 4]
