"""SPSG: superpixel sample-gradient model stealing (stage 1, soft labels).

Zhao et al., "Fully Exploiting Every Real Sample: SuperPixel Sample Gradient Model
Stealing", CVPR 2024 (the sources' "SPSG", "Superpixel Sampling-based Gradient"
estimation: 68.93 % with 3,203 queries on CIFAR-10). Each real sample is made to pay
twice: once for the victim's answer and once more, via finite differences over its
superpixels, for the victim's input gradient, which the substitute then learns to match.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from skimage.segmentation import slic
from torch import nn

from mextract.attacks.base import Attack, AttackContext
from mextract.attacks.baselines import SUBSTITUTE_TRAINING
from mextract.attacks.substitute import kd_loss, query_pool, random_subset, soft_targets, train_substitute
from mextract.errors import InputError
from mextract.oracle import AnswerMode, APIDescription, answers_to_probs
from mextract.training import BatchLoss, TrainConfig

logger = logging.getLogger(__name__)

#: Images probed per round (bounds the probe tensor at GROUP·(1 + 2S) images).
GROUP = 256


def superpixels(x: torch.Tensor, n_segments: int, compactness: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SLIC superpixels of a batch of images ``(N, C, H, W)`` in [0, 1].

    Returns ``labels`` ``(N, H, W)`` (int64, each image's segments numbered ``0..k-1``)
    and ``counts`` ``(N,)`` (its ``k``). SLIC runs once per image (scikit-image has no
    batched SLIC; it takes well under a millisecond on 32×32 images). Grey images are
    segmented on intensity (``channel_axis=None``), colour images in Lab space.
    """
    arr = x.detach().cpu().double().numpy()
    labels = np.empty((arr.shape[0], *arr.shape[2:]), dtype=np.int64)
    for i, im in enumerate(arr):  # SLIC itself is per image
        img, axis = (im[0], None) if im.shape[0] == 1 else (np.moveaxis(im, 0, -1), -1)
        seg = slic(img, n_segments=n_segments, compactness=compactness, channel_axis=axis, start_label=0)
        labels[i] = np.unique(seg, return_inverse=True)[1].reshape(seg.shape)
    lab = torch.from_numpy(labels)
    return lab, lab.flatten(1).amax(1) + 1


