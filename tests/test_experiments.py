"""The experiments layer: plans, cell keys, run_cell, backends, resume, the audit command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mextract.cli.main import app
from mextract.errors import InputError, UnknownNameError
from mextract.experiments import (
    CellSpec,
    Plan,
    VictimSpec,
    audit_plan,
    load_records,
    log_budgets,
    matrix_plan,
    run_plan,
)
from mextract.metrics import answer_shift, expected_calibration_error

DIGITS = VictimSpec(dataset="digits")


def _tiny_plan(detect: bool = True) -> Plan:
    cells = [CellSpec(kind="defence", victim=DIGITS, protection="none", detect=detect)]
    for defence in ("none", "rounding"):
        for attack, answers in (("kd", "soft"), ("hard", "label")):
            cells.append(
                CellSpec(
                    kind="cell",
                    victim=DIGITS,
                    protection=defence,
                    defence=defence,
                    detect=detect,
                    attack=attack,
                    thief=f"{attack}-{answers}",
                    answers=answers,
                    budget=40,
                    seed=1,
                    measures=("dawn",),
                )
            )
    return Plan("tiny", cells)


def _metrics(records: list) -> dict[str, dict]:  # type: ignore[type-arg]
    """Every record's metrics by key, without the wall times."""
    out = {}
    for r in records:
        m = {k: v for k, v in r.metrics.items() if k != "wall_time_s"}
        hist = [{k: v for k, v in h.items() if k != "elapsed_s"} for h in r.history]
        out[r.key] = {"metrics": m, "history": hist}
    return out


# --------------------------------------------------------------------------- plans and keys


def test_cell_keys_cover_the_whole_configuration() -> None:
    base = CellSpec(kind="cell", victim=DIGITS, attack="kd", budget=10)
    same = CellSpec(kind="cell", victim=VictimSpec(dataset="digits"), attack="kd", budget=10)
    assert base.key("abc") == same.key("abc")
    changed = [
        base.model_copy(update={"detect": True}),
        base.model_copy(update={"budget": 11}),
        base.model_copy(update={"seed": 1}),
        base.model_copy(update={"defence": "rounding"}),
        base.model_copy(update={"victim": VictimSpec(dataset="mnist")}),
        base.model_copy(update={"victim": VictimSpec(dataset="digits", adversarial={"eps": 0.1})}),
        base.model_copy(update={"victim": VictimSpec(dataset="digits", split_seed=1)}),
    ]
    keys = {base.key("abc"), base.key("abd"), *(c.key("abc") for c in changed)}
    assert len(keys) == len(changed) + 2  # every change, and the victim's weights, change the key


def test_cell_specs_refuse_incomplete_thieves() -> None:
    # pydantic reports them as a ValidationError (a ValueError) carrying the message
    with pytest.raises(ValueError, match="attack"):
        CellSpec(kind="cell", victim=DIGITS, budget=10)
    with pytest.raises(ValueError, match="budget"):
        CellSpec(kind="cell", victim=DIGITS, attack="kd", budget=0)
    with pytest.raises(ValueError, match="pool"):
        CellSpec(kind="cell", victim=DIGITS, attack="kd", budget=5, data="out-of-domain")
    assert CellSpec(kind="cell", attack="hard", budget=1, answers="label", defence="dawn").api_spec == (
        "dawn+label_only"
    )


def test_log_budgets() -> None:
    assert log_budgets(100, 1000) == [100, 300, 1000]
    assert log_budgets(30, 3000) == [30, 100, 300, 1000, 3000]
    assert log_budgets(7, 7) == [7]
    with pytest.raises(InputError):
        log_budgets(10, 5)


