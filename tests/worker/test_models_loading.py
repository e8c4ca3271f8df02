"""Partial loading of HF causal-LM directories: only the first L layers are ever read or allocated."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from helios_worker.models.loading import ModelLoadError, PartialModel, load_partial

LAYERS = 4
VOCAB = 64


def _llama() -> nn.Module:
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
            tie_word_embeddings=False,
        )
    )


def _qwen2() -> nn.Module:
    return Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
            tie_word_embeddings=True,
        )
    )


def _gpt2() -> nn.Module:
    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=LAYERS,
            n_head=4,
            n_positions=128,
            bos_token_id=0,
            eos_token_id=0,
        )
    )


FAMILIES: dict[str, Callable[[], nn.Module]] = {"llama": _llama, "qwen2": _qwen2, "gpt2": _gpt2}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Random-init models of each family, saved as HF directories."""
    torch.manual_seed(0)
    out = {}
    for family, build in FAMILIES.items():
        directory = tmp_path_factory.mktemp(family)
        build().save_pretrained(str(directory))
        out[family] = directory
    return out


def _layer_outputs(model: Any, layers: list[nn.Module], ids: torch.Tensor) -> list[torch.Tensor]:
    outputs: list[torch.Tensor] = []
    handles = [
        layer.register_forward_hook(lambda _m, _a, o: outputs.append(o[0] if isinstance(o, tuple) else o))
        for layer in layers
    ]
    with torch.no_grad():
        model(input_ids=ids)
    for handle in handles:
        handle.remove()
    return outputs


def _full(directory: Path) -> PartialModel:
    return load_partial(directory)


