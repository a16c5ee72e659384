"""The command line end to end on a tiny tabular victim, and its error messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mextract.cli import app
from mextract.experiments import load_records

runner = CliRunner()


def test_list_names_everything() -> None:
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0
    for word in ("mnist", "cifar10", "resnet18", "vgg11", "kd", "hard", "label", "honey", "cosine"):
        assert word in result.output


def test_train_attack_report_round_trip(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = runner.invoke(
        app, ["train-victim", "--out", str(out), "--dataset", "breast_cancer", "--device", "cpu"]
    )
    assert r.exit_code == 0, r.output
    assert (out / "victim" / "model.safetensors").is_file() and (out / "victim.json").is_file()
    rec_file = tmp_path / "kd.json"
    r = runner.invoke(app, ["attack", str(out / "victim"), "--attack", "kd", "--budget", "100",
                            "--option", "train={\"epochs\": 20, \"batch_size\": 32}",
                            "--out", str(out), "--record", str(rec_file), "--device", "cpu"])  # fmt: skip
    assert r.exit_code == 0, r.output
    record = json.loads(rec_file.read_text())
    assert record["metrics"]["queries"] == 100 and record["metrics"]["fidelity"] > 0.85
    assert record["config"]["mode"] == "probs" and record["versions"]["torch"]
    assert (out / "substitute-kd-probs-100-s0" / "model.safetensors").is_file()
    records = load_records(out)
    assert [x.kind for x in records] == ["victim", "attack"]
    r = runner.invoke(app, ["report", str(out), "--markdown"])
    assert r.exit_code == 0 and "| kd | probs | 100 |" in r.output


def test_attack_option_dict_is_parsed_into_a_train_config(tmp_path: Path) -> None:
    from mextract.cli.main import _parse_options

    assert _parse_options(["temperature=2", "name=x"]) == {"temperature": 2, "name": "x"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train-victim", "--out", "{tmp}/x", "--dataset", "mnsit"], "unknown dataset 'mnsit'"),
        (["train-victim", "--out", "{tmp}/x", "--model", "resnet50"], "unknown model 'resnet50'"),
        (["attack", "{tmp}/nowhere"], "expected a checkpoint folder"),
        (["train-victim", "--out", "{tmp}/x", "--dataset", "cifar10"], "MEXTRACT_CIFAR10"),
    ],
)
def test_errors_are_one_clear_line(tmp_path: Path, args: list[str], message: str) -> None:
    """Through the real entry point: exit code 2 and a message, never a traceback."""
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    proc = subprocess.run(
        [sys.executable, "-c", "from mextract.cli import main; main()", *argv],
        capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr.replace("\n", " ")
    assert "Traceback" not in proc.stderr


def test_attack_with_an_out_of_domain_pool(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = runner.invoke(app, ["train-victim", "--out", str(out), "--dataset", "digits", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    rec_file = tmp_path / "ko.json"
    r = runner.invoke(
        app,
        ["attack", str(out / "victim"), "--attack", "knockoff", "--option", 'policy="adaptive"',
         "--option", 'train={"epochs": 2}', "--pool-dataset", "mnist", "--budget", "64",
         "--record", str(rec_file), "--device", "cpu"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    record = json.loads(rec_file.read_text())
    assert record["config"]["pool_dataset"] == "mnist" and record["metrics"]["queries"] == 64


def test_matrix_records_every_cell_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "matrix"
    args = ["matrix", "--out", str(out), "--dataset", "digits", "--budget", "300", "--detect",
            "-d", "none", "-d", "label_only", "-d", 'dawn:{"fraction": 0.05}', "-d", "cosine",
            "-a", 'kd:{"train": {"epochs": 20}}', "-a", 'hard:{"train": {"epochs": 20}}',
            "--device", "cpu"]  # fmt: skip
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    records = load_records(out)
    cells = [x for x in records if x.kind == "cell"]
    assert len(cells) == 8 and sum(x.kind == "defence" for x in records) == 4
    by = {(c.config["defence"].split(":")[0], c.name): c.metrics for c in cells}
    for key in by:  # kd against a label API distils one-hot answers
        assert by[key]["status"] == "ok" and by[key]["queries"] == 300 and by[key]["fidelity"] > 0.5
        assert by[key]["budget"] == 300
        # natural pool images, drawn at random: PRADA must not take these thieves for probers
        assert by[key]["prada_flagged"] is False and by[key]["prada_first_alarm"] is None
    benign = {x.name: x.metrics["prada_benign_flagged"] for x in records if x.kind == "defence"}
    assert benign["none"] is False and benign["label_only"] is False  # the test set, in random order
    assert by[("dawn", "hard")]["dawn_marks"] > 5 and "dawn_wsr" in by[("dawn", "hard")]
    assert 0 < by[("cosine", "kd")]["cosine_p"] <= 1 and "cosine_z" in by[("cosine", "hard")]
    table = (out / "matrix.md").read_text()
    assert "| label_only |" in table and "Fidelity of the substitute" in table
    pivot, marks = table.split("Fidelity of the substitute")[1].split("Ownership verification")
    assert pivot.count("| dawn:") == 1 and "| kd:" in pivot.splitlines()[2]  # one row per defence
    assert "| dawn:" in marks and "| cosine | CosWM" in marks and "| none" not in marks
    assert runner.invoke(app, args).exit_code == 0  # a re-run reuses every record
    assert [x.created for x in load_records(out)] == [x.created for x in records]
    r = runner.invoke(app, ["report", str(out)])  # the matrix tables, from the records alone
    assert r.exit_code == 0 and r.output.strip() == table.strip()


def test_matrix_prada_flags_the_prober_and_not_the_natural_thief(tmp_path: Path) -> None:
    """SPSG's superpixel probes are synthetic: PRADA flags them; kd's random pool images are not."""
    out = tmp_path / "m"
    args = ["matrix", "--out", str(out), "--dataset", "digits", "--budget", "300", "--detect",
            "-d", "none", "-a", 'spsg:{"train": {"epochs": 5}}', "-a", 'kd:{"train": {"epochs": 5}}',
            "--device", "cpu"]  # fmt: skip
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    cells = {x.name: x.metrics for x in load_records(out) if x.kind == "cell"}
    assert cells["spsg"]["prada_flagged"] is True and cells["spsg"]["prada_first_alarm"] < 300
    assert cells["kd"]["prada_flagged"] is False


def test_matrix_checks_its_plan_before_training(tmp_path: Path) -> None:
    """The library checks too (not only the command line): a bad spec fails before the victim."""
    from mextract.errors import InputError, UnknownNameError
    from mextract.experiments import run_matrix

    out = tmp_path / "m"
    with pytest.raises(InputError, match="epsilon"):
        run_matrix(out, defences=["none", "dp_noise"], attacks=["hard"], budget=10, dataset="digits")
    with pytest.raises(UnknownNameError, match="did you mean 'hard'"):
        run_matrix(out, defences=["none"], attacks=["hadr"], budget=10, dataset="digits")
    with pytest.raises(InputError, match="temperature"):
        run_matrix(out, defences=["none"], attacks=['kd:{"temperature": 0}'], budget=10, dataset="digits")
    assert not out.exists()


def test_a_victim_trained_on_files_can_be_attacked(tmp_path: Path) -> None:
    """No dataset name: the pool and test files are read against the checkpoint's declared range."""
    import numpy as np

    from mextract.experiments import attack_run, train_victim_run

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 5)) * 3
    for name, n in (("v", 90), ("p", 60), ("t", 30)):
        y = rng.integers(0, 3, n)
        np.savez(tmp_path / f"{name}.npz", x=centres[y] + rng.normal(size=(n, 5)), y=y)
    out = tmp_path / "run"
    files = {k: tmp_path / f"{k[0]}.npz" for k in ("victim_data", "pool_data", "test_data")}
    train_victim_run(out, dataset=None, device="cpu", **files)
    rec = attack_run(out / "victim", attack="kd", budget=60, pool_data=files["pool_data"],
                     test_data=files["test_data"], attack_options={"train": {"epochs": 30}},
                     device="cpu")  # fmt: skip
    assert rec.metrics["queries"] == 60 and rec.metrics["fidelity"] > 0.8
