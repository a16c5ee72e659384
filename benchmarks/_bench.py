"""Shared set-up of the mnist attack benchmarks (``datafree.py``, ``label_only.py``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mextract.data import Splits, load_splits
from mextract.experiments import train_victim_run
from mextract.metrics import Evaluator
from mextract.models import load_checkpoint


def mnist_victim(threads: int) -> tuple[torch.nn.Module, Splits, Evaluator]:
    """The catalogue's victim (the `fast` CNN of ``runs/bench-art/victim``, trained if absent),
    the mnist splits and the evaluator; sets and prints torch's threads and the victim's accuracy."""
    torch.set_num_threads(threads)
    print(f"torch threads: {torch.get_num_threads()}", flush=True)
    victim_dir = Path("runs/bench-art")
    train_victim_run(victim_dir, dataset="mnist", seed=0)
    victim, _ = load_checkpoint(victim_dir / "victim")
    splits = load_splits("mnist", seed=0)
    ev = Evaluator.from_victim(victim, splits.test)
    print(f"victim: cnn on mnist, test accuracy {100 * ev.victim_accuracy:.2f}%", flush=True)
    return victim, splits, ev


def read_results(path: Path, fields: tuple[str, ...]) -> dict[tuple[Any, ...], dict[str, Any]]:
    """The JSON lines of earlier runs in ``path``, keyed by ``fields`` (a run there is reused)."""
    done: dict[tuple[Any, ...], dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            done[tuple(r[f] for f in fields)] = r
    return done
