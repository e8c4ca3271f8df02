"""Load any HF causal-LM directory with only its first L decoder layers resident.

The config is cut to L layers before the model is built, parameters are created on the meta
device, and only the tensors the cut model names are read from the checkpoint: the other layers'
weights are never read nor allocated. Exits reuse the model's own final norm and LM head.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .adapter import AdapterError, ModelParts, parts_of
from .checkpoint import CheckpointError, open_checkpoint
from .exit_adapters import ExitAdapters
from .metadata import EXIT_ADAPTERS_FILE

_PER_LAYER_LISTS = ("layer_types",)  # config lists with one entry per layer, cut with the layers
_ENCODERS = {"bert", "roberta", "xlm-roberta", "electra", "camembert", "ernie", "data2vec-text", "rembert"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


class ModelLoadError(ValueError):
    """The directory or the requested depth cannot be served; raised at start-up."""


@dataclass
class PartialModel:
    """A causal LM with its first `loaded_layers` of `model_layers` decoder layers resident."""

    path: Path
    family: str
    hf_model: Any  # a transformers PreTrainedModel (causal LM) cut to `loaded_layers`
    tokenizer: Any  # a transformers tokenizer, or None when the directory ships none
    model_layers: int
    loaded_layers: int
    read_keys: tuple[str, ...] = field(default=(), repr=False)  # checkpoint tensors actually read
    exit_adapters: ExitAdapters | None = None  # trained translators for layers 1..loaded (models.exit_adapters)
    _parts: ModelParts | None = field(default=None, init=False, repr=False)

    @property
    def config(self) -> Any:
        """The cut model's config (num_hidden_layers == loaded_layers)."""
        return self.hf_model.config

    @property
    def parts(self) -> ModelParts:
        """Layers, norm, head, embeddings and rotary embedding of the model (found once)."""
        if self._parts is None:
            try:
                self._parts = parts_of(self.hf_model)
            except AdapterError as error:
                raise ModelLoadError(str(error)) from error
        return self._parts

    def decoder_layers(self) -> list[nn.Module]:
        return list(self.parts.layers)

    def final_norm(self) -> nn.Module:
        return self.parts.final_norm

    def lm_head(self) -> nn.Module:
        return self.parts.lm_head

    def embed_tokens(self) -> nn.Module:
        return self.parts.embed_tokens

    def exit_logits(self, hidden: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """Logits of an exit at 1-based `layer`: its exit adapter where one was trained, then the
        model's own final norm and LM head (without a layer, the plain logit lens)."""
        if layer is not None and self.exit_adapters is not None:
            hidden = self.exit_adapters.translate(hidden, layer)
        return self.parts.exit_logits(hidden)

    def resident_weight_bytes(self) -> int:
        return _weight_bytes(self.hf_model)

    def layer_weight_bytes(self) -> int:
        """Bytes of one decoder layer's weights (they are all the same shape)."""
        return _weight_bytes(self.decoder_layers()[0])

    def fixed_weight_bytes(self) -> int:
        """Weights resident at any depth: embeddings, final norm, LM head, positions."""
        return self.resident_weight_bytes() - sum(_weight_bytes(layer) for layer in self.decoder_layers())

    def kv_bytes_per_token_per_layer(self, dtype: torch.dtype) -> int:
        config = self.config
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or int(config.hidden_size) // heads)
        return 2 * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def max_context(self) -> int:
        return int(self.config.max_position_embeddings)


def _weight_bytes(module: nn.Module) -> int:
    """Parameter bytes, counting tied (shared) tensors once."""
    seen: set[int] = set()
    total = 0
    for param in module.parameters():
        if param.data_ptr() not in seen:
            seen.add(param.data_ptr())
            total += param.numel() * param.element_size()
    return total


def _read_config(directory: Path) -> PretrainedConfig:
    if not directory.is_dir():
        raise ModelLoadError(f"model directory {directory} does not exist")
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{directory} has no config.json: not a Hugging Face model directory")
    try:
        raw = json.loads(config_file.read_text())
        config: PretrainedConfig = AutoConfig.from_pretrained(str(directory))
    except (ValueError, KeyError, OSError) as error:
        raise ModelLoadError(f"{config_file}: cannot read the model config: {error}") from error
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    architectures = raw.get("architectures") or []
    is_causal = (
        any(a in causal for a in architectures)
        if architectures
        else config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and config.model_type not in _ENCODERS
    )
    if not is_causal or getattr(config, "is_encoder_decoder", False):
        kinds = ", ".join(architectures) or config.model_type
        raise ModelLoadError(f"{directory} is not a causal language model ({kinds})")
    return config


def cut_config(config: PretrainedConfig, layers: int) -> PretrainedConfig:
    """A copy of `config` with `layers` decoder layers (per-layer lists cut to match)."""
    cut = config.__class__.from_dict(config.to_dict())
    model_layers = config.num_hidden_layers
    cut.num_hidden_layers = layers
    for name in _PER_LAYER_LISTS:
        values = getattr(cut, name, None)
        if isinstance(values, list | tuple) and len(values) == model_layers:
            setattr(cut, name, list(values)[:layers])
    return cut


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Build modules with meta parameters (no memory) but real buffers (e.g. RoPE frequencies)."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def _set_parameter(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    owner._parameters[attr] = nn.Parameter(value, requires_grad=False)


def _checkpoint_name(name: str, available: set[str], prefix: str) -> str | None:
    """The checkpoint's name for a model parameter (some checkpoints omit or add the base prefix)."""
    candidates = [name]
    if name.startswith(prefix + "."):
        candidates.append(name[len(prefix) + 1 :])
    else:
        candidates.append(f"{prefix}.{name}")
    return next((c for c in candidates if c in available), None)


def _load_tokenizer(directory: Path) -> Any:
    if not any((directory / f).is_file() for f in _TOKENIZER_FILES):
        return None
    return AutoTokenizer.from_pretrained(str(directory))


def load_partial(
    path: str | Path,
    layers: int | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> PartialModel:
    """The model at `path` with only its first `layers` decoder layers (all when None) resident."""
    directory = Path(path)
    config = _read_config(directory)
    model_layers = int(config.num_hidden_layers)
    depth = model_layers if layers is None else layers
    if not 1 <= depth <= model_layers:
        raise ModelLoadError(f"layers must be between 1 and {model_layers} for {directory}, got {depth}")
    target = torch.device(device)
    try:
        with _parameters_on_meta():
            model = AutoModelForCausalLM.from_config(cut_config(config, depth), dtype=dtype)  # type: ignore[no-untyped-call]
    except (ValueError, TypeError, KeyError) as error:
        raise ModelLoadError(f"{directory}: cannot build a {config.model_type} causal LM: {error}") from error
    prefix = str(model.base_model_prefix)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    head = model.get_output_embeddings()
    head_module = next((n for n, m in model.named_modules() if m is head), None)
    head_name = f"{head_module}.weight" if head_module else None
    try:
        with open_checkpoint(directory) as checkpoint:
            available = checkpoint.keys()
            for name, param in list(model.named_parameters(remove_duplicate=False)):
                source = _checkpoint_name(name, available, prefix)
                if source is None or (tied and name == head_name):
                    continue  # missing ones are reported below; a tied head is the embedding
                tensor = checkpoint.read(source)
                if tensor.shape != param.shape:
                    raise ModelLoadError(
                        f"{directory}: {source} has shape {tuple(tensor.shape)}, the config says {tuple(param.shape)}"
                    )
                _set_parameter(model, name, tensor.to(device=target, dtype=dtype))
            read_keys = tuple(checkpoint.read_keys)
    except CheckpointError as error:
        raise ModelLoadError(str(error)) from error
    if tied and head_name is not None:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    missing = [n for n, p in model.named_parameters(remove_duplicate=False) if p.device.type == "meta"]
    if missing:
        raise ModelLoadError(f"{directory}: the checkpoint lacks weights the model needs: {', '.join(missing[:5])}")
    for module in model.modules():
        for key, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[key] = buffer.to(target)
    model.eval()
    adapters_file = directory / EXIT_ADAPTERS_FILE
    try:  # only the loaded layers' adapters are read
        adapters = (
            ExitAdapters.load(adapters_file, depth, device=target, dtype=dtype) if adapters_file.is_file() else None
        )
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(f"{adapters_file}: cannot read the exit adapters: {error}") from error
    if adapters is not None and adapters.down.shape[-1] != config.hidden_size:
        raise ModelLoadError(
            f"{adapters_file}: adapters for hidden size {adapters.down.shape[-1]}, not {config.hidden_size}"
        )
    partial = PartialModel(
        exit_adapters=adapters,
        path=directory,
        family=str(config.model_type),
        hf_model=model,
        tokenizer=_load_tokenizer(directory),
        model_layers=model_layers,
        loaded_layers=depth,
        read_keys=read_keys,
    )
    if len(partial.decoder_layers()) != depth:
        raise ModelLoadError(f"{directory}: built {len(partial.decoder_layers())} layers instead of {depth}")
    return partial
