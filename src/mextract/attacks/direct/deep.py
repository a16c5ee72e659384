"""Cryptanalytic extraction of two-hidden-layer ReLU networks with logit outputs.

The victim is ``O(x) = A²·ReLU(A¹·ReLU(A⁰x + B⁰) + B¹) + B²`` (``D`` inputs, ``H₁`` then
``H₂`` hidden units, ``K`` logits). Following Carlini, Jagielski & Mironov ("Cryptanalytic
Extraction of Neural Network Models", CRYPTO 2020), it is recovered layer by layer from
critical points (inputs where one hidden unit's pre-activation is zero), with choices of
our own that keep every step exact and checked:

1. **Critical points of all units.** On ``lines`` random lines ``x₀ + t·u`` the network is
   piecewise linear; the kink search of :class:`~mextract.attacks.direct.ReLUCryptanalysis`
   finds every bend, layer-1 *and* layer-2 ones. One Jacobian per linear piece
   (``D + 2`` queries, checked) gives each kink's gradient jump, which is rank one for
   both layers: ``(effective output column)·nᵀ``, with ``n`` the unit's normal there.
2. **Which kinks are layer 1.** A layer-1 unit's critical set is a true hyperplane
   ``n·x + b = 0``; a layer-2 unit's is bent wherever a layer-1 unit changes state, so its
   plane through one kink is critical only inside one layer-1 region. Each distinct
   ``(n, b)`` is therefore probed at ``probes`` random points of its plane, 2 to 256 input
   norms away (five queries each: is there a bend exactly there?); a layer-1 unit bends
   at most of them (it hides where every layer-2 unit it feeds is off), a layer-2
   candidate at few (on 24 random nets: layer 1 >= 5 of 8, layer 2 <= 4 of 8; the
   threshold ``min_hits`` is 5).
3. **Layer-1 signs** (the contractive-layer trick of the paper, ``H₁ ≤ D``): from a point
   on unit ``j``'s plane, the step ``±ε·Ŵ₀⁺e_j`` moves only unit ``j``'s pre-activation;
   on the side where the unit is off the output does not change *at all*. Three queries.
4. **Layer 2 in the hidden space.** With layer 1 known (unit-norm rows ``Ŵ₀, b̂₀``: each
   true unit is ``c_j·ĥ_j``, ``c_j > 0``) and ``H₁ ≤ D``, any ``h > 0`` is reached by
   ``x(h) = Ŵ₀⁺(h - b̂₀)``, where all layer-1 units are on, so ``G(h) = O(x(h)) =
   A²·ReLU(A¹ diag(c) h + B¹) + B²`` is a *one*-hidden-layer network on the positive
   orthant. It is solved like :class:`ReLUCryptanalysis` does in input space, with the
   line clamped to the orthant: kinks on one chord through each layer-2 kink of step 1
   (along its normal), on rays from the orthant's corner along sparse Dirichlet(0.1)
   directions (a layer-2 plane may cross the orthant only near a corner where a few
   layer-1 units dominate) and on chords through log-uniform points (``h_lines`` of the
   two kinds); one ``H₁``-dimensional Jacobian per piece, rows from the rank-one jumps,
   each unit's plane refitted through all its kinks when there are ``≥ H₁ + 2`` of them,
   and the signs of layer 2 from the linear residual ``Σ f_m a_m r_mᵀ``
   (``f_m ∈ {0, 1}``, least squares, must round cleanly).
5. **Output layer and check.** ``A², B²`` by least squares on the recovered layer-2
   activations (piece centres and fresh queries); a held-out set of fresh Gaussian
   queries (256 by default, counted and reported as ``verify_queries``; 64 let a layer-2
   unit active on 1.6% of inputs slip through) must be reproduced to ``verify_tol``
   relative error (at least ``128·eps`` of the answers' dtype), else
   :class:`~mextract.attacks.direct.DirectExtractionError` is raised: never a silent
   wrong model.

Requirements and limits (each violated case raises instead of returning a wrong model):
a contractive first layer ``H₁ ≤ D``; logit answers (``probs`` become logit
differences as in the one-layer attack); every layer-2 plane must cross the positive
orthant of ``h`` within the scales searched (a unit that is on everywhere there acts
linearly and breaks the sign solve; one that is off everywhere there is irrelevant).
Hidden units come back with unit-norm rows; :func:`align_relu2` measures the error up to
the network's symmetries (permutations and positive scales per layer).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from mextract.attacks.base import Attack, AttackContext
from mextract.attacks.direct.common import (
    AnswerModeError,
    DirectExtractionError,
    FlatOracle,
    UnsupportedVictimError,
    with_retries,
)
from mextract.attacks.direct.relu import (
    Precision,
    ReLUCryptanalysis,
    _Line,
    _output_layer,
    _rows_from_jumps,
    _segment_points,
    _solve_flips,
)
from mextract.errors import InputError
from mextract.oracle import AnswerMode, APIDescription

logger = logging.getLogger(__name__)

Relu2Params = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def relu2_model(params: Relu2Params, *, flatten: bool = True) -> nn.Module:
    """A float64 ``[Flatten →] Linear → ReLU → Linear → ReLU → Linear`` module."""
    layers: list[nn.Module] = [nn.Flatten()] if flatten else []
    for i in range(3):
        w, b = params[2 * i], params[2 * i + 1]
        lin = nn.Linear(w.shape[1], w.shape[0], dtype=torch.float64)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(w, dtype=np.float64)))
            lin.bias.copy_(torch.from_numpy(np.ascontiguousarray(b, dtype=np.float64)))
        layers.append(lin)
        if i < 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval()


def relu2_parameters(model: nn.Module) -> Relu2Params:
    """``(A⁰, B⁰, A¹, B¹, A², B²)`` of a module whose three Linear layers form the network."""
    lins = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if len(lins) != 3:
        raise InputError(f"expected a two-hidden-layer network with 3 Linear layers, got {len(lins)}")
    p = [t.detach().cpu().double().numpy().copy() for lin in lins for t in (lin.weight, lin.bias)]
    return p[0], p[1], p[2], p[3], p[4], p[5]


@dataclass
class ReLU2Alignment:
    """Per-block relative errors after alignment (see :func:`align_relu2`)."""

    max_rel_error: float
    block_rel_errors: dict[str, float]
    min_cosine: float
    irrelevant: int = 0


def align_relu2(extracted: nn.Module | Relu2Params, true: nn.Module | Relu2Params) -> ReLU2Alignment:
    """Align ``extracted`` to ``true`` up to the symmetries of a two-hidden-layer ReLU net.

    Layer-1 units are matched by input-row cosine (Hungarian) and each gets the positive
    scale ``c_j`` fitted by least squares; the true layer-2 rows are then expressed in the
    extracted layer-1 units (columns times ``c_j``), matched by cosine, and scaled by
    ``κ_m``; the output columns are divided by ``κ_m``. Each block's error is its max
    absolute error over its max absolute true entry; a negative scale shows as a large error.
    """
    e = extracted if isinstance(extracted, tuple) else relu2_parameters(extracted)
    t = true if isinstance(true, tuple) else relu2_parameters(true)
    # a layer-2 unit with no positive weight and no positive bias is off for every input
    # (its inputs are >= 0): functionally irrelevant, excluded like align_relu1 does
    dead = (t[2] <= 0).all(axis=1) & (t[3] <= 0)
    t = (t[0], t[1], t[2][~dead], t[3][~dead], t[4][:, ~dead], t[5])
    if [a.shape for a in e] != [a.shape for a in t]:
        raise InputError(
            f"expected networks of the same shape, got {[a.shape for a in e]} and {[a.shape for a in t]}"
        )

    def match(we: np.ndarray, wt: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        ne = we / np.maximum(np.linalg.norm(we, axis=1, keepdims=True), 1e-300)
        nt = wt / np.maximum(np.linalg.norm(wt, axis=1, keepdims=True), 1e-300)
        cos = nt @ ne.T  # (true, extracted)
        rows, cols = linear_sum_assignment(-cos)
        perm = cols[np.argsort(rows)]  # extracted unit matched to each true unit
        we_p = we[perm]
        scale = np.einsum("hd,hd->h", we_p, wt) / np.maximum(np.einsum("hd,hd->h", we_p, we_p), 1e-300)
        return perm, scale, float(cos[rows, cols].min())

    def rel(err: np.ndarray, ref: np.ndarray) -> float:
        return float(np.abs(err).max()) / max(float(np.abs(ref).max()), 1e-300)

    p1, c1, cos1 = match(e[0], t[0])
    w0 = c1[:, None] * e[0][p1]
    b0 = c1 * e[1][p1]
    # the true layer 2 seen from the extracted (unscaled) layer-1 units
    t2 = t[2] * c1[None, :]
    e2 = e[2][:, p1]
    p2, c2, cos2 = match(e2, t2)
    w1 = c2[:, None] * e2[p2]
    b1 = c2 * e[3][p2]
    with np.errstate(divide="ignore", invalid="ignore"):
        w2 = e[4][:, p2] / c2[None, :]
    blocks = {
        "A0": rel(w0 - t[0], t[0]),
        "B0": rel(b0 - t[1], t[1]),
        "A1": rel(w1 / c1[None, :] - t[2], t[2]),
        "B1": rel(b1 - t[3], t[3]),
        "A2": rel(w2 - t[4], t[4]),
        "B2": rel(e[5] - t[5], t[5]),
    }
    return ReLU2Alignment(max(blocks.values()), blocks, min(cos1, cos2), int(dead.sum()))


@dataclass(kw_only=True)
class ReLU2Cryptanalysis(Attack):
    """Exact extraction of a two-hidden-layer ReLU network from its logits (module docstring).

    Args:
        input_scale: standard deviation of random base points and check queries.
        lines: random input-space lines searched for critical points (layer 1 needs one
            line in principle; more lines cover units hidden on one of them).
        probes: far points of each candidate plane probed for a bend (step 2).
        min_hits: probes that must bend for a plane to count as a layer-1 unit.
        h_lines: most random chords of the hidden space's positive orthant (step 4), after
            one chord per layer-2 kink of step 1.
        min_h_lines, check_every: after ``min_h_lines`` random chords and then every
            ``check_every`` more, layer 2 and the output layer are assembled and the chords
            stop once the model reproduces an early-stop set of fresh queries to ``verify_tol``
            (the final check uses another fresh set).
        tol: relative tolerance of the kink search's "lies on the line" tests.
        verify_queries: fresh random queries of the final check.
        verify_tol: largest relative error on them before the attack refuses its result.
        retries: after a failure, start again on fresh random lines and chords, this many
            times at most (every query counts; ``attempts`` in the metrics).

    Metrics: ``layer1_units``, ``layer2_units``, ``candidates``, ``verify_rel_error`` and
    the query split of the stages.
    """

    name: ClassVar[str] = "relu2_cryptanalysis"
    needs_pool: ClassVar[bool] = False

    input_scale: float = 1.0
    lines: int = 2
    probes: int = 8
    min_hits: int = 5
    h_lines: int = 48
    min_h_lines: int = 4
    check_every: int = 4
    tol: float = 1e-7
    verify_queries: int = 256
    verify_tol: float = 1e-7
    retries: int = 2

    def check_params(self, api: APIDescription, pool: torch.Tensor | None, budget: int) -> None:
        if api.mode not in (AnswerMode.LOGITS, AnswerMode.PROBS):
            raise AnswerModeError(
                "oracle answer mode: expected 'logits' (or 'probs', converted to logit differences) "
                f"for exact ReLU extraction, got {api.mode.value!r}"
            )
        if not self.input_scale > 0 or not 0 < self.tol < 1e-2:
            raise InputError(
                f"input_scale > 0 and 0 < tol < 1e-2 expected, got {self.input_scale}, {self.tol}"
            )
        if api.dtype != torch.float64:
            raise UnsupportedVictimError(
                f"answer dtype: expected float64 answers for the two-hidden-layer attack, got {api.dtype} "
                "(its plane probes and hidden-space Jacobians are not yet precision-aware; every "
                "float32 run measured raised mid-way); nothing was queried"
            )
        if self.lines < 1 or self.h_lines < 1 or not 1 <= self.min_hits <= self.probes:
            raise InputError(
                f"expected lines >= 1, h_lines >= 1 and 1 <= min_hits <= probes, got {self.lines}, "
                f"{self.h_lines}, {self.min_hits}, {self.probes}"
            )

    def model_spec(self, model: nn.Module) -> tuple[str, dict[str, Any]] | None:
        first, second = [m for m in model.modules() if isinstance(m, nn.Linear)][:2]  # the two hidden layers
        return "relu2", {"hidden1": int(first.out_features), "hidden2": int(second.out_features)}

    # ================================================================== run
    def run(self, ctx: AttackContext) -> nn.Module:
        t_start = time.perf_counter()
        f = FlatOracle(ctx.api)
        rng = np.random.default_rng(ctx.seed)
        # other random lines and chords: a unit missed or mis-classified on these is usually
        # found on fresh ones
        model, tried = with_retries(lambda: self._attempt(ctx, f, rng, ctx.spent), self.retries,
                                    what="relu2 extraction", tries="attempts")  # fmt: skip
        ctx.metrics["attempts"] = float(tried)
        ctx.metrics["attack_time_s"] = time.perf_counter() - t_start
        return model

    def _attempt(self, ctx: AttackContext, f: FlatOracle, rng: np.random.Generator, spent0: int) -> nn.Module:
        t_start = time.perf_counter()
        d = f.dim
        sigma = float(self.input_scale)
        unit = sigma * np.sqrt(d)
        search = ReLUCryptanalysis(tol=self.tol)
        stages: dict[str, float] = {}
        verify_tol = Precision.of(f.eps, tol=self.tol, verify_tol=self.verify_tol).verify

        # 1. critical points of all units on random lines, with their normals ----------
        cands: list[tuple[np.ndarray, float]] = []  # (unit normal, bias) of every kink
        where: list[np.ndarray] = []  # the kink's input
        for _ in range(self.lines):
            x0 = sigma * rng.standard_normal(d)
            u = rng.standard_normal(d)
            u /= np.linalg.norm(u)
            kinks, _ = search._find_kinks(_Line(f, x0, u), unit, 11)
            if not kinks:
                continue
            ts = np.array(sorted(kinks))
            rows, biases, _a, extra = self._pieces(f, _affine(x0, u), ts, unit, d, rng, np.eye(d))
            cands += [(n, float(b)) for n, b in zip(rows, biases, strict=True)]
            where += [x0 + t * u for t in ts[extra["keep"]]]
        stages["queries_lines"] = float(ctx.spent - spent0)
        first = _dedupe_index(cands)
        uniq = [cands[i] for i in first]
        logger.info("relu2: %d kinks, %d distinct planes", len(cands), len(uniq))

        # 2. layer 1 = planes that bend far from where they were found ------------------
        layer1: list[tuple[np.ndarray, float]] = []
        seeds: list[tuple[np.ndarray, np.ndarray]] = []  # layer-2 kinks: (input, normal)
        for i, (n, b) in zip(first, uniq, strict=True):
            if self._is_global_plane(f, n, b, unit, rng) >= self.min_hits:
                layer1.append((n, b))
            else:
                seeds.append((where[i], n))
        stages["queries_layer1_test"] = float(ctx.spent - spent0) - sum(stages.values())
        if not layer1:
            raise DirectExtractionError(
                "layer 1: expected at least one critical hyperplane that bends everywhere, found "
                "none: the victim is not a two-hidden-layer ReLU network"
            )
        w0 = np.array([n for n, _ in layer1])
        b0 = np.array([b for _, b in layer1])
        h1 = len(w0)
        if h1 > d or np.linalg.matrix_rank(w0) < h1:
            raise DirectExtractionError(
                f"layer 1: expected a contractive first layer (H1 <= D with independent rows), got "
                f"{h1} units on D = {d} inputs; the hidden-space step needs H1 <= D"
            )

        logger.info("relu2: %d layer-1 units", h1)
        # 3. layer-1 signs: a step that moves only unit j changes nothing on its off side
        pinv = np.linalg.pinv(w0)  # (D, H1)
        for j in range(h1):
            if self._off_side(f, w0, b0, pinv, j, unit, rng) > 0:
                w0[j], b0[j] = -w0[j], -b0[j]
                pinv[:, j] *= -1.0
        stages["queries_layer1_signs"] = float(ctx.spent - spent0) - sum(stages.values())

        # 4. layer 2 as a one-hidden-layer network on the positive orthant of h ---------
        h_scale = sigma * (1.0 + float(np.abs(b0).mean()))
        chords: list[tuple[np.ndarray, np.ndarray, float]] = []
        floor = 1e-2 * h_scale
        for xs, n in seeds:  # through a layer-2 kink of step 1, along its normal in h
            z = w0 @ xs + b0
            act = z > 1e-9 * h_scale
            if not act.any():
                continue
            alpha, *_ = np.linalg.lstsq(w0[act].T, n, rcond=None)
            uh = np.zeros(h1)
            uh[act] = alpha
            chords.append((np.maximum(z, floor), uh / np.linalg.norm(uh), h_scale))
        n_seed = len(chords)
        for i in range(self.h_lines):
            if i % 3:
                # a ray from the orthant's corner (all units barely on) along a sparse positive
                # direction: visits the corners where a few units dominate, where some layer-2
                # planes cross the orthant (and only there)
                uh = rng.dirichlet(np.full(h1, 0.1))
                chords.append((np.full(h1, 1e-3 * h_scale), uh / np.linalg.norm(uh), h_scale))
            else:
                # a chord through a point with coordinates log-uniform over 3 decades
                scale = h_scale * 4.0 ** (i % 4 - 1)
                uh = rng.standard_normal(h1)
                chords.append((scale * 10.0 ** rng.uniform(-2.5, 0.5, h1), uh / np.linalg.norm(uh), scale))
        data: dict[str, list[Any]] = {
            k: [] for k in ("rows", "b", "a", "ratio", "at", "grads", "centers", "vals")
        }
        # fit and early-stop sets, queried once: the output layer needs points where some
        # layer-1 units are off; the chords stop once the assembled model matches x_chk
        x_fit = sigma * rng.standard_normal((h1 + 2, d))
        y_fit = f(x_fit)
        x_chk = sigma * rng.standard_normal((self.verify_queries // 2, d))
        x_chk[len(x_chk) // 2 :] *= 4.0
        y_chk = f(x_chk)
        found: tuple[Relu2Params, np.ndarray] | None = None
        for idx, (hc, uh, scale) in enumerate(chords):
            with np.errstate(divide="ignore"):
                t_cross = -hc / uh  # where each h_i reaches 0
            lo = float(t_cross[uh > 0].max()) if np.any(uh > 0) else -1e4 * scale
            hi = float(t_cross[uh < 0].min()) if np.any(uh < 0) else 1e4 * scale
            lo, hi = lo + 1e-3 * min(hi - lo, scale), hi - 1e-3 * min(hi - lo, scale)

            # the chord, clamped to [lo, hi] (constant beyond: only its two ends bend there)
            chord = _ClampedLine(f, pinv @ (hc - b0), pinv @ uh, lo, hi)
            kinks, _ = search._find_kinks(chord, min(0.25 * (hi - lo), scale), 11)
            margin = 1e-6 * (hi - lo)
            ts = np.array(sorted(t for t in kinks if lo + margin < t < hi - margin))
            if len(ts):
                rows, biases, a, extra = self._pieces(
                    f, _affine(hc, uh), ts, min(0.25 * (hi - lo), scale), h1, rng, pinv, lo=lo, hi=hi, b0=b0
                )
                data["rows"] += list(rows)
                data["b"] += list(biases)
                data["a"] += list(a.T)
                data["ratio"] += list(extra["ratio"])
                data["at"] += list(extra["at"])
                data["grads"].append(extra["grads"])
                data["centers"].append(extra["centers"])
                data["vals"].append(extra["vals"])
            done = idx + 1 - n_seed  # random chords done
            last = idx == len(chords) - 1
            if not last and (done < self.min_h_lines or done % self.check_every):
                continue
            if not data["rows"]:
                if last:
                    raise DirectExtractionError(
                        "layer 2: expected critical points inside the positive orthant of the hidden "
                        "space, found none (the victim has no second hidden layer, or it never bends there)"
                    )
                continue
            try:
                params, flips = _assemble(w0, b0, data, x_fit, y_fit)
            except DirectExtractionError:
                if last:
                    raise
                continue  # a unit is still missing: its linear leftover spoils the flip solve
            pred = _forward(params, x_chk)
            rel = float(np.abs(pred - y_chk).max() / max(np.abs(y_chk).max(), 1e-300))
            if rel > verify_tol and not last:
                continue
            # 5. held-out check on fresh queries; a failure before the last chord only means
            # "keep searching" (the failing queries join the early-stop set)
            x_ver = sigma * rng.standard_normal((self.verify_queries, d))
            x_ver[self.verify_queries // 2 :] *= 4.0  # also further out, where more units switch
            y_ver = f(x_ver)
            pred = _forward(params, x_ver)
            rel = float(np.abs(pred - y_ver).max() / max(np.abs(y_ver).max(), 1e-300))
            if rel <= verify_tol:
                found = params, flips
                logger.info("relu2: stopped after %d of %d hidden-space chords", idx + 1, len(chords))
                break
            if last:
                raise DirectExtractionError(
                    f"extracted network reproduces the victim only to relative error {rel:.3g} on "
                    f"{self.verify_queries} fresh queries (expected <= {verify_tol:.3g}): a unit "
                    "was missed or mis-classified, or the victim is not a two-hidden-layer ReLU network"
                )
            x_chk, y_chk = np.vstack([x_chk, x_ver]), np.vstack([y_chk, y_ver])
        assert found is not None
        params, flips = found
        w1 = params[2]
        stages["queries_layer2"] = float(ctx.spent - spent0) - sum(stages.values())
        stages["hidden_space_chords"] = float(idx + 1)
        model = relu2_model(params)
        ctx.metrics.update(
            {
                "layer1_units": float(h1),
                "layer2_units": float(len(w1)),
                "candidates": float(len(uniq)),
                "flipped_layer2_units": float(flips.sum()),
                "verify_rel_error": rel,
                "verify_queries": float(self.verify_queries),
                "verify_tol": verify_tol,
                "answer_eps": f.eps,
                "attack_time_s": time.perf_counter() - t_start,
                **stages,
            }
        )
        logger.info("relu2 extraction: %d-%d units, verify error %.3g", h1, len(w1), rel)
        return model

    # ====================================================== pieces and jumps
    @staticmethod
    def _pieces(
        f: FlatOracle,
        point: Any,
        ts: np.ndarray,
        unit: float,
        dim: int,
        rng: np.random.Generator,
        basis: np.ndarray,
        *,
        lo: float | None = None,
        hi: float | None = None,
        b0: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Rows/biases/output columns of the kinks ``ts`` on a line, in coordinates ``z``.

        ``point(t)`` is the line in ``z`` coordinates; a query at ``z`` is the input
        ``basis @ z`` (input space: the identity) shifted by ``-basis @ b0`` (hidden space).
        Pieces outside ``[lo, hi]`` are clipped to it. Each piece's Jacobian in ``z`` is
        measured with ``dim + 2`` checked queries; a failed check shrinks the step.
        """
        pts, ell = _segment_points(ts, unit)
        if lo is not None and hi is not None:
            pts[0] = 0.5 * (lo + ts[0])
            ell[0] = 0.5 * (ts[0] - lo)
            pts[-1] = 0.5 * (ts[-1] + hi)
            ell[-1] = 0.5 * (hi - ts[-1])
        shift = np.zeros(basis.shape[0]) if b0 is None else basis @ b0
        centers = np.array([point(t) for t in pts])
        grads = np.empty((len(pts), f.num_classes, dim))
        vals = np.empty((len(pts), f.num_classes))
        for s in range(len(pts)):
            h = ell[s] / (4.0 * np.sqrt(dim))
            for _ in range(12):
                z = np.repeat(centers[s][None, :], dim + 2, axis=0)
                z[np.arange(1, dim + 1), np.arange(dim)] += h
                z[dim + 1] += rng.choice([-1.0, 1.0], size=dim) * (h / np.sqrt(dim))
                y = f(z @ basis.T - shift)
                g = ((y[1 : dim + 1] - y[0]) / h).T
                step = z[dim + 1] - centers[s]
                pred = y[0] + g @ step
                mag = np.abs(y[0]).max() + np.abs(g).max() * np.abs(step).sum()
                if np.abs(pred - y[dim + 1]).max() <= 1e-9 * mag:
                    break
                h /= 16.0
            else:
                raise DirectExtractionError(
                    f"gradient of a linear piece at t = {pts[s]:.6g}: expected the victim to be affine "
                    "around it, got a mismatch for every step: not a ReLU network"
                )
            grads[s], vals[s] = g, y[0]
        offs = vals - np.einsum("skd,sd->sk", grads, centers)
        rows, biases, a, ratio, keep = _rows_from_jumps(grads, offs, centers)
        # a jump that is not rank one is two kinks too close to separate (a layer-2 surface
        # meets a layer-1 plane near the line): dropped here, the units show up elsewhere
        good = ratio <= 1e-6
        if not good.all():
            logger.debug("relu2: %d merged kinks dropped", int((~good).sum()))
        kept = ts[keep][good]
        rows, a = rows[good], a[:, good]
        # the bias from the kink itself (located in closed form on the line), not from the jump
        # of the offsets, which cancels badly far from the origin
        at = np.array([point(t) for t in kept]).reshape(len(kept), dim)
        biases = -np.einsum("hd,hd->h", rows, at)
        keep = np.isin(ts, kept)
        extra = {"grads": grads, "centers": centers, "vals": vals, "keep": keep, "at": at}
        extra["ratio"] = ratio[good]
        return rows, biases, a, extra

    # ====================================================== layer-1 tests
    @staticmethod
    def _kink_at(f: FlatOracle, p: np.ndarray, n: np.ndarray, delta: float) -> bool | None:
        """Does the victim bend exactly at ``p`` along ``n``? ``None``: something else bends nearby."""
        y = f(p[None, :] + np.array([-2.0, -1.0, 0.0, 1.0, 2.0])[:, None] * delta * n[None, :])
        sl = (y[1] - y[0]) / delta
        sr = (y[4] - y[3]) / delta
        mag = np.abs(y).max() + 1e-300
        tol = 1e-9 * mag
        left_ok = np.abs(y[1] + sl * delta - y[2]).max() <= tol
        right_ok = np.abs(y[3] - sr * delta - y[2]).max() <= tol
        bend = np.abs(sl - sr).max() * delta > 1e-6 * mag
        if left_ok and right_ok:
            return bool(bend)
        return None

    def _is_global_plane(
        self, f: FlatOracle, n: np.ndarray, b: float, unit: float, rng: np.random.Generator
    ) -> int:
        """How many far points of the plane ``n·x + b = 0`` are bends (step 2)."""
        foot = -b * n
        hits = 0
        for i in range(self.probes):
            q = rng.standard_normal(len(n))
            q -= (q @ n) * n
            q /= np.linalg.norm(q)
            p = foot + unit * 2.0 ** (i + 1) * q
            delta = 1e-4 * float(np.linalg.norm(p))
            if self._kink_at(f, p, n, delta):
                hits += 1
        return hits

    def _off_side(
        self,
        f: FlatOracle,
        w0: np.ndarray,
        b0: np.ndarray,
        pinv: np.ndarray,
        j: int,
        unit: float,
        rng: np.random.Generator,
    ) -> int:
        """``+1`` if unit ``j`` is really off where ``ŵ_j·x + b̂_j > 0`` (flip it), else ``-1``."""
        v = pinv[:, j]  # Ŵ₀ v = e_j: moves only unit j's pre-activation
        v = v / np.linalg.norm(v)
        for attempt in range(16):
            # points of the plane ever further from the origin, with steps of growing size:
            # the step must reach a region where unit j feeds some active layer-2 unit
            q = rng.standard_normal(len(v))
            q -= (q @ w0[j]) * w0[j]
            reach = unit * 0.5 * attempt
            p = -b0[j] * w0[j] + reach * q / np.linalg.norm(q)
            eps = unit * 0.25 * 2.0 ** (attempt % 4)
            y = f(np.stack([p, p + eps * v, p - eps * v]))
            plus = float(np.abs(y[1] - y[0]).max())
            minus = float(np.abs(y[2] - y[0]).max())
            big, small = max(plus, minus), min(plus, minus)
            if big <= 1e-9 * (np.abs(y).max() + 1e-300):
                continue  # unit j is invisible here: every layer-2 unit it feeds is off
            if small <= 1e-7 * big:
                return 1 if plus < minus else -1
            raise DirectExtractionError(
                f"layer-1 sign of unit {j}: expected the output to stay constant on one side of "
                "its plane along a step that moves only that unit, got changes on both sides: a "
                "layer-1 unit was missed or mis-identified, or the victim is not a two-hidden-layer "
                "ReLU network"
            )
        raise DirectExtractionError(
            f"layer-1 sign of unit {j}: the unit never influenced the output at 16 points of its plane"
        )


