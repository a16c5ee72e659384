"""The audit's analysis and its HTML report, from synthetic records (no training, no network).

The synthetic audit: two thieves × three budgets × two seeds against seven protections (one
of them the undefended API, one a label-only API that a soft-label thief cannot attack, two in
the victim itself), with learning curves, PRADA's statistic over every stream, DAWN's
verification and the transfer of adversarial examples. The last test renders the report in
headless Chromium through ``scripts/check_report.py``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mextract.experiments.analysis import (
    detection_summary,
    fidelity_curves,
    headline,
    non_dominated,
    pareto_front,
    queries_to_fidelity,
    seed_queries,
    transfer_summary,
    verification_summary,
)
from mextract.experiments.html import write_report
from mextract.experiments.records import Record

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "scripts" / "check_report.py"
BUDGETS = (100, 1000, 10000)
SEEDS = (0, 1)
SOFT = "in-domain data, soft labels"
HARD = "out-of-domain data, hard labels"
THIEVES = {
    SOFT: {"attack": "kd", "data": "in-domain", "answers": "soft", "fid": (0.86, 0.94, 0.985)},
    HARD: {"attack": "hard_boundary", "data": "out-of-domain", "answers": "label", "fid": (0.62, 0.81, 0.91)},
}
#: label → (defence spec, victim variant, accuracy drop, answer L1, answer KL, ECE change, fidelity loss)
PROTECTIONS: dict[str, tuple[str, str, float, float, float, float, float]] = {
    "none": ("none", "plain", 0.0, 0.0, 0.0, 0.0, 0.0),
    "rounding": ("rounding", "plain", 0.0, 0.002, 0.0001, 0.0, 0.004),
    "reverse_sigmoid": ("reverse_sigmoid", "plain", 0.0, 0.41, 0.93, 0.06, 0.07),
    "label_only": ("label_only", "plain", 0.0, 0.12, 0.35, 0.03, 0.02),
    "dawn": ("dawn", "plain", 0.005, 0.01, 0.02, 0.002, 0.01),
    "adversarial training": ("none", "adversarial", 0.045, 0.08, 0.2, -0.01, 0.09),
    "trigger watermark": ("none", "trigger", 0.002, 0.001, 0.001, 0.0, 0.0),
}
ACCURACY = 0.99


def _cell(
    thief: str,
    protection: str,
    budget: int,
    seed: int,
    fidelity: float | None,
    *,
    na: str = "",
    history: list[dict[str, Any]] | None = None,
    **extra: Any,
) -> Record:
    spec = THIEVES.get(thief, {"attack": thief, "data": "in-domain", "answers": "soft"})
    defence, variant = PROTECTIONS.get(protection, (protection, "plain"))[:2]
    config = {
        "attack": spec["attack"],
        "thief": thief,
        "data": spec["data"],
        "answers": spec["answers"],
        "defence": defence,
        "variant": variant,
        "protection": protection,
        "budget": budget,
        "detect": "prada_flagged" in extra,
    }
    if na:
        metrics: dict[str, Any] = {"status": f"n/a: {na}"}
    else:
        metrics = {
            "status": "ok",
            "queries": budget,
            "budget": budget,
            "fidelity": fidelity,
            "test_accuracy": None if fidelity is None else fidelity * ACCURACY,
            "wall_time_s": budget / 500,
        }
        metrics.update(extra)
    return Record(
        kind="cell",
        name=str(spec["attack"]),
        seed=seed,
        config=config,
        metrics=metrics,
        history=history or [],
    )


def _prada(thief: str, budget: int, seed: int, shift: float = 0.0) -> dict[str, Any]:
    """A synthetic PRADA stream: W stays high for in-domain data, falls for boundary queries."""
    idx = sorted({round(10 ** (1 + k * (math.log10(budget) - 1) / 24)) - 1 for k in range(25)})
    w = []
    for i in idx:
        if thief == HARD:
            value = 0.99 - 0.04 * math.log10(i + 1) - 0.01 * seed + shift
        else:
            value = 0.97 + 0.01 * math.sin(i / 37 + seed)
        w.append([i, round(value, 4)])
    first = next((i for i, v in w if v < 0.9), None)
    return {
        "prada_w": w,
        "prada_threshold": 0.9,
        "prada_flagged": first is not None,
        "prada_first_alarm": first,
    }


def _history(budget: int, fidelity: float, *, active: bool, epochs: int = 5) -> list[dict[str, Any]]:
    """A learning curve: an active thief spends its queries round by round, a passive one at once."""
    return [
        {
            "queries": budget * (e + 1) // epochs if active else budget,
            "epoch": e,
            "fidelity": fidelity
            * ((0.6 + 0.4 * (e + 1) / epochs) if active else (0.8 + 0.2 * (e + 1) / epochs)),
            "test_accuracy": fidelity * ACCURACY,
            "elapsed_s": float(e),
        }
        for e in range(epochs)
    ]


def synthetic_records() -> list[Record]:
    records = [
        Record(
            kind="plan",
            name="audit",
            seed=0,
            metrics={
                "cells": 84,
                "estimated_s": 3600,
                "left_out": ["dfme: needs more than 10,000 queries", "mad: too slow on CPU"],
            },
        ),
        Record(
            kind="victim",
            name="cnn",
            seed=0,
            config={"dataset": "mnist", "variant": "plain"},
            metrics={"test_accuracy": ACCURACY},
        ),
        Record(
            kind="victim",
            name="cnn",
            seed=0,
            config={"dataset": "mnist", "variant": "adversarial"},
            metrics={"test_accuracy": ACCURACY - 0.045},
        ),
    ]
    for prot, (defence, variant, drop, l1, kl, dece, _) in PROTECTIONS.items():
        records.append(
            Record(
                kind="defence",
                name=prot,
                seed=0,
                config={"defence": defence, "variant": variant, "protection": prot},
                metrics={
                    "honest_accuracy": ACCURACY - drop,
                    "undefended_accuracy": ACCURACY,
                    "answer_l1": l1,
                    "answer_kl": kl,
                    "ece": 0.02 + dece,
                    "undefended_ece": 0.02,
                    "prada_benign_flagged": False,
                    "prada_benign_first_alarm": None,
                    "prada_benign_w": [[i, 0.985 - 0.002 * math.log10(i + 1)] for i in range(9, 10000, 250)],
                },
            )
        )
    for thief, spec in THIEVES.items():
        for prot, (*_, loss) in PROTECTIONS.items():
            for b, budget in enumerate(BUDGETS):
                for seed in SEEDS:
                    if prot == "label_only" and spec["answers"] == "soft":
                        records.append(_cell(thief, prot, budget, seed, None, na="soft labels needed"))
                        continue
                    fid = min(spec["fid"][b] + 0.008 * seed - loss, 1.0)
                    extra: dict[str, Any] = {}
                    if prot in ("none", "rounding"):
                        extra.update(_prada(thief, budget, seed, shift=0.004 if prot == "rounding" else 0.0))
                    if prot == "dawn":
                        extra["dawn_p"] = 1e-9 if thief == SOFT else 0.2
                    if prot == "trigger watermark":
                        wsr = (0.3, 0.7, 0.9)[b] if thief == SOFT else 0.1
                        extra.update({"trigger_wsr": wsr, "trigger_threshold": 0.5})
                    if prot == "none" and budget == BUDGETS[-1]:
                        extra.update(
                            {"fingerprint_auc": 0.98, "fingerprint_p": 1e-6}
                            if thief == SOFT
                            else {"fingerprint_auc": 0.7, "fingerprint_p": 0.03}
                        )
                        extra.update(
                            {
                                "transfer_rate": 0.35 + 0.2 * fid + 0.01 * seed,
                                "transfer_rate_reference": 0.6 + 0.01 * seed,
                                "transfer_config": "PGD eps=0.3, 40 steps",
                            }
                        )
                    history = _history(budget, fid, active=thief == HARD)
                    records.append(_cell(thief, prot, budget, seed, fid, history=history, **extra))
    return records


# ------------------------------------------------------------------- analysis by hand


def _tiny(points: dict[int, list[tuple[int, float]]]) -> list[Record]:
    """One thief against 'none': per seed, (budget, final fidelity) points."""
    return [_cell("t", "none", b, seed, f) for seed, pts in points.items() for b, f in pts]


def test_seed_queries_interpolates_in_log_queries_and_censors() -> None:
    s = seed_queries([(100, 0.8), (1000, 0.95), (10000, 0.99)], 0.90)
    assert s.status == "interpolated"
    assert s.queries == pytest.approx(100 * 10 ** (2 / 3))  # 2/3 of the way in log10 from 100 to 1000
    # non-monotone fidelity: the first budget at or above the level, from the last one below
    s = seed_queries([(100, 0.5), (1000, 0.92), (10000, 0.85)], 0.90)
    assert s.queries == pytest.approx(10 ** (2 + 0.4 / 0.42))
    s = seed_queries([(100, 0.93), (1000, 0.95)], 0.90)
    assert (s.status, s.queries) == ("at_smallest", 100)
    s = seed_queries([(100, 0.5), (1000, 0.89)], 0.90)
    assert (s.status, s.queries, s.largest_budget) == ("not_reached", None, 1000)


def test_queries_to_fidelity_mean_ci_and_censoring() -> None:
    records = _tiny(
        {0: [(100, 0.80), (1000, 0.95), (10000, 0.99)], 1: [(100, 0.85), (1000, 0.90), (10000, 0.97)]}
    )
    q = {r.level: r for r in queries_to_fidelity(records, (0.8, 0.9, 0.99, 0.999))}
    q0, q1 = 100 * 10 ** (2 / 3), 1000.0  # seed 1 reaches 90% exactly at 1,000
    est = q[0.9]
    assert est.estimate == pytest.approx(math.sqrt(q0 * q1))  # geometric mean
    half = 12.7062047 * abs(math.log(q1) - math.log(q0)) / math.sqrt(2) / math.sqrt(2)  # t(0.975, 1 df)
    assert est.ci_low == pytest.approx(math.sqrt(q0 * q1) * math.exp(-half), rel=1e-6)
    assert est.ci_high == pytest.approx(math.sqrt(q0 * q1) * math.exp(half), rel=1e-6)
    assert est.bound == "" and est.text.startswith("681 (95% CI ")
    # 99%: seed 0 at exactly 10,000, seed 1 never: a lower bound, without an interval
    assert (q[0.99].bound, q[0.99].estimate, q[0.99].ci_low) == ("≥", pytest.approx(10000), None)
    assert q[0.99].text == "≥ 10,000 (1/2 seeds not reached by 10,000)"
    assert (q[0.999].bound, q[0.999].estimate, q[0.999].text) == (">", None, "> 10,000")
    assert (q[0.8].bound, q[0.8].text) == ("≤", "≤ 100")  # reached at the smallest budget by both
    # one seed: an estimate, no interval
    one = queries_to_fidelity(_tiny({3: [(100, 0.8), (1000, 0.95)]}), (0.9,))[0]
    assert one.n_seeds == 1 and one.ci_low is None and one.estimate == pytest.approx(q0)


def test_pareto_front_on_three_points() -> None:
    assert non_dominated([(0.0, 0.0), (0.01, 0.2), (0.02, 0.1)]) == {0, 1}
    assert non_dominated([(0.0, 0.0), (0.0, 0.1), (None, 0.5)]) == {1}  # equal cost, more protection
    records = []
    for prot, drop, fid in (("none", 0.0, 0.95), ("a", 0.01, 0.75), ("b", 0.02, 0.85)):
        records.append(
            Record(
                kind="defence",
                name=prot,
                seed=0,
                config={"defence": prot, "protection": prot},
                metrics={"honest_accuracy": 0.9 - drop, "undefended_accuracy": 0.9},
            )
        )
        records += [_cell("t", prot, 100, 0, fid - 0.1), _cell("t", prot, 1000, 0, fid)]
    points = {p.protection: p for p in pareto_front(records)}
    assert points["a"].fidelity_reduction == pytest.approx(0.2)  # at the largest budget
    assert points["b"].accuracy_drop == pytest.approx(0.02)
    assert {k for k, p in points.items() if p.pareto} == {"none", "a"}


def test_synthetic_audit_analysis() -> None:
    records = synthetic_records()
    q = {(r.thief, r.level): r for r in queries_to_fidelity(records)}
    # the soft-label thief: 0.86/0.94 (seed 0), 0.868/0.948 (seed 1) at 100/1,000 → 90% in between
    expected = [10 ** (2 + (0.9 - f0) / (f1 - f0)) for f0, f1 in ((0.86, 0.94), (0.868, 0.948))]
    assert q[(SOFT, 0.9)].estimate == pytest.approx(math.sqrt(expected[0] * expected[1]))
    assert q[(HARD, 0.99)].text == "> 10,000"
    curves = {(c.thief, c.protection): c for c in fidelity_curves(records)}
    soft_none = curves[(SOFT, "none")]
    assert [p.budget for p in soft_none.points] == list(BUDGETS)
    assert soft_none.points[0].fidelity_min == pytest.approx(0.86)
    assert soft_none.points[0].fidelity_max == pytest.approx(0.868)
    assert curves[(SOFT, "label_only")].points == () and curves[(SOFT, "label_only")].not_applicable == 6
    pareto = {p.protection: p for p in pareto_front(records)}
    assert pareto["label_only"].thieves_applicable == 1 and pareto["label_only"].thieves_not_applicable == 1
    assert pareto["reverse_sigmoid"].fidelity_reduction == pytest.approx(0.07)
    assert pareto["adversarial training"].accuracy_drop == pytest.approx(0.045)
    # reverse sigmoid: no accuracy cost, 7 pt; adversarial training: 4.5 pt of accuracy, 9 pt
    assert {k for k, p in pareto.items() if p.pareto} == {"reverse_sigmoid", "adversarial training"}
    det = {(r.thief, r.protection): r for r in detection_summary(records).rows}
    assert det[(HARD, "none")].seeds_flagged == 2 and det[(SOFT, "none")].seeds_flagged == 0
    assert det[(HARD, "none")].median_first_alarm is not None
    ver = {(v.mark, v.thief): v for v in verification_summary(records)}
    assert (ver[("DAWN", SOFT)].verified, ver[("DAWN", SOFT)].cells) == (6, 6)
    assert ver[("DAWN", HARD)].verified == 0
    assert (ver[("trigger", SOFT)].verified, ver[("trigger", SOFT)].cells) == (4, 6)  # WSR ≥ 0.5
    assert ver[("trigger", SOFT)].statistic == pytest.approx((0.3 + 0.7 + 0.9) / 3)  # mean WSR
    assert ver[("trigger", SOFT)].rules == ("WSR ≥ 0.5",)
    assert (ver[("fingerprint", SOFT)].verified, ver[("fingerprint", HARD)].verified) == (2, 0)
    assert (ver[("fingerprint", SOFT)].statistic_name, ver[("fingerprint", SOFT)].statistic) == (
        "AUC",
        pytest.approx(0.98),
    )
    assert ver[("fingerprint", HARD)].median_p == pytest.approx(0.03)
    tr = transfer_summary(records)
    assert tr.best is not None and tr.best.thief == SOFT and tr.best.seed == 1
    assert tr.reference_rate == pytest.approx(0.605)
    lines = headline(records)
    assert lines[0].startswith("Queries to steal a copy with 90%/95%/99% fidelity") and SOFT in lines[0]
    assert any("Pareto-front protections" in line and "reverse_sigmoid" in line for line in lines)


def test_records_without_audit_labels() -> None:
    """The matrix's records: no thief, protection or undefended accuracy; labels are derived."""

    def cell(defence: str, variant: str = "plain", **metrics: Any) -> Record:
        config = {"defence": defence, "variant": variant, "attack": "kd", "budget": 500}
        return Record(kind="cell", name="kd", seed=0, config=config, metrics=metrics)

    records = [
        Record(
            kind="victim", name="cnn", seed=0, config={"dataset": "mnist"}, metrics={"test_accuracy": 0.98}
        ),
        Record(
            kind="defence", name="topk", seed=0, config={"defence": "topk"}, metrics={"honest_accuracy": 0.97}
        ),
        cell(
            "none",
            queries=500,
            fidelity=0.9,
            trigger_wsr=0.4,
            trigger_p=1e-5,
            fingerprint_retention=0.5,
            fingerprint_p=0.01,
        ),
        cell("topk", queries=500, fidelity=0.8),
        cell("none", "adversarial", status="n/a: no"),
    ]
    points = {p.protection: p for p in pareto_front(records)}
    assert set(points) == {"none", "topk", "adversarial training"}
    assert points["topk"].accuracy_drop == pytest.approx(0.01)  # against the plain victim's accuracy
    assert points["topk"].fidelity_reduction == pytest.approx(0.1)
    assert points["adversarial training"].thieves_not_applicable == 1
    assert queries_to_fidelity(records, (0.9,))[0].thief == "kd"
    ver = {v.mark: v for v in verification_summary(records)}
    assert (ver["trigger"].verified, ver["trigger"].rules) == (1, ("p < 0.001",))  # no threshold: its p
    assert (ver["fingerprint"].verified, ver["fingerprint"].statistic_name) == (0, "retention")


