"""Data-free thieves on the bundled mnist victim: fidelity against the query budget.

    OMP_NUM_THREADS=1 python benchmarks/datafree.py --budgets 20000 --seeds 0 1 --threads 1
    OMP_NUM_THREADS=1 python benchmarks/datafree.py --budgets 100000 --seeds 0 --threads 1

The victim is the `fast` CNN of ``runs/bench-art/victim`` (as in ``benchmarks/catalogue.py``,
trained if absent); the substitute is the zoo's ``cnn``; every attack runs at its defaults
unless a row says otherwise. Rows: ``dfme`` (probabilities, with its final phase: a fresh
substitute on every stored query-answer pair), ``dfme`` without the final phase (the
online student, as the paper scores it), and ``dfme_hard`` (top-1 labels only). One JSON
line per run goes to ``--out``/results.jsonl (a run already there is reused); each prints
its wall time and torch's thread count.
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

#: (attack spec, answer mode)
ROWS: list[tuple[str, str]] = [
    ("dfme", "probs"),
    ('dfme:{"retrain": false}', "probs"),
    ("dfme_hard", "label"),
    ("maze", "probs"),
]


def run(spec: str, mode: str, budget: int, seed: int, victim: Any, ev: Evaluator) -> dict[str, Any]:
    name, options = parse_attack_spec(spec)
    oracle = VictimOracle(victim, input_shape=(1, 28, 28), num_classes=10, mode=mode)
    t = time.perf_counter()
    result = create_attack(name, **options)(oracle, None, budget, substitute="cnn", evaluator=ev, seed=seed)
    return {
        "spec": spec,
        "mode": mode,
        "budget": budget,
        "seed": seed,
        "queries": oracle.ledger.count,
        "reported_queries": result.queries,
        "fidelity": result.metrics["fidelity"],
        "test_accuracy": result.metrics["test_accuracy"],
        "wall_time_s": time.perf_counter() - t,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", type=int, nargs="+", default=[20_000])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--only", nargs="*", default=None, help="run only the rows with these exact specs")
    p.add_argument("--out", type=Path, default=Path("runs/bench-datafree"))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    victim, _, ev = mnist_victim(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.jsonl"
    done = read_results(path, ("spec", "mode", "budget", "seed"))
    table: list[tuple[str, str, int, list[dict[str, Any]]]] = []
    for budget in args.budgets:
        for spec, mode in ROWS:
            if args.only and spec not in args.only:
                continue
            runs = []
            for seed in args.seeds:
                key = (spec, mode, budget, seed)
                if key not in done:
                    done[key] = run(spec, mode, budget, seed, victim, ev)
                    with path.open("a") as f:
                        f.write(json.dumps(done[key]) + "\n")
                r = done[key]
                runs.append(r)
                print(f"  {spec} [{mode}] budget {budget:,} seed {seed}: {r['queries']:,} queries, fidelity "
                      f"{100 * r['fidelity']:.2f}%, {r['wall_time_s']:.0f} s on {r['threads']} thread(s)",
                      flush=True)  # fmt: skip
            table.append((spec, mode, budget, runs))

    def ms(v: list[float]) -> str:
        sd = f" ± {100 * statistics.stdev(v):.2f}" if len(v) > 1 else ""
        return f"{100 * statistics.mean(v):.2f}{sd}"

    print("\n| attack | answers | budget | queries | seeds | test acc % | fidelity % | time s | threads |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for spec, mode, budget, runs in table:
        q = statistics.mean(r["queries"] for r in runs)
        t = statistics.mean(r["wall_time_s"] for r in runs)
        print(f"| `{spec}` | {mode} | {budget:,} | {q:,.0f} | {len(runs)} | "
              f"{ms([r['test_accuracy'] for r in runs])} | {ms([r['fidelity'] for r in runs])} | {t:.0f} | "
              f"{runs[0]['threads']} |")  # fmt: skip


if __name__ == "__main__":
    main()
