"""Every learning-based attack of the catalogue on the bundled mnist victim, side by side.

    python benchmarks/catalogue.py                       # budget 1,000, seed 0
    python benchmarks/catalogue.py --budgets 250 1000 --seeds 0 1 2

Same victim (the `fast` CNN of ``runs/bench-art/victim``, trained if absent), same
in-domain pool (2,000 images) unless a row names an out-of-domain pool, same cnn
substitute and default training schedule per attack. Each row's answer mode is the one
its attack is made for (soft attacks get probabilities, hard-label attacks labels).
Records go to ``--out`` and are reused on a re-run.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from mextract.attacks import ATTACKS, create_attack
from mextract.attacks.registry import parse_attack_spec
from mextract.data import load_splits
from mextract.data.transfer import load_pool
from mextract.experiments import train_victim_run
from mextract.experiments.records import Record
from mextract.metrics import Evaluator
from mextract.models import load_checkpoint
from mextract.oracle import VictimOracle

#: (attack spec, answer mode, out-of-domain pool or None, fixed budget or None)
ROWS: list[tuple[str, str, str | None, int | None]] = [
    ("kd", "probs", None, None),
    ("kd_erasing", "probs", None, None),
    ("spsg", "probs", None, None),
    ('active:{"strategy": "random"}', "probs", None, None),
    ('active:{"strategy": "entropy"}', "probs", None, None),
    ('active:{"strategy": "kcenter"}', "probs", None, None),
    ('active:{"strategy": "dfal"}', "probs", None, None),
    ('active:{"strategy": "dfal_kcenter"}', "probs", None, None),
    ("marich", "probs", None, None),
    ('kd:{"semi": {}}', "probs", None, None),
    ('knockoff:{"policy": "random"}', "probs", "digits", None),
    ('knockoff:{"policy": "adaptive"}', "probs", "digits", None),
    ('knockoff:{"policy": "random"}', "probs", "natural_patches", None),
    ("dfme", "probs", None, 20_000),
    ("hard", "label", None, None),
    ('hard_augment:{"flip": false}', "label", None, None),
    ("hard_boundary", "label", None, None),
    ("hard_mixup", "label", None, None),
    ("active_hard", "label", None, None),
]


def run(
    spec: str, mode: str, pool_name: str | None, budget: int, seed: int, victim: Any, splits: Any, ev: Any
) -> dict:
    name, options = parse_attack_spec(spec)
    pool = splits.pool
    if pool_name is not None:
        pool = load_pool(pool_name, (1, 28, 28), seed=seed)
        if name == "knockoff" and options.get("policy") == "adaptive":
            options["pool_labels"] = pool.y
    oracle = VictimOracle(victim, input_shape=(1, 28, 28), num_classes=10, mode=mode)
    t = time.perf_counter()
    result = create_attack(name, **options)(
        oracle, pool.unlabeled(), budget, substitute="cnn", evaluator=ev, seed=seed
    )
    return {"queries": oracle.ledger.count, "wall_time_s": time.perf_counter() - t, **result.metrics}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", type=int, nargs="+", default=[1000])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--only", nargs="*", default=None, help="run only rows whose spec starts with these")
    p.add_argument("--out", type=Path, default=Path("runs/bench-catalogue"))
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    victim_dir = Path("runs/bench-art")
    train_victim_run(victim_dir, dataset="mnist", seed=0)
    victim, _ = load_checkpoint(victim_dir / "victim")
    splits = load_splits("mnist", seed=0)
    ev = Evaluator.from_victim(victim, splits.test)
    print(f"victim: cnn on mnist, test accuracy {100 * ev.victim_accuracy:.2f}%; pool {len(splits.pool)}")
    table: list[tuple[str, str, str, int, list[dict]]] = []
    for budget in args.budgets:
        for spec, mode, pool_name, fixed in ROWS:
            if args.only and not any(spec.startswith(o) for o in args.only):
                continue
            b = fixed or budget
            if fixed is not None and budget != args.budgets[0]:
                continue
            runs = []
            for seed in args.seeds:
                key = hashlib.sha1(f"{spec}|{mode}|{pool_name}".encode()).hexdigest()[:10]
                path = args.out / f"{spec.split(':')[0]}-{key}-{b}-s{seed}.json"
                if path.is_file():
                    metrics = Record.load(path).metrics
                else:
                    metrics = run(spec, mode, pool_name, b, seed, victim, splits, ev)
                    config = {"mode": mode, "pool": pool_name or "mnist", "budget": b}
                    Record(kind="benchmark", name=spec, seed=seed, metrics=metrics, config=config).save(path)
                runs.append(metrics)
                fid, wall = 100 * metrics["fidelity"], metrics["wall_time_s"]
                print(f"  {spec} [{mode}, pool {pool_name or 'mnist'}] budget {b} seed {seed}: "
                      f"fidelity {fid:.2f}% ({wall:.1f} s)", flush=True)  # fmt: skip
            data_free = not ATTACKS[parse_attack_spec(spec)[0]].needs_pool
            label = "none (data-free)" if data_free else pool_name or "mnist (in-domain)"
            table.append((spec, mode, label, b, runs))

    def ms(v: list[float]) -> str:
        return f"{100 * statistics.mean(v):.2f}" + (
            f" ± {100 * statistics.stdev(v):.2f}" if len(v) > 1 else ""
        )

    print(f"\n{len(args.seeds)} seed(s); mean ± sd over seeds")
    print("| attack | answers | pool | queries | test acc % | fidelity % | time s |")
    print("|---|---|---|---:|---:|---:|---:|")
    for spec, mode, pool, _, runs in table:
        q = statistics.mean(r["queries"] for r in runs)
        t = statistics.mean(r["wall_time_s"] for r in runs)
        print(f"| `{spec}` | {mode} | {pool} | {q:,.0f} | {ms([r['test_accuracy'] for r in runs])} "
              f"| {ms([r['fidelity'] for r in runs])} | {t:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
