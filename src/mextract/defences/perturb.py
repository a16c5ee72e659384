"""Output-perturbation defences: wrappers that change what an oracle reveals.

Each defence is an :class:`~mextract.oracle.OracleWrapper`: it asks the inner oracle
(which must answer ``logits`` or ``probs``, the full information), transforms the answer,
and is itself an oracle, so defences stack (``TopK(ReverseSigmoid(oracle), k=3)``) and
every attack runs against a defended victim unchanged. The inner ledger counts each
sample once, whatever the stack. With identity parameters every defence answers
exactly like the undefended oracle in the same mode.

Only :class:`NoisyProbabilities` has state (its noise generator's position); the other
defences are pure functions of their options and models, and their ``state_dict`` is
``{}``.

Covered (IBM ART's postprocessor checklist, plus the strongest published ones):
honey labels (the sources), top-k, rounding, label-only, reverse sigmoid (Lee et al.
2019), ε-differentially-private noise, prediction poisoning (MAD; Orekondy et al.
ICLR 2020) and adaptive misinformation (Kariyappa & Qureshi, CVPR 2020).

What each was checked against (IBM ART's postprocessors, the papers' equations) and how it
differs from its paper: ``docs/faithfulness.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mextract.errors import InputError, UnknownNameError
from mextract.oracle import AnswerMode, Oracle, OracleWrapper, restrict
from mextract.oracle.state import StateLock, check_state_keys, generator_state, state_generator


def _inner_logits(inner: Oracle, x: torch.Tensor) -> torch.Tensor:
    """The inner oracle's answer as logits (up to a per-row constant for ``probs``)."""
    answers = inner.query(x)
    if inner.mode is AnswerMode.LOGITS:
        return answers
    return torch.log(answers.clamp_min(torch.finfo(answers.dtype).tiny))


def _check_inner(inner: Oracle, defence: str, ranked: bool = False) -> None:
    """``ranked``: the defence needs only the top class (label-only), which rounded, top-k and
    label answers keep, so it may wrap them too."""
    if not isinstance(inner, Oracle):
        raise InputError(f"{defence}: expected an Oracle to wrap, got {type(inner).__name__}")
    if ranked and inner.mode in (AnswerMode.ROUNDED, AnswerMode.TOPK, AnswerMode.LABEL):
        return
    if inner.mode not in (AnswerMode.LOGITS, AnswerMode.PROBS):
        raise InputError(
            f"{defence}: expected an inner oracle answering 'logits' or 'probs', got {inner.mode.value!r} "
            "(a defence needs the full answer to perturb it)"
        )


