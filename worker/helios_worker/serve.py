"""`helios worker`: options, validation, and the wiring from a model directory to a running server.

Options are one typed object (`WorkerOptions`), read from flags with defaults from HELIOS_* variables
and checked before anything heavy loads: a bad option exits with status 2 and one line, no traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from helios_worker.engine.api import ConfidenceMeasure, EngineConfig
from helios_worker.placement import AUTO, DTYPES, ENV_DEVICE, ENV_DTYPE, PlacementError, check_request

if TYPE_CHECKING:
    from fastapi import FastAPI

    from helios_worker.metrics import WorkerIdentity
    from helios_worker.server.settings import ServerSettings

ENV_DEPLOYMENT = "HELIOS_DEPLOYMENT"
ENV_CANDIDATE = "HELIOS_CANDIDATE"
ENV_API_TOKEN = "HELIOS_API_TOKEN"
DEFAULT_DEPLOYMENT = "local"
DEFAULT_PORT = 8000
LOG_LEVELS = ("debug", "info", "warning", "error")
ExitsMode = Literal["auto", "on", "off"]
EXITS_OFF_THRESHOLD = 2.0  # above 1: never met, every token runs the whole loaded stack
IMPORTED_SUFFIXES = (".gguf", ".whl")  # served after `helios import` (models/importing.py), cached

log = logging.getLogger("helios.worker")


class OptionError(ValueError):
    """A worker option that cannot work; reported as `helios worker: error: ...` with exit status 2."""


@dataclass(frozen=True)
class WorkerOptions:
    model: Path
    layers: int | None = None  # None: every layer of the model
    threshold: float = 0.9
    exits: ExitsMode = "auto"  # auto: on only when the checkpoint's exits were trained (models/metadata.py)
    profile: bool = False
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT  # 0: any free port (see port_file)
    deployment: str = DEFAULT_DEPLOYMENT
    candidate: str | None = None  # None: the model directory's name
    breach_window: int = 100
    confidence_measure: ConfidenceMeasure = "max_prob"
    max_batch: int = 64
    max_queue: int = 256
    max_context: int | None = None  # None: SERVING_CONTEXT, capped by the model's limit
    exit_layers: tuple[int, ...] | None = ()  # exit checkpoints below the depth; (): one exit head, at it
    exit_max_batch: int = 1  # checkpoints only in steps of at most this many rows, where they can end it
    device: str = AUTO  # auto: CUDA when a GPU is visible, else the CPU
    dtype: str = AUTO  # auto: bfloat16 on CUDA, float32 on the CPU
    api_token_file: Path | None = None
    api_token: str | None = None  # from HELIOS_API_TOKEN when no file is given
    log_level: str = "info"
    drain_timeout: float = 30.0
    port_file: Path | None = None  # written with the bound port once listening

    @property
    def candidate_name(self) -> str:
        return self.candidate or (self.model.stem if self.model.is_file() else self.model.resolve().name)

    def engine_config(self, exits_on: bool = True) -> EngineConfig:
        """The engine's share of the options: every field both have, by name (--threshold is the
        engine's confidence_threshold); what the flags do not set keeps the engine's default. With exits
        off no layer is ever confident: every token comes from the last loaded layer."""
        shared = {f.name for f in fields(EngineConfig)} & {f.name for f in fields(self)}
        threshold = self.threshold if exits_on else EXITS_OFF_THRESHOLD
        return EngineConfig(confidence_threshold=threshold, **{name: getattr(self, name) for name in shared})

    def server_settings(self, identity: WorkerIdentity, model_layers: int) -> ServerSettings:
        """The server's share: who it is (from the loaded model), its token and its drain timeout."""
        from helios_worker.server.settings import ServerSettings

        return ServerSettings(
            model_name=identity.candidate,
            candidate=identity.candidate,
            depth=identity.depth,
            model_layers=model_layers,
            exits=identity.exits,
            api_token=self.api_token,
            drain_timeout_seconds=self.drain_timeout,
        )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _exit_layers(text: str) -> tuple[int, ...] | None:
    if text == "all":
        return None
    if text in ("", "none"):
        return ()
    return tuple(_positive_int(part) for part in text.split(","))


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0..65535, got {value}")
    return value


