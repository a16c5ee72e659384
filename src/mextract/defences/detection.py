"""Stateful detection of extraction attacks from a client's query stream: PRADA.

PRADA (Juuti, Szyller, Marchal & Asokan, "PRADA: Protecting against DNN Model Stealing
Attacks", IEEE EuroS&P 2019, Algorithm 1) watches, per client, the distribution of the
minimum L2 distance between each new query and that client's earlier queries of the same
predicted class. Natural inputs give distances that are close to normally distributed;
synthetic extraction queries (small perturbations of earlier queries, binary-search
midpoints, generator noise) give many tiny distances next to a few large ones, so the
Shapiro–Wilk statistic ``W`` of the distances drops. An alarm is raised when ``W < δ``.

Algorithm 1, as implemented here, for one client:

* ``c`` is the victim's predicted class of the query ``x`` (argmax of the inner answer).
* If the growing set ``G_c`` is empty, ``x`` joins it (its recorded distance is 0 and it
  contributes nothing to ``D``).
* Else ``d = min_{y ∈ G_c} ‖x − y‖₂`` (on the flattened input, as the paper does on images)
  joins the client's distance set ``D``; if ``d > T_c``, ``x`` joins ``G_c``, ``d`` joins
  ``D_{G_c}`` and ``T_c ← max(T_c, mean(D_{G_c}) − std(D_{G_c}))``. Taking the max with the
  previous threshold (a non-decreasing threshold) follows the authors' reference code
  (Aalto SSG, ``GrowingDistanceAgent``); Algorithm 1 prints the bare ``mean − std``.
* ``D`` is pooled over the classes (one set per client, as in the paper). Once
  ``|D| > 100`` (the paper's minimum), outliers beyond ``mean ± 3·std`` are removed
  (the paper and the reference code) and ``W = shapiro(D')`` is computed; ``W < δ`` is an
  alarm. The authors' reference code pools a class's distances only once that class has
  at least 10 of them (a class seen a few times adds no distances); Algorithm 1 has no such
  rule, and neither does the default here (``min_class_distances=0``).
  ``min_class_distances=10`` is the reference code's rule; ``docs/faithfulness.md#prada``
  measures the two on mnist (detection delay, false alarms). The test runs after every
  query (``check_every=1``, Algorithm 1); the reference code tests every 10th query, a
  speed-up available with ``check_every=10``.

``δ``: the paper sets the threshold per dataset so that no benign stream is flagged; its
MNIST value is ``δ = 0.95`` (the default here); its GTSRB value is lower (0.87). The
false-alarm rate of the default on benign MNIST streams is measured in
``docs/defences.md``.

A batch is processed sample by sample in order for the running state (growing sets,
thresholds, ``D``), but its distances are computed in bulk with :func:`torch.cdist`:
once against the stored growing set, once within the batch.

Usage::

    monitor = Prada(delta=0.95)
    oracle_alice = monitor.client("alice", oracle)   # an oracle; answers unchanged
    oracle_alice.query(x)
    monitor.report("alice").flagged

State: :meth:`Prada.state_dict` holds every client's stream statistics and
:meth:`Prada.client_state_dict` one client's (a server persists per client); the
options (``delta``, ``min_distances``, ...) are configuration, not state, so a state is
loaded into a monitor built with the same options. One monitor may serve concurrent
clients: :meth:`Prada.observe` and the state methods hold the monitor's lock.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import stats

from mextract._utils import as_tensor
from mextract.errors import InputError, MextractError
from mextract.oracle import Oracle, OracleWrapper
from mextract.oracle.state import StateLock, check_state_keys, state_int, state_tensor

logger = logging.getLogger(__name__)

#: The paper's minimum size of ``D`` before the normality test is run (``|D| > 100``).
PRADA_MIN_DISTANCES = 100
#: The paper's detection threshold on ``W`` for MNIST.
PRADA_DELTA_MNIST = 0.95


class ExtractionDetectedError(MextractError):
    """A client flagged by a detector tried to query again while blocking is on."""

    def __init__(self, client_id: Hashable, first_alarm: int) -> None:
        self.client_id, self.first_alarm = client_id, first_alarm
        super().__init__(
            f"client {client_id!r} is blocked: PRADA flagged its query stream as a model-extraction "
            f"attack at query #{first_alarm} (0-based); no further queries are answered"
        )


@dataclass
class ClientReport:
    """What PRADA knows about one client.

    Attributes:
        client_id: the client.
        queries: samples seen so far.
        flagged: whether an alarm has ever been raised (alarms latch).
        first_alarm: 0-based index, in this client's stream, of the query whose test raised
            the first alarm (``None`` if never); ``first_alarm + 1`` queries had been seen.
        w_history: ``(query index, W)`` for every test run.
        growing_set_size: samples in all growing sets.
        distances: ``|D|``.
    """

    client_id: Hashable
    queries: int
    flagged: bool
    first_alarm: int | None
    w_history: list[tuple[int, float]]
    growing_set_size: int
    distances: int

    @property
    def last_w(self) -> float | None:
        return self.w_history[-1][1] if self.w_history else None


class _Growing:
    """One class's growing set: a (capacity-doubling) tensor of flattened inputs."""

    def __init__(self, dim: int) -> None:
        self.data = torch.empty(8, dim, dtype=torch.float64)
        self.n = 0
        self.dists: list[float] = []  # D_{G_c}, including the initial 0
        self.threshold = 0.0

    @property
    def stored(self) -> torch.Tensor:
        return self.data[: self.n]

    def add(self, x: torch.Tensor, d: float) -> None:
        if self.n == len(self.data):
            self.data = torch.cat([self.data, torch.empty_like(self.data)])
        self.data[self.n] = x
        self.n += 1
        self.dists.append(d)

    def state_dict(self, cls: int) -> dict[str, Any]:
        """The class, the stored inputs (only the ``n`` filled rows), ``D_{G_c}`` and ``T_c``."""
        stored, dists = self.stored.clone(), list(self.dists)
        return {"cls": cls, "stored": stored, "dists": dists, "threshold": self.threshold}

    @classmethod
    def from_state(cls, owner: str, state: object, dim: int) -> tuple[int, _Growing]:
        """``(class, growing set)`` from :meth:`state_dict`, checked."""
        state = check_state_keys(owner, state, ("cls", "stored", "dists", "threshold"))
        label = state_int(owner, "cls", state["cls"])
        stored = state_tensor(owner, "stored", state["stored"], dtype=torch.float64, shape=(None, dim))
        dists = _floats(owner, "dists", state["dists"])
        if len(dists) != len(stored):
            raise InputError(
                f"{owner}: state 'dists': {len(dists)} distances for {len(stored)} stored inputs"
            )
        g = cls(dim)
        if len(stored) > len(g.data):
            g.data = torch.empty(len(stored), dim, dtype=torch.float64)
        g.data[: len(stored)] = stored
        g.n, g.dists, g.threshold = len(stored), dists, _float(owner, "threshold", state["threshold"])
        return label, g


