"""`mextract serve` and `mextract attack --url`, as a user runs them: two real processes on
127.0.0.1 (a free port), the defended victim in one, the thief in the other."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from typer.testing import CliRunner

from mextract.cli import app

runner = CliRunner()


def _exe() -> str:
    beside = Path(sys.executable).parent / "mextract"
    exe = str(beside) if beside.is_file() else shutil.which("mextract")
    assert exe is not None, "the mextract console script is not installed (pip install -e .)"
    return exe


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_live(port: int, timeout: float = 60.0) -> None:
    """Until a server on 127.0.0.1:``port`` answers its liveness route (or ``timeout``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/v2/health/live", timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.2)


@pytest.fixture(scope="module")
def victim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    args = ["train-victim", "--out", str(out), "--dataset", "breast_cancer", "--device", "cpu"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    return out / "victim"


@pytest.fixture(scope="module")
def server(victim: Path) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    port = _free_port()
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [_exe(), "serve", str(victim), "--defence", "dawn+label_only", "--budget", "300", "--port", str(port),
         "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{base}/v2/health/ready", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the server did not start: {proc.communicate()}")
        time.sleep(0.2)
    try:
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_serve_then_steal_over_http(server: tuple[str, subprocess.Popen[str]], tmp_path: Path) -> None:
    base, _ = server
    meta = httpx.get(f"{base}/v2/models/victim").json()
    api = json.loads(meta["parameters"]["mextract_api"])
    assert api["mode"] == "label" and api["input_shape"] == [30]  # the defence's answer mode, declared
    record = tmp_path / "stolen.json"
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.run(
        [_exe(), "attack", "--url", f"{base}/v2/models/victim", "--dataset", "breast_cancer", "-a", "hard",
         "--budget", "200", "--option", 'train={"epochs": 20, "batch_size": 32}', "--record", str(record),
         "--device", "cpu", "--threads", "1"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr + proc.stdout
    rec = json.loads(record.read_text())
    assert rec["config"]["victim"] == f"{base}/v2/models/victim" and rec["config"]["mode"] == "label"
    assert rec["metrics"]["queries"] == 200 and rec["metrics"]["fidelity"] > 0.85, rec["metrics"]
    usage = httpx.get(f"{base}/v2/models/victim/usage", headers={"X-Client-Id": "mextract-attacker"}).json()
    assert usage == {"client": "mextract-attacker", "spent": 200, "remaining": 100, "burst": None}
    evaluator = {"X-Client-Id": "mextract-attacker-evaluator"}
    judge = httpx.get(f"{base}/v2/models/victim/usage", headers=evaluator)
    assert judge.json()["spent"] > 0  # the evaluator's queries are its own, not the thief's
    # the per-client budget binds: 150 more for the thief are refused before any is sent
    again = subprocess.run(
        [_exe(), "attack", "--url", f"{base}/v2/models/victim", "--dataset", "breast_cancer", "-a", "hard",
         "--budget", "150", "--device", "cpu", "--threads", "1"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert again.returncode == 2 and "will answer client 'mextract-attacker' 100 more" in " ".join(
        again.stderr.split()), again.stderr
    assert "Traceback" not in again.stderr


def test_serve_stops_cleanly_on_ctrl_c(victim: Path) -> None:
    port = _free_port()
    proc = subprocess.Popen([_exe(), "serve", str(victim), "--port", str(port), "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    _wait_live(port)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert f"http://127.0.0.1:{port}/v2/models/victim" in out and "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "{victim}", "--defence", "honeyy"], "unknown defence 'honeyy'; did you mean 'honey'?"),
        (["serve", "{victim}", "--on-alarm", "block"], "needs --detect"),
        (["serve", "{victim}", "--mode", "topk"], "--mode topk needs --k"),
        (["serve", "{victim}", "--budget", "0"], "'--budget'"),
        (["serve", "{victim}", "--port", "{busy}"], "cannot listen on 127.0.0.1"),
        (["serve", "{victim}", "--name", "a/b"], "'--name'"),
        (["serve", "{victim}", "--store", "{victim}/none.db"], "does not exist: create an account first"),
        (["serve", "{victim}", "--store", "x.db", "--budget", "5"], "budgets are the accounts'"),
        (["attack", "--url", "http://127.0.0.1:1/v2/models/v", "--api-key", "mx-1"], "--evaluator-key"),
        (["attack", "{victim}", "--url", "http://127.0.0.1:1/v2/models/x"], "exactly one"),
        (["attack", "--url", "127.0.0.1:8000"], "expected http(s)://HOST:PORT/v2/models/NAME"),
        (["attack", "--url", "http://127.0.0.1:{closed}/v2/models/victim"], "could not be reached"),
        (["attack", "{victim}", "--dataset", "mnist"], "is for --url"),
    ],
)
def test_serve_and_url_usage_errors(victim: Path, args: list[str], message: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        fill = {"victim": str(victim), "busy": str(busy.getsockname()[1]), "closed": str(_free_port())}
        result = runner.invoke(app, [a.format(**fill) for a in args], env={"COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output


def test_a_stated_mode_is_checked_against_the_apis(server: tuple[str, subprocess.Popen[str]]) -> None:
    base, _ = server
    url = f"{base}/v2/models/victim"
    wrong = runner.invoke(app, ["attack", "--url", url, "--dataset", "breast_cancer", "--mode", "probs"],
                          env={"COLUMNS": "200"})  # fmt: skip
    assert wrong.exit_code == 2 and "answers in mode label" in " ".join(wrong.output.split()), wrong.output
    args = ["attack", "--url", url, "--dataset", "mnist", "--budget", "50", "--client-id", "someone"]
    shape = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert shape.exit_code == 2 and "the API takes (30,)" in " ".join(shape.output.split()), shape.output


def test_serve_with_a_store_saves_state_on_sigterm(victim: Path, tmp_path: Path) -> None:
    from mextract.server.store import Store

    db = tmp_path / "api.db"
    made = runner.invoke(app, ["keys", "create", "alice", "--store", str(db), "--budget", "50"])
    key = made.stdout.strip().splitlines()[-1]
    port = _free_port()
    args = [_exe(), "serve", str(victim), "--store", str(db), "--port", str(port), "--device", "cpu"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/v2/models/victim"
    try:
        _wait_live(port)
        assert httpx.get(url).status_code == 401
        from mextract.oracle import RemoteOracle

        with RemoteOracle(url, api_key=key) as remote:
            remote.query(torch.rand(7, 30) * 0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    with Store(db) as store:
        assert store.spent() == {"alice": 7}
        snap = store.snapshot("alice")
        assert snap is not None and snap[0] == store.log_rows("alice")[-1][0]  # saved on the way out
