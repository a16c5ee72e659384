"""Metrics: test accuracy, fidelity (agreement with the victim), queries and time.

Fidelity follows the sources (and Jagielski et al. 2020, "fidelity" vs "accuracy"): the
fraction of test inputs on which the substitute's top-1 class equals the victim's.
The victim's test-set labels are the experimenter's reference, computed once by the
owner side (:meth:`Evaluator.from_victim`) and never charged to the attacker's budget.

Faithfulness (each metric against scikit-learn, SciPy or a worked example):
``docs/faithfulness.md#metrics``.
"""

from __future__ import annotations

import itertools
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
    model: nn.Module,
    x: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int,
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


#: the floor under a defended answer's probabilities before KL and ECE: a rounded, top-k or
#: label answer puts exact zeros where the undefended answer has mass, which would make KL
#: infinite; 1e-6 is below any probability a float32 API states meaningfully
PROB_FLOOR = 1e-6


def answer_probs(answers: torch.Tensor, mode: str) -> torch.Tensor:
    """An API's answers as the probability vectors an honest user reads from them: softmax
    of logits; probabilities (also rounded or top-k) as given, clipped at 0; labels as one-hot
    rows (:class:`~mextract.oracle.AnswerMode` values)."""
    a = answers.detach().to(torch.float64)
    if mode == "logits":
        return torch.softmax(a, dim=1)
    return a.clamp_min(0)


def _normalised(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp_min(PROB_FLOOR)
    return p / p.sum(dim=1, keepdim=True)


def answer_shift(defended: torch.Tensor, undefended: torch.Tensor) -> dict[str, float]:
    """How far a defence moves honest users' answers (Orekondy et al. 2020, MAD, measure the
    utility cost of a perturbation by the distance between perturbed and original posteriors).

    ``answer_l1``: mean L1 distance between the answers as given (a top-k answer's missing
    mass and a label answer's lost confidence count); ``answer_kl``: mean KL(undefended ‖
    defended) after flooring the defended vector at :data:`PROB_FLOOR` and renormalising.
    """
    if defended.shape != undefended.shape or defended.ndim != 2:
        raise InputError(
            f"expected two (N, K) answer matrices of one shape, got {tuple(defended.shape)} and "
            f"{tuple(undefended.shape)}"
        )
    p, q = undefended.to(torch.float64), defended.to(torch.float64)
    l1 = (p - q).abs().sum(dim=1).mean()
    pn, qn = _normalised(p), _normalised(q)
    kl = (pn * (pn.log() - qn.log())).sum(dim=1).mean()
    return {"answer_l1": float(l1), "answer_kl": float(kl)}


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE of Guo et al., "On Calibration of Modern Neural Networks" (ICML 2017): the
    confidence (top-1 probability, after renormalising) against accuracy in ``bins`` equal-width
    bins, weighted by the share of samples in each."""
    if probs.ndim != 2 or len(probs) != len(labels):
        raise InputError(
            f"expected (N, K) probabilities and N labels, got {tuple(probs.shape)} and {len(labels)}"
        )
    if len(probs) == 0:
        raise InputError("expected at least one answer to calibrate")
    p = _normalised(probs.to(torch.float64))
    conf, pred = p.max(dim=1)
    correct = (pred == labels).to(torch.float64)
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    ece = torch.zeros((), dtype=torch.float64)
    for lo, hi in itertools.pairwise(edges):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += inside.double().mean() * (conf[inside].mean() - correct[inside].mean()).abs()
    return float(ece)
