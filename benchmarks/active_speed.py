"""How long does an active hard-label extraction take? (The sources: 3–4 hours for 3,000 queries.)

    python benchmarks/active_speed.py                 # active_hard, 3,000 queries, mnist
    python benchmarks/active_speed.py --attack active --option strategy=kcenter --mode label

The victim is the bundled-mnist CNN trained on a quarter of the data (1,000 images), so
that the attacker's pool holds 3,000 images; the run selects, queries and retrains in
rounds until the budget is spent, and the script prints the wall time of the whole attack
(selection, queries and every training), the queries the ledger counted, and the
substitute's fidelity and test accuracy.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mextract._utils import seeded
from mextract.attacks import create_attack
from mextract.data import load_splits
from mextract.metrics import Evaluator
from mextract.models import create_model
from mextract.oracle import VictimOracle
from mextract.training import train_victim


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attack", default="active_hard")
    p.add_argument("--option", action="append", default=[], help="KEY=JSON attack option (repeatable)")
    p.add_argument("--mode", default="label")
    p.add_argument("--budget", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    options = {}
    for item in args.option:
        key, _, value = item.partition("=")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value

    splits = load_splits("mnist", seed=args.seed, victim_fraction=0.25)
    with seeded(args.seed):
        victim = create_model("cnn", (1, 28, 28), 10)
    train_victim(victim, splits.victim_train, "fast", seed=args.seed)
    ev = Evaluator.from_victim(victim, splits.test)
    print(f"victim: test accuracy {100 * ev.victim_accuracy:.2f}%, pool {len(splits.pool)}, threads "
          f"{torch.get_num_threads()}")  # fmt: skip

    oracle = VictimOracle(victim, input_shape=(1, 28, 28), num_classes=10, mode=args.mode)
    attack = create_attack(args.attack, **options)
    t = time.perf_counter()
    result = attack(oracle, splits.pool.unlabeled(), args.budget, evaluator=ev, seed=args.seed)
    wall = time.perf_counter() - t
    print(
        f"{args.attack} {options or ''}: {oracle.ledger.count} queries in {wall:.1f} s wall; "
        f"fidelity {100 * result.metrics['fidelity']:.2f}%, test accuracy "
        f"{100 * result.metrics['test_accuracy']:.2f}%"
    )


if __name__ == "__main__":
    main()
