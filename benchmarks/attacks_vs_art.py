"""Learning-based attacks: mextract against IBM ART on the bundled mnist victim.

Same victim, same attacker pool, same substitute architecture, same epochs, same budgets,
several seeds; prints test accuracy, fidelity, queries spent and wall time for each.

    pip install -e ".[bench]"          # adversarial-robustness-toolbox, benchmark only
    python benchmarks/attacks_vs_art.py --labels soft --seeds 0 1 2
    python benchmarks/attacks_vs_art.py --labels hard --seeds 0 1 2

Every finished run is a JSON record under ``--out`` (default ``runs/bench-art``); a
re-run reuses them, so an interrupted benchmark resumes where it stopped. ``--ours``
takes attack specs ``name`` or ``name:{json options}``.

ART's side (art.attacks.extraction): ``CopycatCNN`` (Correia-Silva et al. 2018) and
``KnockoffNets`` with the ``random`` and ``adaptive`` policies (Orekondy et al. 2019),
against a ``PyTorchClassifier`` around the same victim. ART counts nothing itself, so
the victim it sees is wrapped in a module that counts every sample it evaluates; that
count is the "queries" column. For soft labels that module answers softmax
probabilities (handing ART raw logits with ``use_probability=True`` leaves its thief at
chance); ART's ``PyTorchClassifier.fit`` then trains with cross-entropy on those
probability vectors (distillation at temperature 1). ART's adaptive policy needs the pool's *true* labels
(``y``): we give them, as ART requires, although a real attacker has none. ART trains
with the optimiser it is handed: Adam (lr 1e-3), ART's documented usage, for the same
number of epochs and batch size as ours.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mextract._utils import seeded
from mextract.attacks import create_attack
from mextract.data import load_splits
from mextract.experiments import train_victim_run
from mextract.experiments.records import Record
from mextract.metrics import Evaluator
from mextract.models import create_model, load_checkpoint
from mextract.oracle import VictimOracle

EPOCHS, BATCH = 40, 64
ART_METHODS = ["art_copycat", "art_knockoff_random", "art_knockoff_adaptive"]
SOFT_OURS = ["kd"]
HARD_OURS = ["hard"]


class CountingModule(nn.Module):
    """The victim as ART sees it: counts every sample it evaluates; answers probabilities
    (``softmax=True``, what ART's ``use_probability`` expects from ``predict``) or logits."""

    def __init__(self, model: nn.Module, *, softmax: bool) -> None:
        super().__init__()
        self.model = model.eval()
        self.softmax = softmax
        self.samples = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.samples += len(x)
        with torch.no_grad():
            out = self.model(x)
        return torch.softmax(out, 1) if self.softmax else out


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    name, _, opts = spec.partition(":")
    return name, (json.loads(opts) if opts else {})


def run_ours(
    spec: str, victim: nn.Module, splits: Any, ev: Evaluator, budget: int, soft: bool, seed: int
) -> dict[str, Any]:
    name, options = parse_spec(spec)
    options.setdefault("train", {"epochs": EPOCHS, "batch_size": BATCH})
    attack = create_attack(name, **options)
    oracle = VictimOracle(victim, input_shape=(1, 28, 28), num_classes=10, mode="probs" if soft else "label")
    t = time.perf_counter()
    result = attack(oracle, splits.pool.unlabeled(), budget, substitute="cnn", evaluator=ev, seed=seed)
    return {
        "queries": oracle.ledger.count,
        "wall_time_s": time.perf_counter() - t,
        "test_accuracy": result.metrics["test_accuracy"],
        "fidelity": result.metrics["fidelity"],
    }


def run_art(
    method: str, victim: nn.Module, splits: Any, ev: Evaluator, budget: int, soft: bool, seed: int
) -> dict[str, Any]:
    from art.attacks.extraction import CopycatCNN, KnockoffNets
    from art.estimators.classification import PyTorchClassifier

    counting = CountingModule(victim, softmax=soft)
    loss = nn.CrossEntropyLoss()
    art_victim = PyTorchClassifier(
        counting, loss=loss, input_shape=(1, 28, 28), nb_classes=10, clip_values=(0.0, 1.0), device_type="cpu"
    )
    with seeded(seed):
        np.random.seed(seed)  # ART samples the pool with numpy's global generator
        sub = create_model("cnn", (1, 28, 28), 10)
        thief = PyTorchClassifier(
            sub,
            loss=loss,
            optimizer=torch.optim.Adam(sub.parameters(), lr=1e-3),
            input_shape=(1, 28, 28),
            nb_classes=10,
            clip_values=(0.0, 1.0),
            device_type="cpu",
        )
        common = {"batch_size_fit": BATCH, "batch_size_query": BATCH, "nb_epochs": EPOCHS}
        common["nb_stolen"] = budget
        x = splits.pool.x.numpy()
        t = time.perf_counter()
        if method == "art_copycat":
            attack = CopycatCNN(art_victim, use_probability=soft, **common)
            stolen = attack.extract(x, thieved_classifier=thief)
        else:
            policy = method.removeprefix("art_knockoff_")
            attack = KnockoffNets(
                art_victim, sampling_strategy=policy, verbose=False, use_probability=soft, **common
            )
            y = None
            if policy == "adaptive":  # ART's adaptive policy needs the pool's true labels
                y = np.eye(10)[splits.pool.y.numpy()]
            stolen = attack.extract(x, y=y, thieved_classifier=thief)
        wall = time.perf_counter() - t
    scores = ev.evaluate(stolen.model)
    return {"queries": counting.samples, "wall_time_s": wall, **scores}


def main() -> None:
    global EPOCHS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labels", choices=["soft", "hard"], default="soft")
    p.add_argument("--budgets", type=int, nargs="+", default=[250, 500, 1000, 2000])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--ours", nargs="+", default=None, help="attack specs: name or name:{json}")
    p.add_argument("--art", nargs="*", default=ART_METHODS)
    p.add_argument("--out", type=Path, default=Path("runs/bench-art"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--epochs", type=int, default=EPOCHS, help="training epochs, ours and ART's alike")
    args = p.parse_args()
    EPOCHS = args.epochs
    if args.threads:
        torch.set_num_threads(args.threads)
    soft = args.labels == "soft"
    ours = args.ours or (SOFT_OURS if soft else HARD_OURS)

    train_victim_run(args.out, dataset="mnist", seed=0)  # reused when present
    victim, _ = load_checkpoint(args.out / "victim")
    splits = load_splits("mnist", seed=0)
    ev = Evaluator.from_victim(victim, splits.test)
    print(f"victim: cnn on mnist, test accuracy {100 * ev.victim_accuracy:.2f}%; pool {len(splits.pool)}")

    rows: dict[tuple[str, int], list[dict]] = {}
    for budget in args.budgets:
        for method in [*ours, *args.art]:
            for seed in args.seeds:
                key = hashlib.sha1(method.encode()).hexdigest()[:10]
                path = (
                    args.out / f"{args.labels}-{method.split(':')[0]}-{key}-e{EPOCHS}-{budget}-s{seed}.json"
                )
                if path.is_file():
                    metrics = Record.load(path).metrics
                else:
                    runner = run_art if method.startswith("art_") else run_ours
                    metrics = runner(method, victim, splits, ev, budget, soft, seed)
                    Record(
                        kind="benchmark",
                        name=method,
                        seed=seed,
                        config={"labels": args.labels, "budget": budget, "epochs": EPOCHS, "batch": BATCH},
                        metrics=metrics,
                    ).save(path)
                rows.setdefault((method, budget), []).append(metrics)
                print(
                    f"  {method} budget {budget} seed {seed}: fidelity {100 * metrics['fidelity']:.2f}% "
                    f"({metrics['queries']} queries, {metrics['wall_time_s']:.1f} s)",
                    flush=True,
                )

    def ms(values: list[float]) -> str:
        m = 100 * statistics.mean(values)
        s = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{m:6.2f} ± {s:4.2f}"

    print(f"\n{args.labels} labels, {len(args.seeds)} seed(s), {EPOCHS} epochs, substitute cnn")
    print(f"| {'method':<44} | budget | queries | test acc % | fidelity % | time s |")
    print(f"|{'-' * 46}|-------:|--------:|-----------:|-----------:|-------:|")
    for (method, budget), ms_ in rows.items():
        q = statistics.mean(m["queries"] for m in ms_)
        t = statistics.mean(m["wall_time_s"] for m in ms_)
        print(
            f"| {method:<44} | {budget:6d} | {q:7.0f} | {ms([m['test_accuracy'] for m in ms_])} "
            f"| {ms([m['fidelity'] for m in ms_])} | {t:6.1f} |"
        )


if __name__ == "__main__":
    main()
