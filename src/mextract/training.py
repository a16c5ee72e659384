"""The training loop shared by victim training (stage 0) and every substitute.

One loop, :func:`fit`: mini-batch SGD with Nesterov momentum and a one-cycle learning
rate (Smith & Topin 2017), the sources' victim recipe, or Adam; targets may be class
indices or probability vectors, and the loss is the caller's. Shuffling, augmentation
and dropout all draw from the caller's seed.

On a GPU (:func:`placement`) the loop keeps the data resident on the device when it fits
in half the free memory (no copy per batch), augments whole batches there, runs the forward
pass and the loss under bf16 autocast (weights and optimiser stay float32), and stores
images channels-last, which is what tensor cores want. On a CPU nothing of this applies:
the same loop, float32, batches moved as they are used.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mextract._utils import resolve_device, seeded
from mextract.data.augment import flip_crop, trivial_augment_wide
from mextract.data.base import Dataset
from mextract.errors import InputError, UnknownNameError

logger = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: A loss that needs the model and the inputs themselves (e.g. gradient matching):
#: ``batch_loss(model, x_batch, target_batch) -> scalar``.
BatchLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
Transform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
EpochHook = Callable[[int, nn.Module], None]


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Optimiser settings. ``lr`` is the one-cycle peak (SGD) or the constant rate (Adam)."""

    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    optimizer: Literal["sgd", "adam"] = "sgd"

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"{name}: expected a positive integer, got {v!r}")
        if not self.lr > 0:
            raise InputError(f"lr: expected a positive number, got {self.lr}")
        if self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise InputError("weight_decay must be >= 0 and momentum in [0, 1)")
        if self.optimizer not in ("sgd", "adam"):
            raise UnknownNameError("optimizer", str(self.optimizer), ["sgd", "adam"])


def _optimizer(
    model: nn.Module, cfg: TrainConfig, steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    if cfg.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(
            model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        return opt, None
    opt = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
        nesterov=cfg.nesterov and cfg.momentum > 0, weight_decay=cfg.weight_decay,
    )  # fmt: skip
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(steps, 1))
    return opt, sched


@dataclass(frozen=True)
class Placement:
    """How :func:`fit` uses a device: data resident on it, bf16 autocast, channels-last."""

    device: torch.device
    resident: bool
    autocast: bool
    channels_last: bool


