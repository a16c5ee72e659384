"""PRADA on the bundled mnist victim: when each attack is flagged, and how often benign
streams are.

    python benchmarks/prada.py                 # budget 2,000 (dfme: 20,000), seed 0
    python benchmarks/prada.py --budget 1000 --only hard_boundary spsg

Every stream goes through one :class:`~mextract.defences.detection.Prada` client in
front of the victim (the `fast` CNN of ``runs/bench-art/victim``, trained if absent),
with ``check_every=1`` (Algorithm 1), so the full ``W`` history of each stream is kept
and the first alarm for any threshold ``δ`` is read off it afterwards.

* Benign streams: natural images in random order — the test set (1,000 images, 20
  orders) and the attacker's pool (2,000 images, 10 orders), neither seen by the
  calibration.
* Calibration (:func:`~mextract.defences.detection.calibrate_delta`): the owner's own
  training data (2,000 images) in 10 random orders; ``δ`` is the lowest ``W`` they reach.
* Attack streams: every attack of the catalogue against the API it is made for (soft
  attacks get probabilities, hard-label attacks labels). The stream of a non-adaptive
  attack does not depend on its substitute's training, so those run with one training
  epoch to save time; adaptive ones (active, dfme) train as usual.

Two monitors watch every stream: PRADA as published (distances to the growing sets) and
the ``compare_to="all"`` variant (distances to every earlier query of the class). The
table gives each stream's first alarm under the paper's MNIST ``δ = 0.95`` and under the
calibrated ``δ``, as a query number and as a share of the attack's budget. Histories go
to ``--out`` and are reused on a re-run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from mextract.attacks import create_attack
from mextract.attacks.registry import parse_attack_spec
from mextract.data import load_splits
from mextract.defences.detection import PRADA_DELTA_MNIST, Prada, calibrate_delta
from mextract.experiments import train_victim_run
from mextract.metrics import predict_labels
from mextract.models import load_checkpoint
from mextract.oracle import VictimOracle

#: (attack spec, answer mode, adaptive (its queries depend on its training), fixed budget)
ATTACK_ROWS: list[tuple[str, str, bool, int | None]] = [
    ("kd", "probs", False, None),
    ("kd_erasing", "probs", False, None),
    ("spsg", "probs", False, None),
    ("marich", "probs", True, None),
    ('knockoff:{"policy": "random"}', "probs", False, None),
    ("dfme", "probs", True, 20_000),
    ("hard", "label", False, None),
    ('hard_augment:{"flip": false}', "label", False, None),
    ("hard_boundary", "label", False, None),
    ("hard_mixup", "label", False, None),
    ("active_hard", "label", True, None),
]
VARIANTS = ("growing", "all")


def first_alarm(history: list[tuple[int, float]], delta: float) -> int | None:
    """The 0-based query index of the first test with ``W < delta`` (``None``: never)."""
    return next((i for i, w in history if w < delta), None)


def monitors() -> dict[str, Prada]:
    """The paper's PRADA and the all-earlier-queries variant; alarms are read off each
    ``W`` history afterwards (``delta`` here only decides what the live monitor logs)."""
    return {v: Prada(delta=1e-9, compare_to=v) for v in VARIANTS}


def stream_history(victim: Any, x: torch.Tensor) -> dict[str, list]:
    out = {}
    for variant, monitor in monitors().items():
        monitor.observe("s", x, predict_labels(victim, x))
        out[variant] = monitor.report("s").w_history
    return out


def attack_history(victim: Any, splits: Any, spec: str, mode: str, adaptive: bool, budget: int) -> dict:
    name, options = parse_attack_spec(spec)
    if not adaptive:
        options["train"] = {"epochs": 1}
    api = VictimOracle(victim, input_shape=(1, 28, 28), num_classes=10, mode=mode)
    watched = api
    ms = monitors()
    for monitor in ms.values():  # both watch the same stream; the ledger counts each query once
        watched = monitor.client("attacker", watched)
    create_attack(name, **options)(watched, splits.pool.unlabeled(), budget, substitute="cnn", seed=0)
    return {"queries": api.ledger.count, **{v: m.report("attacker").w_history for v, m in ms.items()}}


def cached(path: Path, make: Any) -> Any:
    if path.is_file():
        return json.loads(path.read_text())
    value = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))
    return value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=int, default=2000)
    p.add_argument("--only", nargs="*", default=None, help="run only attacks whose spec starts with these")
    p.add_argument("--out", type=Path, default=Path("runs/bench-prada"))
    args = p.parse_args()
    victim_dir = Path("runs/bench-art")
    train_victim_run(victim_dir, dataset="mnist", seed=0)
    victim, _ = load_checkpoint(victim_dir / "victim")
    splits = load_splits("mnist", seed=0)

    def orders(x: torch.Tensor, n: int, base: int) -> list[torch.Tensor]:
        return [
            x[torch.randperm(len(x), generator=torch.Generator().manual_seed(base + i))] for i in range(n)
        ]

    owner = [(x, predict_labels(victim, x)) for x in orders(splits.victim_train.x, 10, 0)]
    deltas = cached(
        args.out / "delta.json", lambda: {v: calibrate_delta(owner, compare_to=v) for v in VARIANTS}
    )
    benign = {
        **{f"test-{i}": s for i, s in enumerate(orders(splits.test.x, 20, 100))},
        **{f"pool-{i}": s for i, s in enumerate(orders(splits.pool.x, 10, 200))},
    }
    benign_h = {k: cached(args.out / f"benign-{k}.json", lambda s=s: stream_history(victim, s))
                for k, s in benign.items()}  # fmt: skip
    for v in VARIANTS:
        lows = sorted(min(w for _, w in h[v]) for h in benign_h.values())
        print(f"{v}: calibrated delta (lowest W of 10 streams of the owner's data) {deltas[v]:.4f}; "
              f"benign streams' lowest W: min {lows[0]:.4f}, median {lows[len(lows) // 2]:.4f}")  # fmt: skip
        for d, label in ((PRADA_DELTA_MNIST, "delta 0.95"), (deltas[v], "calibrated delta")):
            fa = sum(first_alarm(h[v], d) is not None for h in benign_h.values())
            print(f"  {label}: false alarms on {fa}/{len(benign_h)} benign streams")

    print("\nfirst alarm: query number (share of the budget) at delta 0.95 / calibrated delta")
    print(
        "| attack | answers | queries | PRADA min W | PRADA alarm | all-queries min W | all-queries alarm |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for spec, mode, adaptive, fixed in ATTACK_ROWS:
        if args.only and not any(spec.startswith(o) for o in args.only):
            continue
        b = fixed or args.budget
        name = spec.split(":")[0]
        out = cached(args.out / f"attack-{name}-{hashlib.sha1(spec.encode()).hexdigest()[:8]}-{b}.json",
                     lambda a=(spec, mode, adaptive, b): attack_history(victim, splits, *a))  # fmt: skip

        def fmt(i: int | None, b: int = b) -> str:
            return "none" if i is None else f"{i + 1} ({100 * (i + 1) / b:.1f}%)"

        cells = []
        for v in VARIANTS:
            h = out[v]
            low = min((w for _, w in h), default=float("nan"))
            cells += [
                f"{low:.4f}",
                f"{fmt(first_alarm(h, PRADA_DELTA_MNIST))} / {fmt(first_alarm(h, deltas[v]))}",
            ]
        print(f"| `{spec}` | {mode} | {out['queries']:,} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
