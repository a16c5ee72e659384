"""Data-free model extraction, DFME (Truong, Maini, Walls & Papernot, "Data-Free Model
Extraction", CVPR 2021): no attacker pool at all. A generator ``G`` synthesises queries
that make the substitute ``S`` and the victim ``V`` disagree; the substitute learns to
agree with the victim on them. A min-max game on the ℓ1 distance between logits::

    min_S max_G  E_z || V(G(z)) - S(G(z)) ||_1

then (this lab's final phase, as mebench scores DFME) a fresh substitute trained on every
query–answer pair the game paid for.

Components. The paper's settings (its CIFAR-10/SVHN runs of 20M queries, §4, appendix
and reference code) unless marked **lab**, where a budget 100–1000× smaller or a victim
that reads raw pixels calls for another choice (reasons in ``docs/attacks.md``, "Why
DFME was at chance"):

* **Logit recovery** (§3.3): the API returns probabilities ``p``; the victim's logits
  are recovered up to the per-sample constant every softmax ignores as
  ``l = log p - mean_k log p`` (mean correction). A ``logits`` oracle is centred the
  same way. Top-k, rounded or label-only answers do not determine ``log p`` (zeros,
  quantised values) and are refused (``dfme_hard`` reads labels).
* **Loss** (§3.2): ℓ1 between the substitute's logits and the recovered victim logits,
  averaged over classes and batch (``F.l1_loss``); the generator maximises it (its loss
  is the negative), the substitute minimises it.
* **Generator** (the DFAD/DFME generator, Fang et al. 2019): ``z ~ N(0, I)`` of
  ``latent_dim = 256`` → linear → ``(2·ngf, ⌈H/4⌉, ⌈W/4⌉)`` → BN → 2× nearest upsample →
  conv 3×3 → BN → LeakyReLU(0.2) → 2× upsample → conv → BN → LeakyReLU → conv to ``C``
  channels → BN (no affine) → ``tanh``, ``ngf = 64``. Sizes that are not a multiple of 4
  (e.g. 30×30) get a final bilinear resize; 8×8, 28×28 and 32×32 are exact.
* **Pixels** (**lab**, ``pixels="clip"``): DFME's victims read the ``tanh`` output in
  [-1, 1] as *normalised* images, where 0 is the data mean. Ours read pixels in [0, 1].
  The last batch norm has no affine part, so each channel's pre-activation has zero
  batch mean: mapped affinely, ``(tanh(a) + 1) / 2`` (``pixels="affine"``, this lab's
  earlier choice), every batch averages mid-grey and a dark background (MNIST's mean
  pixel is 0.13) is out of the generator's reach. ``"clip"`` keeps the paper's values
  and clips them to the pixel range, ``clamp(tanh(a), 0, 1)`` (what mebench sends a
  [0, 1] victim): 0 stays black.
* **Zeroth-order gradient** (§3.4): the victim is a black box, so the gradient of the
  generator's loss with respect to the pre-activation ``a`` of each image is estimated
  by forward differences along ``m`` random unit directions ``u`` (uniform on the
  sphere), ``∇ ≈ (d/m) Σ_j [L(a + εu_j) - L(a)] / ε · u_j`` with ``d`` the input size,
  ``m = 1``, ``ε = 1e-3`` (as the paper's code, the perturbation is applied before the
  ``tanh``, and ``L`` is the per-sample disagreement, substitute included). The estimate
  is back-propagated through ``G``.
* **Schedule**: per iteration ``n_G = 1`` generator step then ``n_S = 5`` substitute
  steps, each on a fresh batch of generated images; substitute: SGD lr 0.1, momentum
  0.9, weight decay 5e-4; generator: Adam. Both rates are multiplied by 0.3 at 10 %,
  30 % and 50 % of ``schedule_queries`` (the paper's 20M queries; ``None``: of this
  run's budget) — below 2M queries they never decay, as in mebench (the reference code
  counts "epochs" of 50 iterations, 89,600 queries at its batch of 256: a 20k run is one
  epoch and all three milestones round to epoch 0, a case its 20M runs never meet).
  **lab**: ``batch_size = 64`` (the paper: 256) and generator rate 1e-3 (DFAD's rate,
  Fang et al. 2019; DFME's 1e-4 is for 11,000 iterations): at 20k queries the game then
  gets 44 turns instead of 11, and the generator moves in them. The
  generator always runs in training mode (batch statistics, as in the paper's code); the
  substitute is held in evaluation mode while it is part of the estimated objective, so
  that a perturbed point's loss does not depend on the other points of its batch
  through batch norm, and trains in training mode.
* **Final phase** (**lab**, ``retrain=True``; mebench scores DFME this way): every
  image the victim answered — the generator steps' images and their perturbations as
  well as the substitute steps' — is kept with its answer, and a fresh substitute is
  trained on all of them with ``train`` (the project's schedule: SGD with Nesterov
  momentum, one-cycle rate peaking at 0.05, 30 epochs, batches of 128) and
  ``retrain_loss``: ``"l1"`` (default: DFME's own loss, ℓ1 on mean-centred logits; the
  paper's §3.2 argues it keeps a gradient where KL's vanishes) or ``"kl"`` (KL on
  probabilities, mebench's). It queries nothing. ``retrain=False`` returns the online
  student, as the paper does.

**Query accounting.** Every image the victim sees is charged to the ledger:

* a generator step queries ``batch_size · (m + 1)`` images (each image and its ``m``
  perturbations);
* a substitute step queries ``batch_size`` images.

One iteration therefore costs ``c = n_G · B · (m + 1) + n_S · B`` queries (448 with the
defaults, 1,792 at the paper's batch of 256) and the attack runs ``⌊budget / c⌋``
iterations; the remainder ``budget mod c`` is left unspent (a partial iteration would
bias the schedule). A budget below ``min_iterations · c`` (5 iterations, 2,240 queries
with the defaults) is refused: with fewer game turns the generator stays at its random
start and the run is a noise-query baseline, not DFME.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mextract.attacks.base import Attack, AttackContext
from mextract.attacks.substitute import train_substitute
from mextract.errors import InputError
from mextract.oracle import AnswerMode, APIDescription, answers_to_probs
from mextract.training import TrainConfig

logger = logging.getLogger(__name__)

#: Answer modes from which DFME can recover the victim's logits (up to a constant).
SOFT_ENOUGH = (AnswerMode.LOGITS, AnswerMode.PROBS)


class DFMEGenerator(nn.Module):
    """The DFAD/DFME image generator; ``forward(z, pre=True)`` returns the pre-``tanh`` map."""

    def __init__(
        self, output_shape: tuple[int, int, int], latent_dim: int = 256, ngf: int = 64, pixels: str = "clip"
    ) -> None:
        super().__init__()
        c, h, w = output_shape
        self.pixels = pixels
        self.output_shape = output_shape
        self.latent_dim = latent_dim
        self.init = (math.ceil(h / 4), math.ceil(w / 4))
        self.l1 = nn.Linear(latent_dim, 2 * ngf * self.init[0] * self.init[1])
        self.bn0 = nn.BatchNorm2d(2 * ngf)
        self.block1 = nn.Sequential(
            nn.Conv2d(2 * ngf, 2 * ngf, 3, 1, 1, bias=False), nn.BatchNorm2d(2 * ngf),
            nn.LeakyReLU(0.2, inplace=True),
        )  # fmt: skip
        self.block2 = nn.Sequential(
            nn.Conv2d(2 * ngf, ngf, 3, 1, 1, bias=False), nn.BatchNorm2d(ngf),
            nn.LeakyReLU(0.2, inplace=True), nn.Conv2d(ngf, c, 3, 1, 1), nn.BatchNorm2d(c, affine=False),
        )  # fmt: skip

    def forward(self, z: torch.Tensor, pre: bool = False) -> torch.Tensor:
        out = self.l1(z).view(len(z), -1, *self.init)
        out = F.interpolate(self.bn0(out), scale_factor=2, mode="nearest")
        out = F.interpolate(self.block1(out), scale_factor=2, mode="nearest")
        out = self.block2(out)
        if tuple(out.shape[2:]) != self.output_shape[1:]:
            out = F.interpolate(out, size=self.output_shape[1:], mode="bilinear", align_corners=False)
        return out if pre else to_image(out, self.pixels)


#: The paper's query budget on CIFAR-10 (20M): its learning-rate milestones are fractions of it.
PAPER_QUERIES = 20_000_000

#: The final phase's losses: DFME's ℓ1 on (mean-centred) logits, or KL on probabilities.
RETRAIN_LOSSES = ("l1", "kl")

#: The final phase's substitute training (``retrain``): the project's default substitute
#: schedule (SGD, Nesterov momentum, one-cycle rate peaking at 0.05, 30 epochs, batches of
#: 128), on every stored query–answer pair with the KL loss on probabilities.
RETRAIN_TRAINING = TrainConfig(epochs=30, batch_size=128, lr=0.05)


class QueryStore:
    """Every image the victim answered and its answer as a probability vector.

    Preallocated for ``capacity`` images (the attack knows how many it will send), kept on
    the CPU. A thief owns every pair it paid for; :meth:`tensors` returns them for the
    final substitute training.
    """

    def __init__(self, capacity: int, shape: tuple[int, ...], num_classes: int) -> None:
        self.x = torch.empty(capacity, *shape)
        self.p = torch.empty(capacity, num_classes)
        self.n = 0

    def add(self, x: torch.Tensor, probs: torch.Tensor) -> None:
        k = len(x)
        if self.n + k > len(self.x):
            raise RuntimeError(f"query store full: {self.n} + {k} > {len(self.x)}")
        self.x[self.n : self.n + k] = x.detach().cpu()
        self.p[self.n : self.n + k] = probs.detach().float().cpu()
        self.n += k

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[: self.n], self.p[: self.n]


def l1_logit_loss(model: nn.Module, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """DFME's substitute loss on stored pairs: ℓ1 between the substitute's mean-centred logits
    and the victim's recovered logits ``log p - mean log p``."""
    s = model(x)
    return F.l1_loss(s - s.mean(1, keepdim=True), victim_logits(probs, AnswerMode.PROBS))