# ====================================================================== helpers
def _assemble(
    w0: np.ndarray, b0: np.ndarray, data: dict[str, list[Any]], x_fit: np.ndarray, y_fit: np.ndarray
) -> tuple[Relu2Params, np.ndarray]:
    """Layer 2 from the hidden-space kinks so far (dedupe, refit, signs), then the output layer."""
    h1 = w0.shape[0]
    rows, bs, at = data["rows"], data["b"], data["at"]
    order = np.argsort(data["ratio"], kind="stable")  # each unit from its cleanest jump
    keep = [int(order[i]) for i in _dedupe_index([(rows[i], bs[i]) for i in order])]
    w1 = np.array([rows[i] for i in keep])
    b1 = np.array([bs[i] for i in keep])
    a2 = np.array([data["a"][i] for i in keep]).T
    for m, i in enumerate(keep):
        # refit the plane through all of the unit's kinks (closed-form locations, more
        # precise than a finite-difference row) when there are enough of them
        group = [n for n in range(len(rows)) if _same(rows[i], bs[i], rows[n], bs[n])]
        if len(group) >= h1 + 2:
            pts = np.hstack([np.array([at[n] for n in group]), np.ones((len(group), 1))])
            pts /= np.linalg.norm(pts, axis=1, keepdims=True)
            _, sv, vt = np.linalg.svd(pts)
            v = vt[-1] / np.linalg.norm(vt[-1][:h1])
            v = v if v[:h1] @ w1[m] > 0 else -v
            if sv[-1] <= 1e-9 * sv[0] and np.abs(v[:h1] - w1[m]).max() < 1e-6:
                w1[m], b1[m] = v[:h1], v[h1]
    # orientation: "on at larger t" of the line it came from; the flips are solved jointly
    grads = np.concatenate(data["grads"])
    centers = np.concatenate(data["centers"])
    flips = _solve_flips(w1, b1, a2, grads, centers)
    w1[flips] *= -1.0
    b1[flips] *= -1.0
    hid = np.vstack([centers, np.maximum(x_fit @ w0.T + b0, 0.0)])
    ys = np.vstack([np.concatenate(data["vals"]), y_fit])
    a2, b2 = _output_layer(w1, b1, hid, ys)
    return (w0, b0, w1, b1, a2, b2), flips


