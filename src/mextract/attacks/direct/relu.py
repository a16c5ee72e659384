"""Cryptanalytic extraction of one-hidden-layer ReLU networks with logit outputs.

The victim is ``O(x) = A¹·ReLU(A⁰x + B⁰) + B¹`` (``D`` inputs, ``H`` hidden units, ``K``
logits). Along any line ``x(t) = x₀ + t·u`` it is piecewise linear in ``t``, bending
exactly where the line crosses a hidden unit's hyperplane ``w_j·x + b_j = 0`` (a
*critical point*). Following Jagielski et al. (USENIX Security 2020, "High Accuracy and
High Fidelity Extraction of Neural Networks") and Carlini, Jagielski & Mironov
("Cryptanalytic Extraction of Neural Network Models", CRYPTO 2020), with a query
schedule of our own:

1. **Critical points on one random line.** A geometric grid of probes (each with a
   slope) covers ``t`` from ``10⁻³`` to ``10⁷`` input norms each way; every interval
   whose end slopes differ is resolved by *intersecting the two end lines*: if the
   victim's value at the intersection lies on both lines there is exactly one kink,
   located in closed form (one query); otherwise the interval is split. A random
   line crosses every hyperplane, so one line finds all ``H`` units (dead units
   included, as long as their output weights are non-zero). Curvature that never
   resolves into kinks raises :class:`NotPiecewiseLinearError`.
2. **One gradient per linear piece, one row per kink.** Between consecutive kinks the
   network is affine; its Jacobian ``G_s`` (``K × D``) and offset ``c_s`` come from
   ``D + 1`` finite-difference queries at the segment's middle, with a step scaled to
   the distance to the nearest kink. Crossing unit ``j`` changes the Jacobian by the
   rank-one ``±A¹[:, j]·w_jᵀ`` (the *gradient jump*): its leading right singular vector
   is ``w_j`` up to scale and sign, using all ``K`` outputs at once, and the jump in
   ``c`` gives ``b_j``. Neighbouring kinks share the piece between them, so the whole
   hidden layer costs ``(H + 1)(D + 1)`` queries, about ``K`` times the floor
   ``P / K`` (``P = H(D+1) + K(H+1)``), instead of the ``2·H·D`` of per-unit second
   differences. Finite-difference steps that would cross another hyperplane are found
   afterwards from the recovered geometry and re-queried with a safe step.
3. **Absolute signs.** Orienting each unit as "on at the larger ``t``" is a guess per
   unit; a wrong guess ``ReLU(z)`` vs ``ReLU(-z)`` differs by the linear term ``a·z``.
   The residual between a measured Jacobian and the model's predicted one is therefore
   ``Σ_j f_j·a_j w_jᵀ`` with ``f_j ∈ {0, 1}`` (1 = flip); it is solved by least squares
   and must round to 0/1, else the attack raises.
4. **Polish.** Each bias is re-derived from a critical point located in closed form on
   a short line along the unit's normal (four queries per unit, a step kept clear of
   all other hyperplanes), then the output layer ``A¹, B¹`` is solved by least squares
   on the hidden activations of the pieces' middles and fresh random queries (``K``
   outputs at once), and a held-out set of fresh queries must be reproduced to
   ``verify_tol`` relative error or the attack raises instead of returning a wrong model.

Robustness and precision (issue 16; our choices, in the spirit of Carlini et al.'s
precision refinements but not their procedure):

* every step and tolerance comes from the answers' unit roundoff (:class:`Precision`;
  float64 keeps the constants above, float32 answers get longer slope probes and
  looser "on the line", Jacobian, rank-one and sign tolerances); queries are rounded to
  the API's dtype before the steps taken are computed;
* a gradient jump that is not rank one (two kinks merged) is searched again on a fine
  grid between its neighbouring piece middles, re-measuring only the pieces next to it;
  the rank-one test discounts the noise floor ``4(√K + √D)·err`` of the Jacobian entries;
* coarse (float32) answers: a line left with such jumps is searched again with *chords*
  (:meth:`ReLUCryptanalysis._find_kinks_chords`: values only, an interval is linear when
  its middle lies on the chord of its ends within the answers' noise; kinks where the
  least-squares lines of neighbouring linear runs meet), whose resolution does not suffer
  from the short slope probes' noise; the search that leaves fewer rank-two jumps is kept;
* ``extra_lines``: jumps still not rank one are explained by further random lines
  (:meth:`ReLUCryptanalysis._union_lines`): their clean rows are merged with the first
  line's (same hyperplane and output column = same unit) until the units crossing the
  first line between two piece middles add up to every doubtful jump there;
* ``refine_steps``: Jacobian columns are re-measured with the longest safe step the
  recovered geometry allows (finite-difference error is ``noise/step``), and kept only if
  consistent with the first measurement;
* ``retries``: a failure another line can avoid restarts on a fresh random line;
* hidden layers wider than the ``K·D`` equations of the sign solve: the binary flips are
  found by enumerating the solve's null space (:func:`_binary_in_nullspace`);
* float32 answers on small nets: a joint Gauss-Newton least-squares polish of all
  parameters on fresh queries (:func:`_gauss_newton`);
* ``logits`` that are log-probabilities (scikit-learn ``MLPClassifier`` victims) are read
  as probabilities (differences to class 0; shorter search range).

Hidden units come back with unit-norm input weights: the network's symmetry (a positive
scale per unit and a permutation) is all that is not recovered; see
:func:`mextract.attacks.direct.align.align_relu1` for the error after alignment.

Answer modes: ``logits`` (exact); ``probs`` is accepted and converted to logit
differences ``log p_k - log p_0`` (the output layer then comes back minus its row 0:
same softmax and labels), failing clearly if a probability underflows to zero.
``rounded``, ``topk`` and ``label`` answers are refused (:class:`AnswerModeError`).
Memory is bounded by one ``K × D`` Jacobian per linear piece; no query log is kept.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from mextract.attacks.base import Attack, AttackContext
from mextract.attacks.direct.common import (
    AnswerModeError,
    DirectExtractionError,
    FlatOracle,
    NotPiecewiseLinearError,
    UnsupportedVictimError,
    with_retries,
)
from mextract.errors import InputError
from mextract.oracle import AnswerMode, APIDescription

logger = logging.getLogger(__name__)

_EPS = np.finfo(np.float64).eps


@dataclass(frozen=True)
class Precision:
    """Step sizes and tolerances chosen from the answers' unit roundoff ``eps``.

    ``fd``: relative finite-difference step of the kink search's slopes (float64: 1e-4,
    as before; coarser answers need longer steps: the slope error is ``~noise/step``).
    ``noise``: relative error assumed on an answer (a few roundings of the forward pass
    and of the query itself). ``tol``: the "lies on the line" tolerance, ``jac``: the
    Jacobian check, ``rank``: the largest second/first singular value of a gradient jump,
    ``flip``: how far a sign coefficient may be from 0/1, ``verify``: the final check.
    For float64 every value equals the attack's historical constant.
    """

    eps: float
    fd: float
    noise: float
    tol: float
    jac: float
    rank: float
    flip: float
    verify: float

    @classmethod
    def of(cls, eps: float, *, tol: float, verify_tol: float) -> Precision:
        ratio = max(1.0, eps / _EPS)  # 1 for float64, 5.4e8 for float32
        fd = min(1e-2, 1e-4 * ratio**0.25)
        noise = 8.0 * eps
        return cls(
            eps=eps,
            fd=fd,
            noise=noise,
            tol=max(tol, 4.0 * noise / fd),
            jac=max(1e-9, 1e3 * noise),
            rank=max(1e-6, 3e3 * noise),
            flip=max(1e-3, 3e4 * noise),
            verify=max(verify_tol, 16.0 * noise),
        )


def relu1_model(
    w0: np.ndarray, b0: np.ndarray, w1: np.ndarray, b1: np.ndarray, *, flatten: bool = True
) -> nn.Module:
    """A float64 ``[Flatten →] Linear → ReLU → Linear`` module (the zoo's ``relu1`` layout)."""
    h, d = w0.shape
    k = w1.shape[0]
    first = nn.Linear(d, h, dtype=torch.float64)
    second = nn.Linear(h, k, dtype=torch.float64)
    with torch.no_grad():
        first.weight.copy_(torch.from_numpy(np.ascontiguousarray(w0, dtype=np.float64)))
        first.bias.copy_(torch.from_numpy(np.ascontiguousarray(b0, dtype=np.float64)))
        second.weight.copy_(torch.from_numpy(np.ascontiguousarray(w1, dtype=np.float64)))
        second.bias.copy_(torch.from_numpy(np.ascontiguousarray(b1, dtype=np.float64)))
    layers: list[nn.Module] = [nn.Flatten()] if flatten else []
    return nn.Sequential(*layers, first, nn.ReLU(), second).eval()


def gaussian_relu1(d: int, h: int, k: int, seed: int = 0) -> nn.Module:
    """A float64 ``d-h-k`` one-hidden-layer ReLU net with every parameter drawn from N(0, 1)
    (the random victims of Carlini et al.'s and our benchmarks)."""
    from mextract.models import create_model

    net = create_model("relu1", (d,), k, hidden=h).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    return net.eval()


class _Line:
    """The victim restricted to ``x₀ + t·u``: values ``(N, K)`` at parameters ``t``."""

    def __init__(self, f: FlatOracle, x0: np.ndarray, u: np.ndarray) -> None:
        self.f, self.x0, self.u = f, x0, u

    def point(self, t: float) -> np.ndarray:
        return self.x0 + t * self.u

    def __call__(self, ts: np.ndarray) -> np.ndarray:
        ts = np.asarray(ts, dtype=np.float64).reshape(-1)
        return self.f(self.x0[None, :] + ts[:, None] * self.u[None, :])


@dataclass
class _LineFit:
    """Stage 2's results on one line: kinks ``ts``, piece middles, Jacobians, values and
    steps, and the rows of the kept kinks (``ratio``: their rank-one residuals)."""

    ts: np.ndarray
    centers: np.ndarray
    grads: np.ndarray
    vals: np.ndarray
    steps: np.ndarray
    w0: np.ndarray
    b0: np.ndarray
    a1: np.ndarray
    ratio: np.ndarray
    keep: np.ndarray
    values: int
    requeried: int
    shrinks: int
    researched: int


@dataclass(kw_only=True)
class ReLUCryptanalysis(Attack):
    """Exact extraction of a one-hidden-layer ReLU network from its logits.

    Args:
        input_scale: standard deviation of the random base point, of the fresh queries
            for the output layer and the check, and the unit of the line parameter.
        tol: relative tolerance of the "lies on the line" tests of the kink search.
        verify_queries: fresh random queries for the final check (held out of every fit).
        verify_tol: largest relative error on them before the attack refuses its result.
        max_kinks: stop (and raise) after this many critical points on the line.
        min_width: relative width below which an unresolved bend means "not piecewise
            linear".
        search_range: the line is searched over ``|t| <= 4^search_range`` input norms;
            ``None``: 11 for logits, 3 for probabilities (far queries would underflow them).
        retries: after a failure that a different line can avoid (kinks too close to
            separate, a rank-two jump, a failed check), start again on a fresh random line,
            this many times at most; every query counts (``lines_tried`` in the metrics).
        refine_steps: after the first rows are known, re-measure every Jacobian column whose
            safe step (half the way to the nearest known hyperplane along ``e_i``) is over
            4× the first one: finite-difference error is ``~noise/step``, so this is what
            keeps wide layers (close kinks, short first steps) and float32 answers precise.
        extra_lines: when a gradient jump of the line is not rank one (merged kinks) or, for
            coarse answers, too noisy (``max_row_error``), up to this many further random lines
            contribute the units they see cleanly, until every doubtful jump of the first line
            is explained by the units found (see :meth:`_union_lines`); 0: raise at once.
        max_row_error: largest noise-to-jump ratio (about the row's angular error) of a row
            kept from a line in that case.
        chord_search: for coarse (float32) answers, a line whose jumps are not all rank one
            is searched again with the values-only chord search (:meth:`_find_kinks_chords`),
            whose resolution does not suffer from short slope probes; the better of the two
            searches (fewer rank-two jumps) is kept.
        polish_max_params: for answers coarser than float64 (float32), networks with at most
            this many parameters get a final joint Gauss-Newton least-squares polish of all
            parameters on ``2P/K + 16`` fresh queries (activation pattern fixed from the
            current estimate; points near a hyperplane excluded).

    Metrics: ``hidden_units`` found, ``kinks``, ``flipped_units``, ``verify_rel_error``,
    ``requeried_columns`` and the query split of the stages.
    """

    name: ClassVar[str] = "relu_cryptanalysis"
    needs_pool: ClassVar[bool] = False

    input_scale: float = 1.0
    tol: float = 1e-7
    verify_queries: int = 32
    verify_tol: float = 1e-7
    max_kinks: int = 4096
    min_width: float = 1e-9
    search_range: int | None = None
    retries: int = 2
    refine_steps: bool = True
    polish_max_params: int = 2500
    extra_lines: int = 2
    max_row_error: float = 0.05
    chord_search: bool = True

    def check_params(self, api: APIDescription, pool: torch.Tensor | None, budget: int) -> None:
        if api.mode not in (AnswerMode.LOGITS, AnswerMode.PROBS):
            raise AnswerModeError(
                "oracle answer mode: expected 'logits' (or 'probs', converted to logit "
                f"differences) for exact ReLU extraction, got {api.mode.value!r}; rounded, "
                "top-k and label answers make exact recovery impossible"
            )
        d = int(np.prod(api.input_shape))
        need = 2 * (d + 1) + self.verify_queries
        if budget < need:
            raise InputError(
                f"budget: expected at least 2(D + 1) + verify_queries = {need} queries for even "
                f"a single hidden unit on D = {d} inputs, got {budget}"
            )
        if not self.input_scale > 0 or not 0 < self.tol < 1e-2:
            raise InputError(
                f"input_scale > 0 and 0 < tol < 1e-2 expected, got {self.input_scale}, {self.tol}"
            )

    # ================================================================== run
    def model_spec(self, model: nn.Module) -> tuple[str, dict[str, Any]]:
        last = list(model.children())[-1]
        assert isinstance(last, nn.Linear)  # relu1_model's layout: [Flatten →] Linear → ReLU → Linear
        return "relu1", {"hidden": int(last.in_features)}

    def run(self, ctx: AttackContext) -> nn.Module:
        t_start = time.perf_counter()
        f = FlatOracle(ctx.api)
        rng = np.random.default_rng(ctx.seed)
        # a fresh random line: kinks that were too close together on this one (merged, or a step
        # that could not avoid a neighbour) are far apart there
        model, tried = with_retries(lambda: self._attempt(ctx, f, rng, ctx.spent), self.retries,
                                    what="relu extraction", tries="random lines")  # fmt: skip
        ctx.metrics["lines_tried"] = float(tried)
        ctx.metrics["attack_time_s"] = time.perf_counter() - t_start
        return model

    def _attempt(self, ctx: AttackContext, f: FlatOracle, rng: np.random.Generator, spent0: int) -> nn.Module:
        t_start = time.perf_counter()
        d, k = f.dim, f.num_classes
        sigma = float(self.input_scale)
        unit = sigma * np.sqrt(d)  # typical norm of a base point: the unit of t
        x0 = sigma * rng.standard_normal(d)
        u = rng.standard_normal(d)
        u /= np.linalg.norm(u)
        line = _Line(f, x0, u)
        stages: dict[str, float] = {}
        prec = Precision.of(f.eps, tol=self.tol, verify_tol=self.verify_tol)

        # 1. critical points on the line ------------------------------------
        reach = self.search_range
        if f.log_probs is None and f.mode is AnswerMode.LOGITS:
            f(x0[None, :])  # one query: are these logits really log-probabilities?
        if reach is None:
            reach = 3 if f.mode is AnswerMode.PROBS or f.log_probs else 11
        kinks, values = self._find_kinks(line, unit, reach, prec)
        stages["queries_search"] = float(ctx.spent - spent0)
        if not kinks:
            raise DirectExtractionError(
                "no critical point found on a line spanning 10^7 input norms: expected a "
                "ReLU network with at least one hidden unit, got a function that is affine "
                "there (use the equation-solving attack for linear models)"
            )
        ts = np.array(sorted(kinks))
        logger.info("relu extraction: %d critical points on the line", len(ts))

        # 2. one affine model per linear piece ------------------------------
        q_grad0 = ctx.spent
        lf = self._line_rows(f, line, ts, unit, reach, prec, rng)
        values += lf.values
        chord_redo = 0
        if self.chord_search and prec.eps > 1e-12 and len(lf.ratio) and lf.ratio.max() > prec.rank:
            # coarse answers: the slope probes' noise merged kinks; search the same line again
            # with chords (values only) and keep whichever leaves fewer rank-two jumps
            kinks2, n2 = self._find_kinks(line, unit, reach, prec, chords=True)
            values += n2
            if kinks2:
                lf2 = self._line_rows(f, line, np.array(sorted(kinks2)), unit, reach, prec, rng, chords=True)
                values += lf2.values
                chord_redo = 1
                if int((lf2.ratio > prec.rank).sum()) < int((lf.ratio > prec.rank).sum()):
                    lf, chord_redo = lf2, 2
        stages["chord_search"] = float(chord_redo)
        ts, centers, grads, vals, keep = lf.ts, lf.centers, lf.grads, lf.vals, lf.keep
        w0, b0, a1, ratio = lf.w0, lf.b0, lf.a1, lf.ratio
        requeried, shrinks, researched = lf.requeried, lf.shrinks, lf.researched
        stages["queries_gradients"] = float(ctx.spent - q_grad0)
        assert w0 is not None and b0 is not None and a1 is not None
        extra_used = 0
        if len(ratio) and ratio.max() > prec.rank:
            if not self.extra_lines:
                j = int(np.argmax(ratio))
                raise DirectExtractionError(
                    f"gradient jump at critical point {j}: expected rank one (one hidden unit), "
                    f"got second/first singular value {ratio[j]:.3g}: two hyperplanes cross too "
                    "close together, or the victim is not a one-hidden-layer ReLU network"
                )
            q_union = ctx.spent
            w0, b0, a1, extra_used = self._union_lines(f, lf, unit, reach, prec, rng)
            stages["queries_extra_lines"] = float(ctx.spent - q_union)
        stages["extra_lines"] = float(extra_used)
        stages["kinks_researched"] = float(researched)
        stages["queries_requery"] = float(requeried)
        stages["step_shrinks"] = float(shrinks)

        # 3. absolute signs ---------------------------------------------------
        flips = _solve_flips(w0, b0, a1, grads, centers, prec.flip)
        w0[flips] *= -1.0
        b0[flips] *= -1.0

        # 4a. biases from closed-form critical points on normal lines ------
        ts = ts[keep]  # spurious kinks (no gradient jump) are dropped
        # base: the origin, so that b = -w·x* is insensitive to the tiny error left in w
        b0 = self._polish_biases(f, w0, b0, np.zeros((len(w0), d)), unit)

        # 4b. output layer by least squares; 4c. held-out check -------------
        n_fit = w0.shape[0] + 1
        x_fit = sigma * rng.standard_normal((n_fit, d))
        y_fit = f(x_fit)
        xs = np.vstack([centers, x_fit])
        ys = np.vstack([vals, y_fit])
        a1, b1 = _output_layer(w0, b0, xs, ys)
        n_par = w0.shape[0] * (d + 1) + k * (w0.shape[0] + 1)
        polished = 0
        if prec.eps > 1e-12 and n_par <= self.polish_max_params:
            # coarse answers: a joint least-squares polish of every parameter on fresh queries
            n_pol = int(np.ceil(2.0 * n_par / k)) + 16
            x_pol = sigma * rng.standard_normal((n_pol, d))
            y_pol = f(x_pol)
            w0, b0, a1, b1 = _gauss_newton(
                w0, b0, a1, b1, np.vstack([xs, x_pol]), np.vstack([ys, y_pol]), unit
            )
            polished = n_pol
        stages["queries_polish"] = float(polished)
        x_ver = sigma * rng.standard_normal((self.verify_queries, d))
        y_ver = f(x_ver)
        pred = np.maximum(x_ver @ w0.T + b0, 0.0) @ a1.T + b1
        rel = float(np.abs(pred - y_ver).max() / max(np.abs(y_ver).max(), 1e-300))
        if not rel <= prec.verify:
            raise DirectExtractionError(
                f"extracted network reproduces the victim only to relative error {rel:.3g} on "
                f"{self.verify_queries} fresh queries (expected <= {prec.verify:.3g} for answers "
                f"with unit roundoff {prec.eps:.3g}): the "
                "victim is not a one-hidden-layer ReLU network with logit outputs, or a hidden "
                "unit was missed (e.g. two critical points too close to separate)"
            )
        model = relu1_model(w0, b0, a1, b1)
        ctx.metrics.update(
            {
                "hidden_units": float(w0.shape[0]),
                "kinks": float(len(ts)),
                "flipped_units": float(flips.sum()),
                "requeried_columns": float(requeried),
                "verify_rel_error": rel,
                "verify_queries": float(self.verify_queries),
                "verify_tol": prec.verify,
                "answer_eps": prec.eps,
                "search_points": float(values),
                "attack_time_s": time.perf_counter() - t_start,
                **stages,
            }
        )
        logger.info("relu extraction: %d units, verify error %.3g", w0.shape[0], rel)
        return model

    def _line_rows(
        self,
        f: FlatOracle,
        line: _Line,
        ts: np.ndarray,
        unit: float,
        reach: int,
        prec: Precision,
        rng: np.random.Generator,
        chords: bool = False,
    ) -> _LineFit:
        """Stage 2 on one line: a checked Jacobian per linear piece, one row per kink
        (re-searching merged kinks on a fine grid, re-measuring unsafe or short steps)."""
        d, k = f.dim, f.num_classes
        x0, u = line.x0, line.u
        values = 0
        # (pieces are cached by their middle: a re-search around one kink re-measures
        # only the pieces next to it)
        cache: dict[float, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        requeried = shrinks = researched = 0
        for refine in range(4):
            pts, ell = _segment_points(ts, unit)
            centers = f.snap(x0[None, :] + pts[:, None] * u[None, :])
            grads = np.empty((len(pts), k, d))
            vals = np.empty((len(pts), k))
            steps = np.empty((len(pts), d))  # (S, D) current step per column
            for s in range(len(pts)):
                hit = cache.get(float(pts[s]))
                if hit is not None:
                    grads[s], vals[s], steps[s] = hit
                    continue
                h_step = ell[s] / (4.0 * np.sqrt(d))
                for _ in range(8):
                    grads[s], vals[s], ok = self._checked_jacobian(f, centers[s], h_step, rng, prec.jac)
                    if ok:
                        break
                    h_step /= 16.0  # a step crossed a hyperplane: the piece is narrower here
                    shrinks += 1
                else:
                    raise NotPiecewiseLinearError(
                        "gradient of a linear piece: expected the victim to be affine around "
                        f"t = {pts[s]:.6g} for steps down to {h_step:.3g}, got a mismatch: the "
                        "victim is not piecewise linear"
                    )
                steps[s] = h_step
            w0 = b0 = a1 = None
            ratio = np.zeros(0)
            keep = np.ones(len(ts), dtype=bool)
            for _ in range(4):
                offs = vals - np.einsum("skd,sd->sk", grads, centers)
                w0, b0, a1, ratio, keep = _rows_from_jumps(
                    grads, offs, centers, prec.rank, _jac_err(vals, steps, prec)
                )
                bad = _unsafe_steps(w0, b0, centers, steps)
                if not bad:
                    break
                for s, cols in bad.items():
                    new = _safe_steps(w0, b0, centers[s], cols)
                    g_cols = self._columns(f, centers[s], vals[s], cols, new)
                    grads[s][:, cols] = g_cols
                    steps[s, cols] = np.abs(new)
                    requeried += len(cols)
            assert w0 is not None and b0 is not None and a1 is not None
            if self.refine_steps and len(w0):
                # coarse answers: the Jacobian's error is ~noise/step, so re-measure every
                # column whose safe step (half the way to the nearest known hyperplane along
                # e_i) is much longer than the first one, then recompute the rows
                gain = 4.0 if prec.eps > 1e-12 else 16.0
                for s in range(len(centers)):
                    new = _safe_steps(w0, b0, centers[s], np.arange(d))
                    cols = np.nonzero(np.abs(new) > gain * steps[s])[0]
                    if not len(cols):
                        continue
                    g_new = self._columns(f, centers[s], vals[s], cols, new[cols])
                    requeried += len(cols)
                    # keep a new column only if it agrees with the old one within the old
                    # one's error (~noise·|y|/step): a disagreement means the long step
                    # crossed a hyperplane that the current estimate misplaces
                    old_err = 64.0 * prec.noise * (1.0 + np.abs(vals[s]).max()) / steps[s, cols]
                    agree = np.abs(g_new - grads[s][:, cols]).max(axis=0) <= old_err
                    grads[s][:, cols[agree]] = g_new[:, agree]
                    steps[s, cols[agree]] = np.abs(new[cols[agree]])
                offs = vals - np.einsum("skd,sd->sk", grads, centers)
                w0, b0, a1, ratio, keep = _rows_from_jumps(
                    grads, offs, centers, prec.rank, _jac_err(vals, steps, prec)
                )
            for s in range(len(pts)):
                cache[float(pts[s])] = (grads[s].copy(), vals[s].copy(), steps[s].copy())
            bad_kinks = np.nonzero(keep)[0][ratio > prec.rank]
            if not len(bad_kinks) or refine == 3:
                break
            # a jump that is not rank one: two (or more) kinks were merged into one. Search
            # the stretch between the two neighbouring piece middles again on a fine grid
            # (one slope per grid point), where they fall into different cells.
            new_ts = list(ts)
            for j in sorted(bad_kinks, reverse=True):
                fine = np.linspace(pts[j], pts[j + 1], 65)
                sub, n_sub = self._find_kinks(line, unit, reach, prec, grid=fine, chords=chords)
                values += n_sub
                if sub and not (len(sub) == 1 and abs(sub[0] - ts[j]) <= 1e-9 * max(abs(ts[j]), unit)):
                    new_ts[j : j + 1] = sorted(sub)
                    researched += 1
            if len(new_ts) == len(ts) and np.array_equal(np.array(new_ts), ts):
                break
            ts = np.array(sorted(new_ts))
        assert w0 is not None and b0 is not None and a1 is not None
        return _LineFit(
            ts=ts, centers=centers, grads=grads, vals=vals, steps=steps, w0=w0, b0=b0, a1=a1,
            ratio=ratio, keep=keep, values=values, requeried=requeried, shrinks=shrinks,
            researched=researched,
        )  # fmt: skip

    def _union_lines(
        self,
        f: FlatOracle,
        lf: _LineFit,
        unit: float,
        reach: int,
        prec: Precision,
        rng: np.random.Generator,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """Units from several lines, when some gradient jumps of the first line are not rank
        one (merged kinks) or too noisy to trust (e.g. a kink far out on the line).

        The first line's clean rows are kept; every further random line adds the clean rows
        of units not seen yet (same hyperplane: input rows within ``|cos| > 0.99`` and
        matching output columns) and replaces a known unit's row by a less noisy one. The
        search stops when every doubtful jump of the first line is *explained*: the units
        whose hyperplanes (as recovered) cross the first line between the two piece middles
        add up to the measured jump, within its noise. Otherwise, after ``extra_lines``
        lines, the rank-two error is raised. Returns rows, biases, output columns and the
        number of further lines used.
        """
        d = f.dim
        quality = _row_quality(lf, prec)
        clean = (lf.ratio <= prec.rank) & (quality <= self.max_row_error)
        units: list[tuple[np.ndarray, float, np.ndarray, float]] = [
            (lf.w0[i], float(lf.b0[i]), lf.a1[:, i], float(quality[i])) for i in np.nonzero(clean)[0]
        ]
        doubtful = np.nonzero(lf.keep)[0][~clean]  # jumps between pieces j and j + 1
        err = _jac_err(lf.vals, lf.steps, prec)
        k = lf.grads.shape[1]
        floor = 4.0 * (np.sqrt(k) + np.sqrt(d))
        rel = min(1e-2, max(1e-4, 3.0 * prec.rank))

        def explained() -> bool:
            if not units:
                return False
            w = np.array([t[0] for t in units])
            b = np.array([t[1] for t in units])
            a = np.array([t[2] for t in units]).T
            z = lf.centers @ w.T + b  # (S, U)
            for j in doubtful:
                # one more piece each side: a unit recovered elsewhere may be predicted to cross
                # just beyond a piece middle (far out on the line, tiny row errors move crossings)
                lo, hi = max(j - 1, 0), min(j + 2, len(z) - 1)
                jump = lf.grads[hi] - lf.grads[lo]
                s = (z[hi] > 0).astype(float) - (z[lo] > 0).astype(float)
                pred = np.einsum("ku,u,ud->kd", a, s, w)
                res = float(np.linalg.norm(jump - pred, 2))
                if res > 2.0 * floor * (err[lo] + err[hi]) + rel * float(np.linalg.norm(jump, 2)):
                    return False
            return True

        used = 0
        sigma = float(self.input_scale)
        while not explained():
            if used == self.extra_lines:
                ratio = np.where(clean, 0.0, np.maximum(lf.ratio, quality))
                j = int(np.argmax(ratio))
                raise DirectExtractionError(
                    f"gradient jump at critical point {j}: expected rank one (one hidden unit), got "
                    f"second/first singular value {lf.ratio[j]:.3g} (noise {quality[j]:.3g}), and "
                    f"{used} further lines did not explain it: two hyperplanes cross too close "
                    "together, or the victim is not a one-hidden-layer ReLU network"
                )
            used += 1
            x0 = sigma * rng.standard_normal(d)
            u = rng.standard_normal(d)
            u /= np.linalg.norm(u)
            line = _Line(f, x0, u)
            kinks, _ = self._find_kinks(line, unit, reach, prec)
            if not kinks:
                continue
            lf2 = self._line_rows(f, line, np.array(sorted(kinks)), unit, reach, prec, rng)
            q2 = _row_quality(lf2, prec)
            for i in np.nonzero((lf2.ratio <= prec.rank) & (q2 <= self.max_row_error))[0]:
                w, b, a, q = lf2.w0[i], float(lf2.b0[i]), lf2.a1[:, i], float(q2[i])
                for n, (wu, _, au, qu) in enumerate(units):
                    c = float(w @ wu)
                    # the jump is "on side minus off side": reorienting a row (w, b) → (-w, -b)
                    # keeps its output column a (the jump a·wᵀ changes sign with the sides)
                    sw, sa = (w, a) if c > 0 else (-w, a)
                    same = abs(c) > 0.99 and float(np.abs(sa - au).max()) <= 0.2 * float(np.abs(au).max())
                    if same:
                        if q < qu:
                            units[n] = (sw, b if c > 0 else -b, sa, q)
                        break
                else:
                    units.append((w, b, a, q))
        w0 = np.array([t[0] for t in units])
        b0 = np.array([t[1] for t in units])
        a1 = np.array([t[2] for t in units]).T
        return w0, b0, a1, used

    # ====================================================== kink search
    def _find_kinks(
        self,
        line: _Line,
        unit: float,
        reach: int,
        prec: Precision | None = None,
        grid: np.ndarray | None = None,
        chords: bool = False,
    ) -> tuple[list[float], int]:
        """All critical points of the line, by slope-intersection search (see module doc);
        ``grid``: search only between these points (default: the geometric grid);
        ``chords``: the values-only search of :meth:`_find_kinks_chords` instead."""
        if prec is None:
            prec = Precision.of(line.f.eps, tol=self.tol, verify_tol=self.verify_tol)
        if chords:
            return self._find_kinks_chords(line, unit, reach, prec, grid)
        fd = prec.fd
        if grid is None:
            pos = unit * 4.0 ** np.arange(-5, reach + 1)
            grid = np.concatenate([-pos[::-1], [0.0], pos])
        dt = fd * np.maximum(np.abs(grid), unit)
        if len(grid) > 1:  # a slope probe must stay well inside its cell
            gaps = np.diff(grid)
            room = np.minimum(np.concatenate([gaps, [np.inf]]), np.concatenate([[np.inf], gaps]))
            dt = np.minimum(dt, 0.25 * room)
        g_all = line(np.concatenate([grid, grid + dt]))
        n = len(grid)
        g, g2 = g_all[:n], g_all[n:]
        slopes = (g2 - g) / dt[:, None]
        kinks: list[float] = []
        n_points = 2 * n
        stack = [(grid[i], g[i], slopes[i], grid[i + 1], g[i + 1], slopes[i + 1], 0) for i in range(n - 1)]
        stack.reverse()
        while stack:
            a, ga, sa, b, gb, sb, depth = stack.pop()
            w = b - a
            mag = max(np.abs(ga).max(), np.abs(gb).max(), np.abs(sa).max() * w, np.abs(sb).max() * w)
            tol = prec.tol * mag + 1e-300
            ds = sa - sb
            if np.abs(ga + sa * w - gb).max() <= tol and np.abs(ds).max() * w <= tol:
                continue  # one linear piece
            rhs = gb - ga - sb * w
            denom = float(ds @ ds)
            tau = a + float(ds @ rhs) / denom if denom > 0 else 0.5 * (a + b)
            gt = None
            if a + 1e-3 * w < tau < b - 1e-3 * w:  # a kink hugging an end is found after a split
                gt = line(np.array([tau]))[0]
                n_points += 1
                lhs = ga + sa * (tau - a)
                rhs_pred = gb + sb * (tau - b)
                on_both = max(np.abs(gt - lhs).max(), np.abs(gt - rhs_pred).max()) <= tol
                if on_both:
                    # with one output the end lines always meet: also check that the bend is
                    # *at* tau (left line just before it, right line just after it)
                    eps = min(fd * max(abs(tau), unit), 0.01 * (tau - a), 0.01 * (b - tau))
                    side = line(np.array([tau - eps, tau + eps]))
                    n_points += 2
                    s_left, s_right = (gt - side[0]) / eps, (side[1] - gt) / eps
                    slack = 1e-3 * np.abs(ds).max() + 1e3 * prec.eps * mag / eps
                    on_both = np.abs(s_left - sa).max() <= slack and np.abs(s_right - sb).max() <= slack
                if on_both:
                    logger.debug("kink %.9g in [%.9g, %.9g] eps %.3g", tau, a, b, eps)
                    kinks.append(tau)
                    if len(kinks) > self.max_kinks:
                        raise NotPiecewiseLinearError(
                            f"critical-point search: expected at most max_kinks = {self.max_kinks} "
                            "kinks on one line, got more; the victim is not a small ReLU network"
                        )
                    continue
            stuck = n_points > 64 * (len(kinks) + 8)  # a ReLU kink costs ~5-15 queries
            min_width = max(self.min_width, prec.noise / prec.fd)
            if w <= min_width * max(abs(a), abs(b), unit) or depth > 200 or stuck:
                raise NotPiecewiseLinearError(
                    "critical-point search: expected the victim to be piecewise linear along a "
                    f"line, got a bend that does not resolve into kinks near t = {a:.6g} (the "
                    "output curves continuously: e.g. tanh or sigmoid units, or outputs that "
                    "are not logits)"
                )
            # split: at tau if it is well inside, else in the middle
            if gt is not None and a + 0.1 * w < tau < b - 0.1 * w:
                m, gm = tau, gt
                dm = min(fd * max(abs(m), unit), 1e-3 * w)
                gm2 = line(np.array([m + dm]))[0]
                n_points += 1
            else:
                m = 0.5 * (a + b)
                dm = min(fd * max(abs(m), unit), 1e-3 * w)
                pair = line(np.array([m, m + dm]))
                gm, gm2 = pair[0], pair[1]
                n_points += 2
            sm = (gm2 - gm) / dm
            stack.append((m, gm, sm, b, gb, sb, depth + 1))
            stack.append((a, ga, sa, m, gm, sm, depth + 1))
        return kinks, n_points

    def _find_kinks_chords(
        self, line: _Line, unit: float, reach: int, prec: Precision, grid: np.ndarray | None = None
    ) -> tuple[list[float], int]:
        """The kink search for coarse (float32) answers: values only, no short slope probes.

        A slope from two answers ``dt`` apart is off by ``~noise/dt``, and extrapolating it
        across an interval multiplies that error: the default search's tolerance then merges
        kinks. Here an interval is *linear* when its middle lies on the chord of its ends
        (within the answers' own noise); otherwise it is halved. Consecutive linear intervals
        whose shared point lies on the chord of their outer ends belong to one linear piece;
        every boundary between two pieces is a kink, located where the two pieces' lines
        (fitted through all their points, i.e. over the pieces' whole widths) intersect.
        Intervals narrower than ``1e-5`` relative that are still bent give one kink each
        (possibly two merged: the rank test of the gradient jump tells).
        """
        if grid is None:
            pos = unit * 4.0 ** np.arange(-5, reach + 1)
            grid = np.concatenate([-pos[::-1], [0.0], pos])
        grid = np.asarray(grid, dtype=np.float64)
        vals = line(grid)
        n_points = len(grid)
        pts: dict[float, np.ndarray] = {float(t): vals[i] for i, t in enumerate(grid)}
        noise = prec.noise

        def sig(y: np.ndarray) -> float:
            return noise * (1.0 + float(np.abs(y).max()))

        bent: set[float] = set()  # left ends of unresolved (too narrow) bent intervals
        stack = [(float(grid[i]), float(grid[i + 1])) for i in range(len(grid) - 1)]
        budget = 200 * (len(grid) + 64)
        while stack:
            a, b = stack.pop()
            ga, gb = pts[a], pts[b]
            m = 0.5 * (a + b)
            if not a < m < b:
                bent.add(a)
                continue
            gm = line(np.array([m]))[0]
            n_points += 1
            pts[m] = gm
            dev = float(np.abs(gm - 0.5 * (ga + gb)).max())
            if dev <= 3.0 * (sig(gm) + 0.5 * sig(ga) + 0.5 * sig(gb)):
                continue  # linear (or a kink hugging an end: the piece lines show it)
            if b - a <= 1e-5 * max(abs(a), abs(b), unit):
                bent.add(a)
                bent.add(m)
                continue
            if n_points > budget + 64 * len(bent):
                raise NotPiecewiseLinearError(
                    "critical-point search: expected the victim to be piecewise linear along a "
                    f"line, got bends that do not resolve into kinks near t = {a:.6g} (the output "
                    "curves continuously: e.g. tanh or sigmoid units, or outputs that are not logits)"
                )
            stack.append((m, b))
            stack.append((a, m))
        ts = np.array(sorted(pts))
        ys = np.array([pts[float(t)] for t in ts])
        sg = noise * (1.0 + np.abs(ys).max(axis=1))
        # grow maximal linear runs left to right: a point joins the current run if it lies on
        # the least-squares line of the run's last points (error propagated from the noise)
        runs: list[tuple[int, int]] = []  # inclusive, disjoint index ranges
        start = 0
        for i in range(1, len(ts)):
            if i - start >= 2:  # the run's last (at most 8) points: linear cost
                first = max(start, i - 8)
                slope, icpt, sd = _wline(ts[first:i], ys[first:i], sg[first:i], float(ts[i]))
                tol = 3.0 * (sg[i] + sd)
                if float(np.abs(ys[i] - (icpt + slope * ts[i])).max()) > tol:
                    runs.append((start, i - 1))
                    start = i
        runs.append((start, len(ts) - 1))

        def fit(r: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
            slope, icpt, _ = _wline(ts[r[0] : r[1] + 1], ys[r[0] : r[1] + 1], sg[r[0] : r[1] + 1], 0.0)
            return slope, icpt

        kinks: list[float] = []
        prev: tuple[np.ndarray, np.ndarray] | None = None
        prev_end = -1
        for r in runs:
            if r[1] == r[0]:  # a single point between bends: several kinks, one reported
                kinks.append(float(ts[r[0]]))
                prev = None
                prev_end = r[1]
                continue
            cur = fit(r)
            if prev is not None:
                (s1, c1), (s2, c2) = prev, cur
                lo, hi = float(ts[prev_end]), float(ts[r[0]])
                ds = s1 - s2
                den = float(ds @ ds)
                tau = float(ds @ (c2 - c1)) / den if den > 0 else 0.5 * (lo + hi)
                # a kink hugging a sampled point may sit just across it
                if not float(ts[max(prev_end - 1, 0)]) < tau < float(ts[min(r[0] + 1, len(ts) - 1)]):
                    tau = 0.5 * (lo + hi)  # the lines meet elsewhere: merged kinks
                kinks.append(tau)
            prev, prev_end = cur, r[1]
            if len(kinks) > self.max_kinks:
                raise NotPiecewiseLinearError(
                    f"critical-point search: expected at most max_kinks = {self.max_kinks} "
                    "kinks on one line, got more; the victim is not a small ReLU network"
                )
        return kinks, n_points

    # ================================================== gradients
    @staticmethod
    def _jacobian(f: FlatOracle, p: np.ndarray, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Forward differences at ``p`` with per-column steps ``h``: ``(K × D, value)``."""
        d = len(p)
        p = f.snap(p)
        x = np.repeat(p[None, :], d + 1, axis=0)
        x[np.arange(1, d + 1), np.arange(d)] += h
        x = f.snap(x)
        y = f(x)
        hh = x[np.arange(1, d + 1), np.arange(d)] - p  # the steps actually taken
        return ((y[1:] - y[0]) / hh[:, None]).T, y[0]

    @staticmethod
    def _checked_jacobian(
        f: FlatOracle, p: np.ndarray, h: float, rng: np.random.Generator, tol: float = 1e-9
    ) -> tuple[np.ndarray, np.ndarray, bool]:
        """Forward differences with step ``h`` plus one check query at ``p + (h/√D)·ξ``.

        ``ξ`` has random signs, so a column corrupted by a step that crossed a hyperplane
        spoils the check's linear prediction (as does a crossing by the check itself):
        the caller then retries with a smaller step. ``D + 2`` queries.
        """
        d = len(p)
        p = f.snap(p)
        x = np.repeat(p[None, :], d + 2, axis=0)
        x[np.arange(1, d + 1), np.arange(d)] += h
        xi = rng.choice([-1.0, 1.0], size=d) * (h / np.sqrt(d))
        x[d + 1] += xi
        x = f.snap(x)
        y = f(x)
        hh = x[np.arange(1, d + 1), np.arange(d)] - p  # the steps actually taken
        g = ((y[1 : d + 1] - y[0]) / hh[:, None]).T
        step = x[d + 1] - p
        pred = y[0] + g @ step
        scale = np.abs(y[0]).max() + np.abs(g).max() * np.abs(step).sum()
        ok = bool(np.abs(pred - y[d + 1]).max() <= tol * scale)
        return g, y[0], ok

    @staticmethod
    def _columns(
        f: FlatOracle, p: np.ndarray, value: np.ndarray, cols: np.ndarray, h: np.ndarray
    ) -> np.ndarray:
        p = f.snap(p)
        x = np.repeat(p[None, :], len(cols), axis=0)
        x[np.arange(len(cols)), cols] += h
        x = f.snap(x)
        y = f(x)
        hh = x[np.arange(len(cols)), cols] - p[cols]
        return ((y - value[None, :]) / hh[:, None]).T

    # ================================================== polish
    def _polish_biases(
        self, f: FlatOracle, w0: np.ndarray, b0: np.ndarray, crit: np.ndarray, unit: float
    ) -> np.ndarray:
        """Locate each unit's critical point in closed form along its own normal.

        The normal line of unit ``j`` passes through the foot ``q_j`` of the perpendicular
        from ``crit[j]`` (the base point) to the estimated hyperplane, four queries at
        ``±δ, ±2δ`` fit the two linear pieces, and their intersection moves the bias.
        """
        h = w0.shape[0]
        b_new = b0.copy()
        # the foot of the perpendicular from the base point: near the data, so small values
        q = crit - (np.einsum("hd,hd->h", w0, crit) + b0)[:, None] * w0  # on hyperplane j
        z = q @ w0.T + b0  # (H, H): pre-activations of every unit at each q_j
        cosines = w0 @ w0.T  # unit rows
        deltas = np.empty(h)
        for j in range(h):
            with np.errstate(divide="ignore", invalid="ignore"):
                reach = np.abs(z[j] / cosines[j])  # distance along n_j to hyperplane i
            reach[j] = np.inf
            reach[~np.isfinite(reach)] = np.inf
            deltas[j] = min(0.25 * float(reach.min()), unit)
        offs = np.array([-2.0, -1.0, 1.0, 2.0])
        x = q[:, None, :] + (offs[None, :, None] * deltas[:, None, None]) * w0[:, None, :]
        y = f(x.reshape(-1, w0.shape[1])).reshape(h, 4, -1)
        for j in range(h):
            dl = deltas[j]
            sl = (y[j, 1] - y[j, 0]) / dl
            sr = (y[j, 3] - y[j, 2]) / dl
            # left line through (-δ, y1), right line through (δ, y2): intersect
            ds = sr - sl
            den = float(ds @ ds)
            if den <= 0:
                continue
            tau = float(ds @ (y[j, 1] - y[j, 2] + (sr + sl) * dl)) / den
            if abs(tau) < dl:
                b_new[j] = b0[j] - tau  # w·(q + τ n) + b' = 0 with w·q = -b, |w| = 1
        return b_new


# ====================================================================== helpers
def _wline(t: np.ndarray, y: np.ndarray, sd: np.ndarray, at: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Weighted (``1/sd²``) least-squares line through ``(t, y)`` (``y``: ``(N, K)``): slope,
    intercept and the standard error of its prediction at ``at``."""
    w = 1.0 / sd**2
    sw = float(w.sum())
    tm = float(w @ t) / sw
    var = float(w @ (t - tm) ** 2)
    ym = (w @ y) / sw
    slope = ((w * (t - tm)) @ (y - ym)) / var
    return slope, ym - slope * tm, float(np.sqrt(1.0 / sw + (at - tm) ** 2 / var))


def _segment_points(ts: np.ndarray, unit: float) -> tuple[np.ndarray, np.ndarray]:
    """Middle of each linear piece and the distance to its nearest kink."""
    m = len(ts)
    gaps = np.diff(ts)
    outer = max(unit, float(gaps.max()) if m > 1 else unit)
    pts = np.concatenate([[ts[0] - outer], 0.5 * (ts[:-1] + ts[1:]), [ts[-1] + outer]])
    ell = np.concatenate([[outer], 0.5 * gaps, [outer]])
    return pts, ell


def _rows_from_jumps(
    grads: np.ndarray,
    offs: np.ndarray,
    centers: np.ndarray,
    rank_tol: float = 1e-6,
    jac_err: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Unit rows (oriented "on at larger t"), biases, output columns, rank-one residuals
    and the mask of kinks kept.

    Row ``j`` comes from the jump between pieces ``j`` and ``j + 1``. Jumps negligible
    next to the others (a spurious kink) are dropped. ``jac_err``: the estimated error of
    each piece's Jacobian entries; the second singular value is judged above the noise
    floor ``4(√K + √D)·err`` that such errors alone produce (coarse answers, wide inputs).
    """
    n = grads.shape[0] - 1
    d = grads.shape[2]
    w0 = np.empty((n, d))
    b0 = np.empty(n)
    a1 = np.empty((grads.shape[1], n))
    ratio = np.zeros(n)
    size = np.zeros(n)
    for j in range(n):
        jump = grads[j + 1] - grads[j]
        dc = offs[j + 1] - offs[j]
        _, sv, vt = np.linalg.svd(jump, full_matrices=False)
        size[j] = sv[0]
        floor = 0.0
        if jac_err is not None:
            floor = 4.0 * (np.sqrt(jump.shape[0]) + np.sqrt(d)) * (jac_err[j] + jac_err[j + 1])
        ratio[j] = max(sv[1] - floor, 0.0) / sv[0] if len(sv) > 1 and sv[0] > 0 else 0.0
        w = vt[0]
        a = jump @ w
        b = float(a @ dc) / max(float(a @ a), 1e-300)
        if w @ centers[j + 1] + b < 0:  # orient: active on the larger-t side
            w, b, a = -w, -b, -a
        # the unit turns on going right, so the jump is +a·wᵀ (the double flip keeps it)
        w0[j], b0[j], a1[:, j] = w, b, a
    keep = size > 0.1 * rank_tol * size.max()
    return w0[keep], b0[keep], a1[:, keep], ratio[keep], keep


def _unsafe_steps(
    w0: np.ndarray, b0: np.ndarray, centers: np.ndarray, steps: np.ndarray
) -> dict[int, np.ndarray]:
    """Columns whose finite-difference step crosses (or nearly grazes) some hyperplane."""
    bad: dict[int, np.ndarray] = {}
    for s in range(len(centers)):
        z = w0 @ centers[s] + b0  # (H,)
        moved = z[:, None] + w0 * steps[s][None, :]  # (H, D)
        near = np.abs(moved) < 1e-3 * np.abs(z[:, None])
        cross = (np.sign(moved) != np.sign(z[:, None])) | near
        cols = np.nonzero(cross.any(axis=0))[0]
        if len(cols):
            bad[s] = cols
    return bad


def _safe_steps(w0: np.ndarray, b0: np.ndarray, p: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Half the distance to the nearest hyperplane along ``±e_i``, toward the roomier side."""
    z = w0 @ p + b0
    out = np.empty(len(cols))
    for n, i in enumerate(cols):
        wi = w0[:, i]
        with np.errstate(divide="ignore", invalid="ignore"):
            reach = -z / wi  # step along e_i that reaches each hyperplane
        up = reach[(reach > 0) & np.isfinite(reach)]
        down = -reach[(reach < 0) & np.isfinite(reach)]
        r_up = float(up.min()) if len(up) else np.inf
        r_down = float(down.min()) if len(down) else np.inf
        r = max(r_up, r_down)
        step = 0.5 * r if np.isfinite(r) else 1.0
        out[n] = step if r_up >= r_down else -step
    return out


def _solve_flips(
    w0: np.ndarray,
    b0: np.ndarray,
    a1: np.ndarray,
    grads: np.ndarray,
    centers: np.ndarray,
    flip_tol: float = 1e-3,
) -> np.ndarray:
    """Which units are really ``ReLU(-z)``: the residual Jacobian is ``Σ f_j a_j w_jᵀ``."""
    h = w0.shape[0]
    mats = np.einsum("kh,hd->hkd", a1, w0).reshape(h, -1)  # (H, K·D)
    on = ((centers @ w0.T + b0) > 0).astype(float)  # (S, H) under the "on at larger t" guess
    resid = (on @ mats - grads.reshape(len(grads), -1)).mean(axis=0)  # same for every piece
    coef, *_ = np.linalg.lstsq(mats.T, resid, rcond=None)
    sv = np.linalg.svd(mats.T, compute_uv=False)
    rank = int((sv > 1e-9 * sv[0]).sum()) if len(sv) else 0
    if rank < h:
        return _binary_in_nullspace(mats.T, coef, h - rank, flip_tol)
    flips = coef > 0.5
    if np.abs(coef - flips).max() > flip_tol:
        raise DirectExtractionError(
            "sign recovery: expected each unit's flip coefficient to be 0 or 1, got values up to "
            f"{np.abs(coef - flips).max():.3g} away: a hidden unit was missed or the victim is not "
            "a one-hidden-layer ReLU network"
        )
    return flips


def _output_layer(
    w0: np.ndarray, b0: np.ndarray, xs: np.ndarray, ys: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Least squares for ``A¹, B¹`` on hidden activations (rows scaled to unit size)."""
    hid = np.maximum(xs @ w0.T + b0, 0.0)
    design = np.hstack([hid, np.ones((len(xs), 1))])
    scale = np.linalg.norm(design, axis=1)
    theta, *_ = np.linalg.lstsq(design / scale[:, None], ys / scale[:, None], rcond=None)
    return theta[:-1].T, theta[-1]


def _binary_in_nullspace(m: np.ndarray, c0: np.ndarray, nd: int, flip_tol: float) -> np.ndarray:
    """The unique 0/1 vector ``f`` with ``m f = m c0`` when ``m`` (``K·D × H``) has a null space.

    A hidden layer wider than ``K·D`` (more units than the residual Jacobian has entries)
    leaves ``nd`` directions of the flip solve undetermined; the flips are binary, so we
    enumerate the ``2^nd`` values of ``nd`` pivot units (chosen by pivoted QR of the null
    basis), solve for the rest and keep the assignments that round cleanly. Exactly one
    must: none or several raise (the signs are then not identifiable from these pieces).
    """
    from scipy.linalg import qr

    h = m.shape[1]
    if nd > 16:
        raise UnsupportedVictimError(
            f"sign recovery: the hidden layer ({h} units) is wider than the K·D = {m.shape[0]} "
            f"equations of the sign solve, leaving {nd} binary unknowns undetermined (at most 16 "
            "are searched): hidden layers much wider than the input are not supported yet"
        )
    _, _, vt = np.linalg.svd(m)
    null = vt[h - nd :].T  # (H, nd)
    _, _, piv = qr(null.T, pivoting=True)
    pv = piv[:nd]
    combos = ((np.arange(2**nd)[:, None] >> np.arange(nd)[None, :]) & 1).astype(float)  # (2^nd, nd)
    y = np.linalg.solve(null[pv], (combos - c0[pv][None, :]).T)  # (nd, 2^nd)
    cand = c0[:, None] + null @ y  # (H, 2^nd)
    off = np.abs(cand - np.round(cand)).max(axis=0)
    inside = ((cand > -0.5) & (cand < 1.5)).all(axis=0)
    good = np.nonzero((off <= flip_tol) & inside)[0]
    if len(good) != 1:
        raise DirectExtractionError(
            f"sign recovery: {h} units but only K·D = {m.shape[0]} independent equations in the sign "
            f"solve; {len(good)} binary sign patterns fit the measured Jacobians (expected exactly "
            "one): a unit was missed or found twice, or the signs are not identifiable"
        )
    return np.round(cand[:, good[0]]) > 0.5


def _gauss_newton(
    w0: np.ndarray,
    b0: np.ndarray,
    a1: np.ndarray,
    b1: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    unit: float,
    steps: int = 2,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Joint least-squares refinement of ``(A⁰, B⁰, A¹, B¹)`` on answered points ``x, y``.

    With the activation pattern ``m(x)`` fixed (points closer than ``1e-4·unit`` to a
    hyperplane are left out: their pattern may be wrong), the network is bilinear in its
    parameters; each Gauss-Newton step solves the linearised system (min-norm: the
    per-unit scale symmetry is a null direction) and rows are renormalised to unit norm.
    """
    h, d = w0.shape
    k = a1.shape[0]
    for _ in range(steps):
        z = x @ w0.T + b0
        keep = (np.abs(z) > 1e-4 * unit).all(axis=1)
        xs, zs = x[keep], z[keep]
        m = (zs > 0).astype(float)
        r = y[keep] - (np.maximum(zs, 0.0) @ a1.T + b1)
        n = len(xs)
        if n * k < h * (d + 1) + k * (h + 1):
            break
        jw = np.einsum("kj,nj,nd->nkjd", a1, m, xs).reshape(n * k, h * d)
        jb = np.einsum("kj,nj->nkj", a1, m).reshape(n * k, h)
        ja = np.zeros((n, k, k, h))
        ja[:, np.arange(k), np.arange(k), :] = (m * zs)[:, None, :]
        jc = np.broadcast_to(np.eye(k)[None], (n, k, k)).reshape(n * k, k)
        jac = np.hstack([jw, jb, ja.reshape(n * k, k * h), jc])
        delta, *_ = np.linalg.lstsq(jac, r.reshape(-1), rcond=None)
        w0 = w0 + delta[: h * d].reshape(h, d)
        b0 = b0 + delta[h * d : h * d + h]
        a1 = a1 + delta[h * d + h : h * d + h + k * h].reshape(k, h)
        b1 = b1 + delta[h * d + h + k * h :]
        norm = np.linalg.norm(w0, axis=1)
        w0, b0, a1 = w0 / norm[:, None], b0 / norm, a1 * norm[None, :]
    return w0, b0, a1, b1


def _row_quality(lf: _LineFit, prec: Precision) -> np.ndarray:
    """Noise of each kept row's gradient jump relative to its size: the noise floor
    ``4(√K + √D)·err`` of the two pieces' Jacobians over the jump's first singular value
    (about the row's angular error)."""
    err = _jac_err(lf.vals, lf.steps, prec)
    k, d = lf.grads.shape[1], lf.grads.shape[2]
    idx = np.nonzero(lf.keep)[0]
    out = np.empty(len(idx))
    for n, j in enumerate(idx):
        sv1 = float(np.linalg.norm(lf.grads[j + 1] - lf.grads[j], 2))
        out[n] = 4.0 * (np.sqrt(k) + np.sqrt(d)) * (err[j] + err[j + 1]) / max(sv1, 1e-300)
    return out


def _jac_err(vals: np.ndarray, steps: np.ndarray, prec: Precision) -> np.ndarray:
    """Estimated error of each piece's finite-difference Jacobian entries: two answers'
    noise over the shortest step of the piece."""
    return 2.0 * prec.noise * (1.0 + np.abs(vals).max(axis=1)) / steps.min(axis=1)
