"""Shared pieces of the direct-extraction attacks: errors and a flat float64 view of an oracle."""

from __future__ import annotations

import logging
from math import prod

import numpy as np
import torch

from mextract.errors import MextractError
from mextract.oracle import AnswerMode, Client

logger = logging.getLogger(__name__)


class DirectExtractionError(MextractError):
    """Direct extraction could not produce a model that reproduces the victim's answers."""


class AnswerModeError(DirectExtractionError):
    """The oracle's answer mode does not reveal enough for this attack (e.g. labels only)."""


class NotPiecewiseLinearError(DirectExtractionError):
    """The victim's output bends continuously: it is not a ReLU (piecewise-linear) network."""


class FlatOracle:
    """Queries an oracle with flat float64 numpy rows ``(N, D)``; answers ``(N, K)`` float64.

    ``logits`` answers pass through. ``probs`` answers become logit *differences*
    ``log p_k - log p_0`` (the logits up to a per-row constant, which is all that softmax
    reveals); a probability that underflowed to zero makes that impossible and raises.
    Every sample still goes through :meth:`Oracle.query`, so the ledger counts it.
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

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64).reshape(-1, self.dim)
        t = torch.from_numpy(np.ascontiguousarray(x)).reshape(-1, *self.shape)
        ans = self.oracle.query(t).detach().cpu().to(torch.float64).numpy()
        self.calls += 1
        if self.mode is AnswerMode.PROBS:
            if np.any(ans <= 0):
                raise DirectExtractionError(
                    "probability answers: expected every probability > 0 to take logs, got "
                    f"{int(np.sum(ans <= 0))} zero(s) (the softmax underflowed); query nearer the "
                    "data or use an oracle that answers logits"
                )
            logp = np.log(ans)
            return logp - logp[:, :1]
        return ans
