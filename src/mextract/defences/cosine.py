"""A keyed cosine signal in the API's probabilities, which distilled substitutes inherit.

After Charette, Chu, Chen, Pei, Wang & Zhang, "Cosine Model Watermarking Against Ensemble
Distillation" (CosWM), AAAI 2022. DAWN (:class:`~mextract.defences.ownership.DawnWatermark`)
marks single answers, and a substitute carries a mark only if it memorises that one point;
soft-label distillation rarely does (``docs/defences.md``). CosWM instead adds to every
answer a smooth periodic function of the query, so the signal is part of the function the
thief fits, not an outlier of its training set.

The embedding (the paper's formula, applied to the API's answers as DAWN does, rather
than trained into the victim): with the key's unit projection vector ``v``, target class
``i*``, angular frequency ``f`` and amplitude ``ε``, and the victim's probabilities ``q``,

    p(x) = (vᵀx − μ) / σ,        a(x) = cos(f · p(x))
    q̂_i* = (q_i* + ε(1 + a(x))) / (1 + 2ε)
    q̂_j  = (q_j + ε(1 − a(x)) / (K − 1)) / (1 + 2ε)      for j ≠ i*

``q̂`` is a probability vector. ``μ`` and ``σ`` standardise the projection on the owner's
own inputs, so that ``f`` is in radians per standard deviation of the data along ``v``
and means the same on any dataset (images in [0, 1], standardised tables).

Choices, and why:

* ``v`` is Gaussian and normalised, ``i*`` uniform, both derived from the owner's key
  (HMAC-SHA256), like DAWN's decisions;
* the projection is on the flattened query itself: nothing else the API sees is
  independent of the model;
* ``f = π/2`` per σ: one period over the ±2σ bulk of the data. A substitute generalises
  smooth functions of its input, and a full period keeps the signal apart from the slow
  trends every model has along any direction. On mnist (2,000 distillation queries,
  40 epochs), kd substitutes carried the signal at π/2 per σ and did not at 4 rad/σ;
* ``ε = 0.1``: the target class gains up to ``2ε/(1 + 2ε)`` ≈ 0.17 of probability and
  the others lose at most as much in total; the top-1 answer moves only where the
  victim's margin is below that. The honest price is a distorted probability vector
  (an L1 change of at most ``4ε/(1 + 2ε)``) and a fraction of a point of top-1 accuracy.

Verification (:meth:`CosineWatermark.verify`): the owner queries the suspect on inputs it
chose independently of the key — by default the queries its API answered and logged
(DAWN's choice too: the thief's own queries, where a substitute reproduces its training
answers best), or its own natural inputs — keeps those the suspect does not assign to
``i*`` (there the signal sits on a near-zero probability; on ``i*``'s own inputs it
drowns in the model's confidence),
and subtracts its own unwatermarked victim's ``q_i*`` (a clone reproduces the victim, so
the difference removes what clone and victim share and leaves the signal). The statistic
is the correlation of that residual with ``cos(f · p(x))``: the matched filter for a
known frequency and phase (the paper reads the signal off a Lomb–Scargle periodogram, as
the power in a window around ``f`` against the rest of the spectrum).

The false-positive bound is ours, not the paper's: the same statistic is computed for
``null_keys`` projection vectors drawn like ``v``. A suspect that never saw the keyed
answers is independent of ``v``, so the key's statistic is exchangeable with the null
keys' and ``p = (1 + #{null ≥ key}) / (1 + null_keys)`` is an exact p-value, whatever the
suspect, the data or the victim (every key, the owner's included, is standardised on the
verification inputs, so all are treated alike). Its floor is ``1/(1 + null_keys)``;
the default 1,999 null keys allow ``p = 5e-4 < α = 1e-3``. The bound needs the
verification inputs to be independent of the key: the owner's own data always are, and so
is a query log whose queries were not chosen from the marked answers (an adaptive thief
chooses later queries from earlier answers, so for its log the bound is approximate).

What it cannot do: a hard-label thief sees almost nothing of the signal (the top-1 label
moves only at low-margin points), so stack it with DAWN (``"cosine+dawn"``), which marks
exactly those thieves.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mextract._utils import as_tensor, check_shape
from mextract.defences.ownership import key_bytes
from mextract.defences.perturb import _check_inner, _inner_logits
from mextract.errors import InputError
from mextract.metrics import predict_probs
from mextract.oracle import AnswerMode, Oracle, OracleWrapper
from mextract.oracle.state import (
    StateLock,
    check_state_keys,
    generator_state,
    state_generator,
    state_int,
    state_tensor,
)

#: Default amplitude ε of the cosine signal (see the module docstring).
COSINE_EPSILON = 0.1
#: Default angular frequency, radians per standard deviation of the projection.
COSINE_FREQUENCY = math.pi / 2

#: A suspect: a PyTorch classifier (logits out) or a function from inputs to probabilities.
Model = nn.Module | Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class CosineVerification:
    """The outcome of a cosine-watermark verification.

    ``statistic`` is the correlation of the suspect's residual target probability with the
    key's cosine on ``samples`` inputs; ``null_mean``/``null_std`` describe the same
    statistic over ``null_keys`` random keys; ``p_value`` is the exact rank p-value; the
    suspect is declared stolen when ``p_value < alpha``.

    Faithfulness: ``docs/faithfulness.md#cosine-verify``.
    """

    statistic: float
    p_value: float
    null_mean: float
    null_std: float
    null_keys: int
    samples: int
    alpha: float

    @property
    def z(self) -> float:
        """How many null standard deviations the key's statistic lies above the null mean."""
        return (self.statistic - self.null_mean) / self.null_std if self.null_std > 0 else float("nan")

    @property
    def stolen(self) -> bool:
        return self.p_value < self.alpha


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _stream(key: bytes, label: bytes) -> int:
    """A 63-bit seed derived from the key for one purpose (``label``)."""
    return int.from_bytes(hmac.new(key, label, hashlib.sha256).digest()[:8], "big") >> 1


