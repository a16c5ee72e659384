"""Model deception: adversarial examples crafted on a stolen substitute, sent to the victim.

A thief who has extracted a substitute holds a white-box copy of the victim's decision
function. Adversarial examples crafted on that copy *transfer*: they also fool the victim,
which the thief can only query (Papernot et al., "Practical Black-Box Attacks against
Machine Learning", AsiaCCS 2017; Tramèr et al., "Stealing Machine Learning Models via
Prediction APIs", USENIX Security 2016, name this "model deception" among the uses of a
stolen model). This module crafts such examples and measures how often they transfer.

Attacks (white-box on the source model, cross-entropy loss on its logits):

* **FGSM** — one step of size ε along the sign of the gradient (Goodfellow et al.,
  "Explaining and Harnessing Adversarial Examples", ICLR 2015); with the L2 norm, one step
  of length ε along the L2-normalised gradient (the "fast gradient method").
* **PGD** — ``steps`` such steps of size ``step_size``, each followed by the projection
  onto the ε-ball around the input, from a uniform random point of the ball (Madry et al.,
  "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018).
* **Momentum** (MI-FGSM: Dong et al., "Boosting Adversarial Attacks with Momentum",
  CVPR 2018) — with ``momentum`` μ > 0, each sample accumulates
  ``g ← μ·g + ∇/‖∇‖₁`` and steps along ``sign(g)`` (L∞) or ``g/‖g‖₂`` (L2). With μ = 0
  the step is the plain one (the normalisation does not change a sign or a direction), and
  with a single step (FGSM) momentum has nothing to accumulate, so MI-FGSM with one step is
  FGSM.

Untargeted attacks maximise the loss of the true label ``y``; targeted ones minimise the
loss of a target class. Every iterate is projected onto the ε-ball of the chosen norm and
then clipped to the inputs' declared :class:`~mextract.data.ValueRange` (clipping to a box
that holds the clean input only moves coordinates towards it, so the result stays in the
ball). The model is put in eval mode (restored after) and only the input's gradient is
taken, so no gradient is left on any parameter.

Choices:

* ``step_size`` defaults to ε for FGSM and to ``2.5·ε/steps`` for PGD, the rule of Madry
  et al.'s ``robustness`` library (the steps can cross the ball from a random start).
  :func:`default_config` instead uses the papers' own step sizes where they give one.
* ``steps`` defaults to 1 for FGSM (the only value it takes) and to 10 for PGD (the
  iteration count of Dong et al.'s transfer experiments).
* ``random_start`` defaults to True for PGD (Madry et al.) and False for FGSM.
* A targeted attack without an explicit target aims at a class drawn uniformly among the
  ``K − 1`` classes other than ``y``, from ``generator`` (:func:`random_targets`).
* Transfer is measured, as is standard (Papernot et al. 2017; Liu et al., "Delving into
  Transferable Adversarial Examples", ICLR 2017), only on the inputs the victim classifies
  correctly, for untargeted and targeted attacks alike; see :func:`transfer_rate`.

Default radii (:func:`default_config`, :func:`config_grid`), for images in [0, 1]:

* one-channel images (MNIST-like): L∞ ε = 0.3, 40 steps of 0.01 (Madry et al. 2018's
  MNIST setting); L2 ε = 2.0 at 28×28 (Tramèr & Boneh, "Adversarial Training and
  Robustness for Multiple Perturbations", NeurIPS 2019, MNIST);
* three-channel images (CIFAR-10-like): L∞ ε = 8/255, 20 steps of 2/255 (Madry et al.
  2018's CIFAR-10 evaluation, "PGD 20 steps"); L2 ε = 0.5 at 32×32 (RobustBench, Croce
  et al. 2021, CIFAR-10 L2 track; Engstrom et al.'s ``robustness`` library).

L2 radii are kept at the papers' per-coordinate root mean square for other sizes
(ε₂ ∝ √d: 2.0·√(d/784) and 0.5·√(d/3072)); a declared range other than [0, 1] scales
every radius and step by its width. Unbounded (standardised tabular) inputs have no
published setting: the lab uses the MNIST numbers in units of one standard deviation
(ε∞ = 0.3, ε₂ = 2.0·√(d/784)), its own choice.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeAlias

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mextract.data.base import ValueRange
from mextract.errors import InputError
from mextract.metrics import predict_labels

__all__ = [
    "METHODS",
    "NORMS",
    "DeceptionConfig",
    "TransferResult",
    "TransferRow",
    "config_grid",
    "craft",
    "default_config",
    "random_targets",
    "transfer_rate",
    "transfer_table",
]

METHODS: tuple[str, ...] = ("fgsm", "pgd")
NORMS: tuple[str, ...] = ("linf", "l2")
#: PGD's iterations when ``steps`` is not given (Dong et al. 2018's transfer experiments).
DEFAULT_PGD_STEPS = 10
#: ``step_size = STEP_FACTOR·eps/steps`` for PGD when not given (Madry et al.'s ``robustness`` library).
STEP_FACTOR = 2.5

#: A victim: a PyTorch classifier (logits out), or a callable ``x -> labels (N,)`` or
#: ``x -> scores (N, K)`` such as an owner-side oracle's ``query``.
Victim: TypeAlias = nn.Module | Callable[[torch.Tensor], Any]


def _real(value: object) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(
        value, bool | np.bool_
    )


def _integer(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


@dataclass(frozen=True, kw_only=True)
class DeceptionConfig:
    """One white-box attack on the source model.

    Attributes:
        method: ``"fgsm"`` (one step) or ``"pgd"`` (projected iterations).
        norm: ``"linf"`` or ``"l2"``: the ball ``‖x_adv − x‖ ≤ eps`` and the step's shape.
        eps: the radius, in the inputs' own units (> 0).
        steps: iterations; ``None``: 1 for FGSM (which takes no other), 10 for PGD.
        step_size: the step's L∞ size or L2 length; ``None``: ``eps`` for FGSM,
            ``2.5·eps/steps`` for PGD (Madry et al.).
        targeted: minimise the loss of a target class instead of maximising the true one's.
        momentum: μ of MI-FGSM (Dong et al. 2018); 0 for none.
        random_start: start from a uniform point of the ball; ``None``: True for PGD
            (Madry et al.), False for FGSM.

    Every parameter is checked here, and ``None`` defaults are resolved, so that a
    config's fields always hold the values the attack uses.
    """

    method: str = "pgd"
    norm: str = "linf"
    eps: float
    steps: int | None = None
    step_size: float | None = None
    targeted: bool = False
    momentum: float = 0.0
    random_start: bool | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"method: expected one of {', '.join(map(repr, METHODS))}, got {self.method!r}")
        if self.norm not in NORMS:
            raise InputError(f"norm: expected one of {', '.join(map(repr, NORMS))}, got {self.norm!r}")
        if not _real(self.eps) or not math.isfinite(self.eps) or not self.eps > 0:
            raise InputError(f"eps: expected a finite number > 0, got {self.eps!r}")
        if self.steps is not None and (not _integer(self.steps) or self.steps < 1):
            raise InputError(f"steps: expected an integer >= 1, got {self.steps!r}")
        if self.method == "fgsm" and self.steps not in (None, 1):
            raise InputError(
                f"steps: expected 1 for fgsm (a single step; use method 'pgd'), got {self.steps!r}"
            )
        if self.step_size is not None and (
            not _real(self.step_size) or not math.isfinite(self.step_size) or not self.step_size > 0
        ):
            raise InputError(f"step_size: expected a finite number > 0 or None, got {self.step_size!r}")
        if not isinstance(self.targeted, bool):
            raise InputError(f"targeted: expected True or False, got {self.targeted!r}")
        if not _real(self.momentum) or not math.isfinite(self.momentum) or self.momentum < 0:
            raise InputError(f"momentum: expected a finite number >= 0, got {self.momentum!r}")
        if self.random_start is not None and not isinstance(self.random_start, bool):
            raise InputError(f"random_start: expected True, False or None, got {self.random_start!r}")
        steps = (1 if self.method == "fgsm" else DEFAULT_PGD_STEPS) if self.steps is None else int(self.steps)
        if self.step_size is None:
            step_size = float(self.eps) if self.method == "fgsm" else STEP_FACTOR * float(self.eps) / steps
        else:
            step_size = float(self.step_size)
        start = self.method == "pgd" if self.random_start is None else self.random_start
        object.__setattr__(self, "eps", float(self.eps))
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "step_size", step_size)
        object.__setattr__(self, "momentum", float(self.momentum))
        object.__setattr__(self, "random_start", start)

    @property
    def n_steps(self) -> int:
        """``steps``, resolved (always an int after construction)."""
        assert self.steps is not None
        return self.steps

    @property
    def alpha(self) -> float:
        """``step_size``, resolved."""
        assert self.step_size is not None
        return self.step_size

    def summary(self) -> str:
        """A short description, e.g. ``pgd L∞ ε=0.3 40×0.01 rand`` (``targeted`` added when
        it is; ``rand``: random start, ``μ``: momentum)."""
        norm = "L∞" if self.norm == "linf" else "L2"
        parts = [self.method, norm, f"ε={self.eps:.4g}"]
        parts.append(f"{self.n_steps}×{self.alpha:.3g}" if self.method == "pgd" else f"step {self.alpha:.3g}")
        if self.random_start:
            parts.append("rand")
        if self.momentum:
            parts.append(f"μ={self.momentum:g}")
        if self.targeted:
            parts.append("targeted")
        return " ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "norm": self.norm,
            "eps": self.eps,
            "steps": self.steps,
            "step_size": self.step_size,
            "targeted": self.targeted,
            "momentum": self.momentum,
            "random_start": self.random_start,
        }


# --------------------------------------------------------------------------- defaults


def _family(input_shape: Sequence[int]) -> str:
    """``"cifar"`` for three-channel images ``(3, H, W)``, else ``"mnist"`` (grayscale
    images and, by the lab's choice, everything else)."""
    shape = tuple(int(s) for s in input_shape)
    return "cifar" if len(shape) == 3 and shape[0] == 3 else "mnist"


def _width(value_range: ValueRange) -> float:
    if value_range.low is None or value_range.high is None:
        return 1.0  # standardised features: one standard deviation
    return float(value_range.high - value_range.low)


def _check_shape_arg(input_shape: Sequence[int]) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in input_shape)
    except (TypeError, ValueError) as exc:
        raise InputError(
            f"input_shape: expected a sequence of positive integers, got {input_shape!r}"
        ) from exc
    if not shape or any(s < 1 for s in shape):
        raise InputError(f"input_shape: expected a sequence of positive integers, got {input_shape!r}")
    return shape


