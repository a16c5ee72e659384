"""Exact extraction of scikit-learn decision trees by path-finding (Tramèr et al. 2016, section 4.2).

For each bundled tabular set (iris, wine, breast_cancer) and the 8×8 digits (64 numeric
features), a ``DecisionTreeClassifier`` of depth 3, 5, 8, 10 (and unlimited where the grown
tree stays within depth 10) is trained on the victim split and served in answer mode
``leaf``; :class:`~mextract.attacks.tree.TreePathFinding` extracts it without incomplete
queries (Algorithm 1) and with them (the top-down variant, ``missing="stop"``). Reported:
leaves, queries of each variant, agreement with the victim on 100,000 fresh records drawn
uniformly within the features' ranges, the node-by-node match of the leaves, wall time.

    OMP_NUM_THREADS=1 python benchmarks/tree_extraction.py            # the table in docs/tree-extraction.md
    OMP_NUM_THREADS=1 python benchmarks/tree_extraction.py --train all     # larger trees
    python benchmarks/tree_extraction.py --datasets iris --fresh 10000 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import numpy as np
import torch
from sklearn.tree import DecisionTreeClassifier

from mextract.attacks.tree import TreePathFinding, compare_leaves, fresh_agreement
from mextract.data import load_splits
from mextract.data.tabular import TabularSchema, with_ranges
from mextract.oracle import VictimOracle

DATASETS = ("iris", "wine", "breast_cancer", "digits")
DEPTHS: tuple[int | None, ...] = (3, 5, 8, 10, None)
BUDGET = 5_000_000


def victim_data(name: str, train: str = "victim") -> tuple[np.ndarray, np.ndarray, TabularSchema]:
    """The training rows (flat float32), their labels and a schema of the features' ranges.

    ``train="victim"``: the victim split (the lab's protocol); ``"all"``: the victim split and
    the attacker pool together, for larger trees (the ranges then those of all the rows)."""
    splits = load_splits(name)
    parts = [splits.victim_train] if train == "victim" else [splits.victim_train, splits.pool]
    x = np.concatenate([p.x.reshape(len(p.x), -1).numpy() for p in parts]).astype(np.float32)
    assert all(p.y is not None for p in parts)
    y = np.concatenate([p.y.numpy() for p in parts if p.y is not None])
    if "schema" in splits.meta:
        schema = TabularSchema.from_json(splits.meta["schema"])
        if train != "victim":
            schema = with_ranges(schema, x)
    else:  # digits: 64 pixel intensities, each with the training rows' range
        schema = TabularSchema.numeric(x, [f"pixel{i}" for i in range(x.shape[1])])
    return x, y, schema


def run_one(
    name: str, depth: int | None, fresh: int, seed: int, train: str = "victim"
) -> dict[str, Any] | None:
    x, y, schema = victim_data(name, train)
    est = DecisionTreeClassifier(max_depth=depth, random_state=seed).fit(x, y)
    if depth is None and est.get_depth() > 10:
        return None
    row: dict[str, Any] = {
        "dataset": name,
        "train": train,
        "rows": len(x),
        "features": len(schema.features),
        "max_depth": "none" if depth is None else depth,
        "depth": int(est.get_depth()),
        "leaves": int(est.get_n_leaves()),
    }
    for incomplete in (False, True):
        tag = "incomplete" if incomplete else "complete"
        oracle = VictimOracle(est, mode="leaf", features=schema, missing="stop" if incomplete else None)
        start = time.perf_counter()
        result = TreePathFinding(incomplete=incomplete)(oracle, None, BUDGET, seed=seed)
        wall = time.perf_counter() - start
        assert result.queries == oracle.ledger.count
        cmp = compare_leaves(result.model, est)
        agree = fresh_agreement(result.model, est, fresh, seed=seed + 1)
        row[f"queries_{tag}"] = result.queries
        row[f"matched_{tag}"] = f"{cmp['matched']}/{cmp['true_leaves']}"
        row[f"same_id_{tag}"] = cmp["same_id"]
        row[f"exact_{tag}"] = (
            cmp["matched"] == cmp["true_leaves"] == cmp["extracted_leaves"] == cmp["same_id"]
        )
        row[f"agreement_{tag}"] = agree["label_agreement"]
        row[f"distribution_agreement_{tag}"] = agree["distribution_agreement"]
        row[f"wall_s_{tag}"] = round(wall, 2)
    return row


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| dataset | rows | d | max_depth | depth | leaves | queries | queries (incomplete) | "
        "leaves matched | agreement | agreement (incomplete) | wall s | wall s (incomplete) |"
    )
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['rows']} | {r['features']} | {r['max_depth']} | {r['depth']} | "
            f"{r['leaves']} | "
            f"{r['queries_complete']:,} | {r['queries_incomplete']:,} | "
            f"{r['matched_complete']} / {r['matched_incomplete']} | "
            f"{r['agreement_complete']:.2%} | {r['agreement_incomplete']:.2%} | "
            f"{r['wall_s_complete']} | {r['wall_s_incomplete']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--fresh", type=int, default=100_000, help="fresh records for the agreement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--train",
        choices=("victim", "all"),
        default="victim",
        help="train on the victim split (default) or on the victim split and the attacker pool",
    )
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args()
    threads = int(os.environ.get("OMP_NUM_THREADS", "0")) or torch.get_num_threads()
    torch.set_num_threads(threads)
    start = time.perf_counter()
    rows = []
    for name in args.datasets:
        for depth in DEPTHS:
            row = run_one(name, depth, args.fresh, args.seed, args.train)
            if row is not None:
                rows.append(row)
                print(json.dumps(row), flush=True)
    total = time.perf_counter() - start
    threads_now = torch.get_num_threads()
    print(f"\ntorch threads: {threads_now}; wall time: {total:.1f} s; fresh records: {args.fresh:,}\n")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": threads_now, "wall_s": total, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
