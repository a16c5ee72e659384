"""The two baselines of the sources: soft-label distillation and basic hard-label training."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from mextract.attacks.base import Attack, AttackContext
from mextract.attacks.semi import SemiSupervised, train_semi
from mextract.attacks.substitute import (
    hard_targets,
    query_pool,
    random_subset,
    soft_targets,
    train_substitute,
)
from mextract.errors import InputError
from mextract.oracle import APIDescription
from mextract.training import TrainConfig

#: Substitute training for the baselines: the sources train 40 epochs; SGD with Nesterov
#: momentum and a one-cycle schedule as for the victim; batches of 64 so that small
#: budgets still get enough steps.
SUBSTITUTE_TRAINING = TrainConfig(epochs=40, batch_size=64, lr=0.05)


@dataclass(kw_only=True)
class KnockoffDistillation(Attack):
    """Stage-1 baseline: query a random subset of the pool, distil the answers.

    The substitute minimises ``T² · KL(victim softmax/T ‖ substitute softmax/T)`` with
    ``T = 3`` (the sources; Hinton et al. 2015) on ``min(budget, |pool|)`` pool points
    drawn uniformly without replacement — Papernot/Knockoff-style random querying.
    Soft answer modes (probs, top-k, rounded, logits) are read as probability vectors;
    against a label-only oracle the loss reduces to cross-entropy on one-hot targets.
    ``semi`` adds FixMatch on the unqueried pool (no extra query; :mod:`~mextract.attacks.semi`).

    Faithfulness: ``docs/faithfulness.md#kd``.
    """

    name: ClassVar[str] = "kd"
    temperature: float = 3.0
    train: TrainConfig = SUBSTITUTE_TRAINING
    semi: SemiSupervised | None = None

    def check_params(self, api: APIDescription, pool: torch.Tensor | None, budget: int) -> None:
        if not self.temperature > 0:
            raise InputError(f"temperature: expected a positive number, got {self.temperature}")

    def run(self, ctx: AttackContext) -> nn.Module:
        assert ctx.pool is not None
        chosen = random_subset(ctx, ctx.budget)
        x = ctx.pool[chosen]
        targets = soft_targets(query_pool(ctx, x), ctx, self.temperature)
        if self.semi is not None:
            rest = _unqueried(ctx.pool, chosen)
            return train_semi(ctx, x, targets, rest, self.semi, soft=True, temperature=self.temperature,
                              config=self.train)  # fmt: skip
        return train_substitute(ctx, x, targets, soft=True, temperature=self.temperature, config=self.train)


@dataclass(kw_only=True)
class HardLabel(Attack):
    """Stage-2 baseline ("basic"): query a random subset of the pool for its top-1 labels,
    train with cross-entropy. Only the argmax of each answer is used, whatever the mode.
    ``semi`` adds FixMatch on the unqueried pool (no extra query).

    Faithfulness: ``docs/faithfulness.md#hard``.
    """

    name: ClassVar[str] = "hard"
    train: TrainConfig = SUBSTITUTE_TRAINING
    semi: SemiSupervised | None = None

    def run(self, ctx: AttackContext) -> nn.Module:
        assert ctx.pool is not None
        chosen = random_subset(ctx, ctx.budget)
        x = ctx.pool[chosen]
        targets = hard_targets(query_pool(ctx, x))
        if self.semi is not None:
            rest = _unqueried(ctx.pool, chosen)
            return train_semi(ctx, x, targets, rest, self.semi, soft=False, config=self.train)
        return train_substitute(ctx, x, targets, soft=False, config=self.train)


def _unqueried(pool: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """The pool points that were not sent to the oracle (for semi-supervised training)."""
    mask = torch.ones(len(pool), dtype=torch.bool)
    mask[chosen] = False
    return pool[mask]
