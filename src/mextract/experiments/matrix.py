"""The attack × defence matrix, and the sources' stage 3, from one call.

For each defence (a spec of :mod:`mextract.defences.registry`, ``none`` for the plain
API) the owner-side utility — honest users' top-1 accuracy through the defended API —
is measured once; then every attack runs against a fresh copy of the defended API with
the same budget. Each cell records the substitute's test accuracy and fidelity, the
queries the ledger counted, and, when enabled, the trigger watermark's success rate
(WSR) on the substitute, DAWN's and the cosine watermark's verification of the
substitute, and PRADA's first alarm. An attack that cannot run against a defence (a
soft-label attack against a label-only API) is recorded as not applicable with the reason.

Every cell is a JSON record in the run folder; re-running reuses finished cells.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mextract.attacks import create_attack
from mextract.attacks.base import Callback, check_budget
from mextract.attacks.registry import check_attack_spec, parse_attack_spec
from mextract.data import ValueRange, dataset_info, load_splits
from mextract.defences.adversarial import PGDConfig
from mextract.defences.cosine import CosineWatermark
from mextract.defences.detection import Prada
from mextract.defences.ownership import DawnWatermark, TriggerWatermark
from mextract.defences.registry import Owner, build_defence, check_defence_spec, honest_accuracy
from mextract.errors import InputError, MextractError
from mextract.experiments.records import Record, same_config
from mextract.experiments.runner import VICTIM_DIR, train_victim_run
from mextract.metrics import Evaluator
from mextract.models import default_model_for, load_checkpoint
from mextract.oracle import APIDescription, Oracle, OracleWrapper, VictimOracle

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
    "none", "honey", "topk", "rounding", "label_only", "reverse_sigmoid", 'dp_noise:{"epsilon": 10}',
    "mad", 'mad:{"argmax": true}', "adaptive_misinformation", "dawn", "dawn+label_only", "cosine",
    "cosine+dawn",
)  # fmt: skip
#: Every learning-based attack of the catalogue that runs on an in-domain pool at an
#: MNIST-size budget: knockoff with an in-domain random policy is ``kd`` and is left out,
#: as is ``dfme``, which needs tens of thousands of queries (and stays at chance on mnist
#: even then; ``docs/attacks.md``).
FULL_ATTACKS = (
    "kd", "kd_erasing", "spsg", "marich", "hard", 'hard_augment:{"flip": false}', "hard_boundary",
    "hard_mixup", "active_hard",
)  # fmt: skip


def _find(oracle: Oracle, kind: type) -> Any:
    while True:
        if isinstance(oracle, kind):
            return oracle
        if not isinstance(oracle, OracleWrapper):
            return None
        oracle = oracle.inner


def _chain(victim: torch.nn.Module, meta: dict[str, Any], spec: str, owner: Owner) -> Oracle:
    base = VictimOracle(
        victim,
        input_shape=meta["input_shape"],
        num_classes=meta["num_classes"],
        mode="probs" if spec == "none" else "logits",
        device=owner.device,
        value_range=ValueRange.from_json(meta.get("value_range"), meta["input_shape"]),
    )
    return build_defence(spec, base, owner)


def _slug(text: str) -> str:
    name = text.split(":")[0].replace("+", "_")
    return f"{name}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


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
    """
    out = Path(out)
    # the whole plan is checked before any work: names, options and values of every spec
    info = dataset_info(dataset)
    arch = default_model_for(info.input_shape)
    for spec in defences:
        check_defence_spec(spec, info.input_shape, info.num_classes, arch, seed)
    plain = APIDescription(info.input_shape, info.num_classes, value_range=info.value_range)  # undefended
    planned = [check_attack_spec(spec, plain, budget) for spec in attacks]
    if trigger_target is not None and not 0 <= trigger_target < info.num_classes:
        raise InputError(
            f"trigger_target: expected a class of {dataset} (0..{info.num_classes - 1}), got {trigger_target}"
        )
    splits = load_splits(dataset, seed=seed)
    for planned_attack in planned:
        check_budget(planned_attack, budget, len(splits.pool))
    victim_record = train_victim_run(
        out, dataset=dataset, seed=seed, device=device, callback=callback, resume=resume,
        trigger_target=trigger_target, adversarial=adversarial,
    )  # fmt: skip
    victim, meta = load_checkpoint(out / VICTIM_DIR)
    evaluator = Evaluator.from_victim(victim, splits.test, device=device)
    owner = Owner(victim=victim, train=splits.victim_train, architecture=meta["architecture"], seed=seed)
    trigger = None if trigger_target is None else TriggerWatermark(target=trigger_target)
    records = [victim_record]
    for spec in defences:
        utility = _utility(out, spec, victim, meta, owner, splits, detect, resume)
        records.append(utility)
        for attack_spec in attacks:
            if callback is not None:
                callback({"stage": "attack", "name": f"{attack_spec} vs {spec}"})
            records.append(
                _cell(
                    out,
                    spec,
                    attack_spec,
                    budget,
                    victim,
                    meta,
                    owner,
                    splits,
                    evaluator,
                    trigger,
                    detect,
                    seed,
                    device,
                    callback,
                    resume,
                )
            )
    return records


