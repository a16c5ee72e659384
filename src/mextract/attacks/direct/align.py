"""Parameter error of an extracted model, after removing the network's symmetries.

A one-hidden-layer ReLU network ``A¹·ReLU(A⁰x + B⁰) + B¹`` is unchanged by permuting its
hidden units and by scaling unit ``j``'s input row and bias by ``c_j > 0`` while dividing
its output column by ``c_j``. :func:`align_relu1` undoes both: it matches extracted to
true units by the cosine of their input rows (Hungarian assignment,
``scipy.optimize.linear_sum_assignment``), fits each ``c_j`` by least squares on the row,
and reports, for each of the four blocks ``A⁰, B⁰, A¹, B¹``, the largest absolute error
divided by the largest absolute true entry of that block; ``max_rel_error`` is the
largest of the four. A wrong sign (``c_j < 0``) is not a symmetry and shows up as a
large error. True units whose output column is zero are *functionally irrelevant*
(never seen through the outputs) and are excluded and counted in ``irrelevant``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment
from torch import nn

from mextract.errors import InputError

Relu1Params = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def relu1_parameters(model: nn.Module) -> Relu1Params:
    """``(A⁰ (H, D), B⁰ (H,), A¹ (K, H), B¹ (K,))`` of a module whose first two Linear layers
    form a one-hidden-layer network (the zoo's ``relu1`` and the extracted models)."""
    lins = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if len(lins) != 2:
        raise InputError(f"expected a one-hidden-layer network with 2 Linear layers, got {len(lins)}")
    out = [p.detach().cpu().double().numpy().copy() for lin in lins for p in (lin.weight, lin.bias)]
    return out[0], out[1], out[2], out[3]


def query_floor(d: int, h: int, k: int) -> float:
    """``P / K``: parameters of a ``d-h-k`` network over the numbers one query returns."""
    return (h * (d + 1) + k * (h + 1)) / k


@dataclass
class ReLUAlignment:
    """Errors after alignment (see the module docstring for the exact definitions)."""

    max_rel_error: float
    max_abs_error: float
    block_rel_errors: dict[str, float]
    matched: int
    missing: int
    extra: int
    irrelevant: int
    min_cosine: float
    scales: np.ndarray = field(repr=False)

    def as_dict(self) -> dict[str, float]:
        return {
            "max_rel_error": self.max_rel_error,
            "max_abs_error": self.max_abs_error,
            **{f"rel_error_{k}": v for k, v in self.block_rel_errors.items()},
            "matched_units": float(self.matched),
            "missing_units": float(self.missing),
            "extra_units": float(self.extra),
            "irrelevant_units": float(self.irrelevant),
        }


def align_relu1(extracted: nn.Module | Relu1Params, true: nn.Module | Relu1Params) -> ReLUAlignment:
    """Align ``extracted`` to ``true`` (permutation, positive scales) and measure the error."""
    we, be, ae, ce = extracted if isinstance(extracted, tuple) else relu1_parameters(extracted)
    wt, bt, at, ct = true if isinstance(true, tuple) else relu1_parameters(true)
    if we.shape[1] != wt.shape[1] or ae.shape[0] != at.shape[0]:
        raise InputError(
            f"expected networks with the same inputs and outputs, got {we.shape[1]}→{ae.shape[0]} "
            f"and {wt.shape[1]}→{at.shape[0]}"
        )
    relevant = np.abs(at).max(axis=0) > 0
    wt, bt, at = wt[relevant], bt[relevant], at[:, relevant]
    irrelevant = int((~relevant).sum())
    ne = np.linalg.norm(we, axis=1, keepdims=True)
    nt = np.linalg.norm(wt, axis=1, keepdims=True)
    cos = (we / np.where(ne > 0, ne, 1)) @ (wt / np.where(nt > 0, nt, 1)).T
    rows, cols = linear_sum_assignment(-cos)
    scales = np.einsum("hd,hd->h", we[rows], wt[cols]) / np.maximum(
        np.einsum("hd,hd->h", we[rows], we[rows]), 1e-300
    )
    err_w = np.abs(scales[:, None] * we[rows] - wt[cols])
    err_b = np.abs(scales * be[rows] - bt[cols])
    with np.errstate(divide="ignore", invalid="ignore"):
        err_a = np.abs(ae[:, rows] / scales[None, :] - at[:, cols])
    err_c = np.abs(ce - ct)

    def rel(err: np.ndarray, ref: np.ndarray) -> float:
        top = float(np.abs(ref).max()) if ref.size else 0.0
        return float(err.max()) / top if err.size and top > 0 else float(err.max(initial=0.0))

    blocks = {
        "A0": rel(err_w, wt[cols]),
        "B0": rel(err_b, bt[cols]),
        "A1": rel(err_a, at[:, cols]),
        "B1": rel(err_c, ct),
    }
    missing = len(wt) - len(rows)
    extra = len(we) - len(rows)
    abs_err = max(float(e.max(initial=0.0)) for e in (err_w, err_b, err_a, err_c))
    return ReLUAlignment(
        max_rel_error=max(blocks.values()) if missing == 0 else float("inf"),
        max_abs_error=abs_err,
        block_rel_errors=blocks,
        matched=len(rows),
        missing=missing,
        extra=extra,
        irrelevant=irrelevant,
        min_cosine=float(cos[rows, cols].min()) if len(rows) else float("nan"),
        scales=scales,
    )


@dataclass
class LinearError:
    """Max absolute and relative (to the largest true entry) error of ``(W, b)``."""

    max_abs_error: float
    max_rel_error: float


def sklearn_linear_params(est: Any) -> tuple[np.ndarray, np.ndarray]:
    """The logits a fitted scikit-learn linear classifier gives the oracle, as ``(W, b)``.

    Binary models (``coef_`` of one row) become ``W = [0; coef]``, ``b = [0, intercept]``,
    the oracle's ``(0, d)`` logit pair.
    """
    coef = np.asarray(est.coef_, dtype=np.float64)
    icpt = np.asarray(est.intercept_, dtype=np.float64)
    if coef.shape[0] == 1:
        coef = np.vstack([np.zeros_like(coef), coef])
        icpt = np.concatenate([[0.0], icpt])
    return coef, icpt


def linear_error(
    model: nn.Module | tuple[np.ndarray, np.ndarray],
    weight: np.ndarray,
    bias: np.ndarray,
    *,
    gauge: str = "class0",
) -> LinearError:
    """Error of an extracted linear model against ``(weight (K, D), bias (K,))``.

    ``gauge="class0"`` compares the differences to class 0 (all that probabilities reveal);
    ``"raw"`` compares the logits' parameters directly (logit answers).
    """
    if isinstance(model, tuple):
        we, be = model
    else:
        lins = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if len(lins) != 1:
            raise InputError(f"expected a linear model with one Linear layer, got {len(lins)}")
        we = lins[0].weight.detach().double().numpy()
        be = lins[0].bias.detach().double().numpy()
    wt, bt = np.asarray(weight, dtype=np.float64), np.asarray(bias, dtype=np.float64)
    if gauge == "class0":
        we, be, wt, bt = we - we[:1], be - be[:1], wt - wt[:1], bt - bt[:1]
    elif gauge != "raw":
        raise InputError(f"gauge: expected 'class0' or 'raw', got {gauge!r}")
    theta_e = np.concatenate([we.ravel(), be])
    theta_t = np.concatenate([wt.ravel(), bt])
    err = float(np.abs(theta_e - theta_t).max())
    return LinearError(err, err / max(float(np.abs(theta_t).max()), 1e-300))
