"""The `helios` command: every documented subcommand exists, and each pays only for its own imports."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from helios_cli.main import SUBCOMMANDS, build_parser, main

DOCUMENTED = ("train", "import", "worker", "operator", "demo", "bench")


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_every_documented_subcommand_is_registered() -> None:
    names = {add.__name__.removeprefix("_add_") for add in SUBCOMMANDS}
    assert names == set(DOCUMENTED)
    help_text = build_parser().format_help()
    for name in DOCUMENTED:
        assert name in help_text


@pytest.mark.parametrize("name", DOCUMENTED)
def test_each_subcommand_explains_its_options(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"helios {name}" in out
    # Every option carries a help text of its own, not just its name or its variable.
    parser = build_parser(name)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            text = (action.help or "").split("(env ")[0].strip()
            assert len(text) > 8, f"{name} {action.option_strings[0]} has no help text"


def test_operator_command_imports_no_torch() -> None:
    """The operator image carries no torch: building its parser must not import it."""
    result = _run(
        "import sys; from helios_cli.main import build_parser; build_parser('operator'); "
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]


def test_worker_command_imports_no_kopf() -> None:
    """The worker image carries no kopf: building the worker's parser must not import it."""
    result = _run(
        "import sys; from helios_cli.main import build_parser; build_parser('worker'); "
        "print('kopf' in sys.modules, 'kubernetes' in sys.modules)"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]


def test_a_subcommand_whose_extra_is_missing_says_so_instead_of_crashing() -> None:
    """Simulate the worker image (no kopf): `helios operator` answers with a clear error, exit 2."""
    result = _run(
        "import sys; sys.modules['kopf'] = None; from helios_cli.main import main; "
        "sys.exit(main(['operator', '--standalone']))"
    )
    assert result.returncode == 2
    assert "needs 'kopf'" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_preset_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["train", "--preset", "huge", "--out", "/tmp/x"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_train_needs_a_preset_or_a_checkpoint_to_train_exits_into(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--out", "/tmp/x"]) == 2
    assert "--preset NAME, or --from DIR" in capsys.readouterr().err


def test_train_from_a_directory_that_is_not_a_checkpoint_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", "--from", str(tmp_path), "--out", str(tmp_path) + "/out"]) == 2
    assert "not a Hugging Face model directory" in capsys.readouterr().err
