"""Knockoff Nets (Orekondy, Schiele & Fritz, "Knockoff Nets: Stealing Functionality of
Black-Box Models", CVPR 2019): query a victim with a *transfer set* drawn from another
distribution (an out-of-domain pool, see :mod:`mextract.data.transfer`), train a
substitute on the answers.

One registered attack, ``knockoff``, with the paper's two sampling policies
(``policy="random"`` or ``policy="adaptive"``) and a class-balancing one of ours
(``policy="balanced"``, below)::

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

**Noticing a pool that misses classes** (every policy). An out-of-domain pool can make
the victim answer only some of its ``K`` classes (photo patches against a digit
classifier): the substitute then never sees the others. After the answers are in (for
``balanced``, also after its random warm-up), the attack measures their spread: the
top-1 histogram (for every answer mode the argmax is the victim's label), the classes
answered at least once, and the *effective number of classes* ``exp(H)`` of that
histogram (``H`` its Shannon entropy; ``K`` when the answers spread evenly, 1 when one
class takes all; Hill 1973, "Diversity and evenness"). They go into the result's metrics
(``answered_classes``, ``effective_classes``, and ``warmup_*`` for ``balanced``) and
into the log. The spread is *skewed* when the effective number is below ``K/2`` (the
answers are as concentrated as an even spread over fewer than half the classes), or when
a class was never answered although ``n ≥ K·ln(20K)`` answers came back — the count
after which an even spread leaves some class unanswered with probability below 5%
(coupon collector with a union bound: ``K(1 - 1/K)^n ≤ K e^{-n/K}``), so that a missing
class is a fact about the pool and not about a small sample. A skewed spread raises a
:class:`ClassSkewWarning` that says "the victim answered N of K classes on this pool",
names the missing classes, and points to ``policy="balanced"`` — or, after a balanced
run, says that the pool seems unable to produce them (the warning does not pretend).

**balanced** — class balancing by selection, for pools the victim answers unevenly.
A random warm-up of ``n₀ = min(B, max(round(warmup · B), warmup_per_class · K))``
points (ActiveThief's 10% seed set, Pal et al. AAAI 2020, with the floor of 20 labels
per class that :mod:`mextract.attacks.active` takes from Hacohen et al. ICML 2022: a
substitute trained on fewer ranks the pool no better than chance); its spread is
measured and logged as above. The rest of the budget goes in ``rounds`` near-equal
rounds (ActiveThief's 10). Each round trains the selection substitute on every answer so
far (warm-started, ``round_epochs`` epochs, as :mod:`mextract.attacks.active`), scores
the unqueried pool with it (``p̂(k | x)``, its softmax: its estimate of how the victim
answers ``x``) and picks the round's points greedily to maximise the expected gain of
``Σ_k log(1 + n_k)`` (``n_k`` the victim's top-1 answers of class ``k``) — a concave
objective whose maximum, for a fixed number of answers, is the even spread, and whose
marginal value ``log(2 + n_k) - log(1 + n_k)`` of one more answer of class ``k`` is
largest for the classes answered least (the proportional-fairness / Nash product of
allocation theory). A point's gain is ``Σ_k p̂(k|x) (log(2 + n_k) - log(1 + n_k))``;
after each pick the counts grow by the point's ``p̂`` (expected answers), so that one
round spreads over several rare classes instead of spending itself on the rarest. Rare
classes thus get the points the substitute thinks most likely to be answered as them —
the spirit of MARICH's and ActiveThief's substitute-scored pool selection, and of
Knockoff's adaptive policy with the victim's classes (not the pool's) as the arms. A
class the pool cannot produce stays unanswered, whatever is picked; the selection is
self-correcting in that its misses are answers too, which teach the next round's
substitute where that class is *not*. The final substitute is trained afresh on all
answers, as for the other policies.

Which policy when (``random`` stays the default): ``random`` for a pool the victim
answers evenly (no warning): it is the paper's baseline and the cheapest. ``balanced``
when the warning says the answers are skewed: it costs ``rounds`` short trainings and
pool scorings besides the final training (several times the wall time of ``random``),
and it evens out the answers only as far as the pool holds points the victim answers as
the rare classes — it cannot close a domain gap: on photo patches against the mnist
victim it spreads the answers (effective number 5.6 → 7.3-7.5 of 10) but the substitute
stays far from the victim (``docs/attacks.md``, "Out-of-domain pools that miss classes",
has the figures). ``adaptive`` when the pool has classes of its own and some are
uninformative.

**Queries**: exactly ``min(budget, |pool|)`` samples, each answered once; the reward
and the online step use only those answers. Nothing else is sent to the victim.
``balanced`` sends every query through :func:`~mextract.attacks.substitute.query_pool`;
its selection uses only the substitute and costs no query.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mextract.attacks.base import Attack, AttackContext
from mextract.attacks.baselines import SUBSTITUTE_TRAINING
from mextract.attacks.selection import embed
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

POLICIES = ("random", "adaptive", "balanced")


class ClassSkewWarning(UserWarning):
    """The victim's answers on the pool miss classes or crowd into a few (see the module doc)."""