def _float(owner: str, name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InputError(f"{owner}: state {name!r}: expected a finite number, got {value!r}")
    return float(value)


def _floats(owner: str, name: str, value: object) -> list[float]:
    if not isinstance(value, list | tuple):
        raise InputError(f"{owner}: state {name!r}: expected a list of numbers, got {type(value).__name__}")
    return [_float(owner, name, v) for v in value]


@dataclass
class _ClientState:
    """One client's running statistics; ``pending`` is transient (empty between calls)."""

    dim: int
    queries: int = 0
    flagged: bool = False
    first_alarm: int | None = None
    distances: list[float] = field(default_factory=list)  # D
    w_history: list[tuple[int, float]] = field(default_factory=list)
    growing: dict[int, _Growing] = field(default_factory=dict)
    distance_classes: list[int] = field(default_factory=list)  # the predicted class of each of D
    pending: dict[int, tuple[float, int]] = field(default_factory=dict)  # this batch's (d, class)

    _KEYS = (
        "dim", "queries", "flagged", "first_alarm", "distances", "w_history", "growing", "distance_classes",
    )  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return {
            "dim": self.dim,
            "queries": self.queries,
            "flagged": self.flagged,
            "first_alarm": self.first_alarm,
            "distances": list(self.distances),
            "w_history": list(self.w_history),
            "growing": [g.state_dict(c) for c, g in self.growing.items()],
            "distance_classes": list(self.distance_classes),
        }

    @classmethod
    def from_state(cls, owner: str, state: object) -> _ClientState:
        """A client's state from :meth:`state_dict`, checked."""
        legacy = isinstance(state, dict) and "distance_classes" not in state  # saved before it existed
        state = check_state_keys(owner, state, cls._KEYS[:-1] if legacy else cls._KEYS)
        dim = state_int(owner, "dim", state["dim"])
        queries = state_int(owner, "queries", state["queries"])
        flagged, first_alarm = state["flagged"], state["first_alarm"]
        if not isinstance(flagged, bool):
            raise InputError(f"{owner}: state 'flagged': expected a bool, got {flagged!r}")
        if first_alarm is not None:
            first_alarm = state_int(owner, "first_alarm", first_alarm)
        if flagged != (first_alarm is not None) or (first_alarm is not None and first_alarm >= queries):
            raise InputError(f"{owner}: state 'first_alarm' {first_alarm!r} contradicts flagged={flagged}")
        distances = _floats(owner, "distances", state["distances"])
        if len(distances) > queries:
            raise InputError(f"{owner}: state 'distances': {len(distances)} distances from {queries} queries")
        history = state["w_history"]
        if not isinstance(history, list | tuple) or not all(
            isinstance(h, list | tuple) and len(h) == 2 for h in history
        ):
            raise InputError(f"{owner}: state 'w_history': expected a list of (query index, W) pairs")
        w_history = [(state_int(owner, "w_history", i), _float(owner, "w_history", w)) for i, w in history]
        entries = state["growing"]
        if not isinstance(entries, list | tuple):
            raise InputError(f"{owner}: state 'growing': expected a list, got {type(entries).__name__}")
        growing: dict[int, _Growing] = {}
        for entry in entries:
            label, g = _Growing.from_state(f"{owner}: growing set", entry, dim)
            if label in growing:
                raise InputError(f"{owner}: state 'growing': class {label} appears twice")
            growing[label] = g
        if legacy:  # one unknown class for the old distances: pooled together
            distance_classes = [-1] * len(distances)
        else:
            raw = state["distance_classes"]
            if not isinstance(raw, list | tuple) or len(raw) != len(distances):
                raise InputError(f"{owner}: state 'distance_classes': expected one class per distance")
            distance_classes = [state_int(owner, "distance_classes", c) for c in raw]
        return cls(dim, queries, flagged, first_alarm, distances, w_history, growing, distance_classes)


class Prada:
    """PRADA's per-client monitor (Juuti et al., EuroS&P 2019; see the module docstring;
    faithfulness: ``docs/faithfulness.md#prada``).

    Args:
        delta: alarm when the Shapiro–Wilk ``W`` of the distance set is below ``delta``
            (the paper's MNIST value 0.95 by default).
        min_distances: test only once ``|D| >`` this (the paper: 100).
        check_every: run the test after every ``check_every``-th query (1: Algorithm 1).
        outlier_sigma: drop distances further than this many standard deviations from the
            mean before the test (the paper: 3; ``None`` keeps all).
        compare_to: ``"growing"`` (the paper): the distance of a query is to the growing
            set ``G_c``. ``"all"`` (a variant, not in the paper): to *every* earlier query
            of the same class, so every query is stored. The growing set keeps memory
            small, but it also hides searches whose probes crowd around a boundary: a
            binary-search probe rarely joins ``G_c`` (its distance is below ``T_c``), so
            later probes are measured against the distant seed and look natural. Against
            every earlier query their distances halve at each step. Measured on mnist in
            ``docs/defences.md``.
        min_class_distances: a class's distances join the tested ``D`` only once the class
            has at least this many (the authors' reference code: 10; ``0``, the default,
            is Algorithm 1: every distance at once). ``|D| > min_distances`` then applies to
            the pooled set.

    State: per client, its input size ``dim``, ``queries``, ``flagged``, ``first_alarm``,
    the distance set ``distances`` (``D``) with each distance's predicted class
    (``distance_classes``; a state saved without it loads with one unknown class for all),
    ``w_history`` and its growing sets (per class:
    the stored inputs, their distances ``D_{G_c}`` and the threshold ``T_c``). The
    arguments above are configuration, not state. :meth:`state_dict` covers every client
    (their ids must then be ``str`` or ``int``), :meth:`client_state_dict` one.

    Thread-safe: one lock guards all clients, so concurrent clients' batches are processed
    one at a time, each exactly as it would be alone.
    """

    def __init__(
        self,
        *,
        delta: float = PRADA_DELTA_MNIST,
        min_distances: int = PRADA_MIN_DISTANCES,
        check_every: int = 1,
        outlier_sigma: float | None = 3.0,
        compare_to: str = "growing",
        min_class_distances: int = 0,
    ) -> None:
        if compare_to not in ("growing", "all"):
            raise InputError(f"compare_to: expected 'growing' or 'all', got {compare_to!r}")
        if not 0 < delta <= 1:
            raise InputError(f"delta: expected a Shapiro-Wilk threshold in (0, 1], got {delta!r}")
        if isinstance(min_distances, bool) or not isinstance(min_distances, int) or min_distances < 2:
            raise InputError(f"min_distances: expected an integer >= 2, got {min_distances!r}")
        if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
            raise InputError(f"check_every: expected a positive integer, got {check_every!r}")
        if outlier_sigma is not None and not outlier_sigma > 0:
            raise InputError(f"outlier_sigma: expected a positive number or None, got {outlier_sigma!r}")
        if (
            isinstance(min_class_distances, bool)
            or not isinstance(min_class_distances, int)
            or min_class_distances < 0
        ):
            raise InputError(f"min_class_distances: expected an integer >= 0, got {min_class_distances!r}")
        self.min_class_distances = min_class_distances
        self.delta = float(delta)
        self.min_distances = min_distances
        self.check_every = check_every
        self.outlier_sigma = outlier_sigma
        self.compare_to = compare_to
        self._clients: dict[Hashable, _ClientState] = {}
        self._lock = StateLock()

    # ------------------------------------------------------------------ the public interface

    def client(self, client_id: Hashable, inner: Oracle, *, block: bool = False) -> PradaClient:
        """An oracle for ``client_id``: answers like ``inner`` and feeds this monitor."""
        return PradaClient(inner, self, client_id, block=block)

    def observe(self, client_id: Hashable, x: object, classes: object) -> bool:
        """Feed a batch of queries and the victim's predicted classes; return ``flagged``."""
        t = as_tensor(x, name="queries", dtype=torch.float64)
        c = torch.as_tensor(np.asarray(classes) if not isinstance(classes, torch.Tensor) else classes)
        if t.dim() < 2:
            raise InputError(f"queries: expected a batch (N, ...), got shape {tuple(t.shape)}")
        if c.dim() != 1 or len(c) != len(t):
            raise InputError(f"classes: expected {len(t)} class indices, got shape {tuple(c.shape)}")
        if len(t) == 0:
            return self.flagged(client_id)
        flat = t.reshape(len(t), -1)
        labels = c.long().tolist()
        with self._lock:
            state = self._clients.get(client_id)
            if state is None:
                state = self._clients[client_id] = _ClientState(dim=flat.shape[1])
            elif flat.shape[1] != state.dim:
                raise InputError(
                    f"queries: client {client_id!r} sent inputs of {state.dim} values before, "
                    f"now {flat.shape[1]}"
                )
            was_flagged = state.flagged
            for cls in sorted(set(labels)):
                rows = [i for i, v in enumerate(labels) if v == cls]
                self._process_class(state, cls, flat[rows], rows)
            self._advance(state, len(t))
            flagged, first_alarm = state.flagged, state.first_alarm
            alarm = flagged and not was_flagged
            w_alarm = next(w for i, w in state.w_history if i == first_alarm) if alarm else math.nan
        if alarm:
            logger.warning(
                "PRADA: client %r flagged at query #%d (W=%.4f < delta=%.3f)",
                client_id, first_alarm, w_alarm, self.delta,
            )  # fmt: skip
        return flagged

    def flagged(self, client_id: Hashable) -> bool:
        with self._lock:
            state = self._clients.get(client_id)
            return state is not None and state.flagged

    def report(self, client_id: Hashable) -> ClientReport:
        """The current report on ``client_id`` (an empty one for an unknown client)."""
        with self._lock:
            s = self._clients.get(client_id)
            if s is None:
                return ClientReport(client_id, 0, False, None, [], 0, 0)
            return ClientReport(
                client_id=client_id,
                queries=s.queries,
                flagged=s.flagged,
                first_alarm=s.first_alarm,
                w_history=list(s.w_history),
                growing_set_size=sum(g.n for g in s.growing.values()),
                distances=len(s.distances),
            )

    def reports(self) -> dict[Hashable, ClientReport]:
        with self._lock:
            return {cid: self.report(cid) for cid in self._clients}

    def reset(self, client_id: Hashable | None = None) -> None:
        """Forget one client (or all)."""
        with self._lock:
            if client_id is None:
                self._clients.clear()
            else:
                self._clients.pop(client_id, None)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Every client's state: ``{"clients": [{"id": client id, "state": ...}, ...]}`` in
        the order the clients first queried (see :meth:`client_state_dict`). Client ids
        must be ``str`` or ``int`` here (a saved state holds only plain values)."""
        with self._lock:
            for cid in self._clients:
                _check_id(cid)
            return {"clients": [{"id": cid, "state": s.state_dict()} for cid, s in self._clients.items()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace every client's state with ``state``'s (clients not in it are forgotten)."""
        entries = check_state_keys("Prada", state, ("clients",))["clients"]
        if not isinstance(entries, list | tuple):
            raise InputError(f"Prada: state 'clients': expected a list, got {type(entries).__name__}")
        clients: dict[Hashable, _ClientState] = {}
        for entry in entries:
            check_state_keys("Prada: client entry", entry, ("id", "state"))
            cid = _check_id(entry["id"])
            if cid in clients:
                raise InputError(f"Prada: state 'clients': client {cid!r} appears twice")
            clients[cid] = _ClientState.from_state(f"Prada: client {cid!r}", entry["state"])
        with self._lock:
            self._clients = clients

    def client_state_dict(self, client_id: Hashable) -> dict[str, Any]:
        """One client's state: ``dim``, ``queries``, ``flagged``, ``first_alarm``,
        ``distances``, ``w_history``, ``growing`` (a list of ``{"cls", "stored",
        "dists", "threshold"}``) and ``distance_classes``; ``{}`` for a client that has sent
        no query."""
        with self._lock:
            s = self._clients.get(client_id)
            return {} if s is None else s.state_dict()

    def load_client_state_dict(self, client_id: Hashable, state: dict[str, Any]) -> None:
        """Replace one client's state with a :meth:`client_state_dict` (``{}``: forget it);
        the other clients are untouched."""
        if isinstance(state, dict) and not state:
            self.reset(client_id)
            return
        client = _ClientState.from_state(f"Prada: client {client_id!r}", state)
        with self._lock:
            self._clients[client_id] = client

    # ------------------------------------------------------------------ Algorithm 1

    def _process_class(self, state: _ClientState, cls: int, x: torch.Tensor, rows: list[int]) -> None:
        """Update class ``cls``'s growing set with its samples ``x`` (stream positions ``rows``).

        Distances to the stored set come from one ``cdist``; distances to samples of this
        batch that joined the set earlier in the batch come from one within-batch ``cdist``.
        The per-sample distances are parked in ``state.pending`` for :meth:`_advance`.
        """
        g = state.growing.get(cls)
        if g is None:
            g = state.growing[cls] = _Growing(state.dim)
        to_stored = torch.cdist(x, g.stored).min(dim=1).values if g.n else None
        within = torch.cdist(x, x) if len(x) > 1 else None
        added: list[int] = []
        pending = state.pending
        every = self.compare_to == "all"
        for j in range(len(x)):
            d = math.inf if to_stored is None else float(to_stored[j])
            if within is not None and (j if every else added):
                d = min(d, float((within[j, :j] if every else within[j, added]).min()))
            if math.isinf(d):  # the class's first sample: initialisation, no distance
                g.add(x[j], 0.0)
                added.append(j)
                continue
            pending[rows[j]] = (d, cls)
            if every:  # the variant stores every query; no growing threshold
                g.add(x[j], d)
            elif d > g.threshold:
                g.add(x[j], d)
                added.append(j)
                arr = np.asarray(g.dists)
                g.threshold = max(g.threshold, float(arr.mean() - arr.std()))

    def _advance(self, state: _ClientState, n: int) -> None:
        """Append the batch's distances to ``D`` in stream order, testing after each query."""
        pending, state.pending = state.pending, {}
        counts: dict[int, int] = {}
        for c in state.distance_classes:
            counts[c] = counts.get(c, 0) + 1
        for i in range(n):
            index = state.queries
            state.queries += 1
            if i in pending:
                d, cls = pending[i]
                state.distances.append(d)
                state.distance_classes.append(cls)
                counts[cls] = counts.get(cls, 0) + 1
            pooled = self._pooled(state, counts)
            if len(pooled) > self.min_distances and state.queries % self.check_every == 0:
                w = self._shapiro(pooled)
                state.w_history.append((index, w))
                if w < self.delta and not state.flagged:
                    state.flagged, state.first_alarm = True, index

    def _pooled(self, state: _ClientState, counts: dict[int, int]) -> list[float]:
        """``D`` as tested: every distance (Algorithm 1), or with ``min_class_distances``
        only those of classes that have at least that many (the reference code's rule)."""
        m = self.min_class_distances
        if m <= 1 or all(v >= m for v in counts.values()):
            return state.distances
        return [d for d, c in zip(state.distances, state.distance_classes, strict=True) if counts[c] >= m]

    def _shapiro(self, distances: list[float]) -> float:
        d = np.asarray(distances, dtype=np.float64)
        if self.outlier_sigma is not None:
            mu, sd = d.mean(), d.std()
            d = d[np.abs(d - mu) <= self.outlier_sigma * sd] if sd > 0 else d
        if len(d) < 3 or np.ptp(d) == 0:  # a constant sample: as far from normal as it gets
            return 0.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy warns that p-values are inexact for N > 5000
            return float(stats.shapiro(d).statistic)


def _check_id(client_id: object) -> str | int:
    """A client id that a saved state can hold: a ``str`` or an ``int``."""
    if isinstance(client_id, bool) or not isinstance(client_id, str | int):
        raise InputError(
            f"Prada: client id {client_id!r} ({type(client_id).__name__}) cannot be saved in a state; "
            "use str or int client ids"
        )
    return client_id


def calibrate_delta(
    streams: Iterable[tuple[object, object]],
    *,
    min_distances: int = PRADA_MIN_DISTANCES,
    check_every: int = 1,
    outlier_sigma: float | None = 3.0,
    compare_to: str = "growing",
    min_class_distances: int = 0,
) -> float:
    """The highest ``δ`` that raises no alarm on the given benign streams: the lowest ``W``
    any of them reaches (Juuti et al. set ``δ`` per dataset so that benign streams are not
    flagged; this does it on the owner's data instead of taking the paper's constant).

    Args:
        streams: ``(queries, predicted classes)`` pairs, each one benign client's stream in
            order — e.g. the owner's training images in a few random orders, labelled by the
            victim. Calibrate on data that the false-alarm rate is *not* then measured on.
        min_distances, check_every, outlier_sigma, compare_to, min_class_distances: as for the :class:`Prada`
            that will use the threshold (they change ``W``).

    Returns:
        ``δ``; a monitor with it flags none of ``streams``. Raises :class:`InputError` when
        no stream is long enough to be tested (more than ``min_distances`` distances).
    """
    lowest = math.inf
    for i, (x, classes) in enumerate(streams):
        # delta only decides alarms; the W history is recorded for every test regardless
        monitor = Prada(delta=1e-9, min_distances=min_distances, check_every=check_every,
                        outlier_sigma=outlier_sigma, compare_to=compare_to,
                        min_class_distances=min_class_distances)  # fmt: skip
        monitor.observe(i, x, classes)
        lowest = min([lowest, *(w for _, w in monitor.report(i).w_history)])
    if math.isinf(lowest):
        raise InputError(
            f"calibrate_delta: no stream produced more than {min_distances} distances; "
            "give longer benign streams"
        )
    return lowest


class PradaClient(OracleWrapper):
    """One client's view of an oracle under PRADA: answers unchanged, fed to the monitor.

    The wrapper asks the inner oracle (charged once, on the shared ledger), takes the
    victim's predicted class as the argmax of the answer and feeds ``(query, class)`` to
    the monitor. With ``block=True``, once the client is flagged every later query raises
    :class:`ExtractionDetectedError` before reaching the inner oracle; the batch during
    which the alarm is raised is still answered (the monitor sees a query only with its
    answer).
    """

    def __init__(self, inner: Oracle, monitor: Prada, client_id: Hashable, *, block: bool = False) -> None:
        if not isinstance(inner, Oracle):
            raise InputError(f"PradaClient: expected an Oracle to wrap, got {type(inner).__name__}")
        super().__init__(inner)
        self.monitor, self.client_id, self.block = monitor, client_id, block

    def _answer(self, x: torch.Tensor) -> torch.Tensor:
        if self.block and self.monitor.flagged(self.client_id):
            report = self.monitor.report(self.client_id)
            raise ExtractionDetectedError(self.client_id, report.first_alarm or 0)
        answers = self.inner.query(x)
        self.monitor.observe(self.client_id, x, answers.argmax(dim=1))
        return answers

    @property
    def report(self) -> ClientReport:
        return self.monitor.report(self.client_id)


__all__ = ["ClientReport", "ExtractionDetectedError", "Prada", "PradaClient", "calibrate_delta"]