def default_config(
    input_shape: Sequence[int], value_range: ValueRange, *, norm: str = "linf"
) -> DeceptionConfig:
    """The lab's main deception metric for a victim's inputs: untargeted PGD from a random
    start, with the papers' settings (see the module docstring for sources):

    * three-channel images: L∞ ε = 8/255, 20 steps of 2/255 (Madry et al. 2018, CIFAR-10);
      L2 ε = 0.5·√(d/3072), 20 steps of 2.5·ε/20 (RobustBench's CIFAR-10 L2 radius);
    * anything else: L∞ ε = 0.3, 40 steps of 0.01 (Madry et al. 2018, MNIST); L2
      ε = 2.0·√(d/784), 40 steps of 2.5·ε/40 (Tramèr & Boneh 2019's MNIST L2 radius);

    radii and steps scaled by the width of a bounded ``value_range`` (1 for unbounded,
    standardised features).
    """
    shape = _check_shape_arg(input_shape)
    if norm not in NORMS:
        raise InputError(f"norm: expected one of {', '.join(map(repr, NORMS))}, got {norm!r}")
    d = math.prod(shape)
    w = _width(value_range)
    if _family(shape) == "cifar":
        steps, eps_inf, alpha_inf, eps_2 = 20, 8 / 255, 2 / 255, 0.5 * math.sqrt(d / 3072)
    else:
        steps, eps_inf, alpha_inf, eps_2 = 40, 0.3, 0.01, 2.0 * math.sqrt(d / 784)
    if norm == "linf":
        return DeceptionConfig(
            method="pgd", norm="linf", eps=eps_inf * w, steps=steps, step_size=alpha_inf * w
        )
    return DeceptionConfig(method="pgd", norm="l2", eps=eps_2 * w, steps=steps)