@dataclass(frozen=True)
class AnswerSpread:
    """How the victim's top-1 answers spread over its ``K`` classes."""

    counts: torch.Tensor  # (K,) answers of each class
    answered: int  # classes answered at least once
    effective: float  # exp(entropy) of the histogram: K when even, 1 when one class takes all

    @property
    def num_classes(self) -> int:
        return len(self.counts)

    @property
    def missing(self) -> list[int]:
        return torch.nonzero(self.counts == 0).flatten().tolist()

    @property
    def skewed(self) -> bool:
        """Effective number below ``K/2``, or a class never answered although ``n ≥ K·ln(20K)``
        answers came back (an even spread then misses a class with probability below 5%)."""
        k, n = self.num_classes, int(self.counts.sum())
        enough = n >= k * math.log(20 * k)
        return self.effective < k / 2 or (enough and self.answered < k)

    def describe(self) -> str:
        k = self.num_classes
        text = (
            f"the victim answered {self.answered} of {k} classes on this pool "
            f"({int(self.counts.sum())} answers; effective number of classes {self.effective:.1f} of {k}"
        )
        return text + (f"; never answered: {self.missing})" if self.missing else ")")


def answer_spread(answers: torch.Tensor, num_classes: int) -> AnswerSpread:
    """The top-1 histogram of raw answers (any mode: the argmax is the victim's label), the
    classes answered and the effective number of classes ``exp(H)`` (Hill 1973)."""
    counts = torch.bincount(hard_targets(answers).cpu(), minlength=num_classes)[:num_classes]
    q = counts.double() / max(int(counts.sum()), 1)
    q = q[q > 0]
    effective = float(torch.exp(-(q * q.log()).sum())) if len(q) else 0.0
    return AnswerSpread(counts=counts, answered=int((counts > 0).sum()), effective=effective)


