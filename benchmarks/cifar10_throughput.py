"""Is the CIFAR-10 reproduction ready for a GPU? Measure the pipeline's throughput here, and
project the wall time of a reproduction scale from it.

    python benchmarks/cifar10_throughput.py                       # this machine, the full scale
    python benchmarks/cifar10_throughput.py --scale small         # project the CPU scale
    python benchmarks/cifar10_throughput.py --device cuda --seconds 20

It times the training loop that every cell uses (:func:`mextract.training.fit`, with what it
does on the device: resident data, batched TrivialAugmentWide for the victim, bf16 autocast
and channels-last on CUDA) for the scale's victim and thief architectures at the scale's
batch sizes, on random CIFAR-shaped tensors, and their inference (the victim answering
queries, the thieves being scored). Then it counts the work of every cell of the scale's
plan (:func:`mextract.experiments.reproduce.cifar10_plan`): training passes (images × epochs)
and queries, and divides by the measured rates. The counting is an estimate: it leaves out
selection (MARICH, active), SPSG's probing and FixMatch's extra views beyond a factor, and
the measures (transfer, trigger, DAWN) beyond the test set. Prints threads and wall times;
appends a JSON line to ``runs/bench-cifar10/throughput.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mextract._utils import resolve_device
from mextract.attacks.registry import parse_attack_spec
from mextract.data.augment import trivial_augment_wide
from mextract.experiments.reproduce import cifar10_plan, scale_of
from mextract.metrics import predict_probs
from mextract.models import create_model
from mextract.training import TrainConfig, fit, placement, victim_recipe

OUT = Path("runs/bench-cifar10")
SHAPE = (3, 32, 32)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def train_rate(arch: str, batch: int, dev: torch.device, seconds: float, augment: bool) -> float:
    """Images per second through :func:`fit` (one epoch over enough random images)."""
    model = create_model(arch, SHAPE, 10)

    def run(n: int) -> float:
        x, y = torch.rand(n, *SHAPE), torch.randint(10, (n,))
        cfg = TrainConfig(epochs=1, batch_size=batch, lr=0.05)
        _sync(dev)
        t0 = time.perf_counter()
        fit(
            model,
            x,
            y,
            F.cross_entropy,
            cfg,
            device=str(dev),
            transform=trivial_augment_wide if augment else None,
        )
        _sync(dev)
        return time.perf_counter() - t0

    warm = run(4 * batch)  # warm-up (cuDNN's algorithm search, allocations); also a first rate
    n = max(8 * batch, int(seconds * 4 * batch / warm) // batch * batch)
    return n / run(n)


def infer_rate(arch: str, dev: torch.device, seconds: float) -> float:
    model = create_model(arch, SHAPE, 10).to(dev).eval()
    x = torch.rand(2048, *SHAPE)
    predict_probs(model, x[:512])
    _sync(dev)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        predict_probs(model, x)
        n += len(x)
    _sync(dev)
    return n / (time.perf_counter() - t0)


def cell_work(attack: str, budget: int) -> tuple[float, float]:
    """``(training passes, queries)`` of one thief's cell (see the module's docstring)."""
    name, options = parse_attack_spec(attack)
    epochs = int(options.get("train", {}).get("epochs", 40))
    passes = float(budget * epochs)
    if name in ("marich", "active_hard"):
        passes *= 2  # ten rounds of warm-started selection models, about the final training again
    if name == "spsg":
        passes *= 2  # output-and-gradient matching: a double backward
    if "semi" in options:
        passes *= 1 + 2 * 3  # FixMatch: a weak and a strong view of 3 unlabeled points per labelled one
    return passes, float(budget)


def project(scale: str, rates: dict[str, float]) -> dict[str, Any]:
    sc = scale_of(scale)
    plan = cifar10_plan(sc)
    recipe = victim_recipe(sc.victim_preset)
    test = sc.test or 10_000
    stages: dict[str, float] = {}
    victim_s = len(plan.victims) * recipe.train.epochs * sc.pool / rates["victim_train"]
    stages["stage 0 (victims)"] = victim_s
    for c in plan.cells:
        passes, queries = cell_work(str(c.attack), c.budget)
        seconds = passes / rates["thief_train"] + queries / rates["victim_infer"]
        seconds += 11 * test / rates["thief_infer"]  # the history's evaluations
        key = f"stage {str(c.thief).split(' ')[1]}"
        stages[key] = stages.get(key, 0.0) + seconds
    return {"stages_s": stages, "total_s": sum(stages.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--scale", default="full", help="the scale whose architectures and time to project")
    ap.add_argument("--seconds", type=float, default=8.0, help="seconds per measurement (about)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    sc = scale_of(args.scale)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    probe = torch.zeros(2, *SHAPE)
    place = placement(dev, probe, torch.zeros(2, dtype=torch.long))
    threads = f"torch threads {torch.get_num_threads()} of {os.cpu_count()} cores"
    print(f"device {dev} ({name}), {threads}; resident={place.resident} autocast={place.autocast} "
          f"channels_last={place.channels_last}")  # fmt: skip
    t0 = time.perf_counter()
    recipe = victim_recipe(sc.victim_preset)
    rates = {
        "victim_train": train_rate(sc.victim, recipe.train.batch_size, dev, args.seconds, augment=True),
        "thief_train": train_rate(sc.thief, sc.batch_size, dev, args.seconds, augment=False),
        "victim_infer": infer_rate(sc.victim, dev, args.seconds / 2),
        "thief_infer": infer_rate(sc.thief, dev, args.seconds / 2),
    }
    for k, v in rates.items():
        arch = sc.victim if k.startswith("victim") else sc.thief
        print(f"  {k:13s} {arch:9s} {v:10,.0f} images/s")
    proj = project(sc.name, rates)
    print(f"projected wall time of scale {sc.name!r} on this device (one cell at a time):")
    for stage, s in proj["stages_s"].items():
        print(f"  {stage:18s} {s / 60:8.1f} min")
    print(f"  {'total':18s} {proj['total_s'] / 60:8.1f} min   (measured in {time.perf_counter() - t0:.0f} s)")
    OUT.mkdir(parents=True, exist_ok=True)
    with (OUT / "throughput.jsonl").open("a") as f:
        f.write(json.dumps({"device": name, "threads": torch.get_num_threads(), "scale": sc.name,
                            "rates": rates, **proj}) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
