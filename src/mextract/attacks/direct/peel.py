"""Layer-peeling extraction of ReLU networks with ``k >= 2`` hidden layers — a PROTOTYPE.

**Status.** Exact at ``k = 2`` (10/10 random 10-8-6-2 nets); at ``k = 3`` it solved 1 of 40
random nets measured and raised a :class:`~mextract.attacks.direct.DirectExtractionError`
on the others (``benchmarks/direct_deep.py``, ``docs/direct-extraction.md``). It never
returned a wrong model in those runs, but it is *not* registered as an attack; use
:class:`~mextract.attacks.direct.ReLU2Cryptanalysis` for two hidden layers.

The victim is ``O(x) = A^k·ReLU(A^{k-1}·…ReLU(A⁰x + B⁰)… + B^{k-1}) + B^k`` (``D`` inputs,
hidden widths ``D ≥ H₁ ≥ … ≥ H_k``, ``K`` logits, float64 answers). The layers are
recovered one by one from critical points, following Carlini, Jagielski & Mironov
("Cryptanalytic Extraction of Neural Network Models", CRYPTO 2020), with these choices:

1. **Layer 1** as :class:`~mextract.attacks.direct.ReLU2Cryptanalysis` does it (kinks on
   random lines, rank-one gradient jumps, planes that bend at far points of themselves,
   the contractive sign test), with a lower far-probe threshold (``min_hits = 3`` of 8:
   deeper nets hide layer-1 units more often) and, when a sign test fails, the
   fewest-hit candidate dropped in turn.
2. **Coordinates.** Queries are written in the layer-1 pre-activations ``u``
   (``x(u) = Ŵ⁰⁺(u − b̂⁰)``, any ``u`` is reachable since ``H₁ ≤ D``); the recovered
   layers are known functions of ``u``, affine in each cell (activation pattern).
3. **Layer l ≥ 2.** Kinks on random chords of ``u``-space (the one-layer kink search),
   one checked ``H₁ + 2``-query Jacobian per piece, each kink's normal from the rank-one
   jump. Kinks on known units' surfaces are skipped. In the kink's cell the normal is
   solved for the unit's row on the cell's *active* layer-``l-1`` units; stored as
   ``r = w/b`` it is free of the unknown orientation and scale, and partial rows that
   agree on their overlap are joined (Carlini et al.'s "unification") until complete.
   A complete row is accepted as a layer-``l`` unit if its *predicted* critical surface
   ``w·H(x) + b = 0`` — bent by the known layers, points found by bisection without
   queries — bends at ``deep_min_hits`` of ``probes`` random points (five queries each):
   a deeper unit's plane holds only in the layer-``l`` cell it was seen in. A deeper unit
   that still passes has a row in the span of the true ones (it is their combination in
   its cell): dependent rows are dropped, fewest hits first, the sign test deciding.
4. **Signs of layers l < k.** At a point of unit ``j``'s surface whose cell has enough
   active units, the step ``v`` with ``W[:, on]·∂h[on]·v = e_j`` moves only unit ``j``'s
   pre-activation, and on its off side the output is exactly unchanged (Carlini et al.'s
   contractive-layer test; points: its kinks, the all-on region, random cells). Where no
   such point exists, votes of a neuron wiggle after Canales-Martínez, Chávez-Saab,
   Hambitzer, Rodríguez-Henríquez, Satpute & Shamir (EUROCRYPT 2024): a ridge step that
   moves unit ``j`` most and the others least; the side with the larger output change
   is taken as "on" (at least 5 votes, at most 20% dissent). The wiggle is a heuristic
   here (the paper's statistical analysis is not reproduced); the final check guards it.
5. **Last hidden layer and output, no signs.** Since ``ReLU(−z) = ReLU(z) − z`` and
   ``h_{k-1} = ReLU(h_{k-1})`` (``h_{k-1} ≥ 0``), ``O = A·ReLU(W_k h + b_k) + M·h + c``
   is solved by least squares on random inputs, ``h = h_{k-1}`` being passed on through
   ``H_{k-1}`` identity units: the returned MLP is exact with a last hidden layer of
   ``H_k + H_{k-1}`` units (this also absorbs layer-``k`` units that are on for every
   input). A last-layer partial row that never completes raises.
6. **Check**: ``verify_queries`` fresh Gaussian queries at scales 0.25, 1 and 4, counted
   by the ledger, must be reproduced to ``verify_tol`` relative error, else
   :class:`~mextract.attacks.direct.DirectExtractionError`; up to ``retries`` fresh
   attempts, every query counted.

What makes ``k = 3`` fail (each case raises): an intermediate unit that is on for every
input has no critical point but moves with the isolating step (the sign test sees
changes on both sides); with ``H_l = H_{l-1}`` the isolating step needs the all-on cell,
which many units' surfaces never cross, and the wiggle votes are often inconclusive; a
missed or mis-signed layer-2 unit leaves the layer-3 partial rows inconsistent.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment, linprog
from torch import nn

from mextract.attacks.base import Attack, AttackContext
from mextract.attacks.direct.common import (
    AnswerModeError,
    DirectExtractionError,
    FlatOracle,
    UnsupportedVictimError,
    with_retries,
)
from mextract.attacks.direct.deep import ReLU2Cryptanalysis, _affine, _ClampedLine, _dedupe_index
from mextract.attacks.direct.relu import (
    Precision,
    ReLUCryptanalysis,
    _Line,
    _rows_from_jumps,
    _segment_points,
)
from mextract.errors import InputError
from mextract.oracle import AnswerMode, APIDescription

logger = logging.getLogger(__name__)

DeepParams = list[tuple[np.ndarray, np.ndarray]]  # (weight, bias) per Linear layer


def deep_relu_model(params: DeepParams, *, flatten: bool = True) -> nn.Module:
    """A float64 ``[Flatten →] Linear → ReLU → … → Linear`` module from ``(W, b)`` pairs."""
    layers: list[nn.Module] = [nn.Flatten()] if flatten else []
    for i, (w, b) in enumerate(params):
        lin = nn.Linear(w.shape[1], w.shape[0], dtype=torch.float64)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(w, dtype=np.float64)))
            lin.bias.copy_(torch.from_numpy(np.ascontiguousarray(b, dtype=np.float64)))
        layers.append(lin)
        if i < len(params) - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval()


def deep_relu_parameters(model: nn.Module) -> DeepParams:
    """``[(W, b), …]`` of every Linear layer of ``model``, in order, as float64 arrays."""
    lins = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if len(lins) < 2:
        raise InputError(f"expected a ReLU network with at least 2 Linear layers, got {len(lins)}")
    return [
        (lin.weight.detach().cpu().double().numpy().copy(), lin.bias.detach().cpu().double().numpy().copy())
        for lin in lins
    ]


@dataclass
class DeepAlignment:
    """Per-block relative errors after alignment (see :func:`align_relu_deep`)."""

    max_rel_error: float
    block_rel_errors: dict[str, float]
    min_cosine: float


def align_relu_deep(extracted: nn.Module | DeepParams, true: nn.Module | DeepParams) -> DeepAlignment:
    """Align the hidden layers of ``extracted`` to ``true`` up to the network's symmetries.

    Layer by layer, as :func:`~mextract.attacks.direct.align_relu2`: the true rows are
    expressed in the extracted previous units (columns times their fitted scales), each
    true unit is matched to an extracted one by row cosine (Hungarian; the extracted layer
    may be wider) and gets its scale by least squares. The last hidden layer is compared up
    to sign (:class:`DeepReLUCryptanalysis` leaves its orientation free and passes the
    previous layer on through identity units), and the output layer is not compared (a
    linear term moves between it and those units): use the functional error for it. Each
    block's error is its max absolute error over its max absolute true entry.
    """
    e = extracted if isinstance(extracted, list) else deep_relu_parameters(extracted)
    t = true if isinstance(true, list) else deep_relu_parameters(true)
    if len(e) != len(t) or e[0][0].shape != t[0][0].shape:
        shapes = [w.shape for w, _ in e], [w.shape for w, _ in t]
        raise InputError(f"expected networks of the same depth and input, got {shapes[0]} and {shapes[1]}")

    def rel(err: np.ndarray, ref: np.ndarray) -> float:
        return float(np.abs(err).max()) / max(float(np.abs(ref).max()), 1e-300)

    blocks: dict[str, float] = {}
    cmin = 1.0
    perm_prev = np.arange(e[0][0].shape[1])
    c_prev = np.ones(e[0][0].shape[1])
    for i in range(len(e) - 1):
        (we, be), (wt, bt) = e[i], t[i]
        we_p = we[:, perm_prev]  # extracted, columns in the true previous order
        wt_s = wt * c_prev[None, :]  # true, seen from the extracted (unscaled) previous units
        ne = we_p / np.maximum(np.linalg.norm(we_p, axis=1, keepdims=True), 1e-300)
        nt = wt_s / np.maximum(np.linalg.norm(wt_s, axis=1, keepdims=True), 1e-300)
        cos = nt @ ne.T
        lastl = i == len(e) - 2
        rows, cols = linear_sum_assignment(-(np.abs(cos) if lastl else cos))
        perm = cols[np.argsort(rows)]
        cmin = min(cmin, float(np.abs(cos[rows, cols]).min()))
        wp = we_p[perm]
        scale = np.einsum("hd,hd->h", wp, wt_s) / np.maximum(np.einsum("hd,hd->h", wp, wp), 1e-300)
        blocks[f"A{i}"] = rel(scale[:, None] * wp / c_prev[None, :] - wt, wt)
        blocks[f"B{i}"] = rel(scale * be[perm] - bt, bt)
        perm_prev, c_prev = perm, scale
    return DeepAlignment(max(blocks.values()), blocks, cmin)


# ====================================================================== the region R_{l-1}
@dataclass
class _Region:
    """``{u : G u + g > 0}`` in layer-1 pre-activation coordinates, with the affine map
    ``h = P u + q`` of the last recovered layer's activations valid there."""

    g_mat: np.ndarray  # (m, n), unit-norm rows
    g_vec: np.ndarray  # (m,)
    p_mat: np.ndarray  # (H, n)
    q_vec: np.ndarray  # (H,)
    box: float

    def margin(self, u: np.ndarray) -> float:
        """Distance from ``u`` to the region's boundary (box included)."""
        inner = float((self.g_mat @ u + self.g_vec).min()) if len(self.g_vec) else np.inf
        return min(inner, float(self.box - np.abs(u).max()))

    def extent(self, u: np.ndarray, d: np.ndarray) -> tuple[float, float]:
        """``[lo, hi]`` with ``u + t·d`` inside the region (box included) for ``lo < t < hi``."""
        a = np.concatenate([self.g_mat @ d, -d, d])
        c = np.concatenate([self.g_mat @ u + self.g_vec, self.box - u, self.box + u])
        with np.errstate(divide="ignore", invalid="ignore"):
            t = -c / a
        lo = float(t[a > 0].max()) if np.any(a > 0) else -np.inf
        hi = float(t[a < 0].min()) if np.any(a < 0) else np.inf
        return lo, hi

    def interior(self) -> tuple[np.ndarray, float]:
        """The point of largest margin (a linear program) and that margin."""
        n = self.g_mat.shape[1]
        m = len(self.g_vec)
        cost = np.zeros(n + 1)
        cost[-1] = -1.0
        eye = np.eye(n)
        ones = np.ones((m + 2 * n, 1))
        a_ub = np.hstack([np.vstack([-self.g_mat, eye, -eye]), ones])
        b_ub = np.concatenate([self.g_vec, np.full(2 * n, self.box)])
        res = linprog(
            cost, A_ub=a_ub, b_ub=b_ub, bounds=[(None, None)] * n + [(None, self.box)], method="highs"
        )
        if res.status != 0:
            return np.zeros(n), -np.inf
        u = np.asarray(res.x[:n], dtype=np.float64)
        return u, self.margin(u)

    def add_layer(self, w: np.ndarray, b: np.ndarray) -> _Region:
        """The region where the next layer ``(w, b)`` (in this region's ``h``) is also on."""
        p = w @ self.p_mat
        q = w @ self.q_vec + b
        norm = np.linalg.norm(p, axis=1)
        return _Region(
            np.vstack([self.g_mat, p / norm[:, None]]), np.concatenate([self.g_vec, q / norm]), p, q, self.box
        )