def retrain_substitute(
    ctx: AttackContext, x: torch.Tensor, probs: torch.Tensor, loss: str, config: TrainConfig
) -> nn.Module:
    """The final phase: a fresh substitute trained on every stored pair, with ``loss`` ``"l1"``
    (:func:`l1_logit_loss`) or ``"kl"`` (KL on probabilities, temperature 1)."""
    if loss == "kl":
        return train_substitute(ctx, x, probs, soft=True, config=config)
    return train_substitute(ctx, x, probs, soft=True, config=config, batch_loss=l1_logit_loss)


def check_retrain(attack: object) -> None:
    """``retrain`` must be a bool and ``train`` a :class:`TrainConfig` (an ``InputError`` if not)."""
    if not isinstance(getattr(attack, "retrain", None), bool):
        raise InputError(f"retrain: expected true or false, got {getattr(attack, 'retrain', None)!r}")
    if not isinstance(getattr(attack, "train", None), TrainConfig):
        raise InputError(f"train: expected training settings, got {getattr(attack, 'train', None)!r}")


#: How the generator's ``tanh`` output becomes pixels in [0, 1] (see the module docstring).
PIXEL_MAPS = ("clip", "affine")


def to_image(pre: torch.Tensor, pixels: str = "clip") -> torch.Tensor:
    """Map a generator pre-activation to images in [0, 1]: ``clamp(tanh(a), 0, 1)`` (``"clip"``:
    the paper's [-1, 1] output clipped to the pixel range) or ``(tanh(a) + 1) / 2`` (``"affine"``)."""
    if pixels == "affine":
        return (torch.tanh(pre) + 1) / 2
    return torch.tanh(pre).clamp_min(0)