# ------------------------------------------------------------------------------ report


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_report(synthetic_records(), tmp_path_factory.mktemp("report"), title="Synthetic audit")


def test_report_files_and_self_contained_html(report: dict[str, Path]) -> None:
    assert {"html", "md", "json", "fidelity", "pareto", "detection", "transfer"} <= set(report)
    text = report["html"].read_text(encoding="utf-8")
    assert not re.search(r"""(?:src|href|action)\s*=\s*["']?\s*(?:https?:)?//""", text, re.I)
    assert "http://" not in text and "https://" not in text and "@import" not in text
    imgs = re.findall(r"<img\b[^>]*\bsrc=\"([^\"]*)\"", text)
    assert len(imgs) == 4 and all(src.startswith("data:image/png;base64,") for src in imgs)
    assert "<link" not in text and "<script src" not in text
    assert "document.body.dataset.imagesOk" in text
    # the headline's 90% line comes before any plot
    first_img = text.index("<img")
    match = re.search(r"<li>Queries to steal a copy with 90%[^<]*</li>", text)
    assert match is not None and match.start() < first_img and match.start() < 5000
    for section in (
        "Queries to fidelity",
        "Protections",
        "Detection (PRADA)",
        "Ownership verification",
        "Model deception (transfer)",
        "All cells",
        "Left out by the plan",
        "dfme: needs",
    ):
        assert section in text
    md = report["md"].read_text(encoding="utf-8")
    for name in ("fidelity", "pareto", "detection", "transfer"):
        assert f"]({name}.png)" in md and (report["md"].parent / f"{name}.png").is_file()
    assert md.index("Queries to steal a copy with 90%") < md.index("![")
    data = json.loads(report["json"].read_text())
    assert data["records"]["cell"] == 84 and data["figures"]["pareto"] == "pareto.png"
    assert data["queries"][0]["text"] and data["pareto"] and data["detection"]["rows"]


