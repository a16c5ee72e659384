"""Conferrable-example fingerprints (Lukas et al., ICLR 2021) against held-out models.

    python benchmarks/fingerprint.py                     # mnist
    python benchmarks/fingerprint.py --dataset digits

The owner trains the victim (the `fast` CNN of the dataset's seed-0 split), surrogates
(derived from the victim on the owner's own training data) and references (trained from
scratch on its true labels), and generates fingerprints from seeds of the test split.
The fingerprints are then scored on models that took no part in their generation:

* **stolen**: substitutes produced by this package's attacks through the oracle (kd,
  hard, hard_augment, knockoff with an out-of-domain pool, a kd substitute of another
  architecture) at several budgets and seeds, and copies of the victim's weights
  fine-tuned on the attacker's pool;
* **independent**: models trained from scratch on true labels, by other seeds, other
  architectures and other data (the victim's own training data, or the attacker's pool
  with its true labels).

It prints every model's retention (agreement with the victim's labels on the
fingerprints), the ROC AUC of retention over stolen vs independent models, and the
verification decision at a threshold calibrated on separate calibration references.
Every model is cached under ``--out`` (``torch.save``), so that re-runs with other
fingerprint settings only regenerate the fingerprints; the summary is saved as JSON.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mextract.attacks import create_attack
from mextract.data import load_splits
from mextract.data.transfer import load_pool
from mextract.defences.ownership import (
    FINGERPRINT_TRAINING,
    Fingerprints,
    fingerprint_auc,
    generate_fingerprints,
    train_references,
    train_surrogates,
)
from mextract.experiments import train_victim_run
from mextract.experiments.runner import VICTIM_DIR
from mextract.metrics import Evaluator, agreement, predict_labels
from mextract.models import create_model, load_checkpoint
from mextract.oracle import VictimOracle
from mextract.training import TrainConfig, fit, train_victim

#: Held-out stolen attacks: (label, attack name, options, answer mode, substitute, budget
#: as a fraction of the pool, seed, out-of-domain pool or None).
ATTACK_ROWS: list[tuple[str, str, dict[str, Any], str, str, float, int, str | None]] = [
    ("kd 25%", "kd", {}, "probs", "cnn", 0.25, 0, None),
    ("kd 100%", "kd", {}, "probs", "cnn", 1.0, 0, None),
    ("kd 100% s1", "kd", {}, "probs", "cnn", 1.0, 1, None),
    ("kd 100% mlp", "kd", {}, "probs", "mlp", 1.0, 0, None),
    ("hard 25%", "hard", {}, "label", "cnn", 0.25, 0, None),
    ("hard 100%", "hard", {}, "label", "cnn", 1.0, 0, None),
    ("hard 100% s1", "hard", {}, "label", "cnn", 1.0, 1, None),
    ("hard_augment 100%", "hard_augment", {"flip": False}, "label", "cnn", 1.0, 0, None),
    ("knockoff (out-of-domain pool)", "knockoff", {"policy": "random"}, "probs", "cnn", 1.0, 0, "other"),
]

#: The out-of-domain pool of each dataset for Knockoff (the other bundled digit set).
OTHER_POOL = {"mnist": "digits", "digits": "mnist"}


def _cached(path: Path, make: Callable[[], nn.Module]) -> nn.Module:
    if path.is_file():
        return torch.load(path, weights_only=False)
    t = time.perf_counter()
    model = make().cpu().eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model, path)
    print(f"  trained {path.stem} ({time.perf_counter() - t:.0f} s)", flush=True)
    return model


def _key(*parts: object) -> str:
    return hashlib.sha1(repr(parts).encode()).hexdigest()[:8]


def stolen_models(victim: nn.Module, splits: Any, dataset: str, cache: Path) -> dict[str, nn.Module]:
    """Substitutes from real attacks through the oracle, and fine-tuned copies of the victim."""
    shape, k, pool = splits.test.input_shape, splits.test.num_classes, splits.pool
    ev = Evaluator.from_victim(victim, splits.test)
    out: dict[str, nn.Module] = {}
    for label, name, options, mode, arch, frac, seed, ood in ATTACK_ROWS:

        def attack(name=name, options=options, mode=mode, arch=arch, frac=frac, seed=seed, ood=ood):  # type: ignore[no-untyped-def]
            p = pool if ood is None else load_pool(OTHER_POOL[dataset], shape, seed=seed)
            oracle = VictimOracle(victim, input_shape=shape, num_classes=k, mode=mode)
            budget = max(1, int(frac * len(pool)))
            result = create_attack(name, **options)(oracle, p.unlabeled(), budget, substitute=arch,
                                                    evaluator=ev, seed=seed)  # fmt: skip
            return result.model

        key = _key(label, name, options, mode, arch, frac, seed)
        out[label] = _cached(cache / f"stolen-{key}.pt", attack)

    def finetune(epochs: int, lr: float, half: bool) -> nn.Module:
        model = copy.deepcopy(victim)
        x, y = (pool.x, pool.y) if not half else (pool.x[: len(pool) // 2], pool.y[: len(pool) // 2])
        return fit(model, x, y, F.cross_entropy, TrainConfig(epochs=epochs, batch_size=64, lr=lr), seed=3)

    out["victim fine-tuned (pool labels, lr 0.01, 5 ep)"] = _cached(
        cache / "stolen-finetune-a.pt", lambda: finetune(5, 0.01, False)
    )
    out["victim fine-tuned (half pool, lr 0.05, 10 ep)"] = _cached(
        cache / "stolen-finetune-b.pt", lambda: finetune(10, 0.05, True)
    )
    return out


def independent_models(splits: Any, cache: Path) -> dict[str, nn.Module]:
    """Models trained from scratch on true labels: other seeds, architectures and data."""
    shape, k = splits.test.input_shape, splits.test.num_classes
    owner, pool = splits.victim_train, splits.pool

    def recipe(data: Any, seed: int, arch: str = "cnn") -> Callable[[], nn.Module]:
        def make() -> nn.Module:
            torch.manual_seed(seed)
            return train_victim(create_model(arch, shape, k), data, "fast", seed=seed)

        return make

    def plain(data: Any, seed: int, arch: str, **options: Any) -> Callable[[], nn.Module]:
        def make() -> nn.Module:
            torch.manual_seed(seed)
            m = create_model(arch, shape, k, **options)
            return fit(m, data.x, data.y, F.cross_entropy, FINGERPRINT_TRAINING, seed=seed)

        return make

    rows: dict[str, Callable[[], nn.Module]] = {
        "cnn, victim recipe, owner data, seed 100": recipe(owner, 100),
        "cnn, victim recipe, owner data, seed 101": recipe(owner, 101),
        "cnn, victim recipe, pool data, seed 102": recipe(pool, 102),
        "cnn, victim recipe, pool data, seed 103": recipe(pool, 103),
        "cnn, plain SGD, pool data, seed 104": plain(pool, 104, "cnn"),
        "cnn width 32, pool data, seed 105": plain(pool, 105, "cnn", width=32),
        "mlp, owner data, seed 106": plain(owner, 106, "mlp"),
        "mlp, pool data, seed 107": plain(pool, 107, "mlp"),
        "logreg, pool data, seed 108": plain(pool, 108, "logreg"),
    }
    return {label: _cached(cache / f"indep-{_key(label)}.pt", make) for label, make in rows.items()}


def owner_models(
    victim: nn.Module, splits: Any, args: argparse.Namespace, cache: Path
) -> tuple[list[nn.Module], list[nn.Module], list[nn.Module], list[nn.Module], list[nn.Module]]:
    """The owner's models, all on its own training data: surrogates and references for the
    generation, validation surrogates and references for the selection, and calibration
    references for the threshold (each set trained with its own seeds)."""
    shape, k = splits.test.input_shape, splits.test.num_classes
    owner = splits.victim_train

    def spec(arch: str) -> Any:
        return partial(create_model, "cnn", shape, k, width=8) if arch == "cnn8" else arch

    def surrogates(n: int, base: int) -> list[nn.Module]:
        out = []
        for i in range(n):
            arch = args.archs[i % len(args.archs)]
            kind = args.labels if args.labels != "mixed" else ("soft", "hard")[(i // len(args.archs)) % 2]
            make = partial(train_surrogates, victim, owner.x, 1, seed=base + i, labels=kind, model=spec(arch))
            out.append(_cached(cache / f"sur-{kind}-{arch}-{base + i}.pt", lambda make=make: make()[0]))
        return out

    def references(n: int, base: int) -> list[nn.Module]:
        out = []
        for i in range(n):
            arch = args.archs[i % len(args.archs)]
            recipe = args.ref_recipes[(i // len(args.archs)) % len(args.ref_recipes)]
            make = partial(train_references, owner, 1, seed=base + i, model=spec(arch),
                           recipe=None if recipe == "plain" else recipe)  # fmt: skip
            out.append(_cached(cache / f"ref-{recipe}-{arch}-{base + i}.pt", lambda make=make: make()[0]))
        return out

    return (
        surrogates(args.surrogates, 1000),
        references(args.references, 2000),
        surrogates(args.validation, 3000),
        references(args.validation, 4000),
        references(args.calibration, 5000),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist", choices=["mnist", "digits"])
    p.add_argument("--surrogates", type=int, default=8)
    p.add_argument("--references", type=int, default=8)
    p.add_argument("--validation", type=int, default=0, help="surrogates and references held apart to rank")
    p.add_argument("--calibration", type=int, default=2, help="references held apart for the threshold")
    p.add_argument("--archs", nargs="+", default=["cnn", "mlp"], help="cnn, cnn8 (width 8), mlp, logreg")
    p.add_argument("--labels", default="mixed", choices=["soft", "hard", "mixed"])
    p.add_argument("--ref-recipes", nargs="+", default=["fast", "plain"], help="victim preset or plain")
    p.add_argument("--seeds", type=int, default=500, help="fingerprint seeds (test images)")
    p.add_argument("--n", type=int, default=100, help="fingerprints kept")
    p.add_argument("--eps", type=float, default=0.15)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--pgd-steps", type=int, default=10, help="targeted PGD steps of the seed step")
    p.add_argument("--out", type=Path, default=None, help="default runs/bench-fingerprint-<dataset>")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("mextract.defences.ownership").setLevel(logging.INFO)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or Path(f"runs/bench-fingerprint-{args.dataset}")
    cache = out / "models"
    train_victim_run(out, dataset=args.dataset, seed=0)
    victim, _ = load_checkpoint(out / VICTIM_DIR)
    victim.eval()
    splits = load_splits(args.dataset, seed=0)
    t0 = time.perf_counter()
    sur, ref, val_sur, val_ref, cal = owner_models(victim, splits, args, cache)
    stolen = stolen_models(victim, splits, args.dataset, cache)
    indep = independent_models(splits, cache)
    t_models = time.perf_counter() - t0
    seeds = splits.test.x[: args.seeds]
    t = time.perf_counter()
    fp: Fingerprints = generate_fingerprints(
        victim, sur, ref, seeds, n=args.n, eps=args.eps, steps=args.steps, lr=args.lr,
        pgd_steps=args.pgd_steps, validation=(val_sur, val_ref) if args.validation else None,
    )  # fmt: skip
    t_gen = time.perf_counter() - t
    acc = {name: agreement(predict_labels(m, splits.test.x), splits.test.y) for name, m in
           {**stolen, **indep}.items()}  # fmt: skip
    ret = {name: fp.retention(m) for name, m in {**stolen, **indep}.items()}
    cal_ret = [fp.retention(m) for m in cal]
    sur_ret = statistics.mean(fp.retention(m) for m in sur)
    ref_ret = statistics.mean(fp.retention(m) for m in ref)
    auc = fingerprint_auc(fp, list(stolen.values()), list(indep.values()))
    threshold = max(cal_ret) if cal_ret else None
    print(f"\n{args.dataset}: {len(fp)} fingerprints from {len(seeds)} test seeds, eps {args.eps}, "
          f"{args.steps} steps; {len(sur)} surrogates ({args.labels}), {len(ref)} references, "
          f"archs {' '.join(args.archs)}; generation {t_gen:.0f} s (models {t_models:.0f} s)")  # fmt: skip
    adversarial = int(fp.adversarial.sum())
    print(f"adversarial fingerprints (victim label moved off the seed's): {adversarial}/{len(fp)}")
    print(f"in-sample retention: surrogates {sur_ret:.3f}, references {ref_ret:.3f}; "
          f"calibration references {', '.join(f'{r:.3f}' for r in cal_ret)}")  # fmt: skip
    print("\n| suspect | kind | test accuracy | retention | verified |")
    print("|---|---|---:|---:|---|")
    for name in ret:
        kind = "stolen" if name in stolen else "independent"
        verdict = "–" if threshold is None else ("yes" if ret[name] > threshold else "no")
        print(f"| {name} | {kind} | {100 * acc[name]:.1f}% | {ret[name]:.3f} | {verdict} |")
    s_ret, i_ret = [ret[n] for n in stolen], [ret[n] for n in indep]
    print(f"\nstolen retention {min(s_ret):.3f}..{max(s_ret):.3f} (mean {statistics.mean(s_ret):.3f}); "
          f"independent {min(i_ret):.3f}..{max(i_ret):.3f} (mean {statistics.mean(i_ret):.3f})")  # fmt: skip
    print(f"ROC AUC (held-out stolen vs independent): {auc:.3f}")
    families = {  # which thieves do the fingerprints catch?
        "distilled (kd, knockoff)": [n for n in stolen if n.startswith(("kd", "knockoff"))],
        "hard-label (hard, hard_augment)": [n for n in stolen if n.startswith("hard")],
        "fine-tuned copies": [n for n in stolen if n.startswith("victim fine-tuned")],
    }
    family_auc = {
        name: fingerprint_auc(fp, [stolen[n] for n in names], list(indep.values()))
        for name, names in families.items()
        if names
    }
    print("ROC AUC by kind of thief: " + "; ".join(f"{k} {v:.3f}" for k, v in family_auc.items()))
    if threshold is not None:
        tp, fp_ = sum(r > threshold for r in s_ret), sum(r > threshold for r in i_ret)
        print(f"threshold {threshold:.3f} (max retention of {len(cal)} calibration references): "
              f"{tp}/{len(s_ret)} stolen verified, "
              f"{fp_}/{len(i_ret)} independent falsely verified")  # fmt: skip
    summary = {
        "dataset": args.dataset,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "auc": auc,
        "auc_by_thief": family_auc,
        "threshold": threshold,
        "surrogate_retention": sur_ret,
        "reference_retention": ref_ret,
        "calibration_retention": cal_ret,
        "retention": ret,
        "test_accuracy": acc,
        "stolen": list(stolen),
        "independent": list(indep),
        "generation_s": t_gen,
        "adversarial_fingerprints": adversarial,
    }
    path = out / f"fingerprint-{_key(sorted(vars(args).items(), key=str))}.json"
    path.write_text(json.dumps(summary, indent=2))
    print(f"saved {path}")


if __name__ == "__main__":
    main()
