"""The attack × defence matrix, and the sources' stage 3, from one call.

For each defence (a spec of :mod:`mextract.defences.registry`, ``none`` for the plain
API) the owner-side utility — honest users' top-1 accuracy through the defended API —
is measured once; then every attack runs against a fresh copy of the defended API with
the same budget. Each cell records the substitute's test accuracy and fidelity, the
queries the ledger counted, and, when enabled, the trigger watermark's success rate
(WSR) on the substitute, DAWN's and the cosine watermark's verification of the
substitute, and PRADA's first alarm. An attack that cannot run against a defence (a
soft-label attack against a label-only API) is recorded as not applicable with the reason.

The matrix is a plan (:func:`matrix_plan`) for the one experiments runner
(:func:`~mextract.experiments.run_plan`): every cell is a JSON record in the run folder's
``records/``, keyed by its whole configuration; re-running reuses finished cells.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mextract.attacks.base import Callback, check_budget
from mextract.attacks.registry import check_attack_spec
from mextract.data import dataset_info, load_splits
from mextract.defences.adversarial import PGDConfig
from mextract.defences.registry import check_defence_spec
from mextract.errors import InputError, MextractError
from mextract.experiments.backends import Backend, failures_message, run_plan
from mextract.experiments.plan import CellSpec, Plan, VictimSpec
from mextract.experiments.records import Record
from mextract.models import default_model_for
from mextract.oracle import APIDescription

logger = logging.getLogger(__name__)

#: The sources' stage 3: honey labels (margin 1.5) on a label API, a 3×3 trigger watermark
#: in the victim, attacked by their four hard-label strategies.
STAGE3_DEFENCES = ("honey",)
STAGE3_ATTACKS = ("hard", 'hard_augment:{"flip": false}', "hard_boundary", "hard_mixup")

#: The full matrix: every defence that wraps the API, at its defaults, and DAWN paired with
#: label-only answers (which keeps its mark in distilled substitutes), the cosine watermark
#: alone and under DAWN (the owner's mark for soft- and hard-label thieves), and MAD both as
#: published (ε = 1 may move the top-1 label) and as MAD-argmax (it may not). The noise defence
#: has no default privacy level; ε = 10 per query (Laplace scale 2/ε = 0.2 on each
#: probability) is weak privacy, yet noise of the order of a confident answer's margin.
#: Adversarial training changes the victim itself: ``--pgd-eps``.
FULL_DEFENCES = (
    "none",
    "honey",
    "topk",
    "rounding",
    "label_only",
    "reverse_sigmoid",
    'dp_noise:{"epsilon": 10}',
    "mad",
    'mad:{"argmax": true}',
    "adaptive_misinformation",
    "dawn",
    "dawn+label_only",
    "cosine",
    "cosine+dawn",
)
#: Every learning-based attack of the catalogue that runs on an in-domain pool at an
#: MNIST-size budget: knockoff with an in-domain random policy is ``kd`` and is left out,
#: as are the data-free ``dfme`` and ``dfme_hard``, which need thousands of queries (DFME:
#: 92.5% fidelity on mnist at 20,000; ``docs/attacks.md``).
FULL_ATTACKS = (
    "kd",
    "kd_erasing",
    "spsg",
    "marich",
    "hard",
    'hard_augment:{"flip": false}',
    "hard_boundary",
    "hard_mixup",
    "active_hard",
)


def matrix_plan(
    *,
    defences: Sequence[str],
    attacks: Sequence[str],
    budget: int,
    dataset: str = "mnist",
    seed: int = 0,
    trigger_target: int | None = None,
    adversarial: PGDConfig | None = None,
    detect: bool = False,
) -> Plan:
    """The matrix as a plan: one victim, each defence's honest-user cost, and every attack
    against every defence at ``budget`` (the trigger, DAWN and cosine checks where they apply)."""
    info = dataset_info(dataset)
    arch = default_model_for(info.input_shape)
    # the whole plan is checked before any work: names, options and values of every spec
    for spec in defences:
        check_defence_spec(spec, info.input_shape, info.num_classes, arch, seed)
    plain = APIDescription(info.input_shape, info.num_classes, value_range=info.value_range)  # undefended
    planned = [check_attack_spec(spec, plain, budget) for spec in attacks]
    if trigger_target is not None and not 0 <= trigger_target < info.num_classes:
        raise InputError(
            f"trigger_target: expected a class of {dataset} (0..{info.num_classes - 1}), got {trigger_target}"
        )
    pool_size = load_splits(dataset, seed=seed).describe()["pool"]
    for planned_attack in planned:
        check_budget(planned_attack, budget, pool_size)
    victim = VictimSpec(
        dataset=dataset,
        split_seed=seed,
        trigger_target=trigger_target,
        adversarial=None if adversarial is None else asdict(adversarial),
    )
    measures = ("trigger", "dawn", "cosine")
    cells = []
    for d in defences:
        cells.append(
            CellSpec(kind="defence", victim=victim, protection=d, defence=d, detect=detect, seed=seed)
        )
        cells += [
            CellSpec(
                kind="cell",
                victim=victim,
                protection=d,
                defence=d,
                detect=detect,
                attack=a,
                budget=budget,
                seed=seed,
                measures=measures,
            )
            for a in attacks
        ]
    return Plan("matrix", cells)


def run_matrix(
    out: str | Path,
    *,
    defences: Sequence[str],
    attacks: Sequence[str],
    budget: int,
    dataset: str = "mnist",
    seed: int = 0,
    trigger_target: int | None = None,
    adversarial: PGDConfig | None = None,
    detect: bool = False,
    device: str | None = None,
    callback: Callback | None = None,
    resume: bool = True,
    jobs: int = 1,
    threads: int = 1,
    backend: Backend = "local",
    address: str | None = None,
) -> list[Record]:
    """Run every attack against every defence; returns the victim, utility and cell records.

    Args:
        defences: defence specs (``"none"``, ``"honey"``, ``'dp_noise:{"epsilon": 1}'``,
            stacks with ``+``); ``dawn`` is DAWN's API watermark.
        attacks: attack specs (``"kd"``, ``'hard_augment:{"flip": false}'``).
        trigger_target: embed the sources' 3×3 trigger watermark, mapped to this class, in
            the victim (and report WSR on every substitute).
        adversarial: train the victim with PGD adversarial training (a defence in the
            victim itself; its cost is the victim record's test accuracy).
        detect: put PRADA in front of every API and report its first alarm per attack.
        jobs, threads, backend, address: where the cells run (:func:`~mextract.experiments.run_plan`).
    """
    plan = matrix_plan(
        defences=defences,
        attacks=attacks,
        budget=budget,
        dataset=dataset,
        seed=seed,
        trigger_target=trigger_target,
        adversarial=adversarial,
        detect=detect,
    )
    result = run_plan(
        plan,
        out,
        backend=backend,
        jobs=jobs,
        threads=threads,
        address=address,
        device=device,
        callback=callback,
        resume=resume,
    )
    if result.failed:
        raise MextractError(failures_message(result))
    return result.records


def matrix_table(records: Sequence[Record]) -> str:
    """A Markdown table: one row per (defence, attack) cell, with the defence's utility."""
    utility = {r.name: r.metrics for r in records if r.kind == "defence"}
    victim = next((r for r in records if r.kind == "victim"), None)
    lines = []
    if victim is not None:
        extra = ""
        if "trigger_wsr" in victim.metrics:
            extra = f", trigger WSR {100 * victim.metrics['trigger_wsr']:.2f}%"
        lines.append(
            f"victim: {victim.name} on {victim.config.get('dataset')}, "
            f"test accuracy {100 * victim.metrics['test_accuracy']:.2f}%{extra}\n"
        )
    cols = [
        "defence",
        "honest acc",
        "attack",
        "queries",
        "test acc",
        "fidelity",
        "WSR",
        "DAWN",
        "CosWM",
        "PRADA alarm",
    ]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def pct(v: Any) -> str:
        return "–" if not isinstance(v, float) else f"{100 * v:.2f}%"

    cells = [r for r in records if r.kind == "cell"]

    # group by defence, then attack, in the order of the full matrix, then of first
    # appearance (cells of a resumed or extended run come back in the order they were computed)
    def ranks(known: Sequence[str], key: str) -> dict[str, int]:
        seen = dict.fromkeys([*known, *(r.config[key] for r in cells)])
        return {name: i for i, name in enumerate(seen)}

    d_rank, a_rank = ranks(FULL_DEFENCES, "defence"), ranks(FULL_ATTACKS, "attack")
    cells.sort(key=lambda r: (d_rank[r.config["defence"]], a_rank[r.config["attack"]]))
    for r in cells:
        d, m = r.config["defence"], r.metrics
        if m.get("status", "ok") != "ok":
            row = [
                d,
                pct(utility.get(d, {}).get("honest_accuracy")),
                r.config["attack"],
                "n/a",
                "",
                "",
                "",
                "",
                "",
                "",
            ]
        else:
            dawn = "–"
            if "dawn_marks" in m:
                dawn = f"{pct(m['dawn_wsr'])} of {m['dawn_marks']} (p={m['dawn_p']:.1e})"
            cosine = "–"
            if "cosine_p" in m:
                cosine = f"z={m['cosine_z']:.1f} (p={m['cosine_p']:.1e})"
            alarm = "–"
            if "prada_flagged" in m:
                alarm = f"query {m['prada_first_alarm'] + 1}" if m["prada_flagged"] else "none"
            row = [
                d,
                pct(utility.get(d, {}).get("honest_accuracy")),
                r.config["attack"],
                f"{m['queries']:,}",
                pct(m.get("test_accuracy")),
                pct(m.get("fidelity")),
                pct(m.get("trigger_wsr")),
                dawn,
                cosine,
                alarm,
            ]
        lines.append("| " + " | ".join(row) + " |")
    benign = [(k, v) for k, v in utility.items() if "prada_benign_flagged" in v]
    if benign:
        flagged = sum(bool(v["prada_benign_flagged"]) for _, v in benign)
        lines.append(
            f"\nPRADA false alarms on benign streams (test set, random order): {flagged}/{len(benign)}"
        )
    # the same cells at a glance: the substitute's fidelity, one column per attack
    defences = list(dict.fromkeys(r.config["defence"] for r in cells))
    attacks = list(dict.fromkeys(r.config["attack"] for r in cells))
    grid = {(r.config["defence"], r.config["attack"]): r.metrics for r in cells}
    lines += [
        "\nFidelity of the substitute (n/a: the attack cannot run against that API):\n",
        "| defence | honest acc | " + " | ".join(attacks) + " |",
        "|---|---:|" + "---:|" * len(attacks),
    ]
    for d in defences:
        row = [d, pct(utility.get(d, {}).get("honest_accuracy"))]
        for a in attacks:
            cell = grid.get((d, a))
            ok = cell is not None and cell.get("status", "ok") == "ok"
            row.append("" if cell is None else pct(cell.get("fidelity")) if ok else "n/a")
        lines.append("| " + " | ".join(row) + " |")
    # the API marks at a glance: the p-value of each verification, one column per attack
    tests = (("DAWN", "dawn_p"), ("CosWM", "cosine_p"))
    marked = [d for d in defences if any(k in m for (dd, _), m in grid.items() if dd == d for _, k in tests)]
    if marked:
        lines += [
            "\nOwnership verification of the substitute: p-values of DAWN's binomial test and of the "
            "cosine watermark's key test (verified when below 1e-3):\n",
            "| defence | " + " | ".join(attacks) + " |",
            "|---|" + "---:|" * len(attacks),
        ]
        for d in marked:
            row = [d]
            for a in attacks:
                m = grid.get((d, a)) or {}
                parts = [f"{name} {m[k]:.1e}" for name, k in tests if k in m]
                row.append(", ".join(parts) if parts else "n/a")
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"