def test_report_skips_plots_without_their_records(tmp_path: Path) -> None:
    records = [r for r in synthetic_records() if r.kind == "cell" and r.config["protection"] == "none"]
    for r in records:
        for key in ("prada_w", "transfer_rate"):
            r.metrics.pop(key, None)
    paths = write_report(records, tmp_path)
    assert set(paths) == {"html", "md", "json", "fidelity"}
    text = paths["html"].read_text(encoding="utf-8")
    assert text.count("<img") == 1 and text.count("Not drawn:") == 3
    assert json.loads(paths["json"].read_text())["figures"]["transfer"] is None


def test_report_renders_in_chromium(report: dict[str, Path]) -> None:
    shot = report["html"].parent / "screenshot.png"
    proc = subprocess.run(
        [
            sys.executable,
            str(CHECK),
            str(report["html"]),
            "--screenshot",
            str(shot),
            "--json",
            "--min-images",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)
    assert result["ok"] and result["errors"] == []
    assert result["images_ok"] == result["images_total"] == 4
    assert result["pixel_std"] > 10 and result["ink"] > 0.01
    assert shot.is_file() and result["screenshot_size"][0] == 1280


def test_check_report_fails_on_a_broken_image_and_a_blank_page(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("check_report", CHECK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    page = tmp_path / "broken.html"
    script = (
        'window.addEventListener("load", function () { var i = Array.from(document.images);'
        " var ok = i.filter(function (x) { return x.complete && x.naturalWidth > 0; }).length;"
        ' document.body.dataset.imagesOk = ok + "/" + i.length; });'
    )
    broken = '<img src="data:image/png;base64,AAAA">'
    page.write_text(f"<!DOCTYPE html><html><body>{broken}<script>{script}</script></body></html>")
    result = module.check_report(page, tmp_path / "broken.png", timeout=60)
    assert not result["ok"] and (result["images_ok"], result["images_total"]) == (0, 1)
    assert any("0 of 1 images" in e for e in result["errors"]) and any("blank" in e for e in result["errors"])