@dataclass(kw_only=True)
class SPSG(Attack):
    """SuperPixel Sample Gradient stealing: distil outputs and superpixel-level gradients.

    Paper: Zhao, Deng, Liu, Pei, Xu, Shen & Wang, "Fully Exploiting Every Real Sample:
    SuperPixel Sample Gradient Model Stealing", CVPR 2024. Steps, for a uniform random
    draw of pool images:

    1. **Superpixels.** SLIC (Achanta et al. 2012, ``skimage.segmentation.slic``) with
       ``n_segments = 16``: a 32×32 image gets superpixels of ~64 pixels, so a gradient
       costs 17 queries instead of 1 + H·W·C. ``compactness`` defaults to 10 for colour
       (scikit-image's default, on Lab values spanning 0–100) and 0.1 for grey images (the
       same colour/space trade-off for intensities spanning 0–1). SLIC returns about
       ``n_segments`` segments, not exactly; each image's cost uses its own count ``k``.
    2. **Finite-difference probing.** For each superpixel ``j`` with indicator ``m_j``
       (all channels), ``ĝ_j = (p(x + ε m_j) − p(x)) / ε`` (``difference="forward"``) or
       ``(p(x + ε m_j) − p(x − ε m_j)) / 2ε`` (``"central"``), where ``p`` is the victim's
       probability vector (``answers_to_probs``): the directional derivative of every
       class probability along the superpixel, i.e. the victim's input gradient summed
       over the superpixel. Probes are not clipped to [0, 1], so the step is exactly ε on
       every pixel (clipping would shrink it on saturated pixels and bias ``ĝ``). Default
       ``ε = 8/255`` (the usual L∞ perturbation budget on [0, 1] images; the paper's value
       is not reproduced here): small enough for the forward difference's O(ε) bias, far
       above float32 answer noise. Rounded answers
       quantise ``ĝ`` at ``10^-decimals / ε``.
    3. **Training.** From a fresh substitute, minimise, per image,
       ``T²·KL(p_v^T ‖ p_s^T) + λ · ‖J_s M − Ĝ‖²_F`` where ``T = 3`` (as the KD baseline),
       ``J_s`` the substitute's Jacobian of its (T = 1) probabilities w.r.t. the input,
       ``M`` sums it over the same superpixels, ``Ĝ`` the estimate (``K × k``). The exact
       distance needs ``K`` double-backward passes (``torch.autograd.grad(create_graph=
       True)``) per batch (``projections=None``; ~18× a plain step for K = 10). By default
       (``projections=1``) each step instead draws a Rademacher vector ``v ∈ {±1}^K`` per
       image and uses ``‖vᵀ(J_s M − Ĝ)‖²``, whose expectation is exactly ``‖J_s M − Ĝ‖²_F``:
       an unbiased stochastic estimate of the same loss (like a minibatch) for one extra
       double-backward pass. ``λ = grad_weight = 1``: both terms are per-sample sums of
       discrepancies of probability quantities, weighted equally (the paper's weighting is
       not reproduced here; on the 8×8 digits victim ``‖Ĝ‖²_F ≈ 1`` per image, the scale
       of the KD term). No augmentation: the gradient targets belong to the exact queried inputs.
       SPSG holds about ``1/(1 + S)`` as many images as ``kd`` at the same budget, so with
       ``match_kd_steps`` (default) the epochs of ``train`` are scaled by
       ``⌈min(B, |pool|)/bs⌉ / ⌈n/bs⌉``: the substitute takes as many optimiser steps as
       ``kd``'s would (the same training effort per budget), instead of a handful.
       With batch norm in training mode, per-sample gradients include the small
       (O(1/batch)) coupling through the batch statistics.

    Queries (every probe counts): an image with ``k`` superpixels costs ``1 + k``
    (forward) or ``1 + 2k`` (central). Images are taken in random order while their
    cumulative cost fits ``budget``: with exactly ``S`` segments each, ``⌊B / (1 + S)⌋``
    images (forward). If ``spend_remainder`` (default), the ``r`` leftover queries (fewer
    than the next image's cost) buy ``r`` further clean images trained on outputs only, so
    the attack spends the whole budget (when the pool is large enough) and, below ``1 + S`` queries, degrades
    to plain distillation. The probes' own answers are used only for ``Ĝ``.

    Needs soft answers (probs, logits, rounded; top-k is accepted and read renormalised,
    so classes outside the top k have zero estimated gradient); refuses label-only
    oracles, whose finite differences are almost everywhere zero. Images only.

    Faithfulness: ``docs/faithfulness.md#spsg``.
    """

    name: ClassVar[str] = "spsg"
    n_segments: int = 16
    epsilon: float = 8 / 255
    grad_weight: float = 1.0
    difference: Literal["forward", "central"] = "forward"
    compactness: float | None = None
    temperature: float = 3.0
    spend_remainder: bool = True
    match_kd_steps: bool = True
    projections: int | None = 1
    train: TrainConfig = SUBSTITUTE_TRAINING

    def max_queries(self, pool_size: int | None) -> int | None:
        return None  # its queries are made from the pool, not drawn from it

    def check_params(self, api: APIDescription, pool: torch.Tensor | None, budget: int) -> None:
        if isinstance(self.n_segments, bool) or not isinstance(self.n_segments, int) or self.n_segments < 1:
            raise InputError(f"n_segments: expected a positive integer, got {self.n_segments!r}")
        if not self.epsilon > 0:
            raise InputError(f"epsilon: expected a positive number, got {self.epsilon}")
        if not self.grad_weight >= 0:
            raise InputError(f"grad_weight: expected a non-negative number, got {self.grad_weight}")
        if self.difference not in ("forward", "central"):
            raise InputError(f"difference: expected 'forward' or 'central', got {self.difference!r}")
        if self.projections is not None and (
            isinstance(self.projections, bool)
            or not isinstance(self.projections, int)
            or self.projections < 1
        ):
            raise InputError(f"projections: expected a positive integer or None, got {self.projections!r}")
        if self.compactness is not None and not self.compactness > 0:
            raise InputError(f"compactness: expected a positive number or None, got {self.compactness}")
        if not self.temperature > 0:
            raise InputError(f"temperature: expected a positive number, got {self.temperature}")
        if api.mode is AnswerMode.LABEL:
            raise InputError(
                "answer mode: expected soft answers (probs, logits, rounded or topk) for SPSG's "
                "finite-difference gradients, got 'label' (one-hot labels have zero differences)"
            )
        if len(api.input_shape) != 3:
            raise InputError(
                f"attack {self.name!r}: expected image inputs shaped (C, H, W), got {api.input_shape}"
            )

    # ------------------------------------------------------------------ querying

    def _plan(self, ctx: AttackContext, order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Segment images in ``order`` until their probing costs fill the budget.

        Returns the labels and counts of the images to probe (a prefix of ``order``) and
        the queries they will cost."""
        assert ctx.pool is not None
        per_segment = 1 if self.difference == "forward" else 2
        compactness = self.compactness
        if compactness is None:
            compactness = 0.1 if ctx.api.input_shape[0] == 1 else 10.0
        chunk = max(16, 2 * (ctx.budget // (1 + per_segment * self.n_segments) + 1))
        labels, counts, spent = [], [], 0
        for start in range(0, len(order), chunk):
            lab, k = superpixels(ctx.pool[order[start : start + chunk]], self.n_segments, compactness)
            cum = spent + (1 + per_segment * k).cumsum(0)
            take = int((cum <= ctx.budget).sum())  # cum increases, so this is a prefix
            labels.append(lab[:take])
            counts.append(k[:take])
            spent = int(cum[take - 1]) if take else spent
            if take < len(k):
                break
        return torch.cat(labels), torch.cat(counts), spent

    def _probe(
        self, ctx: AttackContext, x: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Query ``x`` and its superpixel probes; returns clean answers ``(n, K)`` and
        gradient estimates ``(n, K, S)`` (zero beyond each image's own count)."""
        n, s = len(x), int(counts.max())
        img = torch.repeat_interleave(torch.arange(n), counts)  # one row per (image, segment)
        seg = torch.arange(len(img)) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        step = self.epsilon * (labels[img] == seg.view(-1, 1, 1)).unsqueeze(1).to(x.dtype)
        probes = [x, x[img] + step] + ([x[img] - step] if self.difference == "central" else [])
        bounds = ctx.api.value_range  # a probe stays in the API's declared range (pixels at a bound
        if bounds.low is not None or bounds.high is not None:  # move less: a slight underestimate)
            probes = [p.clamp(bounds.low, bounds.high) for p in probes]
        answers = query_pool(ctx, torch.cat(probes))
        probs = answers_to_probs(answers.double(), ctx.api.mode)
        clean, plus = probs[:n], probs[n : n + len(img)]
        if self.difference == "central":
            diff = (plus - probs[n + len(img) :]) / (2 * self.epsilon)
        else:
            diff = (plus - clean[img]) / self.epsilon
        grads = torch.zeros(n, s, probs.shape[1], dtype=torch.float64)
        grads[img, seg] = diff
        return answers[:n], grads.transpose(1, 2).float()

    # ------------------------------------------------------------------ training

    def _loss(self, k: int, s: int, seed: int) -> BatchLoss:
        kd = kd_loss(self.temperature)
        weight, projections = self.grad_weight, self.projections
        gen = torch.Generator().manual_seed(seed)

        def loss(model: nn.Module, xb: torch.Tensor, tb: torch.Tensor) -> torch.Tensor:
            soft, has_grad = tb[:, :k], tb[:, k]
            g_hat = tb[:, k + 1 : k + 1 + k * s].view(-1, k, s)
            labels = tb[:, k + 1 + k * s :].long()  # (n, H·W)
            x = xb.detach().requires_grad_(True)
            logits = model(x)
            out = kd(logits, soft)
            if weight == 0 or not bool(has_grad.any()):
                return out
            p = F.softmax(logits, dim=1)

            def aggregate(g: torch.Tensor) -> torch.Tensor:  # (n, C, H, W) -> (n, S)
                agg = torch.zeros(len(x), s, device=x.device, dtype=g.dtype)
                return agg.scatter_add(1, labels, g.sum(1).flatten(1))

            if projections is None:  # exact: one double-backward pass per class
                rows = [
                    aggregate(torch.autograd.grad(p[:, c].sum(), x, create_graph=True)[0]) for c in range(k)
                ]
                dist = ((torch.stack(rows, 1) - g_hat) ** 2).sum((1, 2))
            else:  # E_v (vᵀ(A − B))² = ‖A − B‖²_F for Rademacher v
                dist = torch.zeros(len(x), device=x.device)
                for _ in range(projections):
                    v = (torch.randint(2, (len(x), k), generator=gen) * 2 - 1).to(p)
                    (g,) = torch.autograd.grad((p * v).sum(), x, create_graph=True)
                    dist = dist + ((aggregate(g) - (v.unsqueeze(2) * g_hat).sum(1)) ** 2).sum(1) / projections
            return out + weight * (dist * has_grad).mean()

        return loss

    def run(self, ctx: AttackContext) -> nn.Module:
        assert ctx.pool is not None
        order = random_subset(ctx, len(ctx.pool))
        labels, counts, cost = self._plan(ctx, order)
        n = len(counts)
        k = ctx.api.num_classes
        s = int(counts.max()) if n else 1
        logger.info("spsg: probing %d images (%d superpixels on average) for %d queries",
                    n, float(counts.float().mean()) if n else 0.0, cost)  # fmt: skip
        xs, answers, grads = [ctx.pool[order[:n]]], [], []
        for i in range(0, n, GROUP):
            a, g = self._probe(ctx, xs[0][i : i + GROUP], labels[i : i + GROUP], counts[i : i + GROUP])
            answers.append(a)
            grads.append(F.pad(g, (0, s - g.shape[2])))
            ctx.emit(stage="probe", done=min(i + GROUP, n), total=n)
        extra = ctx.budget - cost if self.spend_remainder else 0
        x_extra = ctx.pool[order[n : n + extra]]
        if len(x_extra):
            xs.append(x_extra)
            answers.append(query_pool(ctx, x_extra))
            grads.append(torch.zeros(len(x_extra), k, s))
            labels = torch.cat([labels, torch.zeros(len(x_extra), *labels.shape[1:], dtype=torch.long)])
        x = torch.cat(xs)
        if len(x) == 0:
            raise InputError(f"spsg: budget {ctx.budget} buys no image (spend_remainder is off)")
        has_grad = (torch.arange(len(x)) < n).float().unsqueeze(1)
        soft = soft_targets(torch.cat(answers), ctx, self.temperature)
        targets = torch.cat([soft, has_grad, torch.cat(grads).flatten(1), labels.flatten(1).float()], 1)
        logger.info("spsg: %d images with gradients, %d output-only, %d queries", n, len(x_extra), ctx.spent)
        seed = int(torch.randint(2**31 - 1, (1,), generator=ctx.generator))
        return self._train(ctx, x, targets, self._loss(k, s, seed))

    def _train(
        self, ctx: AttackContext, x: torch.Tensor, targets: torch.Tensor, loss: BatchLoss
    ) -> nn.Module:
        """The shared substitute loop with SPSG's loss, for as many steps as KD would take."""
        cfg = self.train
        if self.match_kd_steps:
            assert ctx.pool is not None
            kd_steps = -(-min(ctx.budget, len(ctx.pool)) // cfg.batch_size)
            own_steps = -(-len(x) // cfg.batch_size)
            cfg = replace(cfg, epochs=max(cfg.epochs, round(cfg.epochs * kd_steps / own_steps)))
        logger.info("spsg: training %d epochs on %d images", cfg.epochs, len(x))
        return train_substitute(ctx, x, targets, soft=True, config=cfg, batch_loss=loss)