def _unit_vectors(seed: int, dim: int, n: int) -> torch.Tensor:
    """``n`` Gaussian directions in ``dim`` dimensions, normalised: a float64 ``(dim, n)`` matrix."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(dim, n, generator=g, dtype=torch.float64)
    return u / u.norm(dim=0, keepdim=True)


class CosineWatermark(OracleWrapper):
    """CosWM at the API: every answer carries ``ε·cos(f·p(x))`` on a keyed class.

    Args:
        inner: the oracle to protect; it must answer ``logits`` or ``probs``. The
            watermarked oracle answers ``probs``.
        key: the owner's secret (bytes, or a non-negative int).
        reference: the owner's natural inputs ``(N, *input_shape)``, ``N ≥ 2``, on which the
            projection is standardised.
        epsilon: the signal's amplitude ``ε ≥ 0`` (``0``: the plain probabilities, identity).
        frequency: ``f > 0`` in radians per standard deviation of the projection.
        target: the class ``i*`` that carries the signal; default: derived from the key.
        alpha: the verification level.
        null_keys: random keys in the verification's null distribution (≥ 99).
        log_size: queries kept for verification (a uniform reservoir sample once more
            arrive; ``0`` keeps none).

    State (:meth:`state_dict`): the query log and the reservoir sampler's position,
    ``{"log": (n, *input_shape) float32 tensor, n ≤ log_size; "seen": queries answered so
    far; "reservoir": the sampler's generator state}``. Everything else — the key (and the
    projection, target and null keys derived from it), ``reference`` and the options — is
    configuration: load a state into a wrapper built with the same spec, and its log and
    the queries it logs next are the original's. Logging is thread-safe.

    Example:
        >>> api = CosineWatermark(VictimOracle(victim, ...), key=b"secret", reference=owner_x)
        >>> # ... a thief distils a substitute from ``api`` ...
        >>> api.verify(substitute, baseline=victim).stolen      # on the logged queries
        >>> api.verify(substitute, owner_x, baseline=victim)     # on the owner's own inputs

    Faithfulness: ``docs/faithfulness.md#cosine``.
    """

    def __init__(
        self,
        inner: Oracle,
        key: bytes | int,
        *,
        reference: object,
        epsilon: float = COSINE_EPSILON,
        frequency: float = COSINE_FREQUENCY,
        target: int | None = None,
        alpha: float = 1e-3,
        null_keys: int = 1999,
        log_size: int = 10_000,
    ) -> None:
        _check_inner(inner, "CosineWatermark")
        key = key_bytes(key)
        if not _number(epsilon) or not 0 <= epsilon < math.inf:
            raise InputError(f"epsilon: expected a number >= 0, got {epsilon!r}")
        if not _number(frequency) or not 0 < frequency < math.inf:
            raise InputError(f"frequency: expected a positive number, got {frequency!r}")
        if not 0 < alpha < 1:
            raise InputError(f"alpha: expected a level in (0, 1), got {alpha!r}")
        if isinstance(null_keys, bool) or not isinstance(null_keys, int) or null_keys < 99:
            raise InputError(f"null_keys: expected an integer >= 99, got {null_keys!r}")
        if isinstance(log_size, bool) or not isinstance(log_size, int) or log_size < 0:
            raise InputError(f"log_size: expected an integer >= 0, got {log_size!r}")
        k = inner.num_classes
        if target is None:
            target = _stream(key, b"cosine-target") % k
        if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < k:
            raise InputError(f"target: expected a class in [0, {k}), got {target!r}")
        super().__init__(inner, mode=AnswerMode.PROBS)
        self.epsilon, self.frequency, self.target = float(epsilon), float(frequency), target
        self.alpha, self.null_keys = float(alpha), null_keys
        self._key = key
        self.log_size, self._log, self._seen = log_size, torch.empty(0, *self.input_shape), 0
        self._reservoir = torch.Generator().manual_seed(_stream(key, b"cosine-log"))
        self._lock = StateLock()
        dim = math.prod(self.input_shape)
        self._v = _unit_vectors(_stream(key, b"cosine-projection"), dim, 1)[:, 0]
        ref = as_tensor(reference, name="reference", dtype=torch.float64)
        check_shape(ref, self.input_shape, name="reference")
        if len(ref) < 2:
            raise InputError(f"reference: expected at least 2 inputs to standardise on, got {len(ref)}")
        p = ref.flatten(1) @ self._v
        self.mean, self.std = float(p.mean()), float(p.std())
        if not self.std > 0:
            raise InputError("reference: the inputs do not vary along the key's direction (constant data?)")

    def signal(self, x: torch.Tensor) -> torch.Tensor:
        """``a(x) = cos(f · p(x))`` for a batch of queries, in float64."""
        p = (x.detach().to("cpu", torch.float64).flatten(1) @ self._v - self.mean) / self.std
        return torch.cos(self.frequency * p)

    @property
    def logged_queries(self) -> torch.Tensor:
        """The answered queries kept for verification (all of them up to ``log_size``)."""
        return self._log

    def state_dict(self) -> dict[str, Any]:
        """The query log and the reservoir's position (see the class docstring); no key."""
        with self._lock:
            return {
                "log": self._log.clone(),
                "seen": self._seen,
                "reservoir": generator_state(self._reservoir),
            }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the query log and the reservoir's position with ``state``'s."""
        name = type(self).__name__
        state = check_state_keys(name, state, ("log", "seen", "reservoir"))
        log = state_tensor(name, "log", state["log"], dtype=torch.float32, shape=(None, *self.input_shape))
        seen = state_int(name, "seen", state["seen"])
        reservoir = state_generator(name, "reservoir", state["reservoir"])
        if len(log) > self.log_size:
            raise InputError(f"{name}: state 'log': {len(log)} queries, more than log_size={self.log_size}")
        if seen < len(log) or (len(log) < self.log_size and seen != len(log)):
            raise InputError(f"{name}: state 'seen': {seen} queries cannot leave {len(log)} in the log")
        with self._lock:
            self._log, self._seen = log, seen
            self._reservoir.set_state(reservoir)

    def _record(self, x: torch.Tensor) -> None:
        """Reservoir sampling (Vitter's algorithm R), so the log stays a uniform sample."""
        x = x.detach().to("cpu", torch.float32)
        with self._lock:  # concurrent batches are logged one after the other
            self._record_locked(x)

    def _record_locked(self, x: torch.Tensor) -> None:
        room = max(0, self.log_size - len(self._log))
        if room:
            self._log = torch.cat([self._log, x[:room]])
        rest = x[room:]
        if len(rest) and self.log_size:
            seen = self._seen + room + torch.arange(1, len(rest) + 1)
            slot = (torch.rand(len(rest), generator=self._reservoir, dtype=torch.float64) * seen).long()
            for row, j in zip(rest, slot.tolist(), strict=True):
                if j < self.log_size:
                    self._log[j] = row
        self._seen += len(x)

    def _answer(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.softmax(_inner_logits(self.inner, x), dim=1)
        self._record(x)
        a = self.signal(x).to(q.device, q.dtype)[:, None]
        eps, k = self.epsilon, self.num_classes
        add = (eps * (1 - a) / (k - 1)).expand_as(q).clone()
        add[:, self.target] = eps * (1 + a[:, 0])
        return (q + add) / (1 + 2 * eps)

    def verify(
        self,
        suspect: Model,
        x: object | None = None,
        *,
        baseline: Model | None = None,
    ) -> CosineVerification:
        """Test ``suspect`` on inputs ``x`` (default: the logged queries).

        ``suspect`` and ``baseline`` are PyTorch classifiers (logits out) or functions from
        inputs to probability vectors. ``baseline`` is the owner's own model *without* the
        watermark (the victim): subtracting its target probability removes what a clone
        shares with it and leaves the signal; without it the statistic is computed on the
        suspect's raw probabilities (valid, less powerful).
        """
        if x is None:
            if len(self._log) == 0:
                raise InputError("verification: no query was logged; pass the owner's inputs as x")
            x = self._log
        xs = as_tensor(x, name="x", dtype=torch.float32)
        check_shape(xs, self.input_shape, name="x")
        q = _probabilities(suspect, xs)
        keep = q.argmax(dim=1) != self.target
        if int(keep.sum()) < 10:
            raise InputError(
                f"verification: {int(keep.sum())} of {len(xs)} inputs are not of the target class "
                f"{self.target}; at least 10 are needed"
            )
        r = q[keep, self.target].double()
        if baseline is not None:
            r = r - _probabilities(baseline, xs)[keep, self.target].double()
        r = r - r.mean()
        flat = xs[keep].flatten(1).double()
        seed = _stream(self._key, b"cosine-null")
        stats = [self._statistics(flat, r, self._v[:, None])]
        for start in range(0, self.null_keys, 500):  # chunks bound the memory to ~500 columns
            n = min(500, self.null_keys - start)
            directions = _unit_vectors(seed + start, flat.shape[1], n)
            stats.append(self._statistics(flat, r, directions))
        s = torch.cat(stats)
        key_stat, null = float(s[0]), s[1:]
        p_value = (1 + int((null >= key_stat).sum())) / (1 + self.null_keys)
        return CosineVerification(
            statistic=key_stat, p_value=p_value, null_mean=float(null.mean()), null_std=float(null.std()),
            null_keys=self.null_keys, samples=len(r), alpha=self.alpha,
        )  # fmt: skip

    def _statistics(self, flat: torch.Tensor, r: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
        """Correlation of ``r`` with ``cos(f·p_u(x))`` for each direction ``u`` (columns)."""
        p = flat @ directions
        p = (p - p.mean(dim=0)) / p.std(dim=0).clamp_min(1e-12)
        c = torch.cos(self.frequency * p)
        c = c - c.mean(dim=0)
        denom = c.norm(dim=0) * r.norm()
        return (r @ c) / denom.clamp_min(1e-300)


def _probabilities(model: Model, x: torch.Tensor) -> torch.Tensor:
    if isinstance(model, nn.Module):
        out = predict_probs(model, x)
    else:
        out = torch.as_tensor(model(x)).detach().cpu()
    if out.dim() != 2 or len(out) != len(x):
        raise InputError(f"suspect: expected probabilities shaped ({len(x)}, K), got {tuple(out.shape)}")
    if not bool(torch.isfinite(out).all()):  # a NaN statistic would rank as the top key
        raise InputError("suspect: its outputs contain NaN or infinite values")
    return out


__all__ = ["COSINE_EPSILON", "COSINE_FREQUENCY", "CosineVerification", "CosineWatermark"]
