"""DAWN's API watermark on the bundled mnist victim: does every attack's substitute carry
it, do independent models stay at chance, and what does it cost honest users?

    python benchmarks/dawn.py                      # budget 2,000, keys 0 1 2
    python benchmarks/dawn.py --keys 0 --only kd hard

For each key, every learning-based attack of the catalogue (soft ones against a
probability API, hard-label ones against a label API; then the soft ones again against
a label API, i.e. DAWN paired with label-only answers) runs against
``DawnWatermark(api, key, fraction=0.004)`` (the default) in front of the victim (the
`fast` CNN of ``runs/bench-art/victim``, trained if absent); its substitute is verified
against the marks its own queries received. Independent models — CNNs and an MLP trained
from scratch on true labels, on the owner's data with other seeds and on the attacker's
pool — are verified against the same marks: they have never seen a marked answer, so
their match rate is the false-positive side. Honest users' accuracy is the test set's
top-1 accuracy through the marked API against the plain one. Records go to ``--out`` and
are reused on a re-run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
from pathlib import Path
from typing import Any

from mextract.attacks import create_attack
from mextract.attacks.registry import parse_attack_spec
from mextract.data import load_splits
from mextract.defences.ownership import DawnWatermark
from mextract.defences.registry import honest_accuracy
from mextract.errors import InputError
from mextract.experiments import train_victim_run
from mextract.metrics import Evaluator
from mextract.models import create_model, load_checkpoint, save_checkpoint
from mextract.oracle import APIDescription, VictimOracle
from mextract.training import train_victim

#: (attack spec, answer mode)
ROWS = [
    ("kd", "probs"),
    ("kd_erasing", "probs"),
    ("spsg", "probs"),
    ("marich", "probs"),
    ("hard", "label"),
    ('hard_augment:{"flip": false}', "label"),
    ("hard_boundary", "label"),
    ("hard_mixup", "label"),
    ("active_hard", "label"),
    # does distillation memorise the marks when it trains four times longer?
    ('kd:{"train": {"epochs": 160}}', "probs"),
    # the soft-label attacks again, against an owner who pairs DAWN with label-only answers
    ("kd", "label"),
    ("kd_erasing", "label"),
    ("marich", "label"),
]
#: independent models: (name, architecture, training data, seed)
INDEPENDENT = [
    ("cnn, owner's data, seed 1", "cnn", "victim_train", 1),
    ("cnn, owner's data, seed 2", "cnn", "victim_train", 2),
    ("mlp, owner's data, seed 1", "mlp", "victim_train", 1),
    ("cnn, attacker's pool, seed 3", "cnn", "pool", 3),
]


def independent_models(splits: Any, folder: Path) -> list[tuple[str, Any]]:
    """The models of ``INDEPENDENT``, trained once (the `fast` recipe) and kept in ``folder``."""
    out = []
    for label, arch, split, seed in INDEPENDENT:
        path = folder / f"independent-{arch}-{split}-{seed}"
        if (path / "model.json").is_file():
            model, _ = load_checkpoint(path)
        else:
            model = create_model(arch, (1, 28, 28), 10)
            model = train_victim(model, getattr(splits, split), "fast", seed=seed)
            meta = {"architecture": arch, "input_shape": [1, 28, 28], "num_classes": 10}
            save_checkpoint(path, model, meta)
        out.append((label, model.eval()))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=int, default=2000)
    p.add_argument("--keys", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--fraction", type=float, default=0.004)
    p.add_argument("--only", nargs="*", default=None, help="run only attacks whose spec starts with these")
    p.add_argument("--out", type=Path, default=Path("runs/bench-dawn"))
    args = p.parse_args()
    victim_dir = Path("runs/bench-art")
    train_victim_run(victim_dir, dataset="mnist", seed=0)
    victim, meta = load_checkpoint(victim_dir / "victim")
    splits = load_splits("mnist", seed=0)
    ev = Evaluator.from_victim(victim, splits.test)
    args.out.mkdir(parents=True, exist_ok=True)

    def api(mode: str) -> VictimOracle:
        return VictimOracle(victim, input_shape=(1, 28, 28), num_classes=10, mode=mode)

    plain = honest_accuracy(api("probs"), splits.test)
    marked = [honest_accuracy(DawnWatermark(api("probs"), k, fraction=args.fraction), splits.test)
              for k in args.keys]  # fmt: skip
    print(f"victim test accuracy {100 * plain:.2f}%; through DAWN (fraction {args.fraction}): "
          + ", ".join(f"{100 * a:.2f}%" for a in marked)
          + f" (keys {args.keys}); mean drop {100 * (plain - statistics.mean(marked)):.2f} points"
    )  # fmt: skip

    independent = independent_models(splits, args.out)

    print(
        "\n| attack | answers | fidelity % | marks | substitute matches | WSR | max p | independent matches |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for spec, mode in ROWS:
        if args.only and not any(spec.startswith(o) for o in args.only):
            continue
        rows = []
        for key in args.keys:
            tag = hashlib.sha1(f"{spec}|{mode}|{args.fraction}".encode()).hexdigest()[:8]
            path = args.out / f"{spec.split(':')[0]}-{tag}-{args.budget}-k{key}.json"
            if path.is_file():
                rows.append(json.loads(path.read_text()))
                continue
            dawn = DawnWatermark(api(mode), key, fraction=args.fraction)
            name, options = parse_attack_spec(spec)
            attack = create_attack(name, **options)
            try:
                attack.check_params(APIDescription.of(dawn), splits.pool.unlabeled().x, args.budget)
            except InputError as exc:  # e.g. an attack that needs probabilities, against labels
                print(f"| `{spec}` | {mode} | n/a: {exc} |")
                break
            result = attack(
                dawn,
                splits.pool.unlabeled(),
                args.budget,
                substitute=meta["architecture"],
                evaluator=ev,
                seed=0,
            )
            v = dawn.verify(result.model)
            row: dict[str, Any] = {
                "fidelity": result.metrics["fidelity"], "marks": v.total, "matches": v.matches,
                "p_value": v.p_value, "stolen": v.stolen,
                "independent": {lab: dawn.verify(m).matches for lab, m in independent},
            }  # fmt: skip
            path.write_text(json.dumps(row))
            rows.append(row)
        if not rows:
            continue
        marks = sum(r["marks"] for r in rows)
        matches = sum(r["matches"] for r in rows)
        indep = sum(sum(r["independent"].values()) for r in rows)
        fid = statistics.mean(r["fidelity"] for r in rows)
        wsr = 100 * matches / max(marks, 1)
        worst_p = max(r["p_value"] for r in rows)
        print(f"| `{spec}` | {mode} | {100 * fid:.2f} | {marks} | {matches} | {wsr:.1f}% | {worst_p:.1e} "
              f"| {indep} of {marks * len(independent)} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