class _Perturbation(OracleWrapper):
    """A defence that maps the inner logits to an answer in ``self.mode``."""

    #: only the order of the classes is used (see :func:`_check_inner`)
    ranked = False

    def __init__(self, inner: Oracle, *, mode: AnswerMode | str) -> None:
        _check_inner(inner, type(self).__name__, self.ranked)
        super().__init__(inner, mode=mode)

    def _answer(self, x: torch.Tensor) -> torch.Tensor:
        return self.transform(_inner_logits(self.inner, x), x)

    def transform(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The answer for inner ``logits`` on queries ``x``."""
        raise NotImplementedError


class TopK(_Perturbation):
    """Reveal only the ``k`` largest probabilities (zeros elsewhere). ``k = K`` is identity.

    Faithfulness: ``docs/faithfulness.md#topk``.
    """

    def __init__(self, inner: Oracle, *, k: int = 1) -> None:
        if not isinstance(k, int) or k < 1:
            raise InputError(f"k: expected an integer >= 1, got {k!r}")
        self.k = k
        super().__init__(inner, mode=AnswerMode.TOPK)

    def transform(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return restrict(logits, AnswerMode.TOPK, k=self.k)


class Rounding(_Perturbation):
    """Round the probability vector to ``decimals`` decimal places (Tramèr et al. 2016).

    Faithfulness: ``docs/faithfulness.md#rounding``.
    """

    def __init__(self, inner: Oracle, *, decimals: int = 2) -> None:
        if not isinstance(decimals, int) or decimals < 0:
            raise InputError(f"decimals: expected an integer >= 0, got {decimals!r}")
        self.decimals = decimals
        super().__init__(inner, mode=AnswerMode.ROUNDED)

    def transform(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return restrict(logits, AnswerMode.ROUNDED, decimals=self.decimals)


class LabelOnly(_Perturbation):
    """Reveal only the top-1 class (as a one-hot vector). It may wrap rounded, top-k or label
    answers too: their top-1 is the API's label (with rounding, a tie goes to the lower class).

    Faithfulness: ``docs/faithfulness.md#label-only``.
    """

    ranked = True

    def __init__(self, inner: Oracle) -> None:
        super().__init__(inner, mode=AnswerMode.LABEL)

    def transform(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return restrict(logits, AnswerMode.LABEL)


class HoneyLabels(_Perturbation):
    """The sources' stage-3 defence: when the victim is unsure — its top-1/top-2 logit
    margin is below ``threshold`` (the sources: 1.5) — answer the top-2 class instead.

    The margin is read in logits; from a ``probs`` inner oracle it is
    ``log p₁ − log p₂``, the same number. ``output="label"`` answers one-hot labels (the
    sources' hard-label API); ``output="probs"`` swaps the top-1 and top-2 probabilities
    so that the answer stays a plausible distribution. ``threshold = 0`` is identity.

    Faithfulness: ``docs/faithfulness.md#honey``.
    """

    def __init__(self, inner: Oracle, *, threshold: float = 1.5, output: str = "label") -> None:
        if not threshold >= 0:
            raise InputError(f"threshold: expected a number >= 0, got {threshold}")
        if output not in ("label", "probs"):
            raise UnknownNameError("honey-label output", output, ["label", "probs"])
        self.threshold = float(threshold)
        super().__init__(inner, mode=output)

    def flipped(self, logits: torch.Tensor) -> torch.Tensor:
        """Which rows get the honey label (margin strictly below the threshold)."""
        top2 = logits.topk(2, dim=1).values
        return (top2[:, 0] - top2[:, 1]) < self.threshold

    def transform(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        flip = self.flipped(logits)
        order = logits.topk(2, dim=1).indices
        if self.mode is AnswerMode.LABEL:
            label = torch.where(flip, order[:, 1], order[:, 0])
            return F.one_hot(label, logits.shape[1]).to(logits.dtype)
        probs = torch.softmax(logits, dim=1)
        i, j = order[:, 0:1], order[:, 1:2]
        swapped = probs.clone()
        swapped.scatter_(1, i, probs.gather(1, j)).scatter_(1, j, probs.gather(1, i))
        return torch.where(flip[:, None], swapped, probs)


class ReverseSigmoid(_Perturbation):
    """Reverse sigmoid (Lee et al., "Defending against NN model stealing attacks using
    deceptive perturbations", IEEE S&P Workshops 2019), as IBM ART implements it:
    ``r = β·(σ(γ·σ⁻¹(p)) − ½)``, answer ``p − r`` clipped to [0, 1] and renormalised.
    It keeps the argmax for honest users while making the probability-to-logit map
    non-invertible. ``β = 0`` is identity; ART's defaults β = 1, γ = 0.1.

    Faithfulness: ``docs/faithfulness.md#reverse-sigmoid``.
    """

    def __init__(self, inner: Oracle, *, beta: float = 1.0, gamma: float = 0.1) -> None:
        if not beta >= 0 or not gamma > 0:
            raise InputError(f"expected beta >= 0 and gamma > 0, got beta={beta}, gamma={gamma}")
        self.beta, self.gamma = float(beta), float(gamma)
        super().__init__(inner, mode=AnswerMode.PROBS)

    def transform(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(logits, dim=1)
        if self.beta == 0:
            return p
        eps = 1e-6 if p.dtype == torch.float32 else 1e-12
        q = p.clamp(eps, 1 - eps)
        r = self.beta * (torch.sigmoid(self.gamma * torch.log(q / (1 - q))) - 0.5)
        out = (p - r).clamp(0, 1)
        total = out.sum(1, keepdim=True)
        return torch.where(total > 0, out / total.clamp_min(eps), p)


class NoisyProbabilities(_Perturbation):
    """ε-differentially-private answers: noise on the probability vector.

    Two probability vectors differ by at most 2 in L1 and √2 in L2 norm, so the
    Laplace mechanism adds ``Lap(2/ε)`` per entry (ε-DP per query) and the Gaussian
    mechanism ``N(0, σ²)`` with ``σ = √2·√(2 ln(1.25/δ))/ε`` ((ε, δ)-DP per query, valid
    for ε < 1; Dwork & Roth 2014, Thm. A.1). Clipping to [0, 1] and renormalising is
    post-processing and keeps the guarantee. Noise is drawn from the defence's own
    seeded generator. ``epsilon = inf`` is identity. The guarantee is per query: an
    attacker who repeats a query averages the noise away (composition), which is why
    ``budget`` at the oracle matters.

    State (:meth:`state_dict`): the generator's state, ``{"generator": uint8 tensor}``;
    loaded into a defence with the same options, the next answers are those the original
    would have given. ``epsilon``, ``mechanism``, ``delta`` and ``seed`` are configuration.
    Concurrent queries draw their noise one batch at a time (thread-safe).

    Faithfulness: ``docs/faithfulness.md#dp-noise``.
    """

    def __init__(
        self,
        inner: Oracle,
        *,
        epsilon: float,
        mechanism: str = "laplace",
        delta: float = 1e-5,
        seed: int = 0,
    ) -> None:
        if not epsilon > 0:
            raise InputError(f"epsilon: expected a positive number (or inf), got {epsilon}")
        if mechanism not in ("laplace", "gaussian"):
            raise UnknownNameError("noise mechanism", mechanism, ["laplace", "gaussian"])
        if mechanism == "gaussian" and math.isfinite(epsilon) and not (epsilon < 1 and 0 < delta < 1):
            raise InputError(
                f"the Gaussian mechanism needs epsilon < 1 and 0 < delta < 1, got {epsilon} and {delta}"
            )
        self.epsilon, self.mechanism, self.delta = float(epsilon), mechanism, float(delta)
        self.generator = torch.Generator().manual_seed(seed)
        self._lock = StateLock()
        super().__init__(inner, mode=AnswerMode.PROBS)

    def state_dict(self) -> dict[str, Any]:
        with self._lock:
            return {"generator": generator_state(self.generator)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = check_state_keys(type(self).__name__, state, ("generator",))
        generator = state_generator(type(self).__name__, "generator", state["generator"])
        with self._lock:
            self.generator.set_state(generator)

    @property
    def scale(self) -> float:
        """Laplace scale b, or Gaussian standard deviation σ."""
        if not math.isfinite(self.epsilon):
            return 0.0
        if self.mechanism == "laplace":
            return 2.0 / self.epsilon
        return math.sqrt(2.0) * math.sqrt(2 * math.log(1.25 / self.delta)) / self.epsilon

    def transform(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(logits, dim=1)
        if self.scale == 0.0:
            return p
        with self._lock:  # one batch's draws are consecutive, whatever other threads do
            u = torch.rand(p.shape, generator=self.generator, dtype=torch.float64)
            if self.mechanism == "laplace":
                noise = -self.scale * torch.sign(u - 0.5) * torch.log1p(-2 * (u - 0.5).abs())
            else:
                noise = self.scale * torch.randn(p.shape, generator=self.generator, dtype=torch.float64)
        return noisy_probabilities(p, noise)


def noisy_probabilities(p: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """:class:`NoisyProbabilities`' post-processing of ``p + noise``: clip to [0, 1] and
    renormalise (a row clipped to all zeros becomes uniform). IBM ART's ``GaussianNoise``
    clips only below 0; the two agree wherever no noisy entry exceeds 1 (checked in
    ``tests/test_faithfulness.py``). Clipping above too keeps every entry a probability."""
    out = (p.double() + noise.double()).clamp(0, 1)
    total = out.sum(1, keepdim=True)
    uniform = torch.full_like(out, 1.0 / out.shape[1])
    return torch.where(total > 0, out / total.clamp_min(1e-12), uniform).to(p.dtype)


class PredictionPoisoning(_Perturbation):
    """MAD prediction poisoning (Orekondy, Schiele & Fritz, "Prediction Poisoning: Towards
    Defenses Against DNN Model Stealing Attacks", ICLR 2020). Faithfulness:
    ``docs/faithfulness.md#mad``.

    Perturb the answer ``y`` to ``ỹ`` with ``‖ỹ − y‖₁ ≤ ε`` so that the gradient an
    attacker's model would take on ``ỹ`` points as far as possible from the one it would
    take on ``y`` (the paper's objective: the angular deviation ``‖Gᵀỹ/‖Gᵀỹ‖ − Gᵀy/‖Gᵀy‖‖²``).
    The attacker's model is unknown: a *surrogate* stands in for it (the paper uses a
    randomly initialised model of a plausible architecture).

    The gradient is taken w.r.t. the surrogate's **last linear layer's weight**, as in the
    authors' code by default. There it has a closed form: ``Gᵀv = (s − v) ⊗ h`` for a
    target ``v`` on the simplex, surrogate softmax ``s`` and penultimate features ``h``, so
    the unit gradient depends only on ``(v − s)/‖v − s‖`` and the search is exact and batched.

    ``oracle="extreme"`` (default) is the published algorithm (the paper's heuristic solver,
    as in the authors' code with ``objmax``): the target ``y*`` is the simplex vertex ``e_k``
    whose objective is largest *at the vertex*, then the line search moves towards it as far
    as the budget allows, ``ỹ = (1 − α)·y + α·y*`` with ``α = min(1, ε/‖y* − y‖₁)``.
    With ``argmax=True`` (the paper's MAD-argmax) the candidates are instead the
    argmax-preserving extremes: for every class subset ``S`` containing the top class, the
    uniform distribution on ``S`` (the top class nudged up by ``1e-5`` so that it stays the
    argmax); every subset is searched for ``K ≤ 10``, and beyond that the set grows
    greedily (add the class that raises the objective most, keep the best set seen, at most
    1024 evaluations), as in the authors' code. ``y`` and ``y*`` share their top class, so
    every ``ỹ`` between them keeps it: honest users' labels never change.

    ``oracle="truncated"`` is this lab's variant, not the paper's: every vertex is first
    truncated to the budget, ``ỹ_k = (1 − α_k)·y + α_k·e_k`` with ``α_k = min(1, ε/‖e_k − y‖₁)``
    (with ``argmax=True``, ``α_k`` further capped so that the top class survives), and the
    candidate whose objective is largest *after* truncation is answered. It maximises the
    objective over a larger feasible set than the paper's one-vertex line search for small
    ``ε``, at the same L1 cost; its measured effect is in ``docs/faithfulness.md``.

    The authors' code by default (``objmax`` off) ranks vertices by the unnormalised
    ``‖Gᵀ(ỹ − y)‖²``; with last-layer gradients that is ``‖ỹ − y‖₂²·‖h‖²``, which ignores
    the surrogate and picks the vertex of the least likely class. The paper's angular
    objective is used here.

    ``epsilon = 0`` is identity.
    """

    #: the search over argmax-preserving subsets is exhaustive up to this many classes
    EXHAUSTIVE_CLASSES = 10
    #: the greedy search's evaluation budget beyond it (the authors' ``max_iters``)
    GREEDY_EVALUATIONS = 1024
    #: how much the top class is favoured in an argmax-preserving extreme
    TOP_NUDGE = 1e-5

    def __init__(
        self,
        inner: Oracle,
        *,
        surrogate: nn.Module,
        epsilon: float = 1.0,
        argmax: bool = False,
        oracle: str = "extreme",
    ) -> None:
        if isinstance(epsilon, bool) or not isinstance(epsilon, int | float) or not 0 <= epsilon <= 2:
            raise InputError(f"epsilon: expected an L1 budget in [0, 2], got {epsilon!r}")
        if not isinstance(argmax, bool):
            raise InputError(f"argmax: expected a bool, got {argmax!r}")
        if oracle not in ("extreme", "truncated"):
            raise UnknownNameError("MAD oracle", str(oracle), ["extreme", "truncated"])
        if not isinstance(surrogate, nn.Sequential) or not isinstance(surrogate[-1], nn.Linear):
            raise InputError("surrogate: expected an nn.Sequential ending in an nn.Linear (a zoo model)")
        self.surrogate = surrogate.eval()
        self.epsilon, self.argmax, self.oracle = float(epsilon), argmax, oracle
        super().__init__(inner, mode=AnswerMode.PROBS)

    @torch.no_grad()
    def transform(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = torch.softmax(logits, dim=1)
        if self.epsilon == 0:
            return y
        dtype = next(self.surrogate.parameters()).dtype
        s = torch.softmax(self.surrogate(x.to(dtype)), dim=1).to(y.dtype)
        if self.oracle == "truncated":
            return self._truncated(y, s)
        target = self._argmax_extreme(y, s) if self.argmax else self._extreme(y, s)
        alpha = (self.epsilon / (target - y).abs().sum(1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)
        return y + alpha * (target - y)

    @staticmethod
    def objective(candidates: torch.Tensor, y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """The paper's angular deviation ``‖u(ỹ) − u(y)‖²`` with ``u(v) = (v − s)/‖v − s‖``
        (the unit last-layer gradient, up to sign and the factor ``h``), for candidates
        ``(N, C, K)`` against ``y`` and ``s`` ``(N, K)``; returns ``(N, C)``."""
        u_y = F.normalize(y - s, dim=1)
        u_c = F.normalize(candidates - s[:, None, :], dim=2)
        return (u_c - u_y[:, None, :]).pow(2).sum(2)

    def _extreme(self, y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(y.shape[1], dtype=y.dtype).expand(len(y), -1, -1)
        best = self.objective(eye, y, s).argmax(1)
        return eye[0][best]

    def _argmax_extreme(self, y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        n, k = y.shape
        top = y.argmax(1)
        rows = torch.arange(n)

        def extremes(masks: torch.Tensor) -> torch.Tensor:  # (N, C, K) 0/1 → distributions
            v = masks.to(y.dtype).clone()
            v[rows, :, top] += self.TOP_NUDGE
            return v / v.sum(2, keepdim=True)

        if k <= self.EXHAUSTIVE_CLASSES:
            bits = (torch.arange(2 ** (k - 1))[:, None] >> torch.arange(k - 1)) & 1  # (2^(K-1), K-1)
            others = torch.stack([torch.cat([torch.arange(t), torch.arange(t + 1, k)]) for t in top.tolist()])
            masks = torch.zeros(n, len(bits), k, dtype=torch.long)
            masks.scatter_(2, others[:, None, :].expand(-1, len(bits), -1), bits.expand(n, -1, -1))
            masks[rows, :, top] = 1
            cand = extremes(masks)
            return cand[rows, self.objective(cand, y, s).argmax(1)]
        fixed = F.one_hot(top, k).bool()
        best_val = torch.full((n,), -math.inf, dtype=y.dtype)
        best = extremes(fixed[:, None, :])[:, 0]
        evaluations = 0
        while evaluations < self.GREEDY_EVALUATIONS and not fixed.all():
            masks = fixed[:, None, :] | torch.eye(k, dtype=torch.bool)[None]  # (N, K, K): add class j
            cand = extremes(masks)
            val = self.objective(cand, y, s).masked_fill(fixed, -math.inf)
            step_val, j = val.max(1)
            better = step_val > best_val
            best = torch.where(better[:, None], cand[rows, j], best)
            best_val = torch.where(better, step_val, best_val)
            fixed[rows, j] = True
            evaluations += k - int(fixed[0].sum()) + 1
        return best

    def _truncated(self, y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        k = y.shape[1]
        eye = torch.eye(k, dtype=y.dtype)
        top = y.argmax(1)
        vertices = torch.arange(k).expand(len(y), k)  # (N, K): every candidate target e_k
        dist = (eye[None] - y[:, None, :]).abs().sum(2).clamp_min(1e-12)  # ‖e_k − y‖₁
        alpha = (self.epsilon / dist).clamp(max=1.0)  # (N, K)
        if self.argmax:
            alpha = torch.minimum(alpha, _argmax_cap(y[:, None, :], vertices, top[:, None]))
        cand = (1 - alpha[..., None]) * y[:, None, :] + alpha[..., None] * eye[None]  # (N, K, K)
        best = self.objective(cand, y, s).argmax(1)  # largest angular deviation
        return cand[torch.arange(len(y)), best]


def _argmax_cap(y: torch.Tensor, k: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """Largest α keeping ``argmax((1−α)y + α e_k) = top`` (1 when ``k = top``).

    Shapes broadcast: ``y (N, 1, K)``, ``k (N, K)`` candidate classes, ``top (N, 1)``."""
    yt = y[..., 0, :].gather(1, top)  # (N, 1)
    yk = y[..., 0, :].gather(1, k)  # (N, K)
    # (1−α) yt > (1−α) yk + α  ⇔  α < (yt − yk) / (1 + yt − yk); stay just inside
    cap = (yt - yk) / (1 + yt - yk) * (1 - 1e-6)
    return torch.where(k == top, torch.ones_like(cap), cap.clamp(min=0))


class AdaptiveMisinformation(_Perturbation):
    """Adaptive misinformation (Kariyappa & Qureshi, CVPR 2020).

    Extraction queries tend to be out of distribution; the victim's maximum softmax
    probability (MSP) flags them (Hendrycks & Gimpel 2017). The answer blends the true
    prediction with a *misinformation* model's, more so the less confident the victim:
    ``ỹ = (1 − α)·y + α·ŷ_mis``, ``α = σ(ν·(τ − MSP))`` (the paper's reverse sigmoid on
    the OOD score; ν its sharpness). ``ŷ_mis`` comes from a model trained to put low
    probability on the correct class (:func:`misinformation_loss`). In-distribution
    queries with MSP well above τ are answered almost unchanged. ``tau = 0`` is identity.

    Faithfulness: ``docs/faithfulness.md#adaptive-misinformation``.
    """

    def __init__(
        self,
        inner: Oracle,
        *,
        misinformation: nn.Module,
        tau: float = 0.5,
        nu: float = 1000.0,
    ) -> None:
        if not 0 <= tau <= 1 or not nu > 0:
            raise InputError(f"expected tau in [0, 1] and nu > 0, got tau={tau}, nu={nu}")
        self.misinformation = misinformation.eval()
        self.tau, self.nu = float(tau), float(nu)
        super().__init__(inner, mode=AnswerMode.PROBS)

    def transform(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = torch.softmax(logits, dim=1)
        if self.tau == 0:
            return y
        with torch.no_grad():
            dtype = next(self.misinformation.parameters()).dtype
            mis = torch.softmax(self.misinformation(x.to(dtype)), dim=1).to(y.dtype)
        alpha = torch.sigmoid(self.nu * (self.tau - y.max(1).values))
        return (1 - alpha[:, None]) * y + alpha[:, None] * mis


def misinformation_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Kariyappa & Qureshi's misinformation objective: ``−log(1 − p_y)``, minimised when
    the model puts no probability on the correct class."""
    p = torch.softmax(logits, dim=1).gather(1, y[:, None]).squeeze(1)
    return -torch.log1p(-p.clamp(max=1 - 1e-6)).mean()


DefenceFactory = Callable[[Oracle], Oracle]
