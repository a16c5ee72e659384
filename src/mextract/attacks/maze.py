"""MAZE (Kariyappa, Prakash & Qureshi, "MAZE: Data-Free Model Stealing Attack Using
Zeroth-Order Gradient Estimation", CVPR 2021): no attacker pool. A generator ``G`` makes
queries on which the clone ``C`` and the victim ``T`` disagree, measured by the KL
divergence of their output distributions; the clone learns to agree on them and, by
**experience replay**, on earlier generated queries it paid for::

    max_G  E_z KL( T(G(z)) ‖ C(G(z)) )        min_C  E_x KL( T(x) ‖ C(x) )

then (this lab's final phase, as ``dfme``) a fresh substitute trained on every stored
query–answer pair.

Components. The paper's method as its authors' reference code (``sanjaykariyappa/MAZE``)
implements it, unless marked **lab**; reasons for each **lab** choice are in
``docs/attacks.md`` ("MAZE"):

* **Loss** (as the reference code's ``kl_div_logits``): forward KL from the victim's distribution ``p_T``
  to the clone's softmax, ``KL(p_T ‖ softmax C(x)) = Σ_k p_T,k (log p_T,k − log q_k)``,
  batch mean. The clone minimises it; the generator maximises it (loss ``−KL``). KL reads
  the victim's whole probability vector, so ``logits`` (softmax taken) and ``probs``
  answers are accepted; top-k, rounded and label-only answers are refused (their zeros
  and steps carry no finite difference; ``dfme_hard`` reads labels). The per-sample KL
  of the gradient estimate is computed in float64 (a precaution against rounding in the
  forward differences of step ``ε``; on the bundled mnist victim the estimate is the same
  as with float32 answers).
* **Generator** (the reference code's ``conv3_gen``): ``z ~ N(0, I)`` of
  ``latent_dim = 100`` → linear → ``(128, H/4, W/4)`` → BN → 2× nearest upsample →
  conv 3×3 (128) → BN → LeakyReLU(0.2) → 2× upsample → conv (64) → BN → LeakyReLU → conv
  to ``C`` channels → BN → ``tanh``. That is :class:`~mextract.attacks.datafree.DFMEGenerator`
  at ``ngf = 64`` (the DFAD/DFME generator has the same layers) except for the last batch
  norm, which in MAZE has an affine part: :class:`MAZEGenerator` is the DFME generator
  with that layer made affine. (DFME's first two convolutions have no bias where MAZE's
  do; each is followed by a batch norm that removes any bias, so the two are the same
  function.)
* **Pixels** (**lab**, ``pixels="clip"``, as ``dfme``): MAZE's victims normalise images
  with mean 0.5 and std 0.5, so its ``tanh`` output in [-1, 1] is exactly the pixel range
  — ``(tanh(a) + 1) / 2`` in [0, 1] pixels (``pixels="affine"``) is the literal
  translation for this lab's victims, which read [0, 1]. The default instead clips the
  ``tanh`` output to the pixel range, ``clamp(tanh(a), 0, 1)``, for the reason measured
  for ``dfme``: the last batch norm starts as the identity, so with the affine map every
  early batch averages mid-grey and a dark background (MNIST's) is out of reach for the
  few generator steps a small budget buys; with clipping 0 stays black.
* **Zeroth-order gradient** (the reference code's ``zoge_backward``): the gradient
  of the generator's loss with respect to the pre-``tanh`` map ``a`` of each image is
  estimated by forward differences along ``m = 10`` random directions ``u_j`` uniform on
  the unit sphere, ``∇ ≈ (d/m) Σ_j [L(a + εu_j) − L(a)] / ε · u_j``, ``d`` the input
  size, ``ε = 1e-3``, and back-propagated through ``G``. ``L`` is the per-sample
  ``−KL``, the clone's term included (the clone is white-box to the thief). **lab** (as
  ``dfme``): the clone is held in evaluation mode inside the estimate, so that a
  perturbed point's loss does not depend on the rest of its batch through batch norm
  (the reference code leaves it in training mode).
* **Schedule** (``N_G = 1``, ``N_C = 5``, ``N_R = 10``, the reference code's defaults): each
  iteration takes ``N_G`` generator steps, then ``N_C`` clone steps on fresh generated
  batches, then ``N_R`` experience-replay steps. As in the reference code, the first
  clone step reuses the last generator step's unperturbed images and the answers already
  bought for the gradient estimate (no second query for the same images).
* **Experience replay**: every clone-step batch and its answers go into a replay
  set ``D``; each replay step trains the clone on a batch drawn uniformly without
  replacement from all of ``D``. (The reference code adds only the last clone batch of
  each iteration to ``D``; mebench adds every clone batch, as here. Perturbed images of
  the gradient estimate are not replayed: they are near-copies of the generator's
  images.)
* **Optimisers** (the reference code's defaults): clone SGD lr 0.1, momentum 0.9,
  weight decay 5e-4; generator SGD, momentum 0.9, weight decay 5e-4, lr 1e-3 (the
  authors' published command for FashionMNIST, a 28×28 grey set like this lab's;
  their code's default is 1e-4); both rates follow a cosine annealing over this run's
  iterations (stepped once per iteration), which scales with any budget. **lab**:
  ``batch_size = 64`` (the paper: 128) — at 20k queries the game then gets 20 turns
  instead of 10, as ``dfme``'s batch of 64 (the paper's 256) was chosen. The generator
  always runs in training mode (batch statistics), as in the reference code.
* **Final phase** (**lab**, ``retrain=True``, as ``dfme``): every image the victim
  answered — the generator steps' images and their perturbations as well as the clone
  steps' — is kept with its answer, and a fresh substitute is trained on all of them
  with ``train`` (the project's schedule, :data:`~mextract.attacks.datafree.RETRAIN_TRAINING`)
  and ``retrain_loss``: ``"kl"`` (default: MAZE's own loss, KL on probabilities) or
  ``"l1"`` (DFME's ℓ1 on mean-centred logits). It queries nothing. ``retrain=False``
  returns the online clone, as the paper scores it.

**Query accounting.** Every image the victim sees is one query on the ledger:

* a generator step queries ``B · (m + 1)`` images (each image and its ``m``
  perturbations);
* a clone step queries ``B`` images, except the first clone step of an iteration with
  ``N_G ≥ 1``, which reuses the last generator step's images and answers (0 queries);
* replay steps query nothing.

One iteration costs ``c = B · (N_G · (m + 1) + N_C − r)`` queries with ``r = 1`` if
``N_G ≥ 1`` else ``0`` — 960 with the defaults, 1,920 at the paper's batch of 128 (the
reference code's ``budget_per_iter``). The attack runs ``⌊budget / c⌋`` iterations and
leaves ``budget mod c`` unspent; a budget below one iteration's cost is refused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mextract.attacks.base import Attack, AttackContext
from mextract.attacks.datafree import (
    PIXEL_MAPS,
    RETRAIN_LOSSES,
    RETRAIN_TRAINING,
    SOFT_ENOUGH,
    DFMEGenerator,
    QueryStore,
    check_retrain,
    retrain_substitute,
    to_image,
)
from mextract.errors import InputError
from mextract.oracle import APIDescription, answers_to_probs
from mextract.training import TrainConfig

logger = logging.getLogger(__name__)


class MAZEGenerator(DFMEGenerator):
    """MAZE's generator (the reference code's ``conv3_gen``): the DFAD/DFME generator with an
    affine last batch norm. ``forward(z, pre=True)`` returns the pre-``tanh`` map."""

    def __init__(
        self, output_shape: tuple[int, int, int], latent_dim: int = 100, ngf: int = 64, pixels: str = "clip"
    ) -> None:
        super().__init__(output_shape, latent_dim, ngf, pixels)
        self.block2[-1] = nn.BatchNorm2d(output_shape[0], affine=True)


def kl_per_sample(probs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``KL(p ‖ softmax(logits))`` of each row (terms with ``p = 0`` count zero)."""
    return F.kl_div(F.log_softmax(logits, 1), probs, reduction="none").sum(1)


