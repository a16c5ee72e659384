"""Tabular extraction per victim kind: fidelity against queries of the best retraining strategy.

For each victim kind an owner serves — scikit-learn logistic regression, a scikit-learn
pipeline (degree-2 features, scaling, logistic regression), a random forest, gradient
boosting (XGBoost, saved to its JSON format and served from the file), an MLP
(scikit-learn ``MLPClassifier``) and a CNN exported to ONNX (served with onnxruntime) —
the ``tabular`` attack (Tramèr et al. 2016 retraining; ``mextract.attacks.tabular``) runs
with label-only answers in two data settings:

* synthetic: no data at all, queries made from the API's published fields
  (uniform within the ranges; the CNN's 64 pixels within [0, 1]);
* small sample: 50 rows of the attacker's pool, their per-feature marginals.

with each strategy (uniform, adaptive retraining, line search) at each budget, the
substitute family chosen by cross-validation (``model="auto"``). The table reports the
best strategy's fidelity (agreement with the victim's top-1 on the test set) and which.
Results go to a JSON-lines file, so a rerun resumes; ``--fresh`` starts over.

    python benchmarks/tabular.py                  # about 20 minutes on 2 cores (--jobs 2)
    python benchmarks/tabular.py --quick          # one dataset, one budget: a minute
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

KINDS = ("logreg", "pipeline", "forest", "xgboost", "mlp", "onnx_cnn")
STRATEGIES = ("uniform", "adaptive", "line_search")


def _victim(kind: str, dataset: str, workdir: Path) -> tuple[Any, Any, Any]:
    """(the victim as VictimOracle takes it, the split, the owner's scorer for the evaluator)."""
    import numpy as np
    import torch
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import PolynomialFeatures, StandardScaler

    from mextract.data import load_splits
    from mextract.models import load_external

    s = load_splits(dataset, seed=0)
    x, y = s.victim_train.x.numpy(), s.victim_train.y.numpy()
    if kind == "onnx_cnn":
        from mextract.models import create_model
        from mextract.training import TrainConfig, fit

        torch.manual_seed(0)
        net = create_model("cnn", s.test.input_shape, s.test.num_classes)
        fit(net, s.victim_train.x, s.victim_train.y, torch.nn.functional.cross_entropy,
            TrainConfig(epochs=30, batch_size=64, lr=0.05), seed=0)  # fmt: skip
        path = workdir / f"cnn-{dataset}.onnx"
        torch.onnx.export(net.eval(), (s.test.x[:2],), str(path), dynamo=True, external_data=False,
                          dynamic_shapes=({0: "batch"},), input_names=["x"], output_names=["logits"],
                          verbose=False)  # fmt: skip
        return load_external(path), s, None
    if kind == "xgboost":
        from xgboost import XGBClassifier

        path = workdir / f"xgb-{dataset}.json"
        XGBClassifier(n_estimators=100, max_depth=4, random_state=0).fit(x, y).save_model(path)
        return load_external(path), s, None
    est = {
        "logreg": LogisticRegression(max_iter=5000),
        "pipeline": make_pipeline(PolynomialFeatures(2), StandardScaler(), LogisticRegression(max_iter=5000)),
        "forest": RandomForestClassifier(n_estimators=100, random_state=0),
        "mlp": MLPClassifier((64, 64), max_iter=2000, random_state=0),
    }[kind]
    return est.fit(x, y), s, np


def _run(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    from mextract.attacks import create_attack
    from mextract.data.tabular import TabularSchema
    from mextract.metrics import Evaluator
    from mextract.oracle import VictimOracle

    with tempfile.TemporaryDirectory() as tmp:
        victim, s, _ = _victim(job["kind"], job["dataset"], Path(tmp))
        schema = s.meta.get("schema")
        features = None if schema is None else TabularSchema.from_json(schema)
        oracle = VictimOracle(victim, input_shape=s.test.input_shape, num_classes=s.test.num_classes,
                              mode="label", features=features, value_range=s.test.declared_range)  # fmt: skip
        ev = Evaluator.from_victim(victim, s.test)
        pool = s.pool.x[: job["sample"]] if job["sample"] else None
        start = time.perf_counter()
        result = create_attack("tabular", strategy=job["strategy"])(oracle, pool, job["budget"], evaluator=ev,
                                                                     seed=job["seed"])  # fmt: skip
        family = next(k.removeprefix("substitute_") for k in result.metrics if k.startswith("substitute_"))
        return {**job, "fidelity": result.metrics["fidelity"], "queries": result.queries, "family": family,
                "victim_accuracy": ev.victim_accuracy, "seconds": time.perf_counter() - start}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/bench-tabular/results.jsonl"))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--fresh", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    datasets = ["breast_cancer"] if args.quick else ["breast_cancer", "wine"]
    budgets = [300] if args.quick else [100, 1000]
    jobs = []
    for kind in KINDS:
        for dataset in ["digits"] if kind == "onnx_cnn" else datasets:
            for sample in (0, 50):
                for budget in budgets:
                    for strategy in STRATEGIES:
                        jobs.append({"kind": kind, "dataset": dataset, "sample": sample, "budget": budget,
                                     "strategy": strategy, "seed": 0})  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.fresh and args.out.exists():
        args.out.unlink()
    done = {}
    if args.out.exists():
        for line in args.out.read_text().splitlines():
            r = json.loads(line)
            done[json.dumps({k: r[k] for k in jobs[0]}, sort_keys=True)] = r
    todo = [j for j in jobs if json.dumps(j, sort_keys=True) not in done]
    print(f"{len(jobs)} runs, {len(todo)} to do; {args.jobs} process(es) x 1 torch thread each", flush=True)
    start = time.perf_counter()
    with ProcessPoolExecutor(args.jobs) as pool, args.out.open("a") as f:
        for r in pool.map(_run, todo):
            f.write(json.dumps(r) + "\n")
            f.flush()
            done[json.dumps({k: r[k] for k in jobs[0]}, sort_keys=True)] = r
            print(f"  {r['kind']:9s} {r['dataset']:13s} sample {r['sample']:2d} {r['budget']:5d} "
                  f"{r['strategy']:11s} fidelity {100 * r['fidelity']:5.1f}% "
                  f"({r['family']}, {r['seconds']:.1f} s)", flush=True)  # fmt: skip
    print(f"wall time {time.perf_counter() - start:.0f} s, {args.jobs} process(es) x 1 torch thread")
    rows = list(done.values())
    print("\n| victim | data | victim acc. | setting | " + " | ".join(f"{b} queries" for b in budgets) + " |")
    print("|---|---|---|---|" + "---|" * len(budgets))
    for kind in KINDS:
        for dataset in ["digits"] if kind == "onnx_cnn" else datasets:
            for sample in (0, 50):
                cells = []
                acc = ""
                for budget in budgets:
                    runs = [r for r in rows if (r["kind"], r["dataset"], r["sample"], r["budget"]) ==
                            (kind, dataset, sample, budget)]  # fmt: skip
                    if not runs:
                        cells.append("–")
                        continue
                    best = max(runs, key=lambda r: r["fidelity"])
                    acc = f"{100 * best['victim_accuracy']:.1f}%"
                    cells.append(f"{100 * best['fidelity']:.1f}% ({best['strategy']}, {best['family']})")
                setting = "synthetic" if sample == 0 else f"{sample} real rows"
                print(f"| {kind} | {dataset} | {acc} | {setting} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