def _utility(
    out: Path,
    spec: str,
    victim: Any,
    meta: dict[str, Any],
    owner: Owner,
    splits: Any,
    detect: bool,
    resume: bool,
) -> Record:
    path = out / f"defence-{_slug(spec)}.json"
    config = {"defence": spec}
    if resume and path.is_file():
        old = Record.load(path)
        if same_config(old.config, config):
            return old
    api = _chain(victim, meta, spec, owner)
    metrics: dict[str, Any] = {"honest_accuracy": honest_accuracy(api, splits.test)}
    if detect:  # PRADA on a benign stream: the test images in a random order, one client
        monitor = Prada()
        order = torch.randperm(len(splits.test), generator=torch.Generator().manual_seed(owner.seed))
        monitor.client("benign", _chain(victim, meta, spec, owner)).query(splits.test.x[order])
        report = monitor.report("benign")
        metrics.update(
            {"prada_benign_flagged": report.flagged, "prada_benign_first_alarm": report.first_alarm}
        )
    record = Record(kind="defence", name=spec, seed=owner.seed, config=config, metrics=metrics)
    record.save(path)
    return record


def _cell(
    out: Path,
    spec: str,
    attack_spec: str,
    budget: int,
    victim: Any,
    meta: dict[str, Any],
    owner: Owner,
    splits: Any,
    evaluator: Evaluator,
    trigger: TriggerWatermark | None,
    detect: bool,
    seed: int,
    device: str | None,
    callback: Callback | None,
    resume: bool,
) -> Record:
    path = out / f"cell-{_slug(spec)}-{_slug(attack_spec)}-{budget}.json"
    config = {"defence": spec, "attack": attack_spec, "budget": budget, "detect": detect,
              "trigger_target": None if trigger is None else trigger.target}  # fmt: skip
    if resume and path.is_file():
        old = Record.load(path)
        if same_config(old.config, config) and old.seed == seed:
            return old
    api = _chain(victim, meta, spec, owner)
    monitor = Prada() if detect else None
    attacked = api if monitor is None else monitor.client("attacker", api)
    name, options = parse_attack_spec(attack_spec)
    metrics: dict[str, Any] = {}
    try:
        attack = create_attack(name, **options)
        result = attack(attacked, splits.pool.unlabeled(), budget, substitute=meta["architecture"],
                        evaluator=evaluator, seed=seed, device=device, callback=callback)  # fmt: skip
    except InputError as exc:  # e.g. a soft-label attack against a label-only API
        logger.info("%s against %s: not applicable (%s)", attack_spec, spec, exc)
        record = Record(kind="cell", name=name, seed=seed, config=config, metrics={"status": f"n/a: {exc}"})
        record.save(path)
        return record
    if result.queries != api.ledger.count:
        raise MextractError(f"internal error: {result.queries} reported, {api.ledger.count} answered")
    metrics.update(
        {
            "status": "ok",
            "queries": result.queries,
            "budget": budget,
            "wall_time_s": result.wall_time_s,
            **result.metrics,
        }
    )
    if trigger is not None and splits.test.y is not None:
        metrics["wsr"] = trigger.wsr(result.model, splits.test.x, splits.test.y)
    dawn = _find(api, DawnWatermark)
    if dawn is not None:
        verdict = dawn.verify(result.model)
        metrics.update({"dawn_marks": verdict.total, "dawn_wsr": verdict.wsr, "dawn_p": verdict.p_value})
    cosine = _find(api, CosineWatermark)
    if cosine is not None:  # against the unmarked victim: on the thief's logged queries, and
        check = cosine.verify(result.model, baseline=victim)  # on the owner's own inputs
        metrics.update({"cosine_stat": check.statistic, "cosine_z": check.z, "cosine_p": check.p_value})
        owner_x = torch.cat([splits.victim_train.x, splits.test.x])
        check = cosine.verify(result.model, owner_x, baseline=victim)
        metrics.update({"cosine_owner_z": check.z, "cosine_owner_p": check.p_value})
    if monitor is not None:
        report = monitor.report("attacker")
        metrics.update({"prada_flagged": report.flagged, "prada_first_alarm": report.first_alarm})
    record = Record(kind="cell", name=name, seed=seed, config=config, metrics=metrics, history=[])
    record.save(path)
    return record


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
                d, pct(utility.get(d, {}).get("honest_accuracy")), r.config["attack"], f"{m['queries']:,}",
                pct(m.get("test_accuracy")), pct(m.get("fidelity")), pct(m.get("wsr")), dawn, cosine, alarm,
            ]  # fmt: skip
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