def test_audit_plan_defaults_and_what_it_leaves_out() -> None:
    plan = audit_plan(VictimSpec(dataset="mnist"))
    cells = [c for c in plan.cells if c.kind == "cell"]
    thieves = {c.thief for c in cells}
    assert {
        "in-domain data, soft labels",
        "in-domain data, label only",
        "out-of-domain data, soft labels",
        "out-of-domain data, label only",
    } <= thieves
    exposure = [c for c in cells if c.protection == "none"]
    assert {c.budget for c in exposure} == {100, 300, 1000} and {c.seed for c in exposure} == {0, 1, 2}
    protections = {c.protection for c in plan.cells if c.kind == "defence"}
    assert {
        "none",
        "DAWN watermark",
        "adversarial training",
        "trigger watermark",
        "MAD-argmax",
    } <= protections
    variants = {v.variant for v in plan.victims}
    assert variants == {"plain", "trigger", "adversarial"}
    assert all(c.detect for c in plan.cells if c.kind != "victim")
    # DFME cannot run at 1,000 queries, nor dfme_hard at 100 or 300: said, not run
    assert any("no data, soft labels cannot run" in line for line in plan.left_out)
    assert any("no data, label only at 100, 300 queries" in line for line in plan.left_out)
    free = {(c.thief, c.budget) for c in exposure if c.data == "none"}
    assert free == {("no data, label only", 1000)}
    # out-of-domain thieves: glyphs for a single-channel victim, photo patches for colour images
    assert {c.pool for c in exposure if c.data == "out-of-domain"} == {"font_glyphs"}
    colour = audit_plan(VictimSpec(dataset="cifar10"), thieves=["ood-soft"], input_shape=(3, 32, 32),
                        num_classes=10)  # fmt: skip
    assert {c.pool for c in colour.cells if c.kind == "cell"} == {"natural_patches"}
    quick = audit_plan(VictimSpec(dataset="mnist"), quick=True)
    assert len(quick.work()) < len(plan.work()) / 3
    assert any("quick plan" in line for line in quick.left_out)
    with pytest.raises(UnknownNameError):
        audit_plan(DIGITS, thieves=["nobody"])


def test_matrix_plan_is_checked_before_any_work() -> None:
    with pytest.raises(UnknownNameError):
        matrix_plan(defences=["none"], attacks=["hadr"], budget=10, dataset="digits")
    plan = matrix_plan(defences=["none", "dawn"], attacks=["kd"], budget=10, dataset="digits", detect=True)
    assert [c.kind for c in plan.work()] == ["victim", "defence", "defence", "cell", "cell"]


# --------------------------------------------------------------------------- honest users' cost


def test_answer_shift_and_ece_by_hand() -> None:
    p = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]], dtype=torch.float64)
    assert answer_shift(p, p) == {"answer_l1": 0.0, "answer_kl": pytest.approx(0.0, abs=1e-12)}
    label = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]], dtype=torch.float64)
    shift = answer_shift(label, p)
    assert shift["answer_l1"] == pytest.approx((0.6 + 0.8) / 2)
    assert shift["answer_kl"] > 1.0  # the floor keeps KL finite, and large
    # ECE: two answers at confidence 0.7 (one right) and 0.6 (right): bins (0.6, 0.67] and (0.67, 0.73]
    y = torch.tensor([1, 1])
    assert expected_calibration_error(p, y) == pytest.approx(0.5 * 0.7 + 0.5 * 0.4)
    with pytest.raises(InputError):
        answer_shift(p, p[:1])


# --------------------------------------------------------------------------- running plans