class _ClampedLine(_Line):
    """The victim on ``x₀ + clip(t, lo, hi)·u``: still piecewise linear in ``t``."""

    def __init__(self, f: FlatOracle, x0: np.ndarray, u: np.ndarray, lo: float, hi: float) -> None:
        super().__init__(f, x0, u)
        self.lo, self.hi = lo, hi

    def __call__(self, ts: np.ndarray) -> np.ndarray:
        return super().__call__(np.clip(np.asarray(ts, dtype=np.float64), self.lo, self.hi))


def _affine(z0: np.ndarray, u: np.ndarray) -> Any:
    def point(t: float) -> np.ndarray:
        return z0 + t * u

    return point


def _forward(params: Relu2Params, x: np.ndarray) -> np.ndarray:
    w0, b0, w1, b1, w2, b2 = params
    return np.maximum(np.maximum(x @ w0.T + b0, 0.0) @ w1.T + b1, 0.0) @ w2.T + b2


def _same(n1: np.ndarray, b1: float, n2: np.ndarray, b2: float) -> bool:
    c = float(n1 @ n2)
    s = 1.0 if c > 0 else -1.0
    return abs(abs(c) - 1.0) < 1e-8 and abs(b1 - s * b2) <= 1e-5 * max(1.0, abs(b1))


def _dedupe_index(planes: list[tuple[np.ndarray, float]]) -> list[int]:
    keep: list[int] = []
    for i, (n, b) in enumerate(planes):
        if not any(_same(n, b, planes[k][0], planes[k][1]) for k in keep):
            keep.append(i)
    return keep
