"""Semi-supervised substitute training on the attacker's unqueried pool (FixMatch).

An attacker's pool is usually much larger than its query budget. The unqueried points
carry no victim answer, but the substitute can label them itself: this module adds
FixMatch's consistency term (Sohn et al., NeurIPS 2020), which generalises confidence-
thresholded pseudo-labelling (Lee 2013), to the shared training loop. Per step:

* the labelled batch (queried points, victim targets) gets the attack's usual loss —
  KD at temperature ``T`` for soft answers, cross-entropy for hard ones — on a *weakly*
  augmented view, as in FixMatch;
* ``ratio·B`` unqueried points are drawn (with replacement across steps, uniformly,
  from a dedicated seeded generator); the substitute's softmax on a weak view gives a
  hard pseudo-label ``ŷ = argmax p`` kept only if ``max p ≥ threshold``; the
  cross-entropy of the substitute on a *strong* view against ``ŷ`` is averaged over the
  whole unlabelled batch (masked rows count as zero) and added with weight ``weight``.

Pseudo-labels come from the substitute, never from the victim: this costs **no query**.

Choices (FixMatch's defaults unless stated): ``threshold = 0.95``, ``weight = 1``. The
unlabelled ratio ``ratio`` defaults to 3, not FixMatch's 7, because each unlabelled
view costs a forward (and, for the strong one, backward) pass and this lab trains on
CPUs. The weak view is a random translation by up to 12.5% of the image side (FixMatch's
"flip-and-shift" without the flip, which is not label-preserving for digits or text; set
``flip=True`` for natural images); the strong view is TrivialAugmentWide (the
parameter-free relative of FixMatch's RandAugment) followed by Cutout-like random
erasing, always applied. Pseudo-labels are computed under ``no_grad`` in a separate
forward pass in train mode; the labelled and strong views share one forward pass, as
FixMatch's interleaved batch does (the separate weak pass saves its backward). For
non-image inputs both views are the identity, which reduces the method to Lee's
pseudo-labelling.

Schedule (``epochs_over``): FixMatch counts its training in steps, and with few labels it
cycles the labelled set many times per pass over the unlabelled data. Here too an epoch is
one pass over the *unlabelled* pool (``"unlabeled"``, the default): the labelled set is
repeated ``⌈|U| / (ratio·|L|)⌉`` times per epoch, so that a small budget still gets enough
steps for the pseudo-labels to spread. ``"labeled"`` counts epochs over the labelled set as
supervised training does (then 250 labels at batch 64 make 4 steps an epoch). Measured on
the bundled mnist victim at 250 label-only queries (seed 0): ``active_hard`` with FixMatch
reached 94.5% fidelity at its 20 labelled epochs and 97.0% at 40, so the labelled count
starves FixMatch; at its 20 epochs over the unlabelled pool it reaches 96.9%. Random queries
at 40 epochs gave 96.8% (``"labeled"``) and 96.7% (``"unlabeled"``), so the longer schedule
costs nothing where the shorter one sufficed.

When (``when``): ``"always"`` (what ``semi={}`` asks for), or ``"auto"`` — only for
label-only answers and only when the unqueried pool holds at least ``ratio`` points per
queried one (a large pool and a small budget, where FixMatch pays: the mnist figures in
``docs/attacks.md``). With probabilities the victim's answers already carry its knowledge
of every class, and hard pseudo-labels measured no gain (``kd`` at 1,000 queries: 98.0%
with FixMatch, 98.3% without). ``active`` and its presets use ``"auto"`` by default.

FlexMatch's class-wise curriculum thresholds (Zhang et al., NeurIPS 2021) were tried in
place of the fixed threshold: with the lab's short CPU schedules its near-zero early
thresholds admit wrong pseudo-labels (250 label-only queries: 96.7% and 94.5% fidelity on
seeds 0 and 1 against FixMatch's 96.8% and 95.9%); not kept.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mextract.attacks.base import AttackContext
from mextract.attacks.substitute import ce_loss, kd_loss, train_substitute
from mextract.data.augment import flip_crop, random_erasing, trivial_augment_wide
from mextract.errors import InputError, UnknownNameError
from mextract.training import BatchLoss, LossFn, TrainConfig, Transform

logger = logging.getLogger(__name__)


EPOCHS_OVER = ("unlabeled", "labeled")
WHEN = ("always", "auto")


def _is_image(shape: tuple[int, ...]) -> bool:
    return len(shape) == 3 and shape[0] in (1, 3) and min(shape[1:]) >= 4


@dataclass(frozen=True, kw_only=True)
class SemiSupervised:
    """FixMatch settings (see the module docstring for every choice)."""

    threshold: float = 0.95
    weight: float = 1.0
    ratio: int = 3
    shift: float = 0.125
    flip: bool = False
    epochs_over: str = "unlabeled"
    when: str = "always"

    def __post_init__(self) -> None:
        if not 0 <= self.threshold <= 1:
            raise InputError(f"threshold: expected a value in [0, 1], got {self.threshold}")
        if not self.weight >= 0:
            raise InputError(f"weight: expected a non-negative number, got {self.weight}")
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, int) or self.ratio < 1:
            raise InputError(f"ratio: expected a positive integer, got {self.ratio!r}")
        if not 0 <= self.shift < 0.5:
            raise InputError(f"shift: expected a value in [0, 0.5), got {self.shift}")
        if self.epochs_over not in EPOCHS_OVER:
            raise UnknownNameError("epochs_over", str(self.epochs_over), list(EPOCHS_OVER))
        if self.when not in WHEN:
            raise UnknownNameError("when", str(self.when), list(WHEN))

    def applies(self, *, soft: bool, labeled: int, unlabeled: int) -> bool:
        """Whether to train semi-supervised (see ``when``): always, or — ``"auto"`` — for label
        answers when the unqueried pool holds at least ``ratio`` points per queried one."""
        if self.when == "always":
            return True
        return not soft and unlabeled >= self.ratio * labeled

    def repeats(self, labeled: int, unlabeled: int) -> int:
        """How many times the labelled set is cycled per epoch (see ``epochs_over``)."""
        if self.epochs_over == "labeled" or self.weight == 0 or labeled == 0:
            return 1
        return max(1, -(-unlabeled // (self.ratio * labeled)))

    # ------------------------------------------------------------------ augmentations
    def weak(self, shape: tuple[int, ...]) -> Transform | None:
        """Random translation (and optional horizontal flip) for images; ``None`` otherwise."""
        if not _is_image(shape):
            return None
        pad = max(1, round(self.shift * min(shape[1:])))
        flip = self.flip

        def transform(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
            return flip_crop(x, g, pad=pad, flip=flip)

        return transform

    def strong(self, shape: tuple[int, ...]) -> Transform | None:
        """Weak view, then TrivialAugmentWide and random erasing (always) for images."""
        weak = self.weak(shape)
        if weak is None:
            return None

        def transform(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
            return random_erasing(trivial_augment_wide(weak(x, g), g), g, p=1.0)

        return transform

    # ------------------------------------------------------------------------ the loss
    def batch_loss(
        self,
        supervised: LossFn,
        unlabeled: torch.Tensor,
        generator: torch.Generator,
        stats: dict[str, float] | None = None,
    ) -> BatchLoss:
        """A :data:`~mextract.training.BatchLoss` adding FixMatch's unlabelled term to ``supervised``.

        ``unlabeled`` stays on the CPU; each call draws ``ratio × len(batch)`` rows of it.
        ``stats``, if given, counts the steps and sums the share of unlabelled views above
        the confidence threshold (``"steps"``, ``"masked"``).
        """
        shape = tuple(unlabeled.shape[1:])
        weak, strong = self.weak(shape), self.strong(shape)
        if stats is None:
            stats = {}
        stats.update(steps=0, masked=0.0)

        def loss(model: nn.Module, xb: torch.Tensor, tb: torch.Tensor) -> torch.Tensor:
            if self.weight == 0 or len(unlabeled) == 0:
                return supervised(model(xb), tb)
            idx = torch.randint(len(unlabeled), (self.ratio * len(xb),), generator=generator)
            u = unlabeled[idx]
            uw = u if weak is None else weak(u, generator)
            us = u if strong is None else strong(u, generator)
            with torch.no_grad():
                p = torch.softmax(model(uw.to(xb.device)).float(), dim=1)
            conf, pseudo = p.max(1)
            mask = (conf >= self.threshold).float()
            stats["steps"] += 1
            stats["masked"] += float(mask.mean())
            logits = model(torch.cat([xb, us.to(xb.device)]))  # one pass: shared batch-norm statistics
            sup = supervised(logits[: len(xb)], tb)
            unsup = (F.cross_entropy(logits[len(xb) :], pseudo, reduction="none") * mask).mean()
            return sup + self.weight * unsup

        return loss


def train_semi(
    ctx: AttackContext,
    x: torch.Tensor,
    targets: torch.Tensor,
    unlabeled: torch.Tensor,
    semi: SemiSupervised,
    *,
    soft: bool,
    temperature: float = 1.0,
    config: TrainConfig,
    model: nn.Module | None = None,
) -> nn.Module:
    """:func:`~mextract.attacks.substitute.train_substitute` with FixMatch on ``unlabeled``.

    ``x``/``targets`` are the queried points and their targets, exactly as for
    ``train_substitute``; ``unlabeled`` are pool points *not* sent to the oracle. No
    query is made here. The unlabelled sampler's generator is seeded from
    ``ctx.generator``; the labelled batch is weakly augmented by the shared loop.
    """
    if len(unlabeled) and tuple(unlabeled.shape[1:]) != tuple(x.shape[1:]):
        raise InputError(
            f"unlabeled: expected rows of shape {tuple(x.shape[1:])}, got {tuple(unlabeled.shape[1:])}"
        )
    g = torch.Generator().manual_seed(int(torch.randint(2**31 - 1, (1,), generator=ctx.generator)))
    supervised: LossFn = kd_loss(temperature) if soft else ce_loss
    st: dict[str, float] = {}
    bl = semi.batch_loss(supervised, unlabeled, g, stats=st)
    reps = semi.repeats(len(x), len(unlabeled))
    if reps > 1:  # one epoch = one pass over the unlabelled pool; the labelled set is cycled
        x = x.repeat(reps, *([1] * (x.dim() - 1)))
        targets = targets.repeat(reps, *([1] * (targets.dim() - 1)))
    model = train_substitute(
        ctx, x, targets, soft=soft, temperature=temperature, config=config,
        transform=semi.weak(tuple(x.shape[1:])), model=model, batch_loss=bl,
    )  # fmt: skip
    logger.info(
        "fixmatch: %d steps, %.1f%% of unlabelled views above the threshold",
        st["steps"], 100 * st["masked"] / max(1, st["steps"]),
    )  # fmt: skip
    return model
