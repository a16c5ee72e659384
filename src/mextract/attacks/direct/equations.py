"""Equation-solving extraction of (multinomial) logistic regression.

Tramèr, Zhang, Juels, Reiter & Ristenpart, "Stealing Machine Learning Models via
Prediction APIs", USENIX Security 2016, section 4.1.1. A logistic-regression victim
answers ``f(x) = softmax(Wx + b)``; every answer gives linear equations in the parameters:

* with logits, ``f(x) = Wx + b`` directly (K equations per query);
* with probabilities, the log-ratios ``log f_k(x) - log f_0(x) = (w_k - w_0)·x + (b_k - b_0)``
  (for binary LR this is Tramèr's ``w·x + β = σ⁻¹(f(x))``). Softmax is invariant to adding
  one vector to every row, so only the differences to class 0 are identifiable: the
  extracted model puts class 0's row at zero (same probabilities, same labels).

Exact modes use ``d + 1`` queries: the origin and ``d`` steps along the basis, which
make the system triangular and exact up to float64 rounding. Rounded probabilities
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
        queries: total queries; ``None`` means ``d + 1`` for logits / probability answers,
            and ``min(budget, 20 (d + 1))`` for rounded answers (least squares).
        verify: extra random queries spent checking that the victim really is linear
            (0: none, the minimal ``d + 1``); a mismatch raises instead of returning a
            wrong model.
        input_scale: spread of the random verification / least-squares queries.

    The result's metrics hold ``exact`` (1.0 for the exact solve), ``error_bound`` (the
    guaranteed max-abs parameter error in the class-0-difference gauge for rounded
    answers; 0.0 up to float rounding for exact modes) and ``equations`` used.
    """

    name: ClassVar[str] = "equation_solving"
    needs_pool: ClassVar[bool] = False

    step: float = 1.0
    queries: int | None = None
    verify: int = 0
    input_scale: float = 1.0

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

    def _design(self, d: int) -> np.ndarray:
        return np.vstack([np.zeros((1, d)), self.step * np.eye(d)])

    def _exact(
        self, flat: FlatOracle, ctx: AttackContext, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
        d = flat.dim
        n_total = self.queries or d + 1
        x = self._design(d)
        if n_total > d + 1:
            x = np.vstack([x, self.input_scale * rng.standard_normal((n_total - d - 1, d))])
        y = flat(x)  # (N, K): logits, or log-ratios to class 0
        if n_total == d + 1:  # triangular: exact up to rounding
            bias = y[0].copy()
            weight = ((y[1:] - y[0]) / self.step).T
        else:
            a = np.hstack([x, np.ones((len(x), 1))])
            theta, *_ = np.linalg.lstsq(a, y, rcond=None)
            weight, bias = theta[:d].T, theta[d]
        info: dict[str, float] = {"exact": 1.0, "error_bound": 0.0, "equations": float(y.size)}
        if self.verify:
            xv = self.input_scale * rng.standard_normal((self.verify, d))
            yv = flat(xv)
            pred = xv @ weight.T + bias
            scale = max(1.0, float(np.abs(yv).max()))
            err = float(np.abs(pred - yv).max()) / scale
            info["verify_rel_error"] = err
            if err > 1e-8:
                raise DirectExtractionError(
                    "equation solving: expected the victim's log-odds to be linear in x "
                    f"(a logistic regression), got a relative mismatch of {err:.3g} on "
                    f"{self.verify} fresh queries; this victim is not a linear model"
                )
        return weight, bias, info

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
        n_total = self.queries or min(ctx.remaining, 20 * (d + 1))
        n_total = min(n_total, ctx.remaining)

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