@dataclass(kw_only=True)
class MAZE(Attack):
    """MAZE (Kariyappa, Prakash & Qureshi, CVPR 2021): a generator trained by zeroth-order
    gradient estimates to maximise victim–clone KL disagreement, a clone trained on its
    queries with experience replay, then a fresh substitute trained on every stored pair.

    Args: batch_size 64 (paper: 128), latent_dim 100, ngf 64, n_generator ``N_G`` 1,
    n_clone ``N_C`` 5, n_replay ``N_R`` 10, directions ``m`` 10, epsilon 1e-3, lr_clone
    0.1 and lr_generator 1e-3 (both SGD, momentum 0.9, weight decay 5e-4, cosine-annealed
    over the run's iterations), pixels ``"clip"`` or ``"affine"``, evaluations (how many
    times the history scores the online clone), retrain (the final phase, on by default),
    retrain_loss ``"kl"`` or ``"l1"``, train (the final phase's schedule). See the module
    docstring for every choice and the query accounting.
    """

    name: ClassVar[str] = "maze"
    needs_pool: ClassVar[bool] = False
    batch_size: int = 64
    latent_dim: int = 100
    ngf: int = 64
    n_generator: int = 1
    n_clone: int = 5
    n_replay: int = 10
    directions: int = 10
    epsilon: float = 1e-3
    lr_clone: float = 0.1
    lr_generator: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    pixels: str = "clip"
    evaluations: int = 10
    retrain: bool = True
    retrain_loss: str = "kl"
    train: TrainConfig = RETRAIN_TRAINING

    @property
    def queries_per_iteration(self) -> int:
        """``B · (N_G · (m + 1) + N_C − r)``, ``r = 1`` when ``N_G ≥ 1`` (the first clone step
        reuses the generator's last images and answers), else 0."""
        reuse = 1 if self.n_generator >= 1 else 0
        return self.batch_size * (self.n_generator * (self.directions + 1) + self.n_clone - reuse)

    def check_params(self, api: APIDescription, pool: torch.Tensor | None, budget: int) -> None:
        for name in ("batch_size", "latent_dim", "ngf", "directions", "n_clone", "evaluations"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"{name}: expected a positive integer, got {v!r}")
        for name in ("n_generator", "n_replay"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise InputError(f"{name}: expected a non-negative integer, got {v!r}")
        if self.batch_size < 2:
            raise InputError(f"batch_size: expected at least 2 (batch norm), got {self.batch_size}")
        for name in ("epsilon", "lr_clone", "lr_generator"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0:
                raise InputError(f"{name}: expected a positive number, got {v!r}")
        mo = self.momentum
        if isinstance(mo, bool) or not isinstance(mo, int | float) or not 0 <= mo < 1:
            raise InputError(f"momentum: expected a number in [0, 1), got {mo!r}")
        wd = self.weight_decay
        if isinstance(wd, bool) or not isinstance(wd, int | float) or not wd >= 0:
            raise InputError(f"weight_decay: expected a non-negative number, got {wd!r}")
        if self.pixels not in PIXEL_MAPS:
            raise InputError(f"pixels: expected one of {list(PIXEL_MAPS)}, got {self.pixels!r}")
        if self.retrain_loss not in RETRAIN_LOSSES:
            raise InputError(
                f"retrain_loss: expected one of {list(RETRAIN_LOSSES)}, got {self.retrain_loss!r}"
            )
        check_retrain(self)
        if api.mode not in SOFT_ENOUGH:
            raise InputError(
                "answer mode: MAZE measures victim-clone disagreement as a KL divergence of the "
                f"victim's full output, so it expected 'logits' or 'probs', got {api.mode.value!r}"
            )
        if len(api.input_shape) != 3:
            raise InputError(
                f"input shape: MAZE's generator makes images, expected (C, H, W), got {api.input_shape}"
            )
        cost = self.queries_per_iteration
        if budget < cost:
            r = 1 if self.n_generator >= 1 else 0
            raise InputError(
                f"budget: expected at least {cost} queries (one MAZE iteration: "
                f"{self.batch_size}·({self.n_generator}·({self.directions}+1) + {self.n_clone} - {r})), "
                f"got {budget}"
            )

    # ------------------------------------------------------------------ running

    def _victim(self, ctx: AttackContext, x: torch.Tensor, store: QueryStore | None) -> torch.Tensor:
        """Query ``x`` (one query per image), keep the pairs in ``store``; the answers as
        float64 probability vectors on the CPU."""
        x = x.detach().cpu()
        probs = answers_to_probs(ctx.api.query(x).double(), ctx.api.mode)
        if store is not None:
            store.add(x, probs)
        return probs

    def _estimate_gradient(
        self, ctx: AttackContext, sub: nn.Module, pre: torch.Tensor, store: QueryStore | None
    ) -> tuple[torch.Tensor, float, torch.Tensor, torch.Tensor]:
        """Forward-difference estimate of d(−KL)/d(pre) for each sample.

        Queries ``len(pre) · (m + 1)`` images. Returns the gradient of the batch-mean
        generator loss, that loss, and the unperturbed images with their answers (the
        first clone step reuses them).
        """
        n, m, eps = len(pre), self.directions, self.epsilon
        shape = pre.shape[1:]
        d = shape.numel()
        a = pre.detach().reshape(n, 1, d)
        u = torch.randn(n, m, d, generator=ctx.generator).to(pre.device)
        u = u / u.norm(dim=2, keepdim=True)
        points = torch.cat([a, a + eps * u], 1).reshape(n * (m + 1), *shape)  # base point first
        images = to_image(points, self.pixels)
        with torch.no_grad():
            probs = self._victim(ctx, images, store)
            logits = sub(images).double().cpu()
            loss = -kl_per_sample(probs, logits).view(n, m + 1)  # generator loss of each point
        diffs = ((loss[:, 1:] - loss[:, :1]) / eps).float().to(pre.device)  # (n, m)
        grad = d * (diffs[:, :, None] * u).mean(1) / n  # gradient of the batch mean
        base = images.view(n, m + 1, *shape)[:, 0]
        base_probs = probs.view(n, m + 1, -1)[:, 0]
        return grad.view_as(pre), float(loss[:, 0].mean()), base, base_probs

    def run(self, ctx: AttackContext) -> nn.Module:
        dev, gen = ctx.device, ctx.generator
        c, h, w = ctx.api.input_shape
        k = ctx.api.num_classes
        cost = self.queries_per_iteration
        iterations = ctx.budget // cost
        logger.info(
            "maze: %d iterations of %d queries (%d unspent of a budget of %d)",
            iterations, cost, ctx.budget - iterations * cost, ctx.budget,
        )  # fmt: skip
        g_net = MAZEGenerator((c, h, w), self.latent_dim, self.ngf, self.pixels).to(dev)
        sub = ctx.make_substitute().to(dev)
        opt_s = torch.optim.SGD(
            sub.parameters(), lr=self.lr_clone, momentum=self.momentum, weight_decay=self.weight_decay
        )
        opt_g = torch.optim.SGD(
            g_net.parameters(), lr=self.lr_generator, momentum=self.momentum, weight_decay=self.weight_decay
        )
        sched_s = torch.optim.lr_scheduler.CosineAnnealingLR(opt_s, T_max=iterations)
        sched_g = torch.optim.lr_scheduler.CosineAnnealingLR(opt_g, T_max=iterations)
        b = self.batch_size
        replay = QueryStore(iterations * self.n_clone * b, (c, h, w), k)
        store = QueryStore(iterations * cost, (c, h, w), k) if self.retrain else None
        every = max(1, iterations // self.evaluations)

        def latent() -> torch.Tensor:
            return torch.randn(b, self.latent_dim, generator=gen).to(dev)

        def clone_step(x: torch.Tensor, probs: torch.Tensor) -> float:
            loss = F.kl_div(F.log_softmax(sub(x.to(dev)), 1), probs.float().to(dev), reduction="batchmean")
            opt_s.zero_grad(set_to_none=True)
            loss.backward()
            opt_s.step()
            return float(loss.detach())

        loss_g = loss_c = loss_r = float("nan")
        g_net.train()  # as the reference code: batch statistics in every generator call
        for it in range(1, iterations + 1):
            # (1) generator: maximise the estimated KL disagreement
            sub.eval()  # fixed while it is part of the estimated objective (no batch coupling)
            reused: tuple[torch.Tensor, torch.Tensor] | None = None
            for _ in range(self.n_generator):
                pre = g_net(latent(), pre=True)
                grad, loss_g, x0, p0 = self._estimate_gradient(ctx, sub, pre, store)
                opt_g.zero_grad(set_to_none=True)
                pre.backward(grad)
                opt_g.step()
                reused = (x0, p0)
            # (2) clone on generated queries; every batch joins the replay set
            sub.train()
            for step in range(self.n_clone):
                if step == 0 and reused is not None:
                    x, probs = reused  # paid for by the gradient estimate
                else:
                    with torch.no_grad():
                        x = g_net(latent()).cpu()
                    probs = self._victim(ctx, x, store)
                replay.add(x, probs)
                loss_c = clone_step(x, probs)
            # (3) experience replay: batches drawn from every stored clone batch
            x_d, p_d = replay.tensors()
            for _ in range(self.n_replay):
                idx = torch.randperm(len(x_d), generator=gen)[:b]
                loss_r = clone_step(x_d[idx], p_d[idx])
            sched_s.step()
            sched_g.step()
            sub.eval()
            ctx.emit(stage="maze", done=it, total=iterations, loss_generator=loss_g, loss_clone=loss_c,
                     loss_replay=loss_r, queries=ctx.spent)  # fmt: skip
            if it % every == 0 or it == iterations:
                ctx.report(sub, it)
        logger.info(
            "maze: done, %d queries, last losses G %.4f C %.4f R %.4f", ctx.spent, loss_g, loss_c, loss_r
        )
        if store is None:
            return sub.eval()
        x_all, p_all = store.tensors()
        logger.info("maze: retraining a substitute on all %d stored query-answer pairs", len(x_all))
        return retrain_substitute(ctx, x_all, p_all, self.retrain_loss, self.train)
