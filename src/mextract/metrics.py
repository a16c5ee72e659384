"""Metrics: test accuracy, fidelity (agreement with the victim), queries and time.

Fidelity follows the sources (and Jagielski et al. 2020, "fidelity" vs "accuracy"): the
fraction of test inputs on which the substitute's top-1 class equals the victim's.
The victim's test-set labels are the experimenter's reference, computed once by the
owner side (:meth:`Evaluator.from_victim`) and never charged to the attacker's budget.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mextract._utils import resolve_device
from mextract.data.base import Dataset
from mextract.errors import InputError


@torch.no_grad()
def _batched(
    model: nn.Module, x: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], batch_size: int,
    device: str | None,
) -> list[torch.Tensor]:
    dev = next(model.parameters(), torch.empty(0)).device if device is None else resolve_device(device)
    was_training = model.training
    model.eval()
    dtype = next(model.parameters(), torch.empty(0, dtype=x.dtype)).dtype
    try:
        return [head(model(x[i : i + batch_size].to(dev, dtype))).cpu() for i in range(0, len(x), batch_size)]
    finally:
        model.train(was_training)


def predict_labels(
    model: nn.Module, x: torch.Tensor, *, batch_size: int = 1024, device: str | None = None
) -> torch.Tensor:
    """Top-1 classes of a PyTorch classifier on ``x`` (in eval mode, restored after)."""
    out = _batched(model, x, lambda z: z.argmax(1), batch_size, device)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def predict_probs(
    model: nn.Module, x: torch.Tensor, *, batch_size: int = 1024, device: str | None = None
) -> torch.Tensor:
    """Softmax probabilities of a PyTorch classifier (logits out) on ``x``, in eval mode."""
    out = _batched(model, x, lambda z: torch.softmax(z, dim=1), batch_size, device)
    return torch.cat(out) if out else torch.empty(0, 0)


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of positions where two label vectors agree."""
    if a.shape != b.shape:
        raise InputError(f"expected label vectors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return float((a == b).float().mean()) if len(a) else float("nan")


def accuracy(model: nn.Module, data: Dataset, *, batch_size: int = 1024) -> float:
    if data.y is None:
        raise InputError(f"{data.name}: accuracy needs labels, and this dataset has none")
    return agreement(predict_labels(model, data.x, batch_size=batch_size), data.y)


@dataclass(frozen=True)
class Evaluator:
    """Scores substitutes on a fixed test set against true labels and the victim's labels."""

    test: Dataset
    victim_labels: torch.Tensor

    @classmethod
    def from_victim(cls, victim: object, test: Dataset, **oracle_kwargs: Any) -> Evaluator:
        """Label ``test`` with the victim through a private, unbudgeted owner-side oracle."""
        from mextract.oracle import VictimOracle

        owner = VictimOracle(
            victim,
            input_shape=test.input_shape,
            num_classes=test.num_classes,
            mode="label",
            **oracle_kwargs,
        )
        labels = owner.query(test.x).argmax(1)
        return cls(test, labels)

    @property
    def victim_accuracy(self) -> float:
        if self.test.y is None:
            return float("nan")
        return agreement(self.victim_labels, self.test.y)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        pred = predict_labels(model, self.test.x)
        acc = agreement(pred, self.test.y) if self.test.y is not None else float("nan")
        return {"test_accuracy": acc, "fidelity": agreement(pred, self.victim_labels)}
