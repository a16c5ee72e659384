"""Shared pieces of the direct-extraction attacks: errors and a flat float64 view of an oracle."""

from __future__ import annotations

import logging
from collections.abc import Callable
from math import prod
from typing import TypeVar

import numpy as np
import torch

from mextract.errors import MextractError
from mextract.oracle import AnswerMode, Client

logger = logging.getLogger(__name__)
T = TypeVar("T")


class DirectExtractionError(MextractError):
    """Direct extraction could not produce a model that reproduces the victim's answers."""


class AnswerModeError(DirectExtractionError):
    """The oracle's answer mode does not reveal enough for this attack (e.g. labels only)."""


class NotPiecewiseLinearError(DirectExtractionError):
    """The victim's output bends continuously: it is not a ReLU (piecewise-linear) network."""


class UnsupportedVictimError(DirectExtractionError):
    """The victim is outside what the attack supports (e.g. a hidden layer far wider than the
    input); repeating the attack on other random lines would not help."""


def with_retries(attempt: Callable[[], T], retries: int, *, what: str, tries: str) -> tuple[T, int]:
    """``attempt()`` up to ``retries + 1`` times: a :class:`DirectExtractionError` (except an
    :class:`UnsupportedVictimError`, which no retry cures) retries on fresh random lines, and the
    last failure is raised, saying how many ``tries`` failed. Returns the result and the
    attempts it took. Every attempt's queries are the caller's to count (they all go through
    the same client)."""
    failures: list[str] = []
    for n in range(retries + 1):
        try:
            return attempt(), n + 1
        except UnsupportedVictimError:
            raise
        except DirectExtractionError as exc:
            logger.info("%s: attempt %d failed (%s); retrying", what, n, exc)
            failures.append(str(exc))
            if n == retries:
                if len(failures) > 1:
                    raise type(exc)(f"{exc} [failed on all {len(failures)} {tries}]") from exc
                raise
    raise AssertionError("unreachable")