def _threshold(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """The worker's flags, on any parser (the `helios worker` subcommand or `python -m helios_worker`)."""
    d = WorkerOptions(model=Path("."))
    add = parser.add_argument
    add("--model", required=True, type=Path, help="HF causal LM directory, or a .gguf file or wheel (imported, cached)")
    add("--layers", type=_positive_int, help="decoder layers to load (default: all)")
    add(
        "--threshold",
        type=_threshold,
        default=d.threshold,
        help="exit when confidence reaches this, (0, 1]; 1 exits only on certainty",
    )
    add(
        "--exits",
        choices=get_args(ExitsMode),
        default=d.exits,
        help="exits inside the stack; auto: on only for a checkpoint whose exits were trained (helios.json or "
        "exit adapters), else every token runs the loaded stack",
    )
    add("--profile", action="store_true", help="run at full depth and emit the profiling metrics")
    add("--host", default=d.host, help="address to listen on (0.0.0.0 in a pod)")
    add("--port", type=_port, default=d.port, help="0 picks a free port (see --port-file)")
    add("--port-file", type=Path, help="write the bound port here once listening")
    add("--deployment", help=f"metric label (default: ${ENV_DEPLOYMENT} or {DEFAULT_DEPLOYMENT!r})")
    add("--candidate", help=f"metric label (default: ${ENV_CANDIDATE} or the model directory's name)")
    add("--breach-window", type=_positive_int, default=d.breach_window, help="tokens in the breach window")
    add(
        "--confidence-measure",
        choices=get_args(ConfidenceMeasure),
        default=d.confidence_measure,
        help="max_prob: top softmax probability; margin: top-1 minus top-2 probability",
    )
    add("--max-batch", type=_positive_int, default=d.max_batch, help="rows in the running batch")
    add("--max-queue", type=_positive_int, default=d.max_queue, help="waiting requests before 429")
    add("--max-context", type=_positive_int, help="tokens per request (default: 4096, or the model's if less)")
    add(
        "--exit-layers",
        type=_exit_layers,
        default=d.exit_layers,
        help="exit checkpoints below the depth: 1,3,... | all | none (default: none, one exit head per token)",
    )
    add("--exit-max-batch", type=_positive_int, default=d.exit_max_batch, help="rows up to which checkpoints run")
    add("--device", help=f"auto, cpu, cuda, cuda:1, ... (default: ${ENV_DEVICE} or auto: CUDA when a GPU is visible)")
    add(
        "--dtype",
        choices=(AUTO, *DTYPES),
        help=f"weight and KV dtype (default: ${ENV_DTYPE} or auto: bfloat16 on CUDA, float32 on the CPU)",
    )
    add("--api-token-file", type=Path, help=f"require this bearer token on /v1 (else ${ENV_API_TOKEN}, else open)")
    add("--drain-timeout", type=_non_negative, default=d.drain_timeout, help="seconds in-flight requests get")
    add("--log-level", choices=LOG_LEVELS, default=d.log_level, help="debug also logs request paths, never bodies")


def options_from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> WorkerOptions:
    """The typed options; flags win over HELIOS_* variables, which win over defaults."""
    env = os.environ if env is None else env
    return WorkerOptions(
        model=args.model,
        layers=args.layers,
        threshold=args.threshold,
        exits=args.exits,
        profile=args.profile,
        host=args.host,
        port=args.port,
        deployment=args.deployment or env.get(ENV_DEPLOYMENT) or DEFAULT_DEPLOYMENT,
        candidate=args.candidate or env.get(ENV_CANDIDATE) or None,
        breach_window=args.breach_window,
        confidence_measure=args.confidence_measure,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_context=args.max_context,
        exit_layers=args.exit_layers,
        exit_max_batch=args.exit_max_batch,
        device=args.device or env.get(ENV_DEVICE) or AUTO,
        dtype=args.dtype or env.get(ENV_DTYPE) or AUTO,
        api_token_file=args.api_token_file,
        api_token=env.get(ENV_API_TOKEN) or None,
        log_level=args.log_level,
        drain_timeout=args.drain_timeout,
        port_file=args.port_file,
    )


def check_options(options: WorkerOptions) -> WorkerOptions:
    """Cheap checks before loading; returns the options with the API token resolved. Raises OptionError."""
    try:
        check_request(options.device, options.dtype)
    except PlacementError as error:
        raise OptionError(str(error)) from None
    if options.model.is_file() and options.model.suffix in IMPORTED_SUFFIXES:
        pass  # imported (cached) in build_app; a bad file is an OptionError there
    elif not options.model.is_dir():
        raise OptionError(f"--model {options.model}: not a directory (nor a .gguf file)")
    elif not (options.model / "config.json").is_file():
        raise OptionError(f"--model {options.model}: no config.json (not a Hugging Face model directory)")
    token = options.api_token
    if options.api_token_file is not None:
        try:
            token = options.api_token_file.read_text().strip()
        except OSError as error:
            raise OptionError(f"--api-token-file {options.api_token_file}: {error.strerror}") from None
        if not token:
            raise OptionError(f"--api-token-file {options.api_token_file}: the file is empty")
    return replace(options, api_token=token)


def build_app(options: WorkerOptions) -> FastAPI:
    """Load the model (only its first L layers), build telemetry, engine and app. Raises OptionError."""
    options = check_options(options)  # before the heavy imports: a typo fails in a blink
    import torch

    from helios_worker.engine.engine import Engine
    from helios_worker.metrics import ModelSizes, WorkerIdentity, WorkerMetrics
    from helios_worker.models.loading import ModelLoadError, load_partial
    from helios_worker.models.metadata import exits_kind
    from helios_worker.placement import resolve_placement
    from helios_worker.server.app import create_app

    try:
        placement = resolve_placement(options.device, options.dtype, torch.cuda.device_count())
    except PlacementError as error:
        raise OptionError(str(error)) from None
    options = replace(options, device=placement.device, dtype=placement.dtype)
    dtype = getattr(torch, options.dtype)
    if options.model.is_file():
        options = replace(options, model=_imported(options.model), candidate=options.candidate_name)
    try:
        model = load_partial(options.model, options.layers, device=options.device, dtype=dtype)
    except ModelLoadError as error:
        raise OptionError(str(error)) from None
    if options.profile and model.loaded_layers != model.model_layers:
        depth, full = model.loaded_layers, model.model_layers
        log.warning("profiling at %d of %d layers: agreement is measured against layer %d", depth, full, depth)

    kind = exits_kind(options.model)
    exits_on = options.exits == "on" or (options.exits == "auto" and kind != "untrained")
    exits_label = kind if exits_on else "off"
    if exits_on:
        log.info("exits inside the stack: on (%s exits), threshold %.3g", kind, options.threshold)
    else:
        why = "--exits off" if options.exits == "off" else "the checkpoint's exits are untrained"
        log.info("exits inside the stack: off (%s); every token comes from layer %d", why, model.loaded_layers)
    identity = WorkerIdentity(
        deployment=options.deployment,
        candidate=options.candidate_name,
        depth=model.loaded_layers,
        model=options.model.resolve().name,
        profile=options.profile,
        device=options.device,
        dtype=options.dtype,
        exits=exits_label,
    )
    gpu = _open_gpu(options.device) if options.device.startswith("cuda") else None
    telemetry = WorkerMetrics(identity, model.model_layers, gpu=gpu)
    try:
        engine = Engine(model, options.engine_config(exits_on), telemetry)
    except ValueError as error:  # e.g. an exit layer at or beyond the depth
        raise OptionError(f"--exit-layers: {error}") from None
    telemetry.set_model_sizes(
        ModelSizes(
            loaded_layers=model.loaded_layers,
            model_layers=model.model_layers,
            resident_weight_bytes=model.resident_weight_bytes(),
            layer_weight_bytes=model.layer_weight_bytes(),
            kv_cache_bytes=engine.cache.bytes,
            kv_bytes_per_token=engine.cache.plan.bytes_per_token,
        )
    )
    settings = options.server_settings(identity, model.model_layers)
    log.info(
        "loaded %s: %d of %d layers on %s in %s",
        identity.model,
        model.loaded_layers,
        model.model_layers,
        options.device,
        options.dtype,
    )
    return create_app(engine, model.tokenizer, telemetry, settings)


def _imported(file: Path) -> Path:
    from helios_worker.models.importing import ImportFailed, import_checkpoint

    try:
        return import_checkpoint(file, log=log.info)
    except ImportFailed as error:
        raise OptionError(f"--model {error}") from None


def _open_gpu(device: str) -> Any:
    from helios_worker.metrics import NvmlMeter

    index = int(device.split(":", 1)[1]) if ":" in device else 0
    return NvmlMeter.open(index)


def run_worker(options: WorkerOptions) -> None:
    """Serve until SIGTERM/SIGINT, then drain and return. Exits with status 2 on a bad option."""
    import uvicorn

    from helios_worker.server.shutdown import DrainingServer

    logging.basicConfig(level=options.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app = build_app(options)
    except OptionError as error:
        print(f"helios worker: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    config = uvicorn.Config(
        app,
        host=options.host,
        port=options.port,
        log_level=options.log_level,
        timeout_graceful_shutdown=max(1, int(options.drain_timeout)),
        access_log=options.log_level == "debug",  # paths only, never bodies
    )
    server = DrainingServer(config, app.state.worker.begin_drain, options.port_file)
    server.run()


def main(argv: list[str] | None = None) -> None:
    """`python -m helios_worker ...`."""
    parser = argparse.ArgumentParser(prog="helios worker", description="Serve an early-exit LLM.")
    add_worker_arguments(parser)
    run_worker(options_from_args(parser.parse_args(argv)))
