"""Stage-2 hard-label attacks of the sources: the attacker sees only the victim's top-1
class, and spends its budget on *new* points rather than only on pool images.

The sources' stage-2 table (CIFAR-10, VGG-11 substitute, 1.25M queries each) reports
basic 69.39% (:class:`~mextract.attacks.baselines.HardLabel`), augmentation 77.04%
(:class:`HardAugment`), boundary probing 72.12% (:class:`HardBoundary`) and mixup
86.30% (:class:`HardMixup`) test accuracy.

All three attacks use only the argmax of each answer (:func:`hard_targets`), so they work
with every answer mode; every query goes through :func:`query_pool`, is charged to the
oracle's ledger, and is planned so that an attack never spends more than its budget.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import scipy.special
import torch
import torch.nn.functional as F
from torch import nn

from mextract.attacks.base import Attack, AttackContext
from mextract.attacks.baselines import SUBSTITUTE_TRAINING
from mextract.attacks.substitute import hard_targets, query_pool, random_subset, train_substitute
from mextract.data.augment import flip_crop, random_rotation
from mextract.errors import InputError
from mextract.oracle import APIDescription
from mextract.training import TrainConfig

logger = logging.getLogger(__name__)

MixupTarget = Literal["pair", "oracle", "both"]
_MIXUP_TARGETS: tuple[str, ...] = ("pair", "oracle", "both")


# ------------------------------------------------------------------------------ helpers


def _check_images(api: APIDescription, attack: str) -> None:
    if len(api.input_shape) != 3:
        raise InputError(
            f"{attack}: expected image inputs shaped (C, H, W), got input shape {tuple(api.input_shape)}"
        )


def _check_fraction(name: str, value: float | None) -> None:
    if value is not None and not (isinstance(value, int | float) and 0 < value < 1):
        raise InputError(f"{name}: expected a number in (0, 1) or None, got {value!r}")


def _check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InputError(f"{name}: expected an integer >= {low}, got {value!r}")


def _views(ctx: AttackContext, n: int) -> torch.Tensor:
    """Indices of ``n`` pool points: whole random passes over the pool, the last one cut
    short, so that every image is used ``⌊n/|pool|⌋`` or ``⌈n/|pool|⌉`` times."""
    assert ctx.pool is not None
    size = len(ctx.pool)
    passes = [torch.randperm(size, generator=ctx.generator) for _ in range(-(-n // size))]
    return torch.cat(passes)[:n] if passes else torch.empty(0, dtype=torch.long)


def _lerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``(1 − t)·a + t·b`` per sample (``t`` has one entry per row)."""
    return a + t.view(-1, *([1] * (a.dim() - 1))) * (b - a)


def _split(budget: int, pool_size: int, fraction: float, unit: int) -> tuple[int, int]:
    """``(seeds, units)`` with ``seeds + unit·units <= budget``: about ``fraction`` of the
    budget labels pool points (at most the pool), the rest buys whole ``unit``-query units;
    the remainder of the division goes back to the seeds while the pool allows."""
    seeds = min(pool_size, budget, max(2, round(fraction * budget)))
    units = (budget - seeds) // unit
    return min(pool_size, budget - unit * units), units


