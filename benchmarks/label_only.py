"""Label-only thieves with few queries: every active strategy against random, paired by seed.

    OMP_NUM_THREADS=1 python benchmarks/label_only.py --budgets 250 500 1000 --seeds 0 1 2 3 4
    python benchmarks/label_only.py --only active_hard 'active:{"strategy": "random"}' --seeds 0 1

The bundled mnist victim (the `fast` CNN of ``runs/bench-art/victim``, as in
``benchmarks/catalogue.py``, trained if absent) answers top-1 labels only; the thief's whole
pool (the lab's 2,000-image attacker split) is unlabeled and ``budget`` of it is queried.
Every attack runs at its defaults: ``active`` and its presets draw a random warm start of
at least 20 labels per class and train with FixMatch on the unqueried pool (automatic for
labels on a large pool); ``hard`` is the sources' supervised random baseline. The reference
for the active strategies is ``active:{"strategy": "random"}``, the same loop and training
with random selection; each strategy's difference from it is paired by seed (same victim,
same pool, same warm start). One JSON line per run in ``--out``/results.jsonl (a run
already there is reused); each prints its wall time and torch's thread count.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from _bench import mnist_victim, read_results

from mextract.attacks import create_attack
from mextract.attacks.registry import parse_attack_spec
from mextract.metrics import Evaluator
from mextract.oracle import VictimOracle

RANDOM = 'active:{"strategy": "random"}'
SPECS: list[str] = [
    "hard",
    RANDOM,
    "active_hard",
    'active:{"strategy": "entropy"}',
    'active:{"strategy": "kcenter"}',
    'active:{"strategy": "dfal"}',
    'active:{"strategy": "dfal_kcenter"}',
    'active:{"strategy": "entropy_kmeans"}',
    'active:{"strategy": "entropy_kmeans_grad"}',
]


def run(spec: str, budget: int, seed: int, victim: Any, pool: torch.Tensor, ev: Evaluator) -> dict[str, Any]:
    name, options = parse_attack_spec(spec)
    oracle = VictimOracle(victim, input_shape=(1, 28, 28), num_classes=10, mode="label")
    t = time.perf_counter()
    result = create_attack(name, **options)(oracle, pool, budget, substitute="cnn", evaluator=ev, seed=seed)
    return {
        "spec": spec,
        "budget": budget,
        "seed": seed,
        "queries": oracle.ledger.count,
        "fidelity": result.metrics["fidelity"],
        "test_accuracy": result.metrics["test_accuracy"],
        "wall_time_s": time.perf_counter() - t,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", type=int, nargs="+", default=[250, 500, 1000])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--only", nargs="*", default=None, help="run only these exact specs")
    p.add_argument("--out", type=Path, default=Path("runs/bench-label-only"))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    victim, splits, ev = mnist_victim(args.threads)
    pool = splits.pool.unlabeled()
    print(f"pool: {len(pool)} unlabelled images", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.jsonl"
    done = read_results(path, ("spec", "budget", "seed"))
    specs = args.only or SPECS
    for seed in args.seeds:  # seed by seed: an interrupted run leaves whole comparisons
        for budget in args.budgets:
            for spec in specs:
                if (spec, budget, seed) in done:
                    continue
                r = run(spec, budget, seed, victim, pool, ev)
                done[(spec, budget, seed)] = r
                with path.open("a") as f:
                    f.write(json.dumps(r) + "\n")
                print(f"  {spec} budget {budget} seed {seed}: fidelity {100 * r['fidelity']:.2f}% "
                      f"({r['wall_time_s']:.0f} s, {r['threads']} thread)", flush=True)  # fmt: skip

    print(f"\nfidelity % (mean ± sd over seeds); Δ vs {RANDOM}: mean of the per-seed differences")
    print("| attack | budget | seeds | fidelity % | Δ vs random | time s |")
    print("|---|---:|---:|---|---:|---:|")
    for budget in args.budgets:
        for spec in specs:
            runs = [done[(spec, budget, s)] for s in args.seeds if (spec, budget, s) in done]
            if not runs:
                continue
            fid = [100 * r["fidelity"] for r in runs]
            sd = f" ± {statistics.stdev(fid):.2f}" if len(fid) > 1 else ""
            pairs = [100 * (r["fidelity"] - done[(RANDOM, budget, r["seed"])]["fidelity"])
                     for r in runs if (RANDOM, budget, r["seed"]) in done]  # fmt: skip
            delta = f"{statistics.fmean(pairs):+.2f}" if pairs and spec != RANDOM else "–"
            wall = statistics.fmean(r["wall_time_s"] for r in runs)
            mean = statistics.fmean(fid)
            print(f"| `{spec}` | {budget:,} | {len(runs)} | {mean:.2f}{sd} | {delta} | {wall:.0f} |")


if __name__ == "__main__":
    main()
