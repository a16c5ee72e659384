"""The cosine API watermark (CosWM) on the bundled mnist victim: which substitutes carry
it, do innocent models stay at chance, and what does it cost honest users?

    python benchmarks/cosine_watermark.py                 # budget 2,000, keys 0-4
    python benchmarks/cosine_watermark.py --keys 0 --only kd

For each key, each attack runs against ``CosineWatermark(api, key)`` (ε = 0.1, f = π/2 per
standard deviation, the defaults) in front of the victim (the `fast` CNN of
``runs/bench-art/victim``, trained if absent), and its substitute is verified against
the unmarked victim twice: on the queries the API logged (the thief's own, the default)
and on the owner's own 3,000 inputs (training and test images).
Innocent models are verified with every key: the same attack run against the *plain*
API (a clone of the same victim that never saw the mark: the hardest negative), and
models trained from scratch on true labels (the DAWN benchmark's independent models).
Honest users: top-1 test accuracy through the marked API, and the mean L1 change of the
probability vectors. Records go to ``--out`` and are reused on a re-run.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch
from dawn import independent_models  # benchmarks/dawn.py: the same independent models

from mextract.attacks import create_attack
from mextract.attacks.registry import parse_attack_spec
from mextract.data import load_splits
from mextract.defences.cosine import CosineWatermark
from mextract.experiments import train_victim_run
from mextract.metrics import Evaluator
from mextract.models import load_checkpoint
from mextract.oracle import VictimOracle

#: (attack spec, whether the API carries the mark)
ROWS = [
    ("kd", True),
    ("kd_erasing", True),
    ("marich", True),
    ("spsg", True),
    ("hard", True),  # a hard-label thief: only the argmax of the marked answers
    ("kd", False),  # the hardest negative: the same thief against the unmarked API
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=int, default=2000)
    p.add_argument("--keys", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--epsilon", type=float, default=0.1)
    p.add_argument("--only", nargs="*", default=None, help="run only attacks whose spec starts with these")
    p.add_argument("--out", type=Path, default=Path("runs/bench-cosine"))
    args = p.parse_args()
    victim_dir = Path("runs/bench-art")
    train_victim_run(victim_dir, dataset="mnist", seed=0)
    victim, meta = load_checkpoint(victim_dir / "victim")
    splits = load_splits("mnist", seed=0)
    ev = Evaluator.from_victim(victim, splits.test)
    owner_x = torch.cat([splits.victim_train.x, splits.test.x])
    args.out.mkdir(parents=True, exist_ok=True)

    def api() -> VictimOracle:
        return VictimOracle(victim, input_shape=(1, 28, 28), num_classes=10, mode="logits")

    def marked(key: int) -> CosineWatermark:
        return CosineWatermark(api(), key, reference=splits.victim_train.x, epsilon=args.epsilon)

    # one marked API per key for the owner-side measurements (the attacks get fresh ones,
    # whose logs hold only the thief's queries)
    owner_apis = [marked(k) for k in args.keys]
    plain_probs = torch.softmax(api().query(splits.test.x), dim=1)
    plain = float((plain_probs.argmax(1) == splits.test.y).float().mean())
    answers = [wm.query(splits.test.x) for wm in owner_apis]
    honest = [float((a.argmax(1) == splits.test.y).float().mean()) for a in answers]
    l1 = [float((a - plain_probs).abs().sum(1).mean()) for a in answers]
    print(
        f"victim test accuracy {100 * plain:.2f}%; through the cosine mark (ε = {args.epsilon}): "
        + ", ".join(f"{100 * a:.2f}%" for a in honest)
        + f" (keys {args.keys}); mean drop {100 * (plain - statistics.mean(honest)):.2f} points; "
        f"mean L1 change of the probability vector {statistics.mean(l1):.3f}; "
        f"target classes {[wm.target for wm in owner_apis]}"
    )

    independent = independent_models(splits, Path("runs/bench-dawn"))  # shared with dawn.py
    for where, x in (("the attacker's pool (a query log)", splits.pool.x), ("the owner's inputs", owner_x)):
        p_indep = [wm.verify(m, x, baseline=victim).p_value for wm in owner_apis for _, m in independent]
        print(
            f"independent models on {where}: {sum(p < 1e-3 for p in p_indep)} of {len(p_indep)} "
            f"(model, key) pairs verified; smallest p = {min(p_indep):.1e}"
        )

    print("\n| attack | API | fidelity % | on the logged queries: z (min–max over keys) | p (max) "
          "| verified | on the owner's inputs: z | p (max) | verified |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for spec, with_mark in ROWS:
        if args.only and not any(spec.startswith(o) for o in args.only):
            continue
        rows: list[dict[str, Any]] = []
        for key in args.keys:
            path = args.out / f"{spec.split(':')[0]}-{'marked' if with_mark else 'plain'}-eps{args.epsilon}" \
                f"-{args.budget}-k{key}.json"  # fmt: skip
            if path.is_file():
                rows.append(json.loads(path.read_text()))
                continue
            wm = marked(key)
            name, options = parse_attack_spec(spec)
            result = create_attack(name, **options)(
                wm if with_mark else api(), splits.pool.unlabeled(), args.budget,
                substitute=meta["architecture"], evaluator=ev, seed=key,
            )  # fmt: skip
            # the plain API logs nothing: its thief queried pool points (all of them at the
            # default budget), so log the pool through the marked API (answers unseen)
            if not with_mark:
                wm.query(splits.pool.x)
            row = {"fidelity": result.metrics["fidelity"]}
            for where, x in (("log", None), ("owner", owner_x)):
                v = wm.verify(result.model, x, baseline=victim)
                row[where] = {"statistic": v.statistic, "z": v.z, "p_value": v.p_value, "stolen": v.stolen}
            path.write_text(json.dumps(row))
            rows.append(row)
        fid = statistics.mean(r["fidelity"] for r in rows)
        cells = []
        for where in ("log", "owner"):
            zs = [r[where]["z"] for r in rows]
            cells += [f"{min(zs):.1f}–{max(zs):.1f}", f"{max(r[where]['p_value'] for r in rows):.1e}",
                      f"{sum(r[where]['stolen'] for r in rows)} of {len(rows)}"]  # fmt: skip
        api_kind = "marked" if with_mark else "plain"
        print(f"| `{spec}` | {api_kind} | {100 * fid:.2f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