def _label_pairs(y: torch.Tensor, n: int, generator: torch.Generator, rounds: int = 20) -> torch.Tensor:
    """Up to ``n`` distinct unordered index pairs ``(i, j)`` with ``y[i] != y[j]``, uniformly
    at random (rejection sampling in whole batches; shape ``(m, 2)``, ``m <= n``)."""
    s = len(y)
    if n <= 0 or s < 2 or bool((y == y[0]).all()):
        return torch.empty(0, 2, dtype=torch.long)
    keys = torch.empty(0, dtype=torch.long)
    for _ in range(rounds):
        i = torch.randint(s, (4 * n,), generator=generator)
        j = torch.randint(s, (4 * n,), generator=generator)
        ok = y[i] != y[j]
        lo, hi = torch.minimum(i, j)[ok], torch.maximum(i, j)[ok]
        keys = torch.unique(torch.cat([keys, lo * s + hi]))
        if len(keys) >= n:
            break
    keys = keys[torch.randperm(len(keys), generator=generator)[:n]]
    pairs = torch.stack([keys // s, keys % s], 1)
    # random orientation: which endpoint is the search's "inside" end
    swap = torch.rand(len(pairs), generator=generator) < 0.5
    return torch.where(swap.view(-1, 1), pairs.flip(1), pairs)


def _beta(alpha: float, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` draws of Beta(α, α) from the run's generator (inverse CDF of uniform draws;
    ``torch.distributions.Beta`` cannot take a generator)."""
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    return torch.from_numpy(scipy.special.betaincinv(alpha, alpha, u.numpy())).float()


# ------------------------------------------------------------------------------ attacks


@dataclass(kw_only=True)
class HardAugment(Attack):
    """Stage-2 "augmentation": query *augmented* pool images, train on what was queried.

    Each query is a fresh augmented view of a pool image, with the sources' CIFAR-10
    augmentations (the standard ``RandomCrop(padding=4)``, ``RandomHorizontalFlip``,
    ``RandomRotation(15)`` pipeline): a horizontal flip with probability 1/2 (``flip``),
    a random crop after zero-padding by ``pad`` pixels, then a rotation by an angle drawn
    uniformly from ``[-degrees, degrees]`` (zero fill). The augmented image is both what
    the oracle labels and what the substitute trains on (CE on the returned top-1 class,
    no further training-time augmentation, whose labels would be unknown), so the budget
    buys points beyond the pool.

    Choices:
        * ``flip=True`` is the sources' default (natural images). A horizontal flip changes
          the meaning of digits and text; turn it off (``flip=False``) for such data.
        * Views: the ``budget`` queried images are whole random passes over the pool (every
          pool image appears ``⌊budget/|pool|⌋`` or ``⌈budget/|pool|⌉`` times, each time
          with its own independent augmentation); with ``budget <= |pool|`` this is one view
          of each of ``budget`` distinct pool images, like :class:`HardLabel`'s subset.

    Queries: exactly ``budget`` — one per augmented view, in chunks via :func:`query_pool`;
    nothing else is asked. Image inputs ``(C, H, W)`` only.

    Faithfulness: ``docs/faithfulness.md#hard-augment``.
    """

    name: ClassVar[str] = "hard_augment"
    flip: bool = True
    pad: int = 4
    degrees: float = 15.0
    train: TrainConfig = SUBSTITUTE_TRAINING

    def max_queries(self, pool_size: int | None) -> int | None:
        return None  # its queries are made from the pool, not drawn from it

    def check_params(self, api: APIDescription, pool: torch.Tensor | None, budget: int) -> None:
        _check_images(api, self.name)
        if not isinstance(self.flip, bool):
            raise InputError(f"flip: expected True or False, got {self.flip!r}")
        _check_int("pad", self.pad, 0)
        if not (isinstance(self.degrees, int | float) and 0 <= self.degrees <= 180):
            raise InputError(f"degrees: expected a number in [0, 180], got {self.degrees!r}")

    def augment(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Flip (if ``flip``), pad-and-crop, rotate: one independent draw per image."""
        x = flip_crop(x, generator, pad=self.pad, flip=self.flip)
        if self.degrees > 0:
            x = random_rotation(x, generator, degrees=float(self.degrees))
        return x

    def run(self, ctx: AttackContext) -> nn.Module:
        assert ctx.pool is not None
        x = self.augment(ctx.pool[_views(ctx, ctx.budget)], ctx.generator)
        y = hard_targets(query_pool(ctx, x))
        logger.info("%s: %d augmented views of %d pool images queried", self.name, len(x), len(ctx.pool))
        return train_substitute(ctx, x, y, soft=False, config=self.train)


@dataclass(kw_only=True)
class HardBoundary(Attack):
    """Stage-2 "boundary probing": binary searches between differently labelled pool images.

    1. *Seeds*: a random subset of the pool is labelled (top-1 class).
    2. *Pairs*: distinct unordered pairs of seeds with different labels are drawn uniformly
       at random (each oriented at random: the search starts "inside" ``x_a``'s label).
    3. *Search*: on the segment ``x(t) = (1 − t)·x_a + t·x_b`` a bracket ``[t_lo, t_hi]``
       starts at ``[0, 1]``; each of ``steps`` steps queries the midpoint of every pair's
       bracket in one batched query and keeps the half where the label leaves ``y_a``
       (``label(x(t_lo)) = y_a``, ``label(x(t_hi)) != y_a`` at all times, so a third class
       met on the way is handled too). After ``steps`` steps the bracket is ``2^-steps``
       of the segment long, and both of its ends are labelled points (a probed midpoint or
       the seed itself), the boundary-adjacent pair on either side of the boundary.
    4. *Training*: CE on every labelled point — the seeds and every probed midpoint, the
       final bracket ends included, since all carry oracle labels.

    Budget split (``seed_fraction``; default ``1/(1 + steps)``, i.e. as many seeds as
    searches, so every seed is on average an endpoint of two searched pairs): ``S`` seeds
    (at most the pool) and ``P = ⌊(budget − S)/steps⌋`` searches, the remainder of the
    division going back to the seeds while the pool allows. A budget smaller than
    ``steps + 2`` labels seeds only. If fewer than ``P`` differently labelled pairs exist,
    the budget they would have used stays unspent.

    Queries: ``S + steps·P <= budget`` — one per seed and one per probed midpoint (every
    step of every search); searches stop early (keeping the points probed so far) only if
    the ledger runs dry — e.g. an oracle whose own budget is smaller than the attack's —
    so the search never raises ``BudgetExceededError``. ``steps = 10`` follows the
    sources. Works for any input shape (the segment is taken in input space).

    Faithfulness: ``docs/faithfulness.md#hard-boundary``.
    """

    name: ClassVar[str] = "hard_boundary"
    steps: int = 10
    seed_fraction: float | None = None
    train: TrainConfig = SUBSTITUTE_TRAINING

    def max_queries(self, pool_size: int | None) -> int | None:
        return None  # its queries are made from the pool, not drawn from it

    def check_params(self, api: APIDescription, pool: torch.Tensor | None, budget: int) -> None:
        _check_int("steps", self.steps, 1)
        _check_fraction("seed_fraction", self.seed_fraction)

    def run(self, ctx: AttackContext) -> nn.Module:
        assert ctx.pool is not None
        fraction = 1 / (1 + self.steps) if self.seed_fraction is None else float(self.seed_fraction)
        if ctx.budget < self.steps + 2:
            n_seeds, n_pairs = min(len(ctx.pool), ctx.budget), 0
        else:
            n_seeds, n_pairs = _split(ctx.budget, len(ctx.pool), fraction, self.steps)
        x_seed = ctx.pool[random_subset(ctx, n_seeds)]
        y_seed = hard_targets(query_pool(ctx, x_seed))
        xs, ys = [x_seed], [y_seed]
        pairs = _label_pairs(y_seed, n_pairs, ctx.generator)
        if len(pairs) < n_pairs:
            logger.warning(
                "%s: only %d of %d differently labelled seed pairs exist; %d queries stay unspent",
                self.name, len(pairs), n_pairs, (n_pairs - len(pairs)) * self.steps,
            )  # fmt: skip
        xa, xb, ya = x_seed[pairs[:, 0]], x_seed[pairs[:, 1]], y_seed[pairs[:, 0]]
        lo, hi = torch.zeros(len(pairs)), torch.ones(len(pairs))
        alive = len(pairs)  # searches still running (a prefix; shrinks only if the budget ends)
        for step in range(self.steps):
            alive = min(alive, ctx.remaining)  # the attack's budget and any quota of the API's own
            if alive == 0:
                break
            t = (lo[:alive] + hi[:alive]) / 2
            xm = _lerp(xa[:alive], xb[:alive], t)
            ym = hard_targets(query_pool(ctx, xm))
            inside = ym == ya[:alive]
            lo[:alive] = torch.where(inside, t, lo[:alive])
            hi[:alive] = torch.where(inside, hi[:alive], t)
            xs.append(xm)
            ys.append(ym)
            ctx.emit(stage="boundary", done=step + 1, total=self.steps)
        logger.info(
            "%s: %d seeds, %d searches of %d steps, %d queries",
            self.name, len(x_seed), len(pairs), self.steps, ctx.spent,
        )  # fmt: skip
        return train_substitute(ctx, torch.cat(xs), torch.cat(ys), soft=False, config=self.train)


@dataclass(kw_only=True)
class HardMixup(Attack):
    """Stage-2 "mixup" (Zhang et al., "mixup: Beyond Empirical Risk Minimization", ICLR
    2018): query mixed images, train on the mixed label pair, ``λ ~ Beta(α, α)``, ``α = 1``.

    1. *Endpoints*: a random subset of ``S`` pool images is labelled (top-1 class); their
       labels are bought once and reused by every mixture they enter.
    2. *Mixed queries*: the remaining ``M = budget − S`` queries are mixed images
       ``x̃ = λ·x_i + (1 − λ)·x_j`` with ``(i, j)`` a uniformly random pair of distinct
       endpoints and one ``λ ~ Beta(α, α)`` per mixture; each ``x̃`` is queried for its
       top-1 class ``ŷ``.
    3. *Training* (soft cross-entropy, :func:`train_substitute` with ``soft=True, T=1``):
       the endpoints with their one-hot labels, and every mixed image with a target
       chosen by ``target``:

       * ``"pair"`` — the sources' mixed label pair ``λ·e(y_i) + (1 − λ)·e(y_j)`` (Zhang et
         al.'s target), ``y_i, y_j`` the oracle's endpoint labels; ``ŷ`` is bought (the
         sources query mixed images) but unused;
       * ``"oracle"`` — the oracle's own label ``e(ŷ)`` of the mixed image;
       * ``"both"`` (default) — each mixed query is two training examples, ``(x̃, pair)``
         and ``(x̃, e(ŷ))``; soft cross-entropy being linear in the target, they are stored
         as one example with the average target ``½·pair + ½·e(ŷ)``.

       ``"both"`` is the default because it is the sources' recipe (query the mixed image,
       train on its mixed label pair) with no answer thrown away: every label trained on
       comes from the oracle, and where the victim's label of ``x̃`` disagrees with the
       linear interpolation the pair assumes, the bought answer corrects it.

    Budget split (``seed_fraction``, default ½ — no figure in the sources; half the budget
    buys endpoint labels, half buys mixed points): ``S = min(|pool|, round(½·budget))``
    (at least 2 when the budget allows), so budgets beyond twice the pool all go to
    mixtures. Queries: exactly ``S + M = budget`` (one per endpoint, one per mixed image).
    Works for any input shape (mixing is in input space, as in Zhang et al.).

    Faithfulness: ``docs/faithfulness.md#hard-mixup``.
    """

    name: ClassVar[str] = "hard_mixup"
    alpha: float = 1.0
    target: MixupTarget = "both"
    seed_fraction: float = 0.5
    train: TrainConfig = SUBSTITUTE_TRAINING

    def max_queries(self, pool_size: int | None) -> int | None:
        return None  # its queries are made from the pool, not drawn from it

    def check_params(self, api: APIDescription, pool: torch.Tensor | None, budget: int) -> None:
        if not (isinstance(self.alpha, int | float) and 0 < self.alpha < math.inf):
            raise InputError(f"alpha: expected a positive number, got {self.alpha!r}")
        if self.target not in _MIXUP_TARGETS:
            raise InputError(f"target: expected one of {', '.join(_MIXUP_TARGETS)}, got {self.target!r}")
        _check_fraction("seed_fraction", self.seed_fraction)

    def run(self, ctx: AttackContext) -> nn.Module:
        assert ctx.pool is not None
        k = ctx.api.num_classes
        n_seeds, n_mixed = _split(ctx.budget, len(ctx.pool), float(self.seed_fraction), 1)
        x_seed = ctx.pool[random_subset(ctx, n_seeds)]
        y_seed = hard_targets(query_pool(ctx, x_seed))
        s = len(x_seed)
        i = torch.randint(s, (n_mixed,), generator=ctx.generator)
        # j != i whenever there are two endpoints to choose from
        j = (i + torch.randint(1, max(s, 2), (n_mixed,), generator=ctx.generator)) % s
        lam = _beta(float(self.alpha), n_mixed, ctx.generator)
        x_mix = _lerp(x_seed[j], x_seed[i], lam)  # λ·x_i + (1 − λ)·x_j
        y_mix = hard_targets(query_pool(ctx, x_mix))
        onehot = F.one_hot(y_seed, k).float()
        pair = _lerp(onehot[j], onehot[i], lam)
        bought = F.one_hot(y_mix, k).float()
        mixed = {"pair": pair, "oracle": bought, "both": (pair + bought) / 2}[self.target]
        agree = float((pair.argmax(1) == y_mix).float().mean()) if n_mixed else float("nan")
        logger.info(
            "%s: %d endpoints, %d mixed queries; victim agrees with the pair's argmax on %.1f%%",
            self.name, s, n_mixed, 100 * agree,
        )  # fmt: skip
        x = torch.cat([x_seed, x_mix])
        targets = torch.cat([onehot, mixed])
        return train_substitute(ctx, x, targets, soft=True, temperature=1.0, config=self.train)
