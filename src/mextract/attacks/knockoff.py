"""Knockoff Nets (Orekondy, Schiele & Fritz, "Knockoff Nets: Stealing Functionality of
Black-Box Models", CVPR 2019): query a victim with a *transfer set* drawn from another
distribution (an out-of-domain pool, see :mod:`mextract.data.transfer`), train a
substitute on the answers.

One registered attack, ``knockoff``, with the paper's two sampling policies
(``policy="random"`` or ``policy="adaptive"``)::

    create_attack("knockoff", policy="adaptive", pool_labels=pool.y)

**random** — ``min(budget, |pool|)`` pool points drawn uniformly without replacement.

**adaptive** — the paper's gradient bandit (Sutton & Barto 2018, §2.8) over the pool's
*own* classes (its "actions"). The paper's policy is hierarchical over ImageNet's
class tree; our pools have flat label sets, so the bandit is flat (one level). Classes
are the ``pool_labels`` field (e.g. ``load_pool(...).y``: digit classes, photo/cluster
classes of natural patches), or, when ``None``, ``clusters`` k-means clusters of the
pool's pixels (k-means++ seeding, Lloyd iterations, seeded by the run). The victim-side
truth is never needed (unlike IBM ART's version, which also needs it and whose loss
reward re-applies a softmax to probabilities).

Each round ``t`` (``round_size`` queries, 16 by default: the paper's online setting
sends queries one at a time; we batch a few for a batched substitute step):

1. ``π_t = softmax(H_t)`` over classes that still have unqueried points; draw
   ``round_size`` classes from ``π_t`` and, for each, one unqueried pool point of that
   class uniformly (no point is queried twice).
2. Query the victim; read each answer as a probability vector ``y`` with
   :func:`~mextract.oracle.answers_to_probs` (one-hot for label-only answers).
3. Rewards, as in the paper (§4.1.2):

   * certainty ``R_cert = y_k1 - y_k2`` (margin of the victim's top two);
   * diversity ``R_div = Σ_k max(0, y_k - ȳ_k)``, ``ȳ`` the mean of the last
     ``diversity_window`` answers (this round's included);
   * loss ``R_L = CE(y, ŷ) = -Σ_k y_k log ŷ_k``, ``ŷ`` the substitute's prediction
     *before* it is updated on this round.

   For label-only answers ``R_cert`` is always 1 and drops out after standardising;
   ``R_div = 1 - ȳ_label`` rewards rare victim labels, and ``R_L`` is the
   substitute's cross-entropy on the returned label: all three stay defined.
   The paper adds the three rewards; their scales differ (``R_L`` is unbounded), so
   each is first standardised by its running mean and standard deviation over all
   rewards so far (as ART does; the paper gives no scaling). ``r = Σ`` of the three.
4. Gradient-bandit update with the running mean ``r̄`` of all earlier rewards as
   baseline: ``H ← H + α Σ_i (r_i - r̄)(1[a = a_i] - π)`` (the per-query update,
   with ``π`` held for the round). ``α = bandit_lr = 0.1`` (Sutton & Barto's example
   step size; the paper does not state its value).
5. One SGD step (lr ``online_lr`` 0.01, momentum 0.9, weight decay 5e-4) of the online
   substitute on the round's answers, with the final loss below (the paper trains the
   knockoff online as queries arrive so that ``R_L`` tracks what it has learnt).

**Final training** (both policies): a fresh substitute trained with the shared loop on
all queried points, like the baselines: soft answers (probs, top-k, rounded, logits)
with the soft-label cross-entropy of the paper (KL at temperature ``T = 1``; other
``T`` as in Hinton et al. 2015 if set), label-only answers with cross-entropy on the
returned class.

**Queries**: exactly ``min(budget, |pool|)`` samples, each answered once; the reward
and the online step use only those answers. Nothing else is sent to the victim.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mextract.attacks.base import Attack, AttackContext
from mextract.attacks.baselines import SUBSTITUTE_TRAINING
from mextract.attacks.substitute import (
    hard_targets,
    kd_loss,
    query_pool,
    random_subset,
    soft_targets,
    train_substitute,
)
from mextract.data.transfer import kmeans
from mextract.errors import InputError
from mextract.oracle import APIDescription, answers_to_probs
from mextract.training import TrainConfig

logger = logging.getLogger(__name__)

POLICIES = ("random", "adaptive")


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name}: expected a positive integer, got {value!r}")


class _RunningStats:
    """Running mean and variance of reward vectors (Chan et al.'s batched Welford merge)."""

    def __init__(self, dim: int) -> None:
        self.n = 0
        self.mean = torch.zeros(dim, dtype=torch.float64)
        self.m2 = torch.zeros(dim, dtype=torch.float64)

    def update(self, x: torch.Tensor) -> None:
        x = x.double()
        nb = len(x)
        mb = x.mean(0)
        m2b = ((x - mb) ** 2).sum(0)
        delta = mb - self.mean
        tot = self.n + nb
        self.mean = self.mean + delta * nb / tot
        self.m2 = self.m2 + m2b + delta**2 * self.n * nb / tot
        self.n = tot

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        std = (self.m2 / max(self.n, 1)).sqrt()
        z = (x.double() - self.mean) / std.clamp_min(1e-12)
        return torch.where(std > 1e-12, z, torch.zeros_like(z))


@dataclass(kw_only=True)
class KnockoffNets(Attack):
    """Knockoff Nets with the random or the adaptive (gradient-bandit) policy; see the module doc.

    Args:
        policy: ``"random"`` or ``"adaptive"``.
        pool_labels: the pool's own class of each pool point (adaptive only; ``None``:
            k-means clusters of the pool).
        clusters: number of k-means clusters when ``pool_labels`` is ``None``.
        round_size: queries per bandit round (and per online substitute step).
        bandit_lr: the gradient bandit's step size ``α``.
        diversity_window: ``Δ``, answers averaged for the diversity reward.
        online_lr: learning rate of the online substitute updates.
        temperature: of the final soft-label loss (1: the paper's soft cross-entropy).
        train: the final substitute training (the baselines' recipe).

    After an adaptive run, ``last_arm_counts`` holds the queries spent on each pool class
    (in the order of the sorted distinct labels, or of the k-means clusters).

    Faithfulness: ``docs/faithfulness.md#knockoff``.
    """

    name: ClassVar[str] = "knockoff"
    policy: Literal["random", "adaptive"] = "random"
    pool_labels: torch.Tensor | None = None
    clusters: int = 10
    round_size: int = 16
    bandit_lr: float = 0.1
    diversity_window: int = 100
    online_lr: float = 0.01
    temperature: float = 1.0
    train: TrainConfig = SUBSTITUTE_TRAINING

    def check_params(self, api: APIDescription, pool: torch.Tensor | None, budget: int) -> None:
        if self.policy not in POLICIES:
            raise InputError(f"policy: expected one of {', '.join(POLICIES)}, got {self.policy!r}")
        _positive_int("clusters", self.clusters)
        _positive_int("round_size", self.round_size)
        _positive_int("diversity_window", self.diversity_window)
        for name in ("bandit_lr", "online_lr", "temperature"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0:
                raise InputError(f"{name}: expected a positive number, got {v!r}")
        if self.policy == "adaptive" and pool is not None:
            if self.pool_labels is not None:
                labels = self.pool_labels
                if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.is_floating_point():
                    got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
                    raise InputError(f"pool_labels: expected a 1-D integer tensor, got {got}")
                if len(labels) != len(pool):
                    raise InputError(
                        f"pool_labels: expected one label per pool point ({len(pool)}), got {len(labels)}"
                    )
                if len(labels) and int(labels.min()) < 0:
                    raise InputError(f"pool_labels: expected non-negative labels, got {int(labels.min())}")
            elif self.clusters > len(pool):
                raise InputError(
                    f"clusters: expected at most the pool size ({len(pool)}), got {self.clusters}"
                )

    def config(self) -> dict[str, Any]:
        out = super().config()
        labels = out.pop("pool_labels")
        out["pool_classes"] = None if labels is None else len(torch.unique(labels))
        return out

    # ------------------------------------------------------------------ running

    def run(self, ctx: AttackContext) -> nn.Module:
        assert ctx.pool is not None
        if self.policy == "random":
            x = ctx.pool[random_subset(ctx, ctx.budget)]
            answers = query_pool(ctx, x)
        else:
            x, answers = self._adaptive(ctx)
        logger.info("knockoff %s: %d queries answered, final training", self.policy, len(x))
        if ctx.api.mode.is_soft:
            targets = soft_targets(answers, ctx, self.temperature)
            return train_substitute(
                ctx, x, targets, soft=True, temperature=self.temperature, config=self.train
            )
        return train_substitute(ctx, x, hard_targets(answers), soft=False, config=self.train)

    def _arm_labels(self, ctx: AttackContext) -> torch.Tensor:
        assert ctx.pool is not None
        if self.pool_labels is not None:
            return self.pool_labels.long().cpu()
        labels, _ = kmeans(ctx.pool, self.clusters, generator=ctx.generator)
        return labels

    def _loss(self, ctx: AttackContext, logits: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
        if ctx.api.mode.is_soft:
            return kd_loss(self.temperature)(logits, soft_targets(answers, ctx, self.temperature).to(logits))
        return F.cross_entropy(logits, hard_targets(answers).to(logits.device))

    def _adaptive(self, ctx: AttackContext) -> tuple[torch.Tensor, torch.Tensor]:
        assert ctx.pool is not None
        pool, gen, dev = ctx.pool, ctx.generator, ctx.device
        raw_labels = self._arm_labels(ctx)
        _, arm_of = torch.unique(raw_labels, return_inverse=True)
        n_arms = int(arm_of.max()) + 1
        # unqueried points of each arm, in a seeded random order (popped from the end)
        members = []
        for a in range(n_arms):
            idx = torch.nonzero(arm_of == a).flatten()
            members.append(idx[torch.randperm(len(idx), generator=gen)].tolist())
        total = min(ctx.budget, len(pool))

        sub = ctx.make_substitute().to(dev)
        opt = torch.optim.SGD(sub.parameters(), lr=self.online_lr, momentum=0.9, weight_decay=5e-4)
        h = torch.zeros(n_arms, dtype=torch.float64)
        stats = _RunningStats(3)
        mean_reward, n_rewards = 0.0, 0
        window: deque[torch.Tensor] = deque(maxlen=self.diversity_window)
        xs: list[torch.Tensor] = []
        answers_all: list[torch.Tensor] = []
        picks = torch.zeros(n_arms, dtype=torch.long)
        done = 0
        while done < total:
            b = min(self.round_size, total - done)
            alive = torch.tensor([len(m) > 0 for m in members])
            pi = torch.softmax(h.masked_fill(~alive, float("-inf")), 0)
            actions = torch.multinomial(pi, b, replacement=True, generator=gen)
            chosen: list[int] = []
            acts: list[int] = []
            for a in actions.tolist():
                if not members[a]:  # the arm ran dry within this round: redraw among live arms
                    live = torch.tensor([len(m) > 0 for m in members])
                    a = int(torch.multinomial(torch.softmax(h.masked_fill(~live, float("-inf")), 0), 1,
                                              generator=gen))  # fmt: skip
                chosen.append(members[a].pop())
                acts.append(a)
            x_b = pool[torch.tensor(chosen)]
            answers = ctx.api.query(x_b)
            xs.append(x_b)
            answers_all.append(answers.detach().cpu())
            done += b
            ctx.emit(stage="query", done=done, total=total)

            y = answers_to_probs(answers.detach().double().cpu(), ctx.api.mode)
            sub.eval()
            with torch.no_grad():
                log_q = F.log_softmax(sub(x_b.to(dev)).double(), 1).cpu()
            top2 = y.topk(min(2, y.shape[1]), dim=1).values
            r_cert = top2[:, 0] - top2[:, -1]
            window.extend(y)
            y_bar = torch.stack(list(window)).mean(0)
            r_div = (y - y_bar).clamp_min(0).sum(1)
            r_loss = -(y * log_q).sum(1)
            raw = torch.stack([r_cert, r_div, r_loss], 1)
            stats.update(raw)
            reward = stats.standardise(raw).sum(1)
            baseline = mean_reward if n_rewards else float(reward.mean())
            a_t = torch.tensor(acts)
            onehot = F.one_hot(a_t, n_arms).double()
            h = h + self.bandit_lr * ((reward - baseline)[:, None] * (onehot - pi[None, :])).sum(0)
            mean_reward = (mean_reward * n_rewards + float(reward.sum())) / (n_rewards + b)
            n_rewards += b
            picks += torch.bincount(a_t, minlength=n_arms)

            if b >= 2:  # one online step (batch norm needs two samples)
                sub.train()
                loss = self._loss(ctx, sub(x_b.to(dev)), answers.to(dev))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        logger.info("knockoff adaptive: queries per pool class %s", picks.tolist())
        self.last_arm_counts = picks
        return torch.cat(xs), torch.cat(answers_all)