def _layer_index(key: str) -> int | None:
    match = re.search(r"\.(?:layers|h)\.(\d+)\.", key)
    return int(match.group(1)) if match else None


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("depth", [1, 2, LAYERS])
def test_the_first_layers_hidden_states_equal_the_full_models(saved: dict[str, Path], family: str, depth: int) -> None:
    reference = AutoModelForCausalLM.from_pretrained(str(saved[family])).eval()
    partial = load_partial(saved[family], depth)
    assert partial.family == family and (partial.model_layers, partial.loaded_layers) == (LAYERS, depth)
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    full_layers = reference.base_model.h if family == "gpt2" else reference.model.layers
    expected = _layer_outputs(reference, list(full_layers), ids)
    got = _layer_outputs(partial.hf_model, partial.decoder_layers(), ids)
    assert len(got) == depth
    for mine, theirs in zip(got, expected[:depth], strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    if depth == LAYERS:  # the exit at the last layer is the model's own output
        with torch.no_grad():
            torch.testing.assert_close(partial.exit_logits(got[-1]), reference(input_ids=ids).logits)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_layers_beyond_the_depth_are_never_read_nor_allocated(saved: dict[str, Path], family: str) -> None:
    depth = 2
    partial = load_partial(saved[family], depth)
    read_layers = {_layer_index(k) for k in partial.read_keys} - {None}
    assert read_layers == set(range(depth))
    state = partial.hf_model.state_dict()
    assert all((_layer_index(k) or 0) < depth for k in state)
    assert all(p.device.type == "cpu" and not p.requires_grad for p in partial.hf_model.parameters())
    full_params = dict(AutoModelForCausalLM.from_pretrained(str(saved[family])).named_parameters())
    expected = sum(p.numel() for k, p in full_params.items() if (_layer_index(k) or 0) < depth)
    assert sum(p.numel() for p in partial.hf_model.parameters()) == expected


def test_a_checkpoint_without_the_deep_layers_still_loads_at_a_shallow_depth(
    saved: dict[str, Path], tmp_path: Path
) -> None:
    """Proof by removal: the deep layers' tensors are absent from the file and nothing asks for them."""
    source = saved["llama"]
    (tmp_path / "config.json").write_text((source / "config.json").read_text())
    state = AutoModelForCausalLM.from_pretrained(str(source)).state_dict()
    shallow = {k: v.contiguous() for k, v in state.items() if (_layer_index(k) or 0) < 2}
    save_file(shallow, str(tmp_path / "model.safetensors"))
    assert load_partial(tmp_path, 2).loaded_layers == 2
    with pytest.raises(ModelLoadError, match="lacks weights"):
        load_partial(tmp_path, 3)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_resident_bytes_at_half_depth_are_the_fixed_part_plus_half_the_layers(
    saved: dict[str, Path], family: str
) -> None:
    full, half = _full(saved[family]), load_partial(saved[family], LAYERS // 2)
    assert full.fixed_weight_bytes() == half.fixed_weight_bytes() > 0
    assert full.layer_weight_bytes() == half.layer_weight_bytes() > 0
    assert half.resident_weight_bytes() == half.fixed_weight_bytes() + LAYERS // 2 * half.layer_weight_bytes()
    full_layers = full.resident_weight_bytes() - full.fixed_weight_bytes()
    assert half.resident_weight_bytes() - half.fixed_weight_bytes() == full_layers // 2
    assert half.resident_weight_bytes() < full.resident_weight_bytes()


def test_tied_embeddings_are_shared_and_counted_once(saved: dict[str, Path]) -> None:
    qwen = load_partial(saved["qwen2"], 1)
    assert qwen.lm_head().weight is qwen.embed_tokens().weight
    llama = load_partial(saved["llama"], 1)  # saved untied: its own head
    assert llama.lm_head().weight is not llama.embed_tokens().weight
    embed = VOCAB * 32 * 4
    assert llama.fixed_weight_bytes() - qwen.fixed_weight_bytes() == embed


def test_bfloat16_halves_the_resident_bytes(saved: dict[str, Path]) -> None:
    fp32 = load_partial(saved["llama"], 2)
    bf16 = load_partial(saved["llama"], 2, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.hf_model.parameters())
    assert bf16.resident_weight_bytes() * 2 == fp32.resident_weight_bytes()


def test_kv_bytes_and_context_come_from_the_config(saved: dict[str, Path]) -> None:
    llama = load_partial(saved["llama"], 1)  # 2 KV heads x head_dim 8, keys and values
    assert llama.kv_bytes_per_token_per_layer(torch.float16) == 2 * 2 * 8 * 2
    assert llama.max_context() == 128
    gpt2 = load_partial(saved["gpt2"], 1)  # no GQA: 4 heads x 8
    assert gpt2.kv_bytes_per_token_per_layer(torch.float32) == 2 * 4 * 8 * 4
    assert gpt2.max_context() == 128


def test_sharded_and_pytorch_bin_checkpoints_load_the_same_weights(saved: dict[str, Path], tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(str(saved["llama"]))
    sharded = tmp_path / "sharded"
    model.save_pretrained(str(sharded), max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    binary = tmp_path / "bin"
    binary.mkdir()
    (binary / "config.json").write_text((saved["llama"] / "config.json").read_text())
    torch.save(model.state_dict(), binary / "pytorch_model.bin")
    reference = load_partial(saved["llama"], 3).hf_model.state_dict()
    for directory in (sharded, binary):
        loaded = load_partial(directory, 3).hf_model.state_dict()
        assert loaded.keys() == reference.keys()
        assert all(torch.equal(loaded[k], reference[k]) for k in reference)


def test_the_trained_tiny_model_loads_partially_with_its_tokenizer(tiny_model_dir: Path) -> None:
    full, half = load_partial(tiny_model_dir), load_partial(tiny_model_dir, 3)
    assert (half.family, half.model_layers, half.loaded_layers) == ("llama", full.loaded_layers, 3)
    ids = half.tokenizer("12+47=", return_tensors="pt")["input_ids"]
    expected = _layer_outputs(full.hf_model, full.decoder_layers(), ids)
    got = _layer_outputs(half.hf_model, half.decoder_layers(), ids)
    for mine, theirs in zip(got, expected[:3], strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(full.exit_logits(expected[-1]), full.hf_model(input_ids=ids).logits)


@pytest.mark.parametrize("depth", [0, -1, LAYERS + 1])
def test_a_depth_outside_the_model_is_a_clear_error(saved: dict[str, Path], depth: int) -> None:
    with pytest.raises(ModelLoadError, match=f"between 1 and {LAYERS}.*got {depth}"):
        load_partial(saved["llama"], depth)


def test_directories_that_are_not_causal_lms_are_clear_errors(saved: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_partial(tmp_path / "nowhere")
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        load_partial(tmp_path)
    bert = tmp_path / "bert"
    BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        architectures=["BertForMaskedLM"],
    ).save_pretrained(str(bert))
    with pytest.raises(ModelLoadError, match="not a causal language model"):
        load_partial(bert, 1)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot read the model config"):
        load_partial(broken)
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    (weightless / "config.json").write_text((saved["qwen2"] / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="has no weights"):
        load_partial(weightless, 1)
    index = {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}
    (weightless / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="missing"):
        load_partial(weightless, 1)


def test_a_tied_head_is_not_read_from_the_checkpoint(saved: dict[str, Path], tmp_path: Path) -> None:
    """A checkpoint that also stores the tied head: only the embedding is read, and shared."""
    source = saved["qwen2"]
    (tmp_path / "config.json").write_text((source / "config.json").read_text())
    state = {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(str(source)).state_dict().items()}
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, str(tmp_path / "model.safetensors"))
    partial = load_partial(tmp_path, 1)
    assert "lm_head.weight" not in partial.read_keys and "model.embed_tokens.weight" in partial.read_keys
    assert partial.lm_head().weight is partial.embed_tokens().weight


def test_a_tensor_of_the_wrong_shape_is_a_clear_error(saved: dict[str, Path], tmp_path: Path) -> None:
    config = json.loads((saved["llama"] / "config.json").read_text())
    config["intermediate_size"] = 48
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes((saved["llama"] / "model.safetensors").read_bytes())
    with pytest.raises(ModelLoadError, match="has shape"):
        load_partial(tmp_path, 1)
