"""Answer modes: what a prediction API reveals about its victim's output.

Every mode but one answers a batch ``(N, *input_shape)`` with a tensor of the same
shape, ``(N, num_classes)``, so that attacks and defences never branch on return shapes;
mode ``leaf``, for decision-tree victims only, adds one column (``(N, num_classes + 1)``,
:meth:`AnswerMode.width`):

========== ==================================================================
mode       answer row
========== ==================================================================
logits     the raw scores (exact, in the oracle's dtype; direct extraction)
probs      the softmax probability vector
topk       the probabilities of the k most likely classes, zeros elsewhere
           (not renormalised, as Knockoff Nets' top-k API returns them)
rounded    the probability vector rounded to ``decimals`` decimal places
label      a one-hot vector of the top-1 class (hard label)
leaf       a decision tree's answer: the class distribution of the node where
           the record's path ends, then that node's identifier (an integer
           stored as a float) — ``num_classes + 1`` values. BigML's API reveals
           a per-leaf confidence and instance distribution that Tramèr et al.
           (USENIX Security 2016, section 4.2) use as a pseudo-identifier of
           the leaf; the lab's identifier stands for it. With incomplete
           queries (``missing="stop"``) the path may end at an inner node.
========== ==================================================================
"""

from __future__ import annotations

from enum import StrEnum

import torch

from mextract.errors import InputError, UnknownNameError


class AnswerMode(StrEnum):
    LOGITS = "logits"
    PROBS = "probs"
    TOPK = "topk"
    ROUNDED = "rounded"
    LABEL = "label"
    LEAF = "leaf"

    @classmethod
    def parse(cls, value: str | AnswerMode) -> AnswerMode:
        if isinstance(value, AnswerMode):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            raise UnknownNameError("answer mode", str(value), [m.value for m in cls]) from None

    @property
    def is_soft(self) -> bool:
        """True when the answer carries more than the top-1 class."""
        return self is not AnswerMode.LABEL

    def width(self, num_classes: int) -> int:
        """Values in one answer row: ``num_classes``, plus the node identifier in mode ``leaf``."""
        return num_classes + 1 if self is AnswerMode.LEAF else num_classes


def restrict(
    logits: torch.Tensor,
    mode: AnswerMode,
    *,
    k: int | None = None,
    decimals: int | None = None,
) -> torch.Tensor:
    """Turn a victim's logits ``(N, K)`` into the answer of ``mode`` (same shape)."""
    if mode is AnswerMode.LOGITS:
        return logits
    if mode is AnswerMode.LEAF:
        raise InputError(
            "answer mode 'leaf' reveals a decision tree's node (its class distribution and "
            "identifier); it cannot be computed from logits: the victim must be a fitted "
            "scikit-learn DecisionTreeClassifier"
        )
    if mode is AnswerMode.LABEL:
        return torch.nn.functional.one_hot(logits.argmax(1), logits.shape[1]).to(logits.dtype)
    probs = torch.softmax(logits, dim=1)
    if mode is AnswerMode.PROBS:
        return probs
    if mode is AnswerMode.TOPK:
        if k is None:
            raise InputError("answer mode 'topk' needs k")
        top = probs.topk(min(k, probs.shape[1]), dim=1)
        return torch.zeros_like(probs).scatter_(1, top.indices, top.values)
    if mode is AnswerMode.ROUNDED:
        if decimals is None:
            raise InputError("answer mode 'rounded' needs decimals")
        return torch.round(probs, decimals=decimals)
    raise AssertionError(f"unhandled answer mode {mode}")  # pragma: no cover


def answers_to_probs(answers: torch.Tensor, mode: AnswerMode) -> torch.Tensor:
    """Best probability-vector reading of an answer batch, for soft-label training.

    Logits go through a softmax; rounded or top-k vectors are renormalised to sum to one
    (a row rounded to all zeros becomes uniform); one-hot labels are already vectors;
    ``leaf`` rows lose their node identifier (the last column).
    """
    if mode is AnswerMode.LOGITS:
        return torch.softmax(answers, dim=1)
    if mode is AnswerMode.LEAF:
        answers = answers[:, :-1]
    total = answers.sum(dim=1, keepdim=True)
    uniform = torch.full_like(answers, 1.0 / answers.shape[1])
    return torch.where(total > 0, answers / total.clamp_min(1e-12), uniform)
