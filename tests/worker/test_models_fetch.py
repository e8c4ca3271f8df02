"""The fetch-model init container's program (`python -m helios_worker.models.fetch`), run as the pod
runs it, against a local stand-in for the hub (tests/support/hub.py): a real snapshot_download,
once per cache folder, however many pods share the folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests.support.hub import LocalHub, local_hub

from helios_worker.models.fetch import COMPLETE

REPO = "helios-test/tiny"


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """A small model folder as the hub holds it: a config, a tokenizer file, weights in LFS, a subfolder."""
    folder = tmp_path / "hub" / "tiny"
    (folder / "extra").mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 2}')
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    (folder / "model.safetensors").write_bytes(os.urandom(300_000))
    (folder / "extra" / "notes.txt").write_text("a file in a subfolder")
    return folder


def fetch(hub: LocalHub | str, target: Path, *, offline: str = "0", repo: str = REPO) -> subprocess.Popen[str]:
    """The init container's command with the environment the operator gives it (HF_HUB_OFFLINE=0)."""
    env = {**os.environ, "HF_ENDPOINT": hub if isinstance(hub, str) else hub.url, "HF_HUB_OFFLINE": offline}
    env["HF_HOME"] = str(target.parent / ".hf-home")
    command = [sys.executable, "-m", "helios_worker.models.fetch", repo, str(target)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, out


def same_files(a: Path, b: Path) -> bool:
    def listing(root: Path) -> dict[str, bytes]:
        return {
            p.relative_to(root).as_posix(): p.read_bytes()
            for p in root.rglob("*")
            if p.is_file() and ".cache" not in p.parts and p.name != COMPLETE
        }

    return listing(a) == listing(b)


def test_the_snapshot_is_downloaded_byte_for_byte_and_marked_complete(model: Path, tmp_path: Path) -> None:
    target = tmp_path / "cache" / "helios-test--tiny"
    with local_hub({REPO: model}) as hub:
        code, out = finish(fetch(hub, target))
    assert code == 0, out
    assert f"{REPO} downloaded into {target}" in out
    assert same_files(model, target)
    assert (target / COMPLETE).is_file()
    assert sorted(hub.downloads(REPO)) == ["config.json", "extra/notes.txt", "model.safetensors", "tokenizer.json"]


def test_a_complete_folder_is_reused_without_asking_the_hub_even_when_it_is_gone(model: Path, tmp_path: Path) -> None:
    target = tmp_path / "cache" / "helios-test--tiny"
    with local_hub({REPO: model}) as hub:
        assert finish(fetch(hub, target))[0] == 0
        asked = len(hub.requests)
        code, out = finish(fetch(hub, target))
        assert code == 0 and "already complete" in out, out
        assert len(hub.requests) == asked  # not one request: no listing, no HEAD, no bytes
    code, out = finish(fetch("http://127.0.0.1:9", target))  # nothing listens there
    assert code == 0 and "already complete" in out, out


def test_pods_starting_together_on_a_shared_folder_download_it_once(model: Path, tmp_path: Path) -> None:
    target = tmp_path / "cache" / "helios-test--tiny"
    with local_hub({REPO: model}) as hub:
        procs = [fetch(hub, target) for _ in range(3)]
        results = [finish(p) for p in procs]
    assert all(code == 0 for code, _ in results), results
    said = sorted("downloaded into" in out for _, out in results)
    assert said == [False, False, True]  # one pod downloaded; the others waited for it, then reused
    assert sorted(hub.downloads(REPO)) == ["config.json", "extra/notes.txt", "model.safetensors", "tokenizer.json"]
    assert same_files(model, target)


def test_the_image_offline_setting_is_what_made_every_download_fail(model: Path, tmp_path: Path) -> None:
    """Dockerfile.worker sets HF_HUB_OFFLINE=1 for the worker: inherited, an empty folder cannot be filled."""
    target = tmp_path / "cache" / "helios-test--tiny"
    with local_hub({REPO: model}) as hub:
        code, out = finish(fetch(hub, target, offline="1"))
        assert hub.requests == []
    assert code == 1
    (line,) = [x for x in out.splitlines() if x.startswith("fetch-model: error:")]
    assert "HF_HUB_OFFLINE" in line
    assert not (target / COMPLETE).exists()


def test_an_unknown_repo_fails_with_one_error_line_and_no_marker(model: Path, tmp_path: Path) -> None:
    target = tmp_path / "cache" / "nobody--nothing"
    with local_hub({REPO: model}) as hub:
        code, out = finish(fetch(hub, target, repo="nobody/nothing"))
    assert code == 1
    errors = [x for x in out.splitlines() if x.startswith("fetch-model: error: nobody/nothing: ")]
    assert len(errors) == 1, out
    assert not (target / COMPLETE).exists()


def test_an_interrupted_download_leaves_no_marker_and_the_next_try_completes_it(model: Path, tmp_path: Path) -> None:
    target = tmp_path / "cache" / "helios-test--tiny"
    with local_hub({REPO: model}) as hub:
        assert finish(fetch(hub, target))[0] == 0
        (target / COMPLETE).unlink()  # as if the pod died before the marker
        (target / "model.safetensors").unlink()
        before = len(hub.downloads(REPO))
        code, out = finish(fetch(hub, target))
        assert code == 0 and "downloaded into" in out, out
        assert hub.downloads(REPO)[before:] == ["model.safetensors"]  # the rest was already there
    assert same_files(model, target) and (target / COMPLETE).is_file()