class FlatOracle:
    """Queries an oracle with flat float64 numpy rows ``(N, D)``; answers ``(N, K)`` float64.

    ``logits`` answers pass through. ``probs`` answers become logit *differences*
    ``log p_k - log p_0`` (the logits up to a per-row constant, which is all that softmax
    reveals); a probability that underflowed to zero makes that impossible and raises
    (:meth:`answer` instead reports such entries as carrying no information).
    Every sample still goes through :meth:`Oracle.query`, so the ledger counts it.

    **Precision.** The API casts every query to its ``dtype``; :meth:`snap` does the same
    rounding here, so an attack knows the point that was really answered (finite
    differences use the steps actually taken). ``eps`` is the answers' unit roundoff
    (float32: ``1.19e-7``, float64: ``2.2e-16``); :meth:`answer` returns with every answer
    an estimate of its absolute error (see :func:`answer_noise`).
    """

    def __init__(self, oracle: Client, *, allow_probs: bool = True) -> None:
        mode = oracle.mode
        ok = {AnswerMode.LOGITS} | ({AnswerMode.PROBS} if allow_probs else set())
        if mode not in ok:
            raise AnswerModeError(
                f"oracle answer mode: expected one of {sorted(m.value for m in ok)}, got "
                f"{mode.value!r} (exact parameter recovery needs real-valued scores; rounded, "
                "top-k and label answers destroy the equalities the attack solves)"
            )
        self.oracle = oracle
        self.mode = mode
        self.shape = tuple(oracle.input_shape)
        self.dim = int(prod(self.shape))
        self.num_classes = int(oracle.num_classes)
        self.calls = 0
        self.dtype = oracle.dtype
        self.np_dtype = np.float32 if self.dtype == torch.float32 else np.float64
        self.eps = float(torch.finfo(self.dtype).eps)
        self.log_probs: bool | None = None

    def snap(self, x: np.ndarray) -> np.ndarray:
        """``x`` rounded to the API's dtype (what the API will answer for), as float64."""
        return np.asarray(x, dtype=np.float64).astype(self.np_dtype).astype(np.float64)

    def _raw(self, x: np.ndarray) -> np.ndarray:
        x = self.snap(np.asarray(x, dtype=np.float64).reshape(-1, self.dim))
        t = torch.from_numpy(np.ascontiguousarray(x)).reshape(-1, *self.shape)
        ans = self.oracle.query(t).detach().cpu().to(torch.float64).numpy()
        self.calls += 1
        return ans

    def answer(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Answers (logits, or log-ratios to class 0) and their estimated absolute errors.

        Entries whose probability underflowed (or was clipped to the smallest float) get
        an infinite error: they carry no information about the parameters.
        """
        ans = self._raw(x)
        probs = self._probabilities(ans)
        noise = answer_noise(ans, probs, self.eps)
        if probs is None:
            return ans, noise
        with np.errstate(divide="ignore", invalid="ignore"):
            logp = np.log(np.clip(probs, 0.0, None))
            y = logp - logp[:, :1]
        y[~np.isfinite(y)] = 0.0
        return y, noise

    def answer_with_labels(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`answer` plus each row's top class (valid even where probabilities saturate)."""
        ans = self._raw(x)
        probs = self._probabilities(ans)
        labels = np.argmax(ans, axis=1)
        noise = answer_noise(ans, probs, self.eps)
        if probs is None:
            return ans, noise, labels
        with np.errstate(divide="ignore", invalid="ignore"):
            logp = np.log(np.clip(probs, 0.0, None))
            y = logp - logp[:, :1]
        y[~np.isfinite(y)] = 0.0
        return y, noise, labels

    def _probabilities(self, ans: np.ndarray) -> np.ndarray | None:
        """The answers as probabilities, or ``None`` for real logits.

        ``logits`` answers whose rows are all log-probabilities (``logsumexp = 0``, as a
        scikit-learn ``predict_proba`` victim answers) are probabilities in disguise: only
        their differences are linear in the logits. Decided on the first batch, then fixed.
        """
        if self.mode is AnswerMode.PROBS:
            return ans
        if self.log_probs is None:
            verdict = _are_log_probs(ans, self.eps) if self.num_classes > 1 else False
            if verdict is None:  # inconclusive: read this batch as probabilities (the safe side)
                return np.exp(ans)
            self.log_probs = verdict
        return np.exp(ans) if self.log_probs else None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        ans = self._raw(x)
        probs = self._probabilities(ans)
        if probs is not None and self.mode is AnswerMode.LOGITS and self.log_probs is None:
            return ans - ans[:, :1]  # inconclusive batch: the same differences either way
        if probs is not None:
            low = probs <= 1e3 * np.finfo(np.float64).tiny
            if np.any(low):
                raise UnsupportedVictimError(
                    "probability answers: expected every probability > 0 to take logs, got "
                    f"{int(np.sum(low))} zero (or clipped) probabilities: the softmax saturated on "
                    "the attack's search range (binary scikit-learn probabilities, computed as "
                    "1 - p, saturate beyond |logit| ≈ 37); use an oracle that answers logits"
                )
            logp = np.log(probs)
            return logp - logp[:, :1]
        return ans


def answer_noise(ans: np.ndarray, probs: np.ndarray | None, eps: float) -> np.ndarray:
    """Estimated absolute error of each answer as the attacks use it, ``(N, K)``.

    * Probabilities (``probs``, or ``logits`` whose rows are log-probabilities, i.e.
      ``logsumexp = 0``, as a scikit-learn ``predict_proba`` victim answers): each ``p_k``
      is assumed correct to ``eps`` absolute (``p₀ = 1 - p₁`` loses the relative precision
      of a tiny ``p₀``), so ``log p_k - log p_0`` is off by up to ``eps/p_k + eps/p_0``;
      entries at or below the underflow threshold are ``inf`` (no information).
    * Real logits: ``8·eps·(1 + max_k |y_k|)`` per row (a few roundings of the output).
    """
    ans = np.asarray(ans, dtype=np.float64)
    tiny = float(np.finfo(np.float64).tiny) * 1e3
    p = probs
    if p is None:
        mag = 1.0 + np.abs(ans).max(axis=1, keepdims=True)
        return np.broadcast_to(8.0 * eps * mag, ans.shape).copy()
    with np.errstate(divide="ignore"):
        per = np.where(p > tiny, eps / np.maximum(p, tiny), np.inf)
    noise = per + per[:, :1] + 4.0 * eps * np.abs(np.log(np.maximum(p, tiny)))
    noise[:, 0] = 0.0  # the reference class: its log-ratio is 0 by construction
    return noise


def _are_log_probs(ans: np.ndarray, eps: float = float(np.finfo(np.float64).eps)) -> bool | None:
    """Every row's ``logsumexp`` is 0: the "logits" are log-probabilities (``None``: cannot
    tell yet, every row is ``(0, very negative, ...)``, as both readings allow)."""
    top = ans.max(axis=1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(ans - top).sum(axis=1))
    tight = np.abs(lse) <= 64.0 * eps * (1.0 + np.abs(ans).max(axis=1))
    # a real logit vector like (0, f) with f << 0 also has logsumexp ≈ 0, but its top entry is
    # exactly 0 on every row; log-probabilities are below 0 unless some p rounds to 1
    if not (np.all(tight) and np.all(ans <= 0.0)):
        return False
    return True if np.any(top < -1e-15) else None