def victim_logits(answers: torch.Tensor, mode: AnswerMode) -> torch.Tensor:
    """The paper's mean-corrected logit recovery: ``log p - mean(log p)`` (or centred logits)."""
    a = answers.float()
    if mode is AnswerMode.LOGITS:
        return a - a.mean(1, keepdim=True)
    logp = torch.log(a.clamp_min(torch.finfo(a.dtype).tiny))
    return logp - logp.mean(1, keepdim=True)


@dataclass(kw_only=True)
class DataFreeExtraction(Attack):
    """DFME (Truong et al., CVPR 2021): a generator-driven, pool-free extraction, then a
    fresh substitute trained on every stored query–answer pair.

    Args: batch_size 64 (paper: 256), latent_dim 256, ngf 64, n_generator 1,
    n_substitute 5, directions ``m`` 1, epsilon 1e-3, lr_substitute 0.1 (SGD),
    lr_generator 1e-3 (Adam; paper: 1e-4), lr_steps (0.1, 0.3, 0.5) of
    ``schedule_queries`` (20M, the paper's budget; ``None``: this run's budget), lr_decay
    0.3, pixels ``"clip"`` or ``"affine"``, evaluations (how many times the history scores
    the online student), min_iterations 5 (smaller budgets are refused), retrain (the
    final phase, on by default), retrain_loss ``"l1"``
    or ``"kl"``, train (the final phase's schedule). See the module docstring for every
    choice and the query accounting.

    Faithfulness: ``docs/faithfulness.md#dfme``.
    """

    name: ClassVar[str] = "dfme"
    needs_pool: ClassVar[bool] = False
    batch_size: int = 64
    latent_dim: int = 256
    ngf: int = 64
    n_generator: int = 1
    n_substitute: int = 5
    directions: int = 1
    epsilon: float = 1e-3
    lr_substitute: float = 0.1
    lr_generator: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_steps: tuple[float, ...] = (0.1, 0.3, 0.5)
    lr_decay: float = 0.3
    schedule_queries: int | None = PAPER_QUERIES
    pixels: str = "clip"
    evaluations: int = 10
    min_iterations: int = 5
    retrain: bool = True
    retrain_loss: str = "l1"
    train: TrainConfig = RETRAIN_TRAINING

    @property
    def queries_per_iteration(self) -> int:
        """``n_G · B · (m + 1) + n_S · B``."""
        b = self.batch_size
        return self.n_generator * b * (self.directions + 1) + self.n_substitute * b

    def check_params(self, api: APIDescription, pool: torch.Tensor | None, budget: int) -> None:
        for name in ("batch_size", "latent_dim", "ngf", "directions", "evaluations"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"{name}: expected a positive integer, got {v!r}")
        for name in ("n_generator", "n_substitute"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise InputError(f"{name}: expected a non-negative integer, got {v!r}")
        if self.n_substitute < 1:
            raise InputError(f"n_substitute: expected at least 1 substitute step, got {self.n_substitute}")
        if self.batch_size < 2:
            raise InputError(f"batch_size: expected at least 2 (batch norm), got {self.batch_size}")
        for name in ("epsilon", "lr_substitute", "lr_generator", "lr_decay"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0:
                raise InputError(f"{name}: expected a positive number, got {v!r}")
        if not all(0 < s < 1 for s in self.lr_steps):
            raise InputError(f"lr_steps: expected fractions in (0, 1), got {self.lr_steps}")
        if self.pixels not in PIXEL_MAPS:
            raise InputError(f"pixels: expected one of {list(PIXEL_MAPS)}, got {self.pixels!r}")
        sq = self.schedule_queries
        if sq is not None and (isinstance(sq, bool) or not isinstance(sq, int) or sq < 1):
            raise InputError(f"schedule_queries: expected a positive integer or null, got {sq!r}")
        if self.retrain_loss not in RETRAIN_LOSSES:
            raise InputError(
                f"retrain_loss: expected one of {list(RETRAIN_LOSSES)}, got {self.retrain_loss!r}"
            )
        if api.mode not in SOFT_ENOUGH:
            raise InputError(
                f"answer mode: DFME recovers the victim's logits from its full output, so it expected "
                f"'logits' or 'probs', got {api.mode.value!r}"
            )
        if len(api.input_shape) != 3:
            raise InputError(
                f"input shape: DFME's generator makes images, expected (C, H, W), got {api.input_shape}"
            )
        check_retrain(self)
        mi = self.min_iterations
        if isinstance(mi, bool) or not isinstance(mi, int) or mi < 1:
            raise InputError(f"min_iterations: expected a positive integer, got {mi!r}")
        if budget < mi * self.queries_per_iteration:
            raise InputError(
                f"budget: expected at least {mi * self.queries_per_iteration} queries ({mi} DFME "
                f"iteration(s) of {self.n_generator}·{self.batch_size}·({self.directions}+1) generator + "
                f"{self.n_substitute}·{self.batch_size} substitute queries), got {budget}"
            )

    # ------------------------------------------------------------------ running

    def _victim(self, ctx: AttackContext, x: torch.Tensor, store: QueryStore | None = None) -> torch.Tensor:
        x = x.detach().cpu()
        answers = ctx.api.query(x)
        if store is not None:
            store.add(x, answers_to_probs(answers.double(), ctx.api.mode))
        return victim_logits(answers, ctx.api.mode).to(ctx.device)

    def _estimate_gradient(
        self, ctx: AttackContext, sub: nn.Module, pre: torch.Tensor, store: QueryStore | None = None
    ) -> tuple[torch.Tensor, float]:
        """Forward-difference estimate of d(-ℓ1)/d(pre) for each sample (paper §3.4).

        Queries ``len(pre) · (m + 1)`` images. Returns the gradient of the batch-mean
        generator loss and that loss.
        """
        n, m = len(pre), self.directions
        shape = pre.shape[1:]
        d = shape.numel()
        a = pre.detach().reshape(n, 1, d)
        u = torch.randn(n, m, d, generator=ctx.generator).to(pre.device)
        u = u / u.norm(dim=2, keepdim=True)
        points = torch.cat([a + self.epsilon * u, a], 1).reshape(n * (m + 1), *shape)
        images = to_image(points, self.pixels)
        with torch.no_grad():
            v = self._victim(ctx, images, store)
            s = sub(images)
            per_point = -(s - v).abs().mean(1).view(n, m + 1)  # generator loss of each point
        diffs = (per_point[:, :m] - per_point[:, m:]) / self.epsilon  # (n, m)
        grad = d * (diffs[:, :, None] * u).mean(1) / n  # gradient of the batch mean
        return grad.view_as(pre), float(per_point[:, m].mean())

    def run(self, ctx: AttackContext) -> nn.Module:
        dev, gen = ctx.device, ctx.generator
        c, h, w = ctx.api.input_shape
        cost = self.queries_per_iteration
        iterations = ctx.budget // cost
        logger.info(
            "dfme: %d iterations of %d queries (%d unspent of a budget of %d)",
            iterations, cost, ctx.budget - iterations * cost, ctx.budget,
        )  # fmt: skip
        g_net = DFMEGenerator((c, h, w), self.latent_dim, self.ngf, self.pixels).to(dev)
        sub = ctx.make_substitute().to(dev)
        opt_s = torch.optim.SGD(
            sub.parameters(), lr=self.lr_substitute, momentum=self.momentum, weight_decay=self.weight_decay
        )
        opt_g = torch.optim.Adam(g_net.parameters(), lr=self.lr_generator)
        total = ctx.budget if self.schedule_queries is None else self.schedule_queries
        milestones = sorted({max(1, int(s * total) // cost) for s in self.lr_steps})
        sched_s = torch.optim.lr_scheduler.MultiStepLR(opt_s, milestones, gamma=self.lr_decay)
        sched_g = torch.optim.lr_scheduler.MultiStepLR(opt_g, milestones, gamma=self.lr_decay)
        every = max(1, iterations // self.evaluations)
        b = self.batch_size
        store = QueryStore(iterations * cost, (c, h, w), ctx.api.num_classes) if self.retrain else None

        def latent() -> torch.Tensor:
            return torch.randn(b, self.latent_dim, generator=gen).to(dev)

        loss_g = loss_s = float("nan")
        g_net.train()  # as the paper's code: batch statistics in every generator call
        for it in range(1, iterations + 1):
            sub.eval()  # fixed while it is part of the estimated objective (no batch coupling)
            for _ in range(self.n_generator):
                pre = g_net(latent(), pre=True)
                grad, loss_g = self._estimate_gradient(ctx, sub, pre, store)
                opt_g.zero_grad(set_to_none=True)
                pre.backward(grad)
                opt_g.step()
            sub.train()
            for _ in range(self.n_substitute):
                with torch.no_grad():
                    x = g_net(latent())
                v = self._victim(ctx, x, store)
                loss = F.l1_loss(sub(x), v)
                opt_s.zero_grad(set_to_none=True)
                loss.backward()
                opt_s.step()
                loss_s = float(loss.detach())
            sched_s.step()
            sched_g.step()
            sub.eval()
            ctx.emit(stage="dfme", done=it, total=iterations, loss_generator=loss_g, loss_substitute=loss_s,
                     queries=ctx.spent)  # fmt: skip
            if it % every == 0 or it == iterations:
                ctx.report(sub, it)
        logger.info("dfme: done, %d queries, last losses G %.4f S %.4f", ctx.spent, loss_g, loss_s)
        if store is None:
            return sub.eval()
        x_all, p_all = store.tensors()
        logger.info("dfme: retraining a substitute on all %d stored query-answer pairs", len(x_all))
        return retrain_substitute(ctx, x_all, p_all, self.retrain_loss, self.train)
