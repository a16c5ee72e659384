"""Adversarial training of the victim (Madry et al., "Towards Deep Learning Models
Resistant to Adversarial Attacks", ICLR 2018), the prevention the sources list.

The victim trains on projected-gradient-descent (PGD) adversarial examples: each batch
is replaced by the worst case found by ``steps`` signed-gradient steps of size ``alpha``
inside the L∞ ball of radius ``eps`` around it, from a uniform random start, clipped to
the valid input range [0, 1]. Defaults are Madry et al.'s CIFAR-10 setting (ε = 8/255,
α = 2/255, 7 steps), which is generic for images in [0, 1]; their MNIST setting is
ε = 0.3, α = 0.01, 40 steps. The cost to honest users is the drop in clean test accuracy,
which the attack × defence matrix reports.

Faithfulness: ``docs/faithfulness.md#adversarial-training``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mextract.data.base import Dataset
from mextract.errors import InputError
from mextract.training import AUGMENTATIONS, EpochHook, VictimRecipe, fit, victim_recipe


@dataclass(frozen=True, kw_only=True)
class PGDConfig:
    eps: float = 8 / 255
    alpha: float = 2 / 255
    steps: int = 7
    random_start: bool = True

    @classmethod
    def for_eps(cls, eps: float, steps: int = 7) -> PGDConfig:
        """PGD with radius ``eps`` and step size ``α = 2.5·ε/steps``, so that the steps can
        cross the ε-ball from a random start (the rule of Madry et al.'s ``robustness``
        library; 7 steps as in their CIFAR-10 training)."""
        return cls(eps=eps, alpha=2.5 * eps / steps, steps=steps)

    def __post_init__(self) -> None:
        if not self.eps > 0 or not self.alpha > 0:
            raise InputError(f"PGD: expected eps > 0 and alpha > 0, got eps={self.eps}, alpha={self.alpha}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise InputError(f"PGD: expected steps >= 1, got {self.steps!r}")


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: PGDConfig = PGDConfig(),
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Untargeted L∞ PGD on a batch: maximise the cross-entropy of ``y`` (batched)."""
    was_training = model.training
    model.eval()  # batch-norm statistics must not move while the attack searches
    try:
        delta = torch.zeros_like(x)
        if config.random_start:
            u = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
            delta = (2 * u - 1) * config.eps
        adv = (x + delta).clamp(0, 1)
        for _ in range(config.steps):
            adv.requires_grad_(True)
            loss = F.cross_entropy(model(adv), y)
            (grad,) = torch.autograd.grad(loss, adv)
            with torch.no_grad():
                adv = adv + config.alpha * grad.sign()
                adv = torch.min(torch.max(adv, x - config.eps), x + config.eps).clamp(0, 1)
        return adv.detach()
    finally:
        model.train(was_training)


def adversarial_training(
    model: nn.Module,
    data: Dataset,
    recipe: VictimRecipe | str = "fast",
    *,
    attack: PGDConfig = PGDConfig(),
    seed: int = 0,
    device: str | torch.device | None = None,
    on_epoch: EpochHook | None = None,
) -> nn.Module:
    """Train a victim on PGD examples of its (augmented) training batches, with the
    recipe's optimiser, schedule and label smoothing."""
    if isinstance(recipe, str):
        recipe = victim_recipe(recipe)
    if data.y is None:
        raise InputError(f"{data.name}: adversarial training needs labels")
    if not data.is_image:
        raise InputError(f"{data.name}: adversarial training here expects images in [0, 1]")
    generator = torch.Generator().manual_seed(seed + 1)
    smoothing = recipe.label_smoothing

    def batch_loss(m: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        adv = pgd(m, xb, yb, attack, generator=generator)
        return F.cross_entropy(m(adv), yb, label_smoothing=smoothing)

    return fit(
        model,
        data.x,
        data.y,
        None,
        recipe.train,
        batch_loss=batch_loss,
        seed=seed,
        device=device,
        transform=AUGMENTATIONS[recipe.augment],
        on_epoch=on_epoch,
    )
