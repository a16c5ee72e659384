"""What a new user meets first: usage errors and bad values on the command line.

Usage errors go through the installed ``mextract`` console script, as a user runs it (a
fresh install has no ``click`` of its own: typer carries its copy). Bad values are checked
in-process, one row per option: each is refused with exit status 2 and a message naming
the option, before any data is read or any model trained.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mextract.cli import app
from mextract.models import create_model, save_checkpoint

runner = CliRunner()


def _flat(text: str) -> str:
    """Output with rich's panel borders and line wrapping removed."""
    return re.sub(r"\s+", " ", re.sub(r"[│╭╮╰╯─]", " ", text))


def _mextract(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the console script that ``pip install`` put beside this Python (else on the PATH)."""
    beside = Path(sys.executable).parent / "mextract"
    exe = str(beside) if beside.is_file() else shutil.which("mextract")
    assert exe is not None, "the mextract console script is not installed (pip install -e .)"
    env = {**os.environ, "COLUMNS": "120"}
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120, env=env, cwd=cwd)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "Missing command"),
        (["--bogus"], "No such option: --bogus"),
        (["attack"], "give a victim checkpoint folder or model file, or --url"),
        (["demo", "--nope"], "No such option: --nope"),
        (["direct"], "Missing command"),
        (["attack", "x", "--budget", "abc"], "'--budget'"),
        (["matrix", "-d", "honeyy", "-a", "kd"], "unknown defence 'honeyy'; did you mean 'honey'?"),
    ],
)
def test_usage_errors_through_the_console_script(tmp_path: Path, args: list[str], message: str) -> None:
    proc = _mextract(*args, cwd=tmp_path)
    out = _flat(proc.stderr)
    assert proc.returncode == 2, proc.stderr
    assert "Usage: mextract" in out and message in out
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "runs").exists()  # no work was started


@pytest.mark.parametrize(("args", "expected"), [(["--help"], "Usage: mextract"), (["list"], "mnist")])
def test_help_and_list_through_the_console_script(args: list[str], expected: str) -> None:
    proc = _mextract(*args)
    assert proc.returncode == 0, proc.stderr
    assert expected in proc.stdout and not proc.stderr


# --------------------------------------------------------------------------- bad values


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An (untrained) digits-shaped cnn checkpoint: enough for the checks, which never query it."""
    d = tmp_path_factory.mktemp("ckpt") / "victim"
    torch.manual_seed(0)
    meta = {"architecture": "cnn", "input_shape": [1, 8, 8], "num_classes": 10, "dataset": "digits",
            "split": {"seed": 0}, "classes": [str(i) for i in range(10)]}  # fmt: skip
    save_checkpoint(d, create_model("cnn", (1, 8, 8), 10), meta)
    return d


@pytest.fixture(scope="module")
def mlp_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("mlp") / "victim"
    save_checkpoint(d, create_model("mlp", (4,), 3), {"architecture": "mlp", "input_shape": [4],
                                                      "num_classes": 3, "dataset": "iris"})  # fmt: skip
    return d


BAD_VALUES = [
    # train-victim
    (["train-victim", "--out", "{out}", "--dataset", "mnsit"], "--dataset", "did you mean 'mnist'"),
    (["train-victim", "--out", "{out}", "--model", "resnet50"], "--model", "unknown model"),
    (["train-victim", "--out", "{out}", "--dataset", "iris", "--model", "cnn"], "--model", "image inputs"),
    (["train-victim", "--out", "{out}", "--preset", "fats"], "--preset", "did you mean 'fast'"),
    (["train-victim", "--out", "{out}", "--dataset", "cifar10"], "--dataset", "MEXTRACT_CIFAR10"),
    (["train-victim", "--out", "{out}", "--victim-data", "{tmp}/no.npz"], "--victim-data", "does not exist"),
    (["train-victim", "--out", "{out}", "--data-root", "{tmp}/nowhere"], "--data-root", "does not exist"),
    (["train-victim", "--out", "{out}", "--scale", "-1"], "--scale", "positive"),
    (["train-victim", "--out", "{out}", "--pgd-eps", "-0.1"], "--pgd-eps", "eps > 0"),
    (["train-victim", "--out", "{out}", "--pgd-steps", "0"], "--pgd-steps", "greater than or equal to 1"),
    (["train-victim", "--out", "{out}", "--device", "gpu"], "--device", "'gpu'"),
    (["train-victim", "--out", "{out}", "--threads", "0"], "--threads", "greater than or equal to 1"),
    (["train-victim", "--out", "{file}"], "--out", "is a file"),
    # attack
    (["attack", "{tmp}/nowhere"], "'victim'", "expected a checkpoint folder"),
    (["attack", "{ckpt}", "--attack", "kdd"], "--attack", "did you mean 'kd'"),
    (["attack", "{ckpt}", "--option", "epochs"], "--option", "expected KEY=VALUE"),
    (["attack", "{ckpt}", "--option", "nosuch=1"], "--option", "nosuch"),
    (["attack", "{ckpt}", "--option", 'train={"epochs": 0}'], "--option", "epochs"),
    (["attack", "{ckpt}", "--option", "temperature=-1"], "--option", "temperature"),
    (["attack", "{ckpt}", "--budget", "0"], "--budget", "from 1 to"),
    (["attack", "{ckpt}", "--budget", "99999999999999999999"], "--budget", "from 1 to"),
    (["attack", "{ckpt}", "--mode", "prob"], "--mode", "did you mean 'probs'"),
    (["attack", "{ckpt}", "--mode", "topk"], "--k", "needs --k"),
    (["attack", "{ckpt}", "--k", "3"], "--k", "topk"),
    (["attack", "{ckpt}", "--mode", "topk", "--k", "10"], "--k", "fewer than"),
    (["attack", "{ckpt}", "--decimals", "2"], "--decimals", "rounded"),
    (["attack", "{ckpt}", "--precision", "float16"], "--precision", "float16"),
    (["attack", "{ckpt}", "--substitute", "resnet50"], "--substitute", "unknown model"),
    (["attack", "{ckpt}", "--attack", "spsg", "--mode", "label"], "--mode", "soft answers"),
    (["attack", "{ckpt}", "--pool-dataset", "irris"], "--pool-dataset", "did you mean 'iris'"),
    (["attack", "{ckpt}", "--pool-dataset", "iris"], "--pool-dataset", "cannot be conformed"),
    (["attack", "{mlp}", "--pool-dataset", "natural_patches"], "--pool-dataset", "image input shape"),
    (["attack", "{ckpt}", "--pool-dataset", "mnist", "--pool-data", "{file}"], "--pool-dataset", "not both"),
    (["attack", "{ckpt}", "--test-data", "{tmp}/no.npz"], "--test-data", "does not exist"),
    (["attack", "{ckpt}", "--scale", "0"], "--scale", "positive"),
    (["attack", "{ckpt}", "--record", "{tmp}"], "--record", "is a folder"),
    (["attack", "{ckpt}", "--device", "xla"], "--device", "'xla'"),
    # matrix
    (["matrix", "--out", "{out}", "-d", "honeyy", "-a", "kd"], "--defence", "did you mean 'honey'"),
    (["matrix", "--out", "{out}", "-d", "dp_noise", "-a", "kd"], "--defence", "epsilon"),
    (["matrix", "--out", "{out}", "-d", "honey:{bad", "-a", "kd"], "--defence", "json"),
    (["matrix", "--out", "{out}", "-d", 'honey:{"threshold": -1}', "-a", "kd"], "--defence", "threshold"),
    (["matrix", "--out", "{out}", "-d", "none", "-a", "kdd"], "--attack", "did you mean 'kd'"),
    (["matrix", "--out", "{out}", "-d", "none", "-a", 'kd:{"temperature": -1}'], "--attack", "temperature"),
    (["matrix", "--out", "{out}", "-d", "none", "-a", 'kd:{"trian": {}}'], "--attack", "trian"),
    (["matrix", "--out", "{out}", "-d", "none", "-a", "kd", "--dataset", "mnsit"], "--dataset", "mnist"),
    (["matrix", "--out", "{out}", "-d", "none", "-a", "kd", "--budget", "-5"], "--budget", "from 1 to"),
    (["matrix", "--out", "{out}", "-d", "none", "-a", "kd", "--trigger", "10"], "--trigger", "0..9"),
    (["matrix", "--out", "{out}", "-d", "none", "-a", "kd", "--pgd-eps", "0"], "--pgd-eps", "eps > 0"),
    (["matrix", "--out", "{out}", "--stage3", "--full"], "--stage3", "not both"),
    (["matrix", "--out", "{out}", "-d", "none"], "--attack", "--full"),
    # report, demo, direct
    (["report", "{tmp}/nowhere"], "'run'", "does not exist"),
    (["report", "{tmp}"], "'run'", "no mextract records"),
    # reproduce
    (["reproduce", "imagenet"], "'EXPERIMENT'", "unknown experiment 'imagenet'"),
    (["reproduce", "cifar10", "--out", "{out}", "--scale", "huge"], "--scale", "unknown scale 'huge'"),
    (["reproduce", "cifar10", "--out", "{out}", "--time-limit", "soon"], "--time-limit", "9m"),
    (["reproduce", "cifar10", "--out", "{out}", "--data-root", "{tmp}/no"], "--data-root", "no such path"),
    (["reproduce", "cifar10", "--out", "{file}", "--data-root", "{tmp}"], "--out", "is a file"),
    (["demo", "--out", "{file}"], "--out", "is a file"),
    (["demo", "--out", "{out}", "--device", "cuda:x"], "--device", "cuda:x"),
    (["direct", "run", "--victim-kind", "relu3"], "--victim-kind", "relu3"),
    (["direct", "run", "--hidden", "0"], "--hidden", "greater than or equal to 1"),
    (["direct", "run", "--dataset", "mnsit"], "--dataset", "did you mean 'mnist'"),
    (["direct", "run", "--victim", "{ckpt}"], "--victim", "relu1 checkpoint"),
]


@pytest.mark.parametrize(
    ("args", "option", "message"), BAD_VALUES, ids=[f"{a[0]} {o} {m}" for a, o, m in BAD_VALUES]
)
def test_each_bad_value_is_refused_before_any_work(
    tmp_path: Path, ckpt: Path, mlp_ckpt: Path, args: list[str], option: str, message: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv("COLUMNS", "200")
    (tmp_path / "a-file").write_text("x")
    subs = {"{tmp}": str(tmp_path), "{out}": str(tmp_path / "out"), "{file}": str(tmp_path / "a-file"),
            "{ckpt}": str(ckpt), "{mlp}": str(mlp_ckpt)}  # fmt: skip
    argv = list(args)
    for key, value in subs.items():
        argv = [a.replace(key, value) for a in argv]
    r = runner.invoke(app, argv)
    out = _flat(r.output)
    assert r.exit_code == 2, out
    assert option in out and message in out, out
    assert "Usage: mextract" in out
    assert not (tmp_path / "out").exists()  # nothing was trained or written


# --------------------------------------------------------------------------- data at the door


def _digits_npz(path: Path, *, scale: float = 1.0, labels: bool = True) -> Path:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data[:200].reshape(-1, 1, 8, 8) / 16.0 * scale).astype(np.float32)
    arrays = {"x": x, "y": d.target[:200]} if labels else {"x": x}
    np.savez(path, **arrays)
    return path


def _digits_checkpoint(d: Path) -> Path:
    meta = {"architecture": "cnn", "input_shape": [1, 8, 8], "num_classes": 10, "dataset": "digits"}
    save_checkpoint(d, create_model("cnn", (1, 8, 8), 10), meta)
    return d


def test_float_images_in_0_255_are_named_with_the_range_found_and_expected(tmp_path: Path) -> None:
    victim = _digits_npz(tmp_path / "v.npz", scale=255.0)
    test = _digits_npz(tmp_path / "t.npz", scale=255.0)
    proc = _mextract("train-victim", "--out", str(tmp_path / "run"), "--dataset", "digits", "--device", "cpu",
                     "--victim-data", str(victim), "--test-data", str(test))  # fmt: skip
    err = _flat(proc.stderr)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert str(victim) in err and "values lie in [0, 255], expected [0, 1]" in err and "--scale 255" in err
    assert not (tmp_path / "run" / "victim").exists()


def test_scale_converts_when_asked(tmp_path: Path) -> None:
    victim = _digits_npz(tmp_path / "v.npz", scale=255.0)
    test = _digits_npz(tmp_path / "t.npz", scale=255.0)
    out = tmp_path / "run"
    args = ["train-victim", "--out", str(out), "--dataset", "digits", "--device", "cpu",
            "--victim-data", str(victim), "--test-data", str(test), "--scale", "255"]  # fmt: skip
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    meta = json.loads((out / "victim" / "model.json").read_text())
    assert meta["value_range"] == {"low": 0.0, "high": 1.0}


def test_nan_in_a_file_is_a_clear_error(tmp_path: Path) -> None:
    x = np.full((10, 1, 8, 8), 0.5, dtype=np.float32)
    x[3, 0, 2, 2] = np.nan
    np.savez(tmp_path / "p.npz", x=x)
    ckpt = tmp_path / "victim"
    _digits_checkpoint(ckpt)
    proc = _mextract("attack", str(ckpt), "--pool-data", str(tmp_path / "p.npz"), "--device", "cpu")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "p.npz" in proc.stderr and "NaN" in proc.stderr


def test_a_wrong_pool_through_the_entry_point_exits_2(tmp_path: Path) -> None:
    ckpt = tmp_path / "victim"
    _digits_checkpoint(ckpt)
    proc = _mextract("attack", str(ckpt), "--attack", "knockoff", "--pool-dataset", "iris", "--budget", "50")
    err = _flat(proc.stderr)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "'--pool-dataset'" in err and "pool 'iris'" in err


# --------------------------------------------------------------------------- budgets and threads


def test_a_budget_above_the_pool_warns_and_the_record_keeps_both(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = runner.invoke(app, ["train-victim", "--out", str(out), "--dataset", "iris", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    rec = tmp_path / "kd.json"
    proc = _mextract("attack", str(out / "victim"), "--budget", "5000", "--record", str(rec),
                     "--device", "cpu", "--option", 'train={"epochs": 2}', "--threads", "1")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    err = _flat(proc.stderr)
    assert "warning: budget 5,000 is more than attack 'kd' can spend from a pool of 60 samples" in err
    metrics = json.loads(rec.read_text())["metrics"]
    assert metrics["budget"] == 5000 and metrics["queries"] == 60
    assert "torch threads 1 of" in proc.stdout and "(--threads)" in proc.stdout  # as asked
    assert re.search(r"kd\s*│\s*probs\s*│\s*5,000\s*│\s*60\s*│", proc.stdout)  # budget beside queries