def balanced_pick(probs: torch.Tensor, counts: torch.Tensor, n: int) -> torch.Tensor:
    """Greedily pick ``n`` rows of ``probs`` (``(N, K)``, the substitute's estimate of the
    victim's answer for each candidate) maximising the expected gain of ``Σ_k log(1 + n_k)``
    from the answer counts ``counts``; each pick adds its row to the expected counts.
    Returns the chosen row indices (distinct, in pick order)."""
    n = min(n, len(probs))
    p = probs.double()
    c = counts.double().clone()
    free = torch.ones(len(p), dtype=torch.bool)
    chosen: list[int] = []
    for _ in range(n):
        gain = p @ (torch.log(c + 2) - torch.log(c + 1))
        j = int(gain.masked_fill(~free, float("-inf")).argmax())
        chosen.append(j)
        free[j] = False
        c += p[j]
    return torch.tensor(chosen, dtype=torch.long)


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
    """Knockoff Nets with the random, the adaptive (gradient-bandit) or the class-balancing
    policy; see the module doc (which also says which policy to use when).

    Args:
        policy: ``"random"``, ``"adaptive"`` or ``"balanced"``.
        pool_labels: the pool's own class of each pool point (adaptive only; ``None``:
            k-means clusters of the pool).
        clusters: number of k-means clusters when ``pool_labels`` is ``None``.
        round_size: queries per bandit round (and per online substitute step).
        bandit_lr: the gradient bandit's step size ``α``.
        diversity_window: ``Δ``, answers averaged for the diversity reward.
        online_lr: learning rate of the online substitute updates.
        temperature: of the final soft-label loss (1: the paper's soft cross-entropy).
        train: the final substitute training (the baselines' recipe).
        warmup: ``balanced`` only: share of the budget queried at random first (ActiveThief's 0.1).
        warmup_per_class: ``balanced`` only: floor of that warm-up, per victim class (20).
        rounds: ``balanced`` only: selection rounds after the warm-up (ActiveThief's 10).
        round_epochs: ``balanced`` only: warm-started epochs of each round's selection substitute.

    After an adaptive run, ``last_arm_counts`` holds the queries spent on each pool class
    (in the order of the sorted distinct labels, or of the k-means clusters). After any
    run, ``last_spread`` is the :class:`AnswerSpread` of all answers (``last_warmup_spread``
    that of a balanced run's warm-up).

    Faithfulness: ``docs/faithfulness.md#knockoff``.
    """

    name: ClassVar[str] = "knockoff"
    policy: Literal["random", "adaptive", "balanced"] = "random"
    pool_labels: torch.Tensor | None = None
    clusters: int = 10
    round_size: int = 16
    bandit_lr: float = 0.1
    diversity_window: int = 100
    online_lr: float = 0.01
    temperature: float = 1.0
    train: TrainConfig = SUBSTITUTE_TRAINING
    warmup: float = 0.1
    warmup_per_class: int = 20
    rounds: int = 10
    round_epochs: int = 10

    def check_params(self, api: APIDescription, pool: torch.Tensor | None, budget: int) -> None:
        if self.policy not in POLICIES:
            raise InputError(f"policy: expected one of {', '.join(POLICIES)}, got {self.policy!r}")
        _positive_int("clusters", self.clusters)
        _positive_int("round_size", self.round_size)
        _positive_int("diversity_window", self.diversity_window)
        _positive_int("rounds", self.rounds)
        _positive_int("round_epochs", self.round_epochs)
        w = self.warmup
        if isinstance(w, bool) or not isinstance(w, int | float) or not 0 < w <= 1:
            raise InputError(f"warmup: expected a share of the budget in (0, 1], got {w!r}")
        wpc = self.warmup_per_class
        if isinstance(wpc, bool) or not isinstance(wpc, int) or wpc < 0:
            raise InputError(f"warmup_per_class: expected a non-negative integer, got {wpc!r}")
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
        self.last_warmup_spread: AnswerSpread | None = None
        if self.policy == "random":
            x = ctx.pool[random_subset(ctx, ctx.budget)]
            answers = query_pool(ctx, x)
        elif self.policy == "balanced":
            x, answers = self._balanced(ctx)
        else:
            x, answers = self._adaptive(ctx)
        self._notice(ctx, answers)
        logger.info("knockoff %s: %d queries answered, final training", self.policy, len(x))
        if ctx.api.mode.is_soft:
            targets = soft_targets(answers, ctx, self.temperature)
            return train_substitute(
                ctx, x, targets, soft=True, temperature=self.temperature, config=self.train
            )
        return train_substitute(ctx, x, hard_targets(answers), soft=False, config=self.train)

    def _notice(self, ctx: AttackContext, answers: torch.Tensor) -> None:
        """Measure, record and (when skewed) warn about the spread of all the answers."""
        spread = answer_spread(answers, ctx.api.description.num_classes)
        self.last_spread = spread
        ctx.metrics["answered_classes"] = float(spread.answered)
        ctx.metrics["effective_classes"] = spread.effective
        logger.info("knockoff %s: %s; answers per class %s", self.policy, spread.describe(),
                    spread.counts.tolist())  # fmt: skip
        if not spread.skewed:
            return
        if self.policy == "balanced":
            what = spread.describe() + " even with class-balanced selection"
            if spread.missing:
                what += (
                    f": the pool seems unable to produce class(es) {spread.missing}, which the "
                    "substitute will not learn from it; add a pool that holds them"
                )
            else:
                what += ": the pool holds few points the victim answers as the rarest classes"
        else:
            what = (
                spread.describe() + ": the substitute learns little of the classes it rarely or never "
                "sees; try policy='balanced' (class-balancing selection) or another pool"
            )
        logger.warning("knockoff: %s", what)
        warnings.warn(ClassSkewWarning(f"knockoff: {what}"), stacklevel=2)

    def _balanced(self, ctx: AttackContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Random warm-up, then class-balancing rounds (module doc, **balanced**)."""
        assert ctx.pool is not None
        pool = ctx.pool
        k = ctx.api.description.num_classes
        soft = ctx.api.mode.is_soft
        total = min(ctx.remaining, len(pool))
        n0 = min(total, max(1, round(self.warmup * total), self.warmup_per_class * k))
        rest = total - n0
        sizes = [rest // self.rounds + (1 if r >= self.rounds - rest % self.rounds else 0)
                 for r in range(self.rounds)]  # fmt: skip
        sizes = [n for n in sizes if n > 0]  # fewer rounds than `rounds` when few queries are left
        quiet = replace(ctx, snapshot=None)  # selection models: one history point per round
        round_cfg = replace(self.train, epochs=self.round_epochs)

        order = torch.randperm(len(pool), generator=ctx.generator)
        chosen = order[:n0]
        queried = torch.zeros(len(pool), dtype=torch.bool)
        queried[chosen] = True
        picked = [chosen]
        answers = [query_pool(ctx, pool[chosen])]
        warm = answer_spread(answers[0], k)
        self.last_warmup_spread = warm
        ctx.metrics["warmup_answered_classes"] = float(warm.answered)
        ctx.metrics["warmup_effective_classes"] = warm.effective
        logger.info("knockoff balanced: after the random warm-up of %d, %s; answers per class %s",
                    n0, warm.describe(), warm.counts.tolist())  # fmt: skip
        model: nn.Module | None = None
        for r, size in enumerate(sizes):
            x = pool[torch.cat(picked)]
            raw = torch.cat(answers)
            targets = soft_targets(raw, ctx, self.temperature) if soft else hard_targets(raw)
            model = train_substitute(quiet, x, targets, soft=soft, temperature=self.temperature,
                                     config=round_cfg, model=model)  # fmt: skip
            ctx.report(model, r)
            candidates = order[~queried[order]]  # unqueried, in the run's random order (breaks ties)
            logits, _ = embed(model, pool[candidates], features=False)
            counts = answer_spread(raw, k).counts
            pick = candidates[balanced_pick(torch.softmax(logits.double(), 1), counts, size)]
            ctx.emit(stage="select", done=r + 1, total=len(sizes), strategy="balanced")
            answers.append(query_pool(ctx, pool[pick]))
            queried[pick] = True
            picked.append(pick)
            logger.info("knockoff balanced round %d: %d queries, answers per class %s", r, ctx.spent,
                        answer_spread(torch.cat(answers), k).counts.tolist())  # fmt: skip
        return pool[torch.cat(picked)], torch.cat(answers)

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
