"""One adapter finds every family's layers, rotary embedding, final norm and LM head: the exit it
builds at the last layer reproduces the model's own logits (Llama, Qwen2, GPT-2, and the real SmolLM2),
and the partial loader built on it never reads nor allocates the layers beyond the depth."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from helios_worker.engine.testing import FAMILY_CONFIGS, HFStack, random_model
from helios_worker.models.adapter import AdapterError, parts_of
from helios_worker.models.loading import load_partial
from helios_worker.models.training import all_exit_logits, layer_hidden_states


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_the_exit_at_the_last_layer_is_the_models_own_output(family: str) -> None:
    model = random_model(family, layers=3).hf_model
    parts = parts_of(model)
    assert len(parts.layers) == 3
    assert (parts.rotary is None) == (family == "gpt2")
    assert parts.lm_head is model.get_output_embeddings()
    ids = torch.tensor([[5, 9, 17, 33, 8]])
    with torch.no_grad():
        hidden = layer_hidden_states(model, ids)
        exits = all_exit_logits(model, ids)
        expected = model(ids).logits
    assert len(hidden) == 3 and exits.shape == (3, *expected.shape)
    torch.testing.assert_close(exits[-1], expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(exits[0], expected, atol=1e-3)  # an early exit is a different distribution


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_the_engines_test_stack_sees_the_adapters_parts(family: str) -> None:
    stack = random_model(family, layers=2)
    assert isinstance(stack, HFStack)
    assert stack.decoder_layers() == list(parts_of(stack.hf_model).layers)
    assert stack.final_norm() is parts_of(stack.hf_model).final_norm


def test_a_model_without_decoder_layers_is_a_clear_error() -> None:
    model = random_model("llama", layers=1).hf_model
    model.model.layers = nn.Identity()  # type: ignore[assignment]
    with pytest.raises(AdapterError, match="cannot find the decoder layers"):
        parts_of(model)


def test_real_smollm2_exit_at_full_depth_reproduces_its_logits(smollm2_dir: Path) -> None:
    model = load_partial(smollm2_dir)
    assert (model.family, len(model.decoder_layers())) == ("llama", 30)
    assert model.parts.rotary is not None
    ids = torch.tensor([model.tokenizer("The capital of France is")["input_ids"]])
    with torch.no_grad():
        last = layer_hidden_states(model.hf_model, ids)[-1]
        torch.testing.assert_close(model.exit_logits(last), model.hf_model(ids).logits, rtol=1e-4, atol=1e-4)


def test_real_smollm2_at_four_layers_reads_and_allocates_only_those(smollm2_dir: Path) -> None:
    model = load_partial(smollm2_dir, 4)
    read_layers = {int(k.split(".layers.")[1].split(".")[0]) for k in model.read_keys if ".layers." in k}
    assert read_layers == {0, 1, 2, 3}
    assert model.resident_weight_bytes() == model.fixed_weight_bytes() + 4 * model.layer_weight_bytes()
    full_layers = 30 * model.layer_weight_bytes()
    assert model.resident_weight_bytes() < model.fixed_weight_bytes() + full_layers / 5