def placement(device: torch.device, x: torch.Tensor, targets: torch.Tensor) -> Placement:
    """The accelerator choices for training on ``device``: only CUDA gets them. The data is
    resident when it takes at most half the device's free memory; channels-last for images."""
    if device.type != "cuda":
        return Placement(device, resident=False, autocast=False, channels_last=False)
    free, _ = torch.cuda.mem_get_info(device)
    size = x.element_size() * x.numel() + targets.element_size() * targets.numel()
    return Placement(device, resident=size <= free // 2, autocast=True, channels_last=x.dim() == 4)


def fit(
    model: nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: LossFn | None,
    config: TrainConfig,
    *,
    batch_loss: BatchLoss | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    transform: Transform | None = None,
    on_epoch: EpochHook | None = None,
) -> nn.Module:
    """Train ``model`` in place on ``(x, targets)`` and return it (in eval mode).

    Args:
        x: inputs ``(N, ...)`` (kept on the CPU; batches move to ``device``).
        targets: ``(N,)`` class indices or ``(N, K)`` probability vectors, passed to ``loss_fn``.
        loss_fn: ``loss_fn(logits, target_batch) -> scalar``.
        batch_loss: used instead of ``loss_fn`` when the loss needs the model and inputs.
        transform: batch augmentation ``transform(x_batch, generator)``.
        on_epoch: called as ``on_epoch(epoch, model)`` after each epoch (1-based).
    """
    if len(x) != len(targets):
        raise InputError(f"expected as many targets as inputs, got {len(targets)} and {len(x)}")
    if len(x) == 0:
        raise InputError("cannot train on an empty set")
    if (loss_fn is None) == (batch_loss is None):
        raise InputError("give exactly one of loss_fn and batch_loss")
    dev = resolve_device(device)
    place = placement(dev, x, targets)
    model.to(dev)
    if place.channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if place.resident:  # one copy for the whole run; batches are gathered on the device
        x, targets = x.to(dev), targets.to(dev)
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = -(-len(x) // config.batch_size)
    opt, sched = _optimizer(model, config, config.epochs * steps_per_epoch)
    with seeded(seed):
        for epoch in range(1, config.epochs + 1):
            model.train()
            order = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), config.batch_size):
                idx = order[i : i + config.batch_size]
                if len(idx) < 2 and len(x) >= 2:  # batch norm cannot train on one sample
                    continue
                idx = idx.to(x.device)
                xb = x[idx]
                if transform is not None:
                    xb = transform(xb, gen)
                xb, tb = xb.to(dev), targets[idx].to(dev)
                if place.channels_last:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=place.autocast):
                    if batch_loss is not None:
                        loss = batch_loss(model, xb, tb)
                    else:
                        assert loss_fn is not None  # exactly one of the two, checked above
                        loss = loss_fn(model(xb), tb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
            model.eval()
            if on_epoch is not None:
                on_epoch(epoch, model)
    if place.channels_last:  # contiguous weights again: safetensors and callers expect them
        model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    return model.eval()


# ----------------------------------------------------------------------- stage 0: the victim

AUGMENTATIONS: dict[str, Transform | None] = {
    "none": None,
    "trivialaugment": trivial_augment_wide,
    "flip_crop": flip_crop,
}


@dataclass(frozen=True, kw_only=True)
class VictimRecipe:
    """The sources' victim recipe: label smoothing, one-cycle SGD with Nesterov momentum,
    TrivialAugmentWide for images. ``augment`` names an entry of :data:`AUGMENTATIONS`."""

    train: TrainConfig = TrainConfig(epochs=50, batch_size=128, lr=0.1)
    label_smoothing: float = 0.1
    augment: str = "trivialaugment"

    def __post_init__(self) -> None:
        if self.augment not in AUGMENTATIONS:
            raise UnknownNameError("augmentation", self.augment, sorted(AUGMENTATIONS))
        if not 0 <= self.label_smoothing < 1:
            raise InputError(f"label_smoothing: expected a value in [0, 1), got {self.label_smoothing}")


#: ``paper``: the sources' CIFAR-10 recipe (50 epochs); ``fast``: the same recipe, short
#: enough for a laptop CPU (MNIST-size data). Tabular data is never augmented.
VICTIM_PRESETS: dict[str, VictimRecipe] = {
    "paper": VictimRecipe(),
    "fast": VictimRecipe(train=TrainConfig(epochs=15, batch_size=64, lr=0.05)),
}


def victim_recipe(preset: str) -> VictimRecipe:
    if preset not in VICTIM_PRESETS:
        raise UnknownNameError("victim preset", preset, sorted(VICTIM_PRESETS))
    return VICTIM_PRESETS[preset]


def train_victim(
    model: nn.Module,
    data: Dataset,
    recipe: VictimRecipe | str = "fast",
    *,
    seed: int = 0,
    device: str | torch.device | None = None,
    on_epoch: EpochHook | None = None,
) -> nn.Module:
    """Stage 0: train a victim on labelled data with the sources' recipe."""
    if isinstance(recipe, str):
        recipe = victim_recipe(recipe)
    if data.y is None:
        raise InputError(f"{data.name}: training a victim needs labels")
    transform = AUGMENTATIONS[recipe.augment] if data.is_image else None
    if not data.is_image and recipe.augment != "none":
        recipe = replace(recipe, augment="none")
    smoothing = recipe.label_smoothing

    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, label_smoothing=smoothing)

    return fit(model, data.x, data.y, loss, recipe.train, seed=seed, device=device,
               transform=transform, on_epoch=on_epoch)  # fmt: skip