def test_run_plan_records_resume_and_reruns_only_what_changed(tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = run_plan(_tiny_plan(), out)
    assert not first.failed and first.ran == 6 and first.reused == 0
    records = load_records(out)
    cells = [r for r in records if r.kind == "cell"]
    assert len(cells) == 4 and all(r.key for r in records)
    for r in cells:
        assert r.metrics["status"] == "ok" and r.metrics["queries"] == 40
        assert r.history and r.history[-1]["queries"] <= 40  # the learning curve is kept
        assert "prada_w" in r.metrics and r.config["thief"] and r.config["victim_digest"]
    utility = next(r for r in records if r.kind == "defence")
    assert utility.metrics["answer_l1"] == 0.0 and 0 < utility.metrics["undefended_accuracy"] <= 1
    # rounding moves a kd thief (soft answers) and not a label-only one
    by = {(r.config["defence"], r.config["answers"]): r.metrics["fidelity"] for r in cells}
    assert by[("rounding", "label")] == by[("none", "label")]
    # a rerun does nothing; a lost record is redone alone; a changed option redoes its cells
    again = run_plan(_tiny_plan(), out)
    assert again.ran == 0 and again.reused == 6
    victim = json.loads(next((out / "records").glob("victim-*.json")).read_text())
    lost = next(p for p in (out / "records").glob("cell-*.json"))
    lost.unlink()
    assert run_plan(_tiny_plan(), out).ran == 1
    assert run_plan(_tiny_plan(detect=False), out).ran == 5  # the victim is reused
    assert json.loads(next((out / "records").glob("victim-*.json")).read_text())["key"] == victim["key"]


def test_local_processes_give_identical_records(tmp_path: Path) -> None:
    plan = _tiny_plan()
    one = run_plan(plan, tmp_path / "one", jobs=1, threads=1)
    torch.set_num_threads(1)
    two = run_plan(plan, tmp_path / "two", jobs=2, threads=1)
    assert not one.failed and not two.failed
    assert _metrics(one.records) == _metrics(two.records)


def test_ray_backend_gives_identical_records(tmp_path: Path) -> None:
    plan = _tiny_plan()
    torch.set_num_threads(1)
    local = run_plan(plan, tmp_path / "local", jobs=1, threads=1)
    ray = run_plan(plan, tmp_path / "ray", backend="ray", threads=1)
    assert not ray.failed and ray.ran == 6
    assert _metrics(local.records) == _metrics(ray.records)


def test_failed_cells_are_reported_and_the_rest_kept(tmp_path: Path) -> None:
    bad = CellSpec(kind="cell", victim=DIGITS, attack="kd", budget=10, data="out-of-domain", pool="nowhere")
    plan = Plan("bad", [*_tiny_plan().cells[:2], bad])
    result = run_plan(plan, tmp_path / "run")
    assert len(result.failed) == 1 and "nowhere" in result.failed[0][1]
    assert result.ran == 3  # the victim, the defence cell and the good thief


# --------------------------------------------------------------------------- the command


def test_audit_command_end_to_end_and_restart(tmp_path: Path) -> None:
    runner = CliRunner()
    victim_run = tmp_path / "v"
    res = runner.invoke(
        app, ["train-victim", "--dataset", "digits", "--out", str(victim_run), "--device", "cpu"]
    )
    assert res.exit_code == 0, res.output
    out = tmp_path / "audit"
    args = [
        "audit",
        str(victim_run / "victim"),
        "--out",
        str(out),
        "--quick",
        "--jobs",
        "1",
        "-b",
        "30",
        "-b",
        "90",
        "--seeds",
        "2",
        "--protection",
        "rounding",
        "--protection",
        "dawn",
    ]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    output = " ".join(res.output.split())  # rich wraps long lines
    assert "rough estimate" in output and "leaves out" in output
    assert "Queries to steal a copy with 90%" in output  # the report's first lines
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "http://" not in html
    assert (out / "report.md").is_file() and json.loads((out / "report.json").read_text())
    res = runner.invoke(app, args)
    assert res.exit_code == 0 and "0 cell(s) run" in " ".join(res.output.split())
    res = runner.invoke(app, ["report", str(out)])
    assert res.exit_code == 0 and "90%" in res.output


def test_audit_of_a_prediction_api_over_http(tmp_path: Path, digits_victim) -> None:  # type: ignore[no-untyped-def]
    """`audit --url`: the thieves are clients of a real server on 127.0.0.1, each with its own
    client id (so its ledger holds its queries only); the measurements use a second client."""
    from mextract.data.base import IMAGE_RANGE
    from mextract.oracle import VictimOracle
    from mextract.server import ServedAPI, create_app, running

    victim = VictimOracle(digits_victim, input_shape=(1, 8, 8), num_classes=10, mode="probs",
                          value_range=IMAGE_RANGE, device="cpu")  # fmt: skip
    api = ServedAPI(victim, name="digits")
    out = tmp_path / "audit"
    with running(create_app(api)) as base:
        args = ["audit", "--url", f"{base}/v2/models/digits", "--dataset", "digits", "--out", str(out),
                "--quick", "--jobs", "1", "-b", "30", "-b", "90"]  # fmt: skip
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 0, res.output
        records = load_records(out)
        cells = [r for r in records if r.kind == "cell"]
        assert len(cells) == 4 and not any(r.kind == "defence" for r in records)
        for r in cells:
            assert r.metrics["status"] == "ok" and r.config["variant"] == "remote"
            assert api.spent(f"mextract-audit-{r.key[:12]}") == r.metrics["queries"] == r.config["budget"]
            assert 0 <= r.metrics["transfer_rate"] <= 1 and "transfer_rate_reference" in r.metrics
        # the thieves got soft answers and labels: their fidelity says they stole something
        assert max(r.metrics["fidelity"] for r in cells) > 0.7
        assert CliRunner().invoke(app, args).exit_code == 0  # a rerun asks the API for its description only
    assert "remote API" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--thief", "nobody"], "unknown thief 'nobody'"),
        (["--protection", "honeyy"], "did you mean 'honey'"),
        (["--url", "http://127.0.0.1:9/v2/models/x"], "--url needs --dataset"),
        (["--dataset", "digits"], "--dataset is for --url"),
        (["--address", "127.0.0.1:6379"], "--address is for --backend ray"),
        (["--backend", "spark"], "expected 'local' or 'ray'"),
        (["-b", "0"], "budgets: expected positive numbers"),
    ],
)
def test_audit_usage_errors_name_the_problem_before_any_work(
    tmp_path: Path, args: list[str], message: str
) -> None:
    res = CliRunner().invoke(app, ["audit", "--out", str(tmp_path / "a"), *args])
    assert res.exit_code == 2 and message in " ".join(res.output.split()), res.output
    assert not (tmp_path / "a").exists()  # nothing was started
