"""The worker's API behind a bearer token (from a file, as a mounted Secret, or HELIOS_API_TOKEN):
missing or wrong tokens get an OpenAI-shaped 401; tokens and prompts never reach the logs, even at
debug level, nor /metrics. And the worker runs in a pod's read-only root filesystem: it writes
nothing to HOME or its working directory."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from tests.reliability.conftest import assert_openai_error
from tests.support.workers import WorkerProcess, worker_process

pytestmark = pytest.mark.timeout(120)

TOKEN = "hx-s3cr3t-T0KEN-7f3a9c"
WRONG = "hx-s3cr3t-T0KEN-000000"
PROMPT = "quokka-zebra-4412"  # distinctive: if it shows up anywhere, it leaked


def auth(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def secured(chatty_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    directory = tmp_path_factory.mktemp("secured")
    token_file = directory / "token"
    token_file.write_text(TOKEN + "\n")  # as a Secret volume often holds it: with a trailing newline
    args = ["--model", str(chatty_model_dir), "--max-context", "64", "--api-token-file", str(token_file),
            "--log-level", "debug"]  # fmt: skip
    with worker_process(args, directory) as worker:
        yield worker


@pytest.mark.parametrize(
    "headers",
    [
        {},
        auth(WRONG),
        {"authorization": "Bearer"},
        {"authorization": TOKEN},
        {"authorization": f"Basic {TOKEN}"},
        auth(TOKEN + "x"),
    ],
    ids=["none", "wrong", "empty", "no-scheme", "basic", "prefix"],
)
def test_a_missing_or_wrong_token_gets_an_openai_401(secured: WorkerProcess, headers: dict[str, str]) -> None:
    for method, path in (("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models")):
        body = {"prompt": PROMPT, "max_tokens": 2} if path == "/v1/completions" else None
        r = httpx.request(method, f"{secured.base_url}{path}", json=body, headers=headers, timeout=30)
        error = assert_openai_error(r, 401)
        assert error["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
        assert TOKEN not in r.text and PROMPT not in r.text


def test_tokens_and_prompts_never_reach_logs_or_metrics(secured: WorkerProcess) -> None:
    url = secured.base_url
    with httpx.Client(base_url=url, timeout=30) as client:
        ok = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3}, headers=auth(TOKEN))
        assert ok.status_code == 200, ok.text
        chat = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 3, "stream": True}
        streamed = client.post("/v1/chat/completions", json=chat, headers=auth(TOKEN))
        assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")
        # Failures are where servers echo input: a validation error, a too-long prompt, a wrong token.
        bad = client.post("/v1/completions", json={"prompt": PROMPT, "bogus": PROMPT}, headers=auth(TOKEN))
        assert_openai_error(bad, 400)
        long = client.post("/v1/completions", json={"prompt": PROMPT * 10}, headers=auth(TOKEN))
        assert_openai_error(long, 400)
        typed = client.post("/v1/completions", json={"prompt": {"text": PROMPT}}, headers=auth(TOKEN))
        assert_openai_error(typed, 400)
        for r in (bad, long, typed):
            assert PROMPT not in r.text and TOKEN not in r.text
        client.post("/v1/completions", json={"prompt": PROMPT}, headers=auth(WRONG))
        metrics = client.get("/metrics").text
    secured.terminate()
    assert secured.wait(timeout=60) == 0
    log = secured.log()
    # The log is not empty: debug level logs every request's line, so silence cannot pass as safety.
    assert '"POST /v1/completions HTTP/1.1" 200' in log and '"POST /v1/completions HTTP/1.1" 401' in log
    assert "helios_requests_total" in metrics
    for secret in (TOKEN, WRONG, PROMPT, "quokka"):
        assert secret not in log, f"{secret!r} appears in the worker's log"
        assert secret not in metrics, f"{secret!r} appears in /metrics"


@pytest.fixture
def sealed_home(tmp_path: Path) -> dict[str, Path]:
    """Empty directories to watch: HOME and the working directory (read-only in the pod); TMPDIR
    stands for the pod's writable emptyDir."""
    dirs = {name: tmp_path / name for name in ("home", "cwd", "tmp", "run")}
    for d in dirs.values():
        d.mkdir()
    return dirs


def test_env_token_and_a_read_only_home_and_working_directory(
    chatty_model_dir: Path, sealed_home: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(sealed_home["cwd"])
    env = {"HOME": str(sealed_home["home"]), "TMPDIR": str(sealed_home["tmp"]), "HELIOS_API_TOKEN": TOKEN}
    for variable in ("HF_HOME", "XDG_CACHE_HOME", "HF_HUB_CACHE", "TRANSFORMERS_CACHE", "TORCHINDUCTOR_CACHE_DIR"):
        monkeypatch.delenv(variable, raising=False)  # the defaults under HOME are what a pod would use
    args = ["--model", str(chatty_model_dir), "--max-context", "64"]
    with worker_process(args, sealed_home["run"], env=env) as worker:
        denied = httpx.post(f"{worker.base_url}/v1/completions", json={"prompt": "1+1="}, timeout=30)
        assert_openai_error(denied, 401)
        body = {"prompt": "1+1=", "max_tokens": 3, "stream": True}
        ok = httpx.post(f"{worker.base_url}/v1/completions", json=body, headers=auth(TOKEN), timeout=30)
        assert ok.status_code == 200 and ok.text.rstrip().endswith("data: [DONE]")
        first = json.loads(ok.text.split("\n\n")[0].removeprefix("data: "))
        assert first["object"] == "text_completion"
        worker.terminate()
        assert worker.wait(timeout=60) == 0, worker.log()
    written = {name: sorted(str(p.relative_to(d)) for p in d.rglob("*")) for name, d in sealed_home.items()}
    assert written["home"] == [], f"the worker wrote under HOME: {written['home']}"
    assert written["cwd"] == [], f"the worker wrote into its working directory: {written['cwd']}"
    assert TOKEN not in worker.log()
    assert os.environ.get("HELIOS_API_TOKEN") != TOKEN  # the test's own environment stays clean