@dataclass
class _Unit:
    normal: np.ndarray  # unit normal in u
    bias: float  # in u: normal·u + bias = 0
    at: np.ndarray  # a kink of the unit, inside the region
    ratio: float


@dataclass(eq=False)
class _Cluster:
    """A layer-``l`` unit seen at kinks of several cells: ``r = w/b`` (NaN where no cell
    with that previous unit active showed it yet) and each kink with its cell's pattern."""

    r: np.ndarray
    sights: list[tuple[np.ndarray, np.ndarray]]
    accepted: bool | None = None
    hits: int = 0

    def row(self) -> tuple[np.ndarray, float]:
        """Unit-norm row and bias (orientation as ``b > 0``; the sign test fixes it)."""
        nrm = float(np.linalg.norm(self.r))
        return self.r / nrm, 1.0 / nrm


@dataclass(kw_only=True)
class DeepReLUCryptanalysis(Attack):
    """Layer-peeling extraction of a ReLU network with ``depth`` hidden layers: a prototype,
    not registered (see the module docstring for what it solves and what raises).

    Args:
        depth: hidden layers of the victim (``>= 2``); a victim of another depth raises.
        input_scale: standard deviation of random base points and check queries.
        lines: random input lines searched for layer-1 critical points.
        probes, min_hits: far points of each candidate plane probed for a bend, and how
            many must bend for the plane to count as a unit of the layer being peeled.
        deep_min_hits: the same threshold for the predicted-surface test of layers ``>= 2``.
        chords, min_chords, patience: random ``u``-space chords per hidden layer ``>= 2`` (at
            most, at least, and how many without a new unit or a filled-in partial row end
            the layer's search; the last layer also goes on while a partial row is open).
        tol: relative tolerance of the kink search's "lies on the line" tests.
        verify_queries, verify_tol: the final check on fresh queries.
        retries: fresh attempts (new lines and walks) after a failure, every query counted.

    Metrics: ``units_layer{l}``, ``queries_layer{l}``, ``queries_output``, ``verify_rel_error``,
    ``verify_queries``, ``verify_tol``, ``answer_eps``, ``attempts``, ``attack_time_s``.
    """

    name: ClassVar[str] = "deep_relu_cryptanalysis"
    needs_pool: ClassVar[bool] = False

    depth: int = 3
    input_scale: float = 1.0
    lines: int = 3
    probes: int = 8
    min_hits: int = 3
    deep_min_hits: int = 5
    chords: int = 96
    min_chords: int = 8
    patience: int = 12
    tol: float = 1e-7
    verify_queries: int = 1024
    verify_tol: float = 1e-7
    retries: int = 2

    def check_params(self, api: APIDescription, pool: torch.Tensor | None, budget: int) -> None:
        if api.mode not in (AnswerMode.LOGITS, AnswerMode.PROBS):
            raise AnswerModeError(
                "oracle answer mode: expected 'logits' (or 'probs', converted to logit differences) "
                f"for exact ReLU extraction, got {api.mode.value!r}"
            )
        if api.dtype != torch.float64:
            raise UnsupportedVictimError(
                f"answer dtype: expected float64 answers for the deep ReLU attack, got {api.dtype} "
                "(its steps and tolerances are not precision-aware); nothing was queried"
            )
        if self.depth < 2 or not self.input_scale > 0 or not 0 < self.tol < 1e-2:
            raise InputError(
                f"expected depth >= 2, input_scale > 0 and 0 < tol < 1e-2, got {self.depth}, "
                f"{self.input_scale}, {self.tol}"
            )
        if self.lines < 1 or not 1 <= self.min_hits <= self.probes or not 1 <= self.min_chords <= self.chords:
            raise InputError(
                f"expected lines >= 1, 1 <= min_hits <= probes and 1 <= min_chords <= chords, got "
                f"{self.lines}, {self.min_hits}, {self.probes}, {self.min_chords}, {self.chords}"
            )

    def model_spec(self, model: nn.Module) -> tuple[str, dict[str, Any]] | None:
        return None  # no zoo architecture of arbitrary depth: the module itself is the model

    # ================================================================== run
    def run(self, ctx: AttackContext) -> nn.Module:
        t_start = time.perf_counter()
        f = FlatOracle(ctx.api, allow_probs=True)
        rng = np.random.default_rng(ctx.seed)
        model, tried = with_retries(lambda: self._attempt(ctx, f, rng, ctx.spent), self.retries,
                                    what="deep relu extraction", tries="attempts")  # fmt: skip
        ctx.metrics["attempts"] = float(tried)
        ctx.metrics["attack_time_s"] = time.perf_counter() - t_start
        return model

    def _attempt(self, ctx: AttackContext, f: FlatOracle, rng: np.random.Generator, spent0: int) -> nn.Module:
        d = f.dim
        sigma = float(self.input_scale)
        unit = sigma * np.sqrt(d)
        helper = ReLU2Cryptanalysis(
            lines=self.lines, probes=self.probes, min_hits=self.min_hits, tol=self.tol
        )
        search = ReLUCryptanalysis(tol=self.tol)
        verify_tol = Precision.of(f.eps, tol=self.tol, verify_tol=self.verify_tol).verify
        stages: dict[str, float] = {}

        # 1. layer 1, as the two-layer attack does it ------------------------------------
        cands: list[tuple[np.ndarray, float]] = []
        for _ in range(self.lines):
            x0 = sigma * rng.standard_normal((d,))
            u = rng.standard_normal((d,))
            u /= np.linalg.norm(u)
            kinks, _ = search._find_kinks(_Line(f, x0, u), unit, 11)
            if not kinks:
                continue
            ts = np.array(sorted(kinks))
            rows, biases, _a, _extra = helper._pieces(f, _affine(x0, u), ts, unit, d, rng, np.eye(d))
            cands += [(n, float(b)) for n, b in zip(rows, biases, strict=True)]
        uniq = [cands[i] for i in _dedupe_index(cands)]
        scored = [(helper._is_global_plane(f, n, b, unit, rng), n, b) for n, b in uniq]
        layer1 = sorted([c for c in scored if c[0] >= self.min_hits], key=lambda c: -c[0])
        if not layer1:
            raise DirectExtractionError(
                "layer 1: expected at least one critical hyperplane that bends everywhere, found none: "
                "the victim is not a deep ReLU network"
            )
        # signs (contractive-layer test); a deeper unit's plane that passed the far-probe test
        # spoils it ("changes on both sides"): the fewest-hit candidates are dropped in turn
        last_exc: DirectExtractionError | None = None
        for drop in [None, *range(len(layer1) - 1, max(len(layer1) - 4, 0), -1)]:
            keep = [c for i, c in enumerate(layer1) if i != drop]
            w0 = np.array([n for _, n, _ in keep])
            b0 = np.array([b for _, _, b in keep])
            h1 = len(w0)
            if h1 > d or np.linalg.matrix_rank(w0) < h1:
                continue
            pinv = np.linalg.pinv(w0)
            try:
                for j in range(h1):
                    if helper._off_side(f, w0, b0, pinv, j, unit, rng) > 0:
                        w0[j], b0[j] = -w0[j], -b0[j]
                        pinv[:, j] *= -1.0
            except DirectExtractionError as exc:
                last_exc = exc
                continue
            break
        else:
            raise DirectExtractionError(
                f"layer 1: no set of the {len(layer1)} candidate planes passed the sign test "
                f"(contractive first layer H1 <= D expected; last failure: {last_exc})"
            )
        stages["queries_layer1"] = float(ctx.spent - spent0)
        stages["units_layer1"] = float(h1)
        logger.info("deep relu: layer 1 has %d units", h1)

        # 2.-4. deeper layers, in u = layer-1 pre-activations -------------------------------
        scale = sigma * (1.0 + float(np.abs(b0).mean()))
        shift = pinv @ b0

        def to_x(us: np.ndarray) -> np.ndarray:
            return us @ pinv.T - shift

        # the recovered layers as functions of u (layer 1 is the identity there), and R_l
        uknown: DeepParams = [(np.eye(h1), np.zeros(h1))]
        region = _Region(np.eye(h1), np.zeros(h1), np.eye(h1), np.zeros(h1), 64.0 * scale)
        params: list[tuple[np.ndarray, np.ndarray]] = [(w0, b0)]
        for layer in range(2, self.depth + 1):
            before = float(ctx.spent)
            w, b = self._layer(
                f, search, to_x, uknown, params, layer, region=region, scale=scale, unit=unit, rng=rng
            )
            params.append((w, b))
            uknown.append((w, b))
            region = region.add_layer(w, b)
            stages[f"queries_layer{layer}"] = float(ctx.spent) - before
            stages[f"units_layer{layer}"] = float(len(w))
            logger.info("deep relu: layer %d has %d units", layer, len(w))

        # 5. last hidden layer's output by least squares, then the check on fresh queries ----
        before = float(ctx.spent)
        # the last hidden layer's orientation is free: ReLU(-z) = ReLU(z) - z, and a linear
        # term in h_{k-1} (also what a unit that is on for every input contributes) is exactly
        # ReLU(h_{k-1}) since h_{k-1} >= 0. So O = A·ReLU(W_k h + b_k) + M·h + c, least squares
        # on random inputs at three scales, with h = h_{k-1} passed on by identity units
        wk, bk = params.pop()
        hk, hprev = len(wk), wk.shape[1]
        cols = hk + hprev + 1
        xs = sigma * rng.standard_normal((3 * cols + 16, d))
        xs[: len(xs) // 3] *= 0.25
        xs[-(len(xs) // 3) :] *= 4.0
        ys = f(xs)
        hprev_x = _hidden(params, xs)
        design = np.hstack([np.maximum(hprev_x @ wk.T + bk, 0.0), hprev_x, np.ones((len(xs), 1))])
        theta, *_ = np.linalg.lstsq(design, ys, rcond=None)
        fit_res = float(np.abs(design @ theta - ys).max() / max(np.abs(ys).max(), 1e-300))
        if fit_res > verify_tol:
            raise DirectExtractionError(
                f"output layer: expected the logits to be affine in the last hidden layer, got a "
                f"least-squares residual {fit_res:.3g}: the victim has more than depth = {self.depth} "
                "hidden layers, or a unit was missed"
            )
        params.append((np.vstack([wk, np.eye(hprev)]), np.concatenate([bk, np.zeros(hprev)])))
        params.append((theta[:-1].T.copy(), theta[-1].copy()))
        stages["queries_output"] = float(ctx.spent) - before
        model = deep_relu_model(params)
        x_ver = sigma * rng.standard_normal((self.verify_queries, d))
        x_ver[: self.verify_queries // 4] *= 0.25  # three scales: units active near the origin,
        x_ver[self.verify_queries // 2 :] *= 4.0  # and further out, where more units switch
        y_ver = f(x_ver)
        with torch.no_grad():
            pred = model(torch.from_numpy(x_ver)).numpy()
        pred = pred - pred[:, :1] if f.mode is AnswerMode.PROBS else pred
        rel = float(np.abs(pred - y_ver).max() / max(np.abs(y_ver).max(), 1e-300))
        if not rel <= verify_tol:
            raise DirectExtractionError(
                f"extracted network reproduces the victim only to relative error {rel:.3g} on "
                f"{self.verify_queries} fresh queries (expected <= {verify_tol:.3g}): a unit was "
                "missed or a neuron-wiggle sign vote was wrong, or the victim is not a "
                f"{self.depth}-hidden-layer ReLU network"
            )
        ctx.metrics.update(
            {
                "depth": float(self.depth),
                "verify_rel_error": rel,
                "verify_queries": float(self.verify_queries),
                "verify_tol": verify_tol,
                "answer_eps": f.eps,
                **stages,
            }
        )
        return model

    # ================================================================== one layer
    def _layer(
        self,
        f: FlatOracle,
        search: ReLUCryptanalysis,
        to_x: Any,
        uknown: DeepParams,
        known: DeepParams,
        layer: int,
        *,
        region: _Region,
        scale: float,
        unit: float,
        rng: np.random.Generator,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Rows and biases (in layer ``l-1``'s activations, signs fixed) of layer ``l``.

        ``uknown``: the recovered layers ``1..l-1`` as functions of ``u`` (layer 1 is the
        identity there). In each cell of their arrangement (one activation pattern) they are
        affine, and a layer-``l`` unit's plane shows its row on the cell's active layer-``l-1``
        units only; rows seen in several cells are joined (:func:`_add_sighting`).
        """
        n = uknown[0][0].shape[1]
        hprev = len(uknown[-1][0])
        last = layer == self.depth
        box = 64.0 * scale
        clusters: list[_Cluster] = []
        quiet = 0
        for idx in range(self.chords):
            u = scale * rng.standard_normal((n,))
            dirn = rng.standard_normal((n,))
            dirn /= np.linalg.norm(dirn)
            lo, hi = _box_extent(u, dirn, box)
            xa, xb = to_x(u[None, :])[0], to_x((u + dirn)[None, :])[0]
            cu = min(0.25 * (hi - lo), scale)
            kinks, _ = search._find_kinks(_ClampedLine(f, xa, xb - xa, lo, hi), cu, 11)
            margin_t = 1e-5 * (hi - lo)
            ts = np.array(sorted(t for t in kinks if lo + margin_t < t < hi - margin_t))
            before = (sum(c.accepted is True for c in clusters), _unknown(clusters))
            if len(ts):
                for cand in self._pieces(f, to_x, u, dirn, ts, lo, hi, cu, rng):
                    sight = _sighting(cand, uknown, scale)
                    if sight is not None:
                        _add_sighting(clusters, sight)
                for c in clusters:
                    if c.accepted is None and not np.isnan(c.r).any():
                        row = c.row()
                        c.hits = self.probes if last else self._surface_hits(f, known, *row, unit, rng)
                        c.accepted = c.hits >= self.deep_min_hits
            # progress: a new unit, or a partial row seen twice filled in further (not merely a
            # new partial row: deeper units show a new one in every cell)
            progress = sum(c.accepted is True for c in clusters) > before[0] or _unknown(clusters) < before[1]
            quiet = 0 if progress else quiet + 1
            # the last layer has no deeper units: every partial row is one of its units, so the
            # search goes on while one is incomplete
            pending = last and any(c.accepted is None for c in clusters)
            if idx + 1 >= self.min_chords and quiet >= self.patience and not pending:
                break
        if last and any(c.accepted is None for c in clusters):
            open_rows = [c for c in clusters if c.accepted is None]
            raise DirectExtractionError(
                f"layer {layer}: {len(open_rows)} unit(s) of the last hidden layer seen at "
                f"{sum(len(c.sights) for c in open_rows)} kinks were never seen with every unit of "
                f"layer {layer - 1} active near them, so their rows are incomplete after {idx + 1} chords"
            )
        units = [c for c in clusters if c.accepted]
        if not units:
            raise DirectExtractionError(
                f"layer {layer}: expected critical points of layer-{layer} units, found none after "
                f"{idx + 1} chords ({len(clusters)} partial rows): the victim has fewer than {layer} "
                "hidden layers"
            )
        w = np.array([c.row()[0] for c in units])
        b = np.array([c.row()[1] for c in units])
        if last:
            return w, b  # orientation is free: the output fit absorbs it (see _attempt, step 5)
        # signs: a step that moves only unit j's pre-activation changes nothing on its off side.
        # A deeper unit that passed the surface test has a row in the span of this layer's (it
        # is their combination in its cell): dependent rows are dropped, fewest hits first,
        # until the rest is independent and every sign test is clean
        sv = np.linalg.svd(w, compute_uv=False)
        extra = int(np.sum(sv < 1e-6 * sv[0])) + max(len(w) - hprev, 0)
        if extra == 0:
            return self._signs(f, to_x, uknown, region, units, w, b, layer, scale, rng)
        _, _, vt = np.linalg.svd(w.T)
        null = vt[len(units) - extra :]
        group = [i for i in range(len(units)) if np.abs(null[:, i]).max() > 1e-6]
        group.sort(key=lambda i: (units[i].hits, len(units[i].sights)))
        last_exc: DirectExtractionError | None = None
        for tried, drop in enumerate(itertools.combinations(group, extra)):
            if tried >= 32:
                break
            keep = [i for i in range(len(units)) if i not in drop]
            if np.linalg.matrix_rank(w[keep], tol=1e-6) < len(keep):
                continue
            try:
                kept = [units[i] for i in keep]
                return self._signs(f, to_x, uknown, region, kept, w[keep], b[keep], layer, scale, rng)
            except DirectExtractionError as exc:
                last_exc = exc
        raise DirectExtractionError(
            f"layer {layer}: {len(units)} candidate units with {extra} dependent rows, and no "
            f"independent subset passed the sign test ({last_exc})"
        )

    def _signs(
        self,
        f: FlatOracle,
        to_x: Any,
        uknown: DeepParams,
        region: _Region,
        units: list[_Cluster],
        w: np.ndarray,
        b: np.ndarray,
        layer: int,
        scale: float,
        rng: np.random.Generator,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The layer's rows with each unit's sign fixed by the contractive-layer test, run at
        points of the unit's surface whose cell is known: a step ``v`` with
        ``W[:, on]·dz[on]·v = e_j`` moves only unit ``j``'s pre-activation there."""
        w, b = w.copy(), b.copy()
        for j, c in enumerate(units):
            if self._off_side(f, to_x, uknown, region, c, w, b, j, layer, scale, rng) > 0:
                w[j], b[j] = -w[j], -b[j]
        return w, b

    def _pieces(
        self,
        f: FlatOracle,
        to_x: Any,
        u0: np.ndarray,
        dirn: np.ndarray,
        ts: np.ndarray,
        lo: float,
        hi: float,
        unit: float,
        rng: np.random.Generator,
    ) -> list[_Unit]:
        """The kinks ``ts`` of the chord ``u0 + t·dirn`` as planes in ``u`` (rank-one jumps of
        checked ``n + 2``-query Jacobians; jumps that are not rank one are dropped)."""
        n = len(u0)
        pts, ell = _segment_points(ts, unit)
        pts[0], ell[0] = 0.5 * (lo + ts[0]), 0.5 * (ts[0] - lo)
        pts[-1], ell[-1] = 0.5 * (ts[-1] + hi), 0.5 * (hi - ts[-1])
        centers = u0[None, :] + pts[:, None] * dirn[None, :]
        grads = np.empty((len(pts), f.num_classes, n))
        vals = np.empty((len(pts), f.num_classes))
        for s in range(len(pts)):
            h = ell[s] / (4.0 * np.sqrt(n))
            for _ in range(12):
                zz = np.repeat(centers[s][None, :], n + 2, axis=0)
                zz[np.arange(1, n + 1), np.arange(n)] += h
                zz[n + 1] += rng.choice([-1.0, 1.0], size=n) * (h / np.sqrt(n))
                y = f(to_x(zz))
                g = ((y[1 : n + 1] - y[0]) / h).T
                step = zz[n + 1] - centers[s]
                mag = np.abs(y[0]).max() + np.abs(g).max() * np.abs(step).sum()
                if np.abs(y[0] + g @ step - y[n + 1]).max() <= 1e-9 * mag:
                    break
                h /= 16.0
            else:
                raise DirectExtractionError(
                    f"gradient of a linear piece at t = {pts[s]:.6g}: expected the victim to be affine "
                    "around it, got a mismatch for every step: not a ReLU network"
                )
            grads[s], vals[s] = g, y[0]
        offs = vals - np.einsum("skd,sd->sk", grads, centers)
        rows, _b, _a, ratio, keep = _rows_from_jumps(grads, offs, centers)
        kept = ts[keep]
        out: list[_Unit] = []
        for r, t, q in zip(rows, kept, ratio, strict=True):
            if q > 1e-6:
                continue
            at = u0 + t * dirn
            out.append(_Unit(r, -float(r @ at), at, float(q)))
        return out

    def _surface_hits(
        self, f: FlatOracle, known: DeepParams, w: np.ndarray, b: float, unit: float, rng: np.random.Generator
    ) -> int:
        """How many random points of the candidate's *predicted* critical surface bend.

        A layer-``l`` unit with row ``(w, b)`` in the recovered layer-``l-1`` activations
        ``H(x)`` is critical on the whole surface ``w·H(x) + b = 0``, which the known layers
        bend across all their regions; a deeper unit's plane, found where its layer-``l``
        inputs had one pattern, matches that surface only there (Carlini et al. check
        candidate neurons against the known layers the same way). Points of the surface on
        random input lines are found without queries (bisection on the known layers);
        five queries each test for a bend exactly there.
        """
        sigma = float(self.input_scale)
        d = known[0][0].shape[1]
        hits = 0
        for _ in range(self.probes):
            for _try in range(8):
                x0 = sigma * rng.standard_normal((d,))
                e = rng.standard_normal((d,))
                e /= np.linalg.norm(e)
                p = _surface_point(known, w, b, x0, e, 4.0 * unit, rng)
                if p is not None:
                    break
            else:
                continue
            pattern, grad = _pattern_and_grad(known, w, p)
            gn = float(np.linalg.norm(grad))
            if gn == 0.0:
                continue
            nvec = grad / gn
            delta = 1e-4 * max(float(np.linalg.norm(p)), unit)
            for _shrink in range(6):  # the five points must share the known layers' pattern
                pts = p[None, :] + np.array([-2.0, -1.0, 1.0, 2.0])[:, None] * delta * nvec[None, :]
                if all(np.array_equal(_pattern_and_grad(known, w, q)[0], pattern) for q in pts):
                    break
                delta /= 16.0
            else:
                continue
            if ReLU2Cryptanalysis._kink_at(f, p, nvec, delta):
                hits += 1
        return hits

    def _off_side(
        self,
        f: FlatOracle,
        to_x: Any,
        uknown: DeepParams,
        region: _Region,
        c: _Cluster,
        w: np.ndarray,
        b_all: np.ndarray,
        j: int,
        layer: int,
        scale: float,
        rng: np.random.Generator,
    ) -> int:
        """``+1`` if unit ``j`` is off where its row (as found) is positive, else ``-1``."""
        points = sorted(c.sights, key=lambda pt: -int(pt[1].sum()))[:8]
        bj = float(b_all[j])
        points += _region_surface_points(region, w[j], bj, rng, 16)
        points += _surface_points_u(uknown, w[j], bj, rng, 24, scale)
        tried = 0
        votes: list[int] = []
        for at, _on in points:
            zall, dzall, _h, dh = _cell(uknown, at)
            on = np.abs(dh).sum(axis=1) > 0
            m = w[:, on] @ dh[on]  # (H_l, n): this layer's pre-activations in u, in this cell
            step = np.linalg.pinv(m)[:, j]
            if np.abs(m @ step - np.eye(len(w))[j]).max() > 1e-8:
                # too few active units here to move unit j alone: a neuron wiggle instead
                zl = w[:, on] @ _h[on] + b_all
                keep = np.arange(len(w)) != j  # the other units of this layer must not switch either
                vote = self._wiggle(
                    f, to_x, m, j, at, np.concatenate([zall, zl[keep]]), np.vstack([dzall, m[keep]])
                )
                if vote:
                    votes.append(vote)
                continue
            with np.errstate(divide="ignore"):
                room = float(np.min(np.abs(zall) / np.abs(dzall @ step)))
            eps = 0.25 * room
            if not eps > 0:
                continue
            tried += 1
            y = f(to_x(np.stack([at, at + eps * step, at - eps * step])))
            plus = float(np.abs(y[1] - y[0]).max())
            minus = float(np.abs(y[2] - y[0]).max())
            big, small = max(plus, minus), min(plus, minus)
            if big <= 1e-9 * (np.abs(y).max() + 1e-300):
                continue  # invisible here: every path from the unit to the output is off
            if small <= 1e-7 * big:
                return 1 if plus < minus else -1  # "plus" raises the as-found pre-activation
            raise DirectExtractionError(
                f"layer-{layer} sign of unit {j}: expected the output to stay constant on one side of "
                "its plane along a step that moves only that unit, got changes on both sides: a unit "
                f"of layer {layer} was missed or mis-classified, or the victim is not a ReLU network "
                "of this depth"
            )
        ups, downs = votes.count(1), votes.count(-1)
        if max(ups, downs) >= 5 and min(ups, downs) <= max(ups, downs) // 5:
            return 1 if ups > downs else -1
        raise DirectExtractionError(
            f"layer-{layer} sign of unit {j}: no point of its surface where it can be moved alone "
            f"and influences the output ({tried} usable of {len(points)}), and the neuron-wiggle "
            f"votes are inconclusive ({ups} vs {downs})"
        )

    @staticmethod
    def _wiggle(
        f: FlatOracle,
        to_x: Any,
        m: np.ndarray,
        j: int,
        at: np.ndarray,
        zall: np.ndarray,
        dzall: np.ndarray,
    ) -> int:
        """One neuron-wiggle vote (after Canales-Martínez et al., EUROCRYPT 2024): a step that
        moves unit ``j``'s pre-activation by 1 and the others' as little as possible (ridge
        least squares); the side where the output moves more is taken as unit ``j``'s on side
        (the others contribute the same linear change on both sides). ``+1``: flip, ``-1``:
        keep, ``0``: no vote (the unit is invisible here, or the sides are too alike)."""
        others = np.delete(m, j, axis=0)
        gram = others.T @ others
        mu = 1e-3 * float(np.trace(gram)) / max(gram.shape[0], 1) + 1e-12
        step = np.linalg.solve(gram + mu * np.eye(len(gram)), m[j])
        step /= float(m[j] @ step)
        with np.errstate(divide="ignore"):
            room = float(np.min(np.abs(zall) / np.abs(dzall @ step)))
        eps = 0.25 * room
        if not eps > 0:
            return 0
        y = f(to_x(np.stack([at, at + eps * step, at - eps * step])))
        plus = float(np.linalg.norm(y[1] - y[0]))
        minus = float(np.linalg.norm(y[2] - y[0]))
        if max(plus, minus) <= 1e-9 * (np.abs(y).max() + 1e-300) or abs(plus - minus) <= 0.1 * max(
            plus, minus
        ):
            return 0
        return -1 if plus > minus else 1

    @staticmethod
    def _walk_points(region: _Region, start: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
        """``count`` points of the region from a hit-and-run walk (log-uniform step lengths)."""
        u = start.copy()
        out: list[np.ndarray] = []
        while len(out) < count:
            dirn = rng.standard_normal((len(u),))
            dirn /= np.linalg.norm(dirn)
            lo, hi = region.extent(u, dirn)
            end = hi if rng.random() < 0.5 else lo
            cand = u + 10.0 ** rng.uniform(-3.0, 0.0) * 0.9 * end * dirn
            if region.margin(cand) > 0:
                u = cand
                out.append(u.copy())
        return np.array(out)


# ====================================================================== helpers
def _hidden(known: DeepParams, x: np.ndarray) -> np.ndarray:
    """The known layers' last activations at inputs ``x`` (rows)."""
    h = x
    for w, b in known:
        h = np.maximum(h @ w.T + b, 0.0)
    return h


def _pattern_and_grad(known: DeepParams, w: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The known layers' activation pattern at ``x`` and the input gradient of ``w·H(x)``."""
    h = x
    pats = []
    jac = np.eye(len(x))
    for wl, bl in known:
        z = wl @ h + bl
        on = z > 0
        pats.append(on)
        jac = (wl * on[:, None]) @ jac
        h = np.maximum(z, 0.0)
    return np.concatenate(pats), w @ jac


def _surface_point(
    known: DeepParams,
    w: np.ndarray,
    b: float,
    x0: np.ndarray,
    e: np.ndarray,
    reach: float,
    rng: np.random.Generator,
) -> np.ndarray | None:
    """A random root of ``w·H(x0 + t·e) + b`` with ``|t| <= reach`` (no queries), or ``None``."""
    ts = np.linspace(-reach, reach, 2049)
    phi = _hidden(known, x0[None, :] + ts[:, None] * e[None, :]) @ w + b
    change = np.flatnonzero(np.sign(phi[:-1]) * np.sign(phi[1:]) < 0)
    if not len(change):
        return None
    i = int(rng.choice(change))
    lo, hi, flo = ts[i], ts[i + 1], phi[i]
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        fm = float(_hidden(known, (x0 + mid * e)[None, :])[0] @ w + b)
        if fm == 0.0:
            lo = hi = mid
            break
        if np.sign(fm) == np.sign(flo):
            lo, flo = mid, fm
        else:
            hi = mid
    return x0 + 0.5 * (lo + hi) * e


def _cell(uknown: DeepParams, u: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """At ``u``: every known unit's pre-activation and its gradient (``(Σ H, n)``), and the last
    known layer's activations ``h`` with their gradient (zero rows for units that are off)."""
    h, dh = u, np.eye(len(u))
    zs, dzs = [], []
    for w, b in uknown:
        z, dz = w @ h + b, w @ dh
        zs.append(z)
        dzs.append(dz)
        on = z > 0
        h, dh = np.where(on, z, 0.0), dz * on[:, None]
    return np.concatenate(zs), np.vstack(dzs), h, dh


def _sighting(
    cand: _Unit, uknown: DeepParams, scale: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """A kink's partial row ``r = w/b`` on its cell's active layer-``l-1`` units, or ``None``
    for a kink of a known unit, or one that the cell's active units do not determine."""
    zall, _dz, h, dh = _cell(uknown, cand.at)
    if np.abs(zall).min() <= 1e-7 * (np.abs(zall).max() + scale):
        return None  # on a known unit's surface
    on = np.abs(dh).sum(axis=1) > 0
    if not on.any() or np.linalg.matrix_rank(dh[on]) < int(on.sum()):
        return None
    sol, *_ = np.linalg.lstsq(dh[on].T, cand.normal, rcond=None)
    if float(np.linalg.norm(dh[on].T @ sol - cand.normal)) > 1e-6:
        return None
    bias = -float(sol @ h[on])
    if abs(bias) <= 1e-9 * float(np.linalg.norm(sol)) * (float(np.abs(h).max()) + scale):
        return None
    r = np.full(len(h), np.nan)
    r[on] = sol / bias
    return r, cand.at, on


def _unknown(clusters: list[_Cluster]) -> int:
    return sum(int(np.isnan(c.r).sum()) for c in clusters if len(c.sights) > 1)


def _box_extent(u: np.ndarray, d: np.ndarray, box: float) -> tuple[float, float]:
    with np.errstate(divide="ignore"):
        t1, t2 = (box - u) / d, (-box - u) / d
    return float(np.minimum(t1, t2).max()), float(np.maximum(t1, t2).min())


def _agree(r1: np.ndarray, r2: np.ndarray) -> bool:
    both = ~np.isnan(r1) & ~np.isnan(r2)
    if not both.any():
        return False
    a, b = r1[both], r2[both]
    return bool(np.abs(a - b).max() <= 1e-6 * max(float(np.abs(a).max()), float(np.abs(b).max())))


def _add_sighting(clusters: list[_Cluster], sight: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    """File a partial row with the clusters it agrees with (merging them), or start one."""
    r, at, on = sight
    hits = [c for c in clusters if _agree(c.r, r)]
    if not hits:
        clusters.append(_Cluster(r.copy(), [(at, on)]))
        return
    head = hits[0]
    head.sights.append((at, on))
    fill = np.isnan(head.r) & ~np.isnan(r)
    head.r[fill] = r[fill]
    for other in hits[1:]:
        fill = np.isnan(head.r) & ~np.isnan(other.r)
        head.r[fill] = other.r[fill]
        head.sights += other.sights
        if other.accepted:
            head.accepted, head.hits = None, 0  # re-classify the merged row
        clusters.remove(other)
    if fill.any() or len(hits) > 1:
        head.accepted = None if np.isnan(head.r).any() else head.accepted


def _surface_points_u(
    uknown: DeepParams, w: np.ndarray, b: float, rng: np.random.Generator, count: int, scale: float
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Points of the surface ``w·h(u) + b = 0`` with their cells' patterns, most active units
    first (no queries): the root of the affine function on a random line inside the cell of a
    random point."""
    out: list[tuple[np.ndarray, np.ndarray]] = []
    n = uknown[0][0].shape[1]
    for _ in range(8 * count):
        if len(out) >= count:
            break
        u = scale * rng.standard_normal((n,)) * 10.0 ** rng.uniform(-1.0, 1.0)
        dirn = rng.standard_normal((n,))
        dirn /= np.linalg.norm(dirn)
        zall, dzall, h, dh = _cell(uknown, u)
        a, slope = float(w @ h) + b, float(w @ (dh @ dirn))
        if slope == 0.0:
            continue
        t = -a / slope
        # the cell: no known pre-activation changes sign between u and u + t·dirn
        if np.all((zall + t * (dzall @ dirn)) * zall > 0):
            on = np.abs(dh).sum(axis=1) > 0
            out.append((u + t * dirn, on))
    out.sort(key=lambda pt: -int(pt[1].sum()))
    return out


def _region_surface_points(
    region: _Region, w: np.ndarray, b: float, rng: np.random.Generator, count: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Points of ``w·h + b = 0`` inside the all-on region ``R_{l-1}`` (where ``h = P u + q``;
    every layer-``l-1`` unit is active there, so any unit of layer ``l`` can be moved alone)."""
    centre, margin = region.interior()
    if margin <= 0:
        return []
    on = np.ones(len(region.q_vec), dtype=bool)
    out: list[tuple[np.ndarray, np.ndarray]] = []
    starts = DeepReLUCryptanalysis._walk_points(region, centre, 4 * count, rng)
    for u in starts:
        if len(out) >= count:
            break
        dirn = rng.standard_normal((len(u),))
        dirn /= np.linalg.norm(dirn)
        lo, hi = region.extent(u, dirn)
        slope = float(w @ (region.p_mat @ dirn))
        if slope == 0.0:
            continue
        t = -(float(w @ (region.p_mat @ u + region.q_vec)) + b) / slope
        if lo < t < hi and region.margin(u + t * dirn) > 0:
            out.append((u + t * dirn, on))
    return out
