"""Equation-solving extraction of (multinomial) logistic regression.

Tramèr, Zhang, Juels, Reiter & Ristenpart, "Stealing Machine Learning Models via
Prediction APIs", USENIX Security 2016, section 4.1.1. A logistic-regression victim
answers ``f(x) = softmax(Wx + b)``; every answer gives linear equations in the parameters:

* with logits, ``f(x) = Wx + b`` directly (K equations per query);
* with probabilities, the log-ratios ``log f_k(x) - log f_0(x) = (w_k - w_0)·x + (b_k - b_0)``
  (for binary LR this is Tramèr's ``w·x + β = σ⁻¹(f(x))``). Softmax is invariant to adding
  one vector to every row, so only the differences to class 0 are identifiable: the
  extracted model puts class 0's row at zero (same probabilities, same labels).

Exact modes start with ``d + 1`` queries: the origin and ``d`` steps along the basis,
which make the system triangular. Every answer carries an error estimated from the
answers' precision (the API's dtype; for probabilities, ``eps/p``, which is large near
saturation: a scikit-learn ``predict_proba`` computes ``p₀ = 1 - p₁``). The fit is least
squares weighted by those errors, and its pseudo-inverse turns them into the reported
``error_bound``. Where the bound is poor (e.g. a ``Pipeline(StandardScaler,
LogisticRegression)`` queried at the raw origin, logits ≈ 31, or beyond saturation where
probabilities are clipped), up to three more rounds of ``d + 1`` queries are placed where
all classes are equally likely under the current estimate, with per-feature steps that
move the logits by about one — our choice (Tramèr et al. solve at arbitrary points,
which is exact only with exact answers; saturated finite-precision answers carry no
information); a saturated starting point is first left by bisecting towards a point
with another top class. Finally ``verify`` fresh
queries (default 16, counted by the ledger and reported as ``verify_queries``) must
agree within ``verify_slack`` times the error that the precision allows, else the
attack raises instead of returning a wrong model. Rounded probabilities
(``rounded`` mode) break exactness; the attack then solves a weighted least-squares
system on more queries, placed where every class is reasonably probable (a pilot
solve finds that point and scale), and reports a *guaranteed* bound on the parameter
error: with each rounded probability within ``10^-decimals / 2`` of the truth, the
log-ratio error of equation ``n`` is at most ``e_n``, and the parameter error is at most
``Σ_n |P_in|`` where ``P`` is the pseudo-inverse of the system weighted by ``1/e_n``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from mextract.attacks.base import Attack, AttackContext
from mextract.attacks.direct.common import AnswerModeError, DirectExtractionError, FlatOracle
from mextract.errors import InputError
from mextract.oracle import AnswerMode, APIDescription

logger = logging.getLogger(__name__)

_EXACT_MODES = (AnswerMode.LOGITS, AnswerMode.PROBS)


def linear_model(weight: np.ndarray, bias: np.ndarray, input_shape: tuple[int, ...]) -> nn.Module:
    """A float64 ``Flatten → Linear`` module holding ``weight (K, D)`` and ``bias (K,)``."""
    k, d = weight.shape
    lin = nn.Linear(d, k, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(np.asarray(weight, dtype=np.float64)))
        lin.bias.copy_(torch.from_numpy(np.asarray(bias, dtype=np.float64)))
    return nn.Sequential(nn.Flatten(), lin).eval()


@dataclass(kw_only=True)
class EquationSolving(Attack):
    """Recover a linear softmax classifier from ``d + 1`` queries (Tramèr et al. 2016).

    Args:
        step: length of the basis steps of the exact design (in input units).
        queries: total equations; ``None`` means the adaptive rounds of ``d + 1`` for logits /
            probability answers (more adds random least-squares queries), and
            ``min(budget, 20 (d + 1))`` for rounded answers (least squares).
        verify: fresh random queries checking the model (default 16; 0 skips the check,
            reported as ``verify_queries = 0``); a mismatch beyond what the answers'
            precision allows raises instead of returning a wrong model.
        input_scale: spread of the random verification / least-squares queries (in units
            of the final per-feature steps for exact modes).
        rounds: most design rounds of ``d + 1`` queries for exact modes.
        rounds_target: stop adding rounds once the error bound is below
            ``rounds_target × eps`` relative to the largest parameter (eps of the answers).
        verify_slack: factor on the precision-derived error allowed by the check.
        max_rel_bound: largest error bound (relative to the largest parameter) an exact-mode
            result may have; a larger one raises (the answers could not pin the model down).

    The result's metrics hold ``exact`` (1.0 for the exact modes, 0.0 for rounded),
    ``error_bound`` (max-abs parameter error, class-0-difference gauge for probabilities:
    guaranteed for rounded answers; for exact modes propagated from the estimated answer
    errors, so float32 answers report ~1e-6, not 0), ``answer_eps``, ``equations`` used,
    ``design_rounds``, ``verify_queries`` and ``verify_rel_error``.
    """

    name: ClassVar[str] = "equation_solving"
    needs_pool: ClassVar[bool] = False

    step: float = 1.0
    queries: int | None = None
    verify: int = 16
    input_scale: float = 1.0
    rounds: int = 4
    rounds_target: float = 1e3
    verify_slack: float = 16.0
    max_rel_bound: float = 1e-3

    def check_params(self, api: APIDescription, pool: torch.Tensor | None, budget: int) -> None:
        if api.mode not in (*_EXACT_MODES, AnswerMode.ROUNDED):
            raise AnswerModeError(
                "oracle answer mode: expected 'logits', 'probs' or 'rounded' for equation "
                f"solving, got {api.mode.value!r}"
            )
        d = int(np.prod(api.input_shape))
        need = d + 1 + self.verify
        if budget < need:
            raise InputError(
                f"budget: expected at least d + 1 + verify = {need} queries to solve for "
                f"{d} weights and a bias per class, got {budget}"
            )
        if self.queries is not None and self.queries < d + 1:
            raise InputError(f"queries: expected at least d + 1 = {d + 1}, got {self.queries}")
        if not self.step > 0 or not self.input_scale > 0:
            raise InputError(
                f"step, input_scale: expected positive numbers, got {self.step}, {self.input_scale}"
            )

    # ------------------------------------------------------------------ run
    def model_spec(self, model: nn.Module) -> tuple[str, dict[str, Any]]:
        return "logreg", {}

    def run(self, ctx: AttackContext) -> nn.Module:
        oracle = ctx.api
        rng = np.random.default_rng(ctx.seed)
        rounded = oracle.mode is AnswerMode.ROUNDED
        shape = tuple(oracle.input_shape)
        if rounded:
            weight, bias, info = self._least_squares_rounded(ctx, rng)
        else:
            flat = FlatOracle(oracle)
            weight, bias, info = self._exact(flat, ctx, rng)
        model = linear_model(weight, bias, shape)
        ctx.metrics.update(info)
        return model

    def _exact(
        self, flat: FlatOracle, ctx: AttackContext, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
        """Weighted least squares on adaptively placed basis designs, then a check.

        Round 1 is the classic design (the origin, or the middle of the declared value
        range, and ``d`` basis steps of length ``step``). Every answer comes with its
        estimated error (:meth:`FlatOracle.answer`); the fit weights each equation by the
        inverse error and its pseudo-inverse ``P`` propagates those errors to a parameter
        error bound ``Σ_n |P_in| e_n``. When that bound is larger than ``rounds_target``
        relative (answers near saturation, e.g. a scaled pipeline queried far from its
        data), the next round is centred where all classes are equally likely under the
        current estimate, with per-feature steps that change the logits by about 1: the
        answers there carry the most information.
        """
        d = flat.dim
        lo, hi = self._range(ctx)
        center = np.zeros(d) if lo is None or hi is None else np.full(d, 0.5 * (lo + hi))
        steps = np.full(d, self.step)
        xs: list[np.ndarray] = []
        ys: list[np.ndarray] = []
        ns: list[np.ndarray] = []
        fit: _Fit | None = None
        rounds = 0
        target = self.rounds_target * flat.eps
        center, cached = self._informative_center(flat, center, rng, lo, hi)
        for rounds in range(1, self.rounds + 1):
            if rounds > 1 and (ctx.remaining is not None and ctx.remaining < d + 1 + self.verify):
                break
            x = np.repeat(center[None, :], d + 1, axis=0)
            up = x[np.arange(1, d + 1), np.arange(d)] + steps
            if hi is not None:  # step the other way where the range ends
                steps = np.where(up > hi, -steps, steps)
            x[np.arange(1, d + 1), np.arange(d)] += steps
            if lo is not None or hi is not None:
                x = np.clip(x, lo, hi)
            x = flat.snap(x)
            if cached is not None and np.array_equal(cached[0], x[0]):  # the centre was asked
                y1, n1 = flat.answer(x[1:])
                y, noise = np.vstack([cached[1], y1]), np.vstack([cached[2], n1])
            else:
                y, noise = flat.answer(x)
            cached = None
            xs.append(x)
            ys.append(y)
            ns.append(noise)
            fit = _fit_with_internal_noise(np.vstack(xs), np.vstack(ys), np.vstack(ns), flat.eps)
            bad = np.nonzero(~np.isfinite(noise[1:]).all(axis=1))[0]
            for _ in range(8):  # features whose step saturated the answer: shorter steps, re-asked
                if fit is not None or not len(bad) or not np.isfinite(noise[0]).all():
                    break
                if ctx.remaining is not None and ctx.remaining < len(bad) + self.verify:
                    break
                steps[bad] *= 1e-2
                xb = np.repeat(center[None, :], len(bad), axis=0)
                xb[np.arange(len(bad)), bad] += steps[bad]
                xb = flat.snap(xb if lo is None and hi is None else np.clip(xb, lo, hi))
                yb, nb = flat.answer(xb)
                xs.append(xb)
                ys.append(yb)
                ns.append(nb)
                bad = bad[~np.isfinite(nb).all(axis=1)]
                fit = _fit_with_internal_noise(np.vstack(xs), np.vstack(ys), np.vstack(ns), flat.eps)
            if fit is not None:
                scale = max(float(np.abs(fit.theta).max()), 1e-300)
                if fit.bound / scale <= target:
                    break
                w = fit.theta[:d].T
                b = fit.theta[d]
                wd = w - w[:1] if flat.log_probs or flat.mode is AnswerMode.PROBS else w
                bd = b - b[:1] if flat.log_probs or flat.mode is AnswerMode.PROBS else b
                rows = np.abs(wd).max(axis=1) > 0
                if rows.any():
                    shift = np.linalg.lstsq(wd[rows], -(wd[rows] @ center + bd[rows]), rcond=None)[0]
                    center = center + shift
                    if lo is not None or hi is not None:
                        center = np.clip(center, lo, hi)
                big = np.abs(wd).max(axis=0)
                steps = np.where(big > 0, 1.0 / np.maximum(big, 1e-300), self.step)
                steps = np.clip(steps, 1e-9 * self.step, self.step)
            else:  # the centre itself carries no information
                break
        n_asked = sum(len(x) for x in xs)
        if fit is not None and self.queries is not None and self.queries > n_asked:
            noise_x = rng.standard_normal((self.queries - n_asked, d))
            xr = flat.snap(center + steps * self.input_scale * noise_x)
            if lo is not None or hi is not None:
                xr = flat.snap(np.clip(xr, lo, hi))
            yr, nr = flat.answer(xr)
            xs.append(xr)
            ys.append(yr)
            ns.append(nr)
            fit = _fit_with_internal_noise(np.vstack(xs), np.vstack(ys), np.vstack(ns), flat.eps) or fit
        if fit is None:
            raise DirectExtractionError(
                "equation solving: expected answers that carry information (probabilities above "
                "the underflow threshold) on at least d + 1 independent queries, got too few after "
                f"{rounds} rounds: the victim saturates everywhere it was queried"
            )
        weight, bias = fit.theta[:d].T.copy(), fit.theta[d].copy()
        rel_bound = fit.bound / max(float(np.abs(fit.theta).max()), 1e-300)
        if not rel_bound <= self.max_rel_bound:
            raise DirectExtractionError(
                f"equation solving: the answers' precision only bounds the parameters to {rel_bound:.3g} "
                f"relative (expected <= max_rel_bound = {self.max_rel_bound:g}) after {rounds} design "
                "rounds: the victim's answers are saturated or too coarse where it was queried "
                "(raise `rounds`, or the budget)"
            )
        info: dict[str, float] = {
            "exact": 1.0,
            "error_bound": fit.bound,
            "equations": float(fit.used),
            "design_rounds": float(rounds),
            "answer_eps": flat.eps,
        }
        if self.verify:
            xv = flat.snap(center + steps * rng.standard_normal((self.verify, d)) * self.input_scale)
            if lo is not None or hi is not None:
                xv = flat.snap(np.clip(xv, lo, hi))
            yv, nv = flat.answer(xv)
            pred = xv @ weight.T + bias
            ok = np.isfinite(nv)
            allowed = self.verify_slack * (fit.propagate(xv) + nv + _internal_noise(xv, fit.theta, flat.eps))
            excess = np.where(ok, np.abs(pred - yv) / np.maximum(allowed, 1e-300), 0.0)
            scale = max(1.0, float(np.abs(yv[ok]).max()) if ok.any() else 1.0)
            info["verify_rel_error"] = float(np.where(ok, np.abs(pred - yv), 0.0).max()) / scale
            info["verify_queries"] = float(self.verify)
            info["verify_excess"] = float(excess.max())
            if not ok.any() or excess.max() > 1.0:
                raise DirectExtractionError(
                    "equation solving: expected the victim's log-odds to be linear in x "
                    f"(a logistic regression), got a mismatch {excess.max():.3g}× the error that "
                    f"the answers' precision allows on {self.verify} fresh queries; this victim "
                    "is not a linear model (or its answers are noisier than their dtype)"
                )
        else:
            info["verify_queries"] = 0.0
        logger.info(
            "equation solving: %d rounds, %d equations, error bound %.3g", rounds, fit.used, fit.bound
        )
        return weight, bias, info

    def _informative_center(
        self,
        flat: FlatOracle,
        center: np.ndarray,
        rng: np.random.Generator,
        lo: float | None,
        hi: float | None,
    ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray] | None]:
        """A starting point whose answers are not saturated (and its answer, if asked there).

        If the answers at ``center`` are (some probability underflowed, as for a scaled
        pipeline queried at the raw origin), random points at growing distances (1 to 10⁴
        ``input_scale``, 4 per scale) are asked until two get different top classes; the
        segment between them is bisected (at most 60 queries) until the answer carries
        information everywhere: a point near the decision boundary.
        """
        center = flat.snap(center)
        y, noise, lab = flat.answer_with_labels(center[None, :])
        if np.isfinite(noise).all():
            return center, (center, y, noise)
        d = len(center)
        pts, labs = [center], [int(lab[0])]
        found: tuple[np.ndarray, np.ndarray] | None = None
        for scale in 10.0 ** np.arange(0, 5):
            xr = center + scale * self.input_scale * rng.standard_normal((4, d))
            if lo is not None or hi is not None:
                xr = np.clip(xr, lo, hi)
            xr = flat.snap(xr)
            _, nr, lr = flat.answer_with_labels(xr)
            for i in range(len(xr)):
                if np.isfinite(nr[i]).all():
                    return xr[i], None
                pts.append(xr[i])
                labs.append(int(lr[i]))
            other = [i for i, c in enumerate(labs) if c != labs[0]]
            if other:
                found = pts[0], pts[other[0]]
                break
        if found is None:
            return center, None  # every answer has one top class: the rounds below will raise
        a, b = found
        la = labs[0]
        for _ in range(60):
            m = flat.snap(0.5 * (a + b))
            _, nm, lm = flat.answer_with_labels(m[None, :])
            if np.isfinite(nm).all():
                return m, None
            if int(lm[0]) == la:
                a = m
            else:
                b = m
        return center, None

    def _range(self, ctx: AttackContext) -> tuple[float | None, float | None]:
        vr = ctx.api.value_range
        return vr.low, vr.high

    def _least_squares_rounded(
        self, ctx: AttackContext, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
        oracle = ctx.api
        decimals = oracle.description.decimals  # a public parameter of the answer mode
        if decimals is None:
            raise InputError("rounded answers: expected the API to describe its `decimals`")
        delta = 10.0 ** (-int(decimals))
        shape = tuple(oracle.input_shape)
        d = int(np.prod(shape))
        n_total = self.queries or min(ctx.remaining - self.verify, 20 * (d + 1))
        n_total = min(n_total, ctx.remaining - self.verify)

        def ask(x: np.ndarray) -> np.ndarray:
            t = torch.from_numpy(np.ascontiguousarray(x)).reshape(-1, *shape)
            return oracle.query(t).to(torch.float64).numpy()

        xs: list[np.ndarray] = []
        ps: list[np.ndarray] = []
        # pilot: the exact design, shrunk until enough probabilities survive rounding
        step = self.step
        center = np.zeros(d)
        spread = self.input_scale
        for _ in range(4):
            if ctx.remaining < d + 1:
                break
            xp = np.vstack([np.zeros((1, d)), step * np.eye(d)])
            pp = ask(xp)
            xs.append(xp)
            ps.append(pp)
            fit = _weighted_fit(np.vstack(xs), np.vstack(ps), delta)
            if fit is not None:
                w_est, b_est = fit[0], fit[1]
                wd = w_est[1:]  # rows k >= 1 (class 0 is the reference)
                norm = float(np.abs(wd).sum(axis=1).max()) if len(wd) else 0.0
                if norm > 0:
                    spread = 1.0 / max(np.linalg.norm(wd, axis=1).max(), 1e-12)
                    center = np.linalg.lstsq(wd, -b_est[1:], rcond=None)[0]
                break
            step /= 10.0
        rest = n_total - sum(len(x) for x in xs)
        if rest > 0:
            xr = center + spread * rng.standard_normal((rest, d))
            xs.append(xr)
            ps.append(ask(xr))
        fit = _weighted_fit(np.vstack(xs), np.vstack(ps), delta)
        if fit is None:
            raise DirectExtractionError(
                "rounded answers: expected at least d + 1 answers per class with probabilities "
                f"above 2·10^-{decimals}, got too few; raise the budget or the decimals"
            )
        weight, bias, bound, used = fit
        info = {"exact": 0.0, "error_bound": bound, "equations": float(used)}
        info["verify_queries"] = float(self.verify)
        if self.verify:
            # fresh queries: each rounded answer is within delta/2 of the truth, and the
            # model's log-ratios are within bound·(|x|₁ + 1) of the victim's (softmax moves
            # a probability by at most half the largest log-ratio change)
            xv = center + spread * rng.standard_normal((self.verify, d))
            pv = ask(xv)
            z = xv @ weight.T + bias
            z -= z.max(axis=1, keepdims=True)
            pred = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
            allowed = 0.5 * delta + bound * (np.abs(xv).sum(axis=1, keepdims=True) + 1.0) + 1e-12
            excess = float((np.abs(pred - pv) / allowed).max())
            info["verify_excess"] = excess
            info["verify_rel_error"] = float(np.abs(pred - pv).max())
            if excess > 1.0:
                raise DirectExtractionError(
                    "equation solving (rounded): expected the fitted model's probabilities within "
                    f"the rounding and the error bound of the answers on {self.verify} fresh queries, "
                    f"got {excess:.3g}× that: the victim is not a linear softmax model"
                )
        logger.info("equation solving (rounded): %d equations, error bound %.3g", used, bound)
        return weight, bias, info


def _weighted_fit(
    x: np.ndarray, p: np.ndarray, delta: float
) -> tuple[np.ndarray, np.ndarray, float, int] | None:
    """Weighted least squares on log-ratios of rounded probabilities, with a worst-case bound.

    Returns ``(weight (K, D), bias (K,), bound, equations)`` with class 0 at zero, or
    ``None`` when some class has fewer than ``d + 1`` usable equations.
    """
    n, d = x.shape
    k = p.shape[1]
    a = np.hstack([x, np.ones((n, 1))])
    weight = np.zeros((k, d))
    bias = np.zeros(k)
    bound = 0.0
    used = 0
    ok0 = p[:, 0] >= 2 * delta
    e0 = -np.log1p(-delta / (2 * np.where(ok0, p[:, 0], 1.0)))
    for c in range(1, k):
        ok = ok0 & (p[:, c] >= 2 * delta)
        if int(ok.sum()) < d + 1:
            return None
        e = e0[ok] - np.log1p(-delta / (2 * p[ok, c]))  # |log-ratio error| <= e
        y = np.log(p[ok, c]) - np.log(p[ok, 0])
        aw = a[ok] / e[:, None]
        pinv = np.linalg.pinv(aw)
        if np.linalg.matrix_rank(aw) < d + 1:
            return None
        theta = pinv @ (y / e)
        weight[c], bias[c] = theta[:d], theta[d]
        bound = max(bound, float(np.abs(pinv).sum(axis=1).max()))
        used += int(ok.sum())
    return weight, bias, bound, used


@dataclass
class _Fit:
    """A weighted least-squares solution ``θ (d+1, K)`` and its error propagation."""

    theta: np.ndarray
    pinvs: list[np.ndarray | None]  # per class: (d+1, n_c) pseudo-inverse of the weighted system
    bound: float  # max over parameters of Σ_n |P_in| (weighted errors <= 1)
    used: int

    def propagate(self, x: np.ndarray) -> np.ndarray:
        """Bound on the error of the predicted answers at ``x`` ``(N, K)`` implied by the fit."""
        a = np.hstack([x, np.ones((len(x), 1))])
        out = np.zeros((len(x), len(self.pinvs)))
        for c, pinv in enumerate(self.pinvs):
            if pinv is not None:
                out[:, c] = np.abs(a @ pinv).sum(axis=1)
        return out


def _weighted_lstsq(x: np.ndarray, y: np.ndarray, noise: np.ndarray, eps: float) -> _Fit | None:
    """Per class, least squares weighted by ``1/noise`` over the informative equations.

    A class whose answers are identically zero with zero noise (the reference class of
    log-ratios) gets zero parameters. ``None`` when some class has fewer than ``d + 1``
    informative, independent equations.
    """
    n, d = x.shape
    k = y.shape[1]
    a = np.hstack([x, np.ones((n, 1))])
    theta = np.zeros((d + 1, k))
    pinvs: list[np.ndarray | None] = []
    bound = 0.0
    used = 0
    for c in range(k):
        if not np.any(y[:, c]) and not np.any(noise[:, c]):
            pinvs.append(None)
            continue
        ok = np.isfinite(noise[:, c])
        if int(ok.sum()) < d + 1:
            return None
        e = np.maximum(noise[ok, c], eps * (1.0 + np.abs(y[ok, c])))
        if np.linalg.matrix_rank(a[ok]) < d + 1:
            return None
        aw = a[ok] / e[:, None]
        # weights may span many orders of magnitude: keep every direction (full rank above)
        pinv = np.linalg.pinv(aw, rcond=1e-300)
        theta[:, c] = pinv @ (y[ok, c] / e)
        bound = max(bound, float(np.abs(pinv).sum(axis=1).max()))
        pinvs.append(pinv)  # maps weighted answers (errors <= 1) to parameters
        used += int(ok.sum())
    return _Fit(theta=theta, pinvs=pinvs, bound=bound, used=used)


def _internal_noise(x: np.ndarray, theta: np.ndarray, eps: float) -> np.ndarray:
    """Rounding inside the victim's own forward pass: ``4·eps·(|w_c|·|x| + |b_c|)``."""
    d = x.shape[1]
    return 4.0 * eps * (np.abs(x) @ np.abs(theta[:d]) + np.abs(theta[d])[None, :])


def _fit_with_internal_noise(x: np.ndarray, y: np.ndarray, noise: np.ndarray, eps: float) -> _Fit | None:
    """:func:`_weighted_lstsq`, refitted once with the victim's estimated internal rounding
    (large inputs times large weights) added to the answers' own errors."""
    fit = _weighted_lstsq(x, y, noise, eps)
    if fit is None:
        return None
    extra = _internal_noise(x, fit.theta, eps)
    extra[:, ~np.any(noise, axis=0) & ~np.any(y, axis=0)] = 0.0  # the reference class stays exact
    return _weighted_lstsq(x, y, noise + extra, eps) or fit