def config_grid(input_shape: Sequence[int], value_range: ValueRange) -> list[DeceptionConfig]:
    """The grid of ``mextract deceive --all``: FGSM and PGD × L∞ and L2 × untargeted and
    targeted × momentum 0 and 0.9, at the radii of :func:`default_config`.

    PGD cells take :func:`default_config`'s steps, step size and random start; momentum
    changes nothing else. FGSM cells take one step of size ε and no random start, and have
    no momentum cell: with a single step, MI-FGSM is FGSM. That leaves 12 cells, in the
    order method, norm, targeted, momentum.
    """
    grid: list[DeceptionConfig] = []
    for method in METHODS:
        for norm in NORMS:
            base = default_config(input_shape, value_range, norm=norm)
            for targeted in (False, True):
                if method == "fgsm":
                    grid.append(DeceptionConfig(method="fgsm", norm=norm, eps=base.eps, targeted=targeted))
                    continue
                for momentum in (0.0, 0.9):
                    grid.append(replace(base, targeted=targeted, momentum=momentum))
    return grid


# --------------------------------------------------------------------------- crafting


def random_targets(
    y: torch.Tensor, num_classes: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """For each label, a class drawn uniformly among the ``num_classes − 1`` others:
    ``(y + U{1, …, K−1}) mod K``, with ``generator`` (CPU) for the draw."""
    if num_classes < 2:
        raise InputError(f"num_classes: expected at least 2 for a targeted attack, got {num_classes}")
    shift = torch.randint(1, num_classes, (len(y),), generator=generator)
    return (y.cpu().long() + shift) % num_classes


def _check_inputs(x: object, value_range: ValueRange, *, name: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise InputError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 2:
        raise InputError(f"{name}: expected a batch (N, ...), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise InputError(f"{name}: expected at least one sample, got an empty batch {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise InputError(f"{name}: expected finite values, got {bad} NaN or infinite value(s)")
    if not isinstance(value_range, ValueRange):
        raise InputError(f"value_range: expected a ValueRange, got {type(value_range).__name__}")
    lo, hi = float(x.min()), float(x.max())
    if (value_range.low is not None and lo < value_range.low - 1e-6) or (
        value_range.high is not None and hi > value_range.high + 1e-6
    ):
        raise InputError(f"{name}: expected values in {value_range}, got values in [{lo:g}, {hi:g}]")
    return x.detach()


def _check_labels(y: object, n: int, num_classes: int | None, name: str) -> torch.Tensor:
    if not isinstance(y, torch.Tensor):
        raise InputError(f"{name}: expected a torch.Tensor of class indices, got {type(y).__name__}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise InputError(f"{name}: expected integer class indices, got dtype {y.dtype}")
    if tuple(y.shape) != (n,):
        raise InputError(f"{name}: expected shape ({n},), one label per sample, got {tuple(y.shape)}")
    y = y.detach().cpu().long()
    if num_classes is not None and n and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise InputError(
            f"{name}: expected classes in 0..{num_classes - 1}, got {int(y.min())}..{int(y.max())}"
        )
    return y


def _param(model: nn.Module, x: torch.Tensor) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters(), None)
    return (x.device, x.dtype) if p is None else (p.device, p.dtype)


def _num_classes(model: nn.Module, x: torch.Tensor) -> int:
    dev, dtype = _param(model, x)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x[:1].to(dev, dtype))
    finally:
        model.train(was_training)
    if out.dim() != 2 or out.shape[1] < 2:
        raise InputError(f"model: expected logits of shape (N, K) with K >= 2, got {tuple(out.shape)}")
    return int(out.shape[1])


def _per_sample(t: torch.Tensor) -> tuple[int, ...]:
    return (-1,) + (1,) * (t.dim() - 1)


def _l2(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(p=2, dim=1).view(_per_sample(t))


def _project(delta: torch.Tensor, config: DeceptionConfig) -> torch.Tensor:
    if config.norm == "linf":
        return delta.clamp(-config.eps, config.eps)
    factor = (config.eps / _l2(delta).clamp_min(1e-12)).clamp(max=1.0)
    return delta * factor


def _random_start(
    x: torch.Tensor, config: DeceptionConfig, generator: torch.Generator | None
) -> torch.Tensor:
    """A uniform point of the ε-ball (drawn on the CPU with ``generator``)."""
    if config.norm == "linf":
        u = torch.rand(x.shape, generator=generator, dtype=torch.float64)
        return ((2 * u - 1) * config.eps).to(x.device, x.dtype)
    d = x[0].numel()
    direction = torch.randn(x.shape, generator=generator, dtype=torch.float64)
    direction = direction / _l2(direction).clamp_min(1e-12)
    radius = torch.rand(len(x), generator=generator, dtype=torch.float64) ** (1.0 / d) * config.eps
    return (direction * radius.view(_per_sample(x))).to(x.device, x.dtype)


def _clip(x: torch.Tensor, value_range: ValueRange) -> torch.Tensor:
    if value_range.low is None and value_range.high is None:
        return x
    return x.clamp(min=value_range.low, max=value_range.high)


def _attack_batch(
    model: nn.Module,
    x: torch.Tensor,
    label: torch.Tensor,
    config: DeceptionConfig,
    value_range: ValueRange,
    generator: torch.Generator | None,
) -> torch.Tensor:
    sign = -1.0 if config.targeted else 1.0  # descend on the target's loss, ascend on the true one's
    delta = _random_start(x, config, generator) if config.random_start else torch.zeros_like(x)
    adv = _clip(x + delta, value_range)
    g = torch.zeros_like(x)
    for _ in range(config.n_steps):
        adv = adv.detach().requires_grad_(True)
        loss = F.cross_entropy(model(adv), label, reduction="sum")
        (grad,) = torch.autograd.grad(loss, adv)
        with torch.no_grad():
            grad = sign * grad
            # MI-FGSM's accumulator; with μ = 0 it is the gradient, normalised (same sign, same direction)
            l1 = grad.flatten(1).abs().sum(1).view(_per_sample(grad)).clamp_min(1e-12)
            g = config.momentum * g + grad / l1
            step = g.sign() if config.norm == "linf" else g / _l2(g).clamp_min(1e-12)
            adv = adv + config.alpha * step
            adv = _clip(x + _project(adv - x, config), value_range)
    return adv.detach()


def craft(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: DeceptionConfig,
    *,
    value_range: ValueRange,
    generator: torch.Generator | None = None,
    target: torch.Tensor | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """Adversarial examples for ``x``, white-box on ``model`` (a classifier returning logits).

    Args:
        x: clean inputs ``(N, ...)`` within ``value_range``, finite.
        y: their labels ``(N,)``; an untargeted attack maximises their cross-entropy.
        config: the attack.
        value_range: every output is clipped to it (``None`` bounds: unbounded).
        generator: the CPU generator for random starts and default targets; ``None``
            draws from torch's global generator. Given a generator, the result is
            deterministic.
        target: for a targeted config, the class ``(N,)`` to reach, whose cross-entropy is
            minimised; ``None`` draws :func:`random_targets` (a uniform class ≠ ``y``).
            An untargeted config takes none.
        batch_size: samples per forward/backward pass.

    Returns:
        ``x_adv`` with the shape, dtype and device of ``x``, ``‖x_adv − x‖ ≤ eps`` in the
        config's norm, within ``value_range``. The model is left in the mode it was in and
        with no gradient on its parameters.
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"model: expected a torch.nn.Module returning logits, got {type(model).__name__}")
    if not isinstance(config, DeceptionConfig):
        raise InputError(f"config: expected a DeceptionConfig, got {type(config).__name__}")
    if not _integer(batch_size) or batch_size < 1:
        raise InputError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    x = _check_inputs(x, value_range)
    k = _num_classes(model, x)
    y = _check_labels(y, len(x), k, "y")
    if config.targeted:
        target = (
            random_targets(y, k, generator) if target is None else _check_labels(target, len(x), k, "target")
        )
        label = target
    else:
        if target is not None:
            raise InputError(
                "target: expected None for an untargeted config (set targeted=True to aim at a class)"
            )
        label = y
    dev, dtype = _param(model, x)
    was_training = model.training
    model.eval()  # batch-norm statistics and dropout must not move while the attack searches
    try:
        out = [
            _attack_batch(
                model,
                x[i : i + batch_size].to(dev, dtype),
                label[i : i + batch_size].to(dev),
                config,
                value_range,
                generator,
            )
            for i in range(0, len(x), batch_size)
        ]
    finally:
        model.train(was_training)
    adv = torch.cat(out).to(x.device, x.dtype)
    # the cast back to the input's dtype may round a hair outside the ball or the range
    adv = _clip(x + _project(adv - x, config), value_range)
    return adv


# --------------------------------------------------------------------------- transfer


@dataclass(frozen=True)
class TransferResult:
    """How often examples crafted on a source model fool the victim.

    Attributes:
        rate: the fraction of evaluated samples on which the victim was fooled (its label
            changed, untargeted; it equals the target, targeted); NaN when none was evaluated.
        white_box_rate: the same criterion on the source model itself.
        evaluated: samples evaluated: those the victim classifies correctly.
        samples: samples given.
        victim_accuracy: the victim's accuracy on the clean samples given.
        config: the attack.
    """

    rate: float
    white_box_rate: float
    evaluated: int
    samples: int
    victim_accuracy: float
    config: DeceptionConfig


@dataclass(frozen=True)
class TransferRow:
    """One line of :func:`transfer_table`."""

    source: str
    config: str
    rate: float
    white_box_rate: float
    evaluated: int


def _victim_labels(victim: Victim, x: torch.Tensor) -> torch.Tensor:
    if isinstance(victim, nn.Module):
        return predict_labels(victim, x)
    if not callable(victim):
        raise InputError(
            f"victim: expected an nn.Module or a callable x -> labels, got {type(victim).__name__}"
        )
    out = victim(x)
    t = out.detach() if isinstance(out, torch.Tensor) else torch.as_tensor(np.asarray(out))
    if t.dim() == 2:  # scores or one-hot answers (an oracle's query)
        t = t.argmax(1)
    if tuple(t.shape) != (len(x),):
        raise InputError(
            f"victim: expected labels ({len(x)},) or scores ({len(x)}, K) for {len(x)} inputs, "
            f"got shape {tuple(t.shape)}"
        )
    if t.is_floating_point() and not bool((torch.isfinite(t) & (t == t.round())).all()):
        raise InputError("victim: expected integer class labels, got non-integer values")
    return t.cpu().long()


def _transfer(
    source: nn.Module,
    victim: Victim,
    x: torch.Tensor,
    y: torch.Tensor,
    clean: torch.Tensor,
    config: DeceptionConfig,
    value_range: ValueRange,
    generator: torch.Generator | None,
    target: torch.Tensor | None,
    batch_size: int,
) -> TransferResult:
    correct = clean == y
    idx = correct.nonzero().flatten()
    acc = float(correct.double().mean())
    if len(idx) == 0:
        return TransferResult(float("nan"), float("nan"), 0, len(x), acc, config)
    xs, ys = x[idx], y[idx]
    if config.targeted:
        t = random_targets(ys, _num_classes(source, xs), generator) if target is None else target[idx]
    else:
        t = None
    adv = craft(source, xs, ys, config, value_range=value_range, generator=generator, target=t,
                batch_size=batch_size)  # fmt: skip
    fooled_victim = _victim_labels(victim, adv)
    fooled_source = predict_labels(source, adv, batch_size=batch_size)
    if t is not None:
        hit_v, hit_s = fooled_victim == t, fooled_source == t
    else:
        hit_v, hit_s = fooled_victim != ys, fooled_source != ys
    return TransferResult(
        rate=float(hit_v.double().mean()),
        white_box_rate=float(hit_s.double().mean()),
        evaluated=len(idx),
        samples=len(x),
        victim_accuracy=acc,
        config=config,
    )


def _check_pair(
    source: object,
    victim: object,
    x: torch.Tensor,
    y: object,
    value_range: ValueRange,
    configs: Sequence[object],
) -> torch.Tensor:
    if not isinstance(source, nn.Module):
        raise InputError(f"source: expected a torch.nn.Module returning logits, got {type(source).__name__}")
    if not isinstance(victim, nn.Module) and not callable(victim):
        raise InputError(
            f"victim: expected an nn.Module or a callable x -> labels, got {type(victim).__name__}"
        )
    for config in configs:
        if not isinstance(config, DeceptionConfig):
            raise InputError(f"config: expected a DeceptionConfig, got {type(config).__name__}")
    _check_inputs(x, value_range)
    return _check_labels(y, len(x), None, "y")


def transfer_rate(
    source: nn.Module,
    victim: Victim,
    x: torch.Tensor,
    y: torch.Tensor,
    config: DeceptionConfig,
    *,
    value_range: ValueRange,
    generator: torch.Generator | None = None,
    target: torch.Tensor | None = None,
    batch_size: int = 256,
) -> TransferResult:
    """Craft adversarial examples on ``source`` (white-box) and measure how often they fool
    ``victim`` (black-box: only its labels are read).

    The protocol is the standard one (Papernot et al. 2017; Liu et al. 2017): only the
    samples that the **victim classifies correctly** on clean inputs are attacked and
    counted (``evaluated``), for untargeted and targeted configs alike, so that a victim's
    own mistakes never count as a success. Success is, untargeted, a victim label different
    from ``y``; targeted, the victim's label equal to the target (``target``, else
    :func:`random_targets` drawn from ``generator``). ``white_box_rate`` is the same
    criterion on ``source`` itself, on the same samples.

    Args:
        victim: an ``nn.Module`` (logits out), or a callable ``x -> labels (N,)`` or
            ``x -> scores (N, K)`` (argmax taken), e.g. an owner-side oracle's ``query``;
            it is called once on the clean samples and once on the adversarial ones.
        x, y: clean samples within ``value_range`` and their true labels.
        generator: makes the random starts and default targets deterministic.
    """
    y = _check_pair(source, victim, x, y, value_range, [config])
    if target is not None:
        target = _check_labels(target, len(x), None, "target")
        if not config.targeted:
            raise InputError(
                "target: expected None for an untargeted config (set targeted=True to aim at a class)"
            )
        if bool((target == y).any()):
            raise InputError(
                f"target: expected classes different from y, got {int((target == y).sum())} equal"
            )
    clean = _victim_labels(victim, x)
    return _transfer(source, victim, x.detach(), y, clean, config, value_range, generator, target, batch_size)


def transfer_table(
    sources: dict[str, nn.Module],
    victim: Victim,
    x: torch.Tensor,
    y: torch.Tensor,
    configs: Sequence[DeceptionConfig],
    *,
    value_range: ValueRange,
    seed: int = 0,
    batch_size: int = 256,
) -> list[TransferRow]:
    """:func:`transfer_rate` for every source and config (sources outer, configs inner).

    The victim labels the clean samples once. Every cell draws its random starts and
    targets from a generator seeded with ``seed``, so that sources face the same draws
    (common random numbers) and a cell's figure does not depend on the others.
    """
    if not sources:
        raise InputError("sources: expected at least one source model, got none")
    if not configs:
        raise InputError("configs: expected at least one DeceptionConfig, got none")
    first = next(iter(sources.values()))
    y = _check_pair(first, victim, x, y, value_range, configs)
    for name, model in sources.items():
        if not isinstance(model, nn.Module):
            raise InputError(f"sources[{name!r}]: expected a torch.nn.Module, got {type(model).__name__}")
    clean = _victim_labels(victim, x)
    rows: list[TransferRow] = []
    for name, model in sources.items():
        for config in configs:
            gen = torch.Generator().manual_seed(seed)
            res = _transfer(model, victim, x.detach(), y, clean, config, value_range, gen, None, batch_size)
            rows.append(TransferRow(name, config.summary(), res.rate, res.white_box_rate, res.evaluated))
    return rows
