"""One victim served to many clients, each behind its own defence stack and ledger.

:class:`ServedAPI` is the prediction API as its owner runs it, with no HTTP in it: the
web layer (:mod:`mextract.server.app`) only authenticates, decodes requests and encodes
answers.

Per-client state: every client gets, on its first query, its own view of the shared
victim (:meth:`VictimOracle.fork`: the same model, a new ledger with the client's budget)
wrapped in a fresh stack of the served defence spec, so PRADA histories, DAWN's and the
cosine watermark's evidence, noise generators and budgets are per client, as the papers
deploy them. The owner's models that the defences use (the misinformation model, the
surrogate) are built once and shared. A client's requests are answered one at a time
(a lock per client), different clients in parallel; the PRADA monitor, shared by all
clients, keeps its own lock.

With a :class:`~mextract.server.store.Store`, clients are the store's accounts (API keys,
each with its budget and rate limit), every answered request is logged — one row per
sample, committed before the answer is returned — and a client's state is rebuilt on
its first request after a restart: its latest snapshot, then the requests logged after
it replayed through its stack. Budgets, PRADA histories and watermark evidence thus
survive restarts and crashes exactly.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mextract._utils import check_shape
from mextract.defences.detection import Prada, PradaClient
from mextract.defences.pow import PowGate, Puzzle
from mextract.defences.registry import Owner, build_defence
from mextract.errors import BudgetExceededError, InputError, MextractError
from mextract.oracle import APIDescription, Oracle, VictimOracle, load_stack_state_dict, stack_state_dict
from mextract.oracle.base import check_query_values, query_tensor
from mextract.server.store import Store

#: client ids are what a caller states in a header: short printable text
MAX_CLIENT_ID = 128
#: what a PRADA alarm does to the flagged client: only logged, every later query refused,
#: or later answers reduced to the top-1 label
ALARM_ACTIONS = ("log", "block", "degrade")


class ProofOfWorkRequired(MextractError):
    """The request must come with a solution of ``puzzle`` (calibrated proof of work)."""

    def __init__(self, client_id: str, puzzle: Puzzle) -> None:
        self.puzzle = puzzle
        super().__init__(f"client {client_id!r}: proof of work required: a puzzle of {puzzle.bits} bits "
                         f"(about {2**puzzle.bits:,} hash evaluations) prices this request")  # fmt: skip


class RateLimitedError(MextractError):
    """A request over the client's rate limit; ``retry_after`` is the wait in seconds."""

    def __init__(self, client_id: str, n: int, retry_after: float) -> None:
        self.retry_after = retry_after
        super().__init__(f"client {client_id!r} is over its rate limit: {n} queries can be answered "
                         f"in {retry_after:.2f} s")  # fmt: skip


class TokenBucket:
    """A token bucket: ``rate`` queries per second, at most ``burst`` at once (one token per
    sample). Thread-safe."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = float(rate), int(burst)
        self._tokens, self._time = float(burst), time.monotonic()
        self._lock = threading.Lock()

    def take(self, client_id: str, n: int) -> None:
        """Take ``n`` tokens, or raise :class:`RateLimitedError` with the wait (taking none)."""
        if n > self.burst:
            raise InputError(f"a batch of {n} is larger than client {client_id!r}'s burst of "
                             f"{self.burst} queries: send smaller batches")  # fmt: skip
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._time) * self.rate)
            self._time = now
            if self._tokens < n:
                raise RateLimitedError(client_id, n, (n - self._tokens) / self.rate)
            self._tokens -= n


@dataclass
class _Tenant:
    oracle: Oracle
    base: VictimOracle
    lock: threading.Lock
    bucket: TokenBucket | None = None
    seq: int = 0  # the last log position this client's state includes
    since_snapshot: int = 0
    prada: PradaClient | None = field(default=None, repr=False)


def check_client_id(client_id: str) -> str:
    """A client id as a header may carry it: 1 to 128 printable ASCII characters."""
    if not isinstance(client_id, str) or not 0 < len(client_id) <= MAX_CLIENT_ID:
        raise InputError(f"client id: expected 1 to {MAX_CLIENT_ID} characters, got {client_id!r:.140}")
    if not client_id.isascii() or not client_id.isprintable():
        raise InputError(f"client id: expected printable ASCII characters, got {client_id!r:.140}")
    return client_id


class ServedAPI:
    """A prediction API: one shared victim, a defence stack and a ledger per client.

    Args:
        victim: the victim behind its oracle, in the answer mode the API serves (its own
            ledger is not used: each client gets a fork with its own).
        name: the model's name in the API's paths.
        defence: a defence spec of :mod:`mextract.defences.registry` (``"dawn+label_only"``).
        owner: what the owner has (the victim as a module, its training data), needed by
            defences that build models or standardise on the owner's data.
        budget: samples each client may have answered (``None``: unlimited); with a
            ``store``, each account's own budget applies instead.
        detect: a PRADA monitor shared by all clients, outermost in every stack (it sees
            each query with the answer the client gets).
        on_alarm: what a PRADA alarm does to the flagged client: ``"log"`` (recorded only),
            ``"block"`` (every later query refused) or ``"degrade"`` (later answers reduced
            to the top-1 label, as one-hot vectors).
        store: accounts, query log and persistent state (see the module docstring).
        snapshot_every: with a store, save a client's state after this many requests
            (and at :meth:`close`); a restart replays at most this many requests.
        pow: calibrated proof of work (:class:`~mextract.defences.pow.PowGate`): every
            request must come with the solution of a puzzle priced on the client's
            privacy cost so far; the client's privacy ledger is state like the rest.

    Example:
        >>> api = ServedAPI(VictimOracle(net, input_shape=(1, 28, 28), num_classes=10),
        ...                 defence="dawn+label_only", owner=owner, budget=10_000)
        >>> api.query("alice", x)        # alice's DAWN evidence and ledger, not bob's
    """

    def __init__(
        self,
        victim: VictimOracle,
        *,
        name: str = "victim",
        defence: str = "none",
        owner: Owner | None = None,
        budget: int | None = None,
        detect: Prada | None = None,
        on_alarm: str = "log",
        store: Store | None = None,
        snapshot_every: int = 100,
        pow: PowGate | None = None,
    ) -> None:
        if not isinstance(victim, VictimOracle):
            raise InputError(f"victim: expected a VictimOracle, got {type(victim).__name__}")
        if not name or not all(c.isalnum() or c in "-_." for c in name):
            raise InputError(f"name: expected letters, digits, '-', '_' or '.', got {name!r}")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
            raise InputError(f"budget: expected a positive integer or None, got {budget!r}")
        if on_alarm not in ALARM_ACTIONS:
            raise InputError(f"on_alarm: expected one of {', '.join(ALARM_ACTIONS)}, got {on_alarm!r}")
        if isinstance(snapshot_every, bool) or not isinstance(snapshot_every, int) or snapshot_every < 1:
            raise InputError(f"snapshot_every: expected a positive integer, got {snapshot_every!r}")
        if store is not None and budget is not None:
            raise InputError("budget: with a store, each account has its own budget")
        self.victim, self.name, self.defence, self.budget = victim, name, defence, budget
        self.detect, self.on_alarm, self.store, self.snapshot_every = detect, on_alarm, store, snapshot_every
        self.pow = pow
        self._owner = owner
        self._tenants: dict[str, _Tenant] = {}
        self._opening: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        # one stack built now checks the spec and gives the public description
        self.description = APIDescription.of(self._stack("", victim.fork()))
        if store is not None:
            store.bind(self.description.to_json(), defence)

    def _stack(self, client_id: Hashable, base: VictimOracle) -> Oracle:
        # each client's own per-client decisions (DAWN's watermark key); "" is the description's stack
        oracle = build_defence(self.defence, base, self._owner, client=str(client_id) if client_id else None)
        if self.detect is not None:
            oracle = PradaClient(oracle, self.detect, client_id, block=self.on_alarm == "block")
        return oracle

    def _tenant(self, client_id: str) -> _Tenant:
        tenant = self._tenants.get(client_id)
        if tenant is not None:
            return tenant
        check_client_id(client_id)
        with self._lock:  # one opening lock per client: restoring one does not hold up the others
            opening = self._opening.setdefault(client_id, threading.Lock())
        with opening:
            tenant = self._tenants.get(client_id)
            if tenant is None:
                tenant = self._open(client_id)
                with self._lock:
                    self._tenants[client_id] = tenant
        return tenant

    def _open(self, client_id: str) -> _Tenant:
        """A client's stack: fresh, or (with a store) its account's, as the log left it."""
        budget, bucket = self.budget, None
        if self.store is not None:
            account = self.store.account(client_id)
            budget = account.budget
            if account.rate is not None:
                bucket = TokenBucket(account.rate, account.burst or max(1, math.ceil(account.rate)))
        base = self.victim.fork(budget=budget)
        oracle = self._stack(client_id, base)
        tenant = _Tenant(oracle, base, threading.Lock(), bucket,
                         prada=oracle if isinstance(oracle, PradaClient) else None)  # fmt: skip
        if self.store is not None:
            self._restore(client_id, tenant)
        return tenant

    def _restore(self, client_id: str, tenant: _Tenant) -> None:
        """Latest snapshot, then the requests logged after it replayed through the stack (their
        answers discarded): the state the client had when the server stopped."""
        assert self.store is not None
        snap = self.store.snapshot(client_id)
        if snap is not None:
            tenant.seq, state = snap
            load_stack_state_dict(tenant.oracle, state["stack"])
            if self.detect is not None:
                self.detect.load_client_state_dict(client_id, state.get("prada", {}))
            if self.pow is not None and "pow" in state:
                self.pow.ledger(client_id).load_state_dict(state["pow"])
        budget, tenant.base.ledger.budget = tenant.base.ledger.budget, None  # they were answered
        blocking = tenant.prada is not None and tenant.prada.block
        if tenant.prada is not None:
            tenant.prada.block = False
        try:
            dtype = np.dtype(str(self.description.dtype).removeprefix("torch."))
            for seq, batch in self.store.requests(client_id, tenant.seq, self.description.input_shape, dtype):
                x = torch.from_numpy(batch.copy())
                tenant.oracle.query(x)
                if self.pow is not None:  # the privacy cost it was charged
                    self.pow.ledger(client_id).add(self.pow.cost.query_rdp(x))
                tenant.seq = seq
                tenant.since_snapshot += 1
        finally:
            tenant.base.ledger.budget = budget
            if tenant.prada is not None:
                tenant.prada.block = blocking

    def _snapshot(self, client_id: str, tenant: _Tenant) -> None:
        assert self.store is not None
        state: dict[str, Any] = {"stack": stack_state_dict(tenant.oracle)}
        if self.detect is not None:
            state["prada"] = self.detect.client_state_dict(client_id)
        if self.pow is not None:
            state["pow"] = self.pow.ledger(client_id).state_dict()
        self.store.save_snapshot(client_id, tenant.seq, state)
        tenant.since_snapshot = 0

    def query(self, client_id: str, x: object, proof: tuple[str, str] | None = None) -> torch.Tensor:
        """Answer ``client_id``'s batch through its own stack (checks, rate and budget
        included); with a store, the answered samples are logged before this returns.

        With proof of work, ``proof`` is ``(puzzle header, nonce)``: without it, this raises
        :class:`ProofOfWorkRequired` with the request's puzzle; a wrong one raises
        :class:`~mextract.defences.pow.PowError`.
        """
        tenant = self._tenant(client_id)
        # bad input (shape, NaN unless the API takes incomplete queries, value range, a row that is no
        # valid record) is refused before any puzzle, token or privacy cost is spent on it
        t = query_tensor(x, dtype=self.description.dtype, missing=self.victim.missing)
        check_shape(t, self.description.input_shape, name="query")
        check_query_values(t, self.victim.value_range, self.victim.features)
        with tenant.lock:
            if self.pow is not None and len(t):
                ledger = tenant.base.ledger
                if ledger.limit is not None and ledger.count + len(t) > ledger.limit:
                    raise BudgetExceededError(len(t), ledger.count, ledger.limit)  # before any work
                if proof is None:  # the puzzle first: asking for it takes no rate tokens
                    raise ProofOfWorkRequired(client_id, self.pow.challenge(client_id, t))
            if tenant.bucket is not None and len(t):
                tenant.bucket.take(client_id, len(t))
            if self.pow is not None and proof is not None and len(t):
                self.pow.redeem(client_id, proof[0], proof[1], t)
            flagged = self.detect is not None and self.detect.flagged(client_id)
            answers = tenant.oracle.query(t)
            now_flagged = self.detect is not None and self.detect.flagged(client_id)
            if now_flagged and self.on_alarm == "degrade":  # the top-1 class only (no leaf identifier)
                k = self.description.num_classes
                top = torch.nn.functional.one_hot(answers[:, :k].argmax(1), k).to(answers.dtype)
                answers = torch.cat([top, torch.zeros_like(answers[:, k:])], dim=1)
            if self.store is not None and len(t):
                try:
                    tenant.seq = self.store.log(client_id, uuid.uuid4().hex, t.cpu().numpy(), answers.numpy())
                except BaseException:
                    with self._lock:  # this client's memory now holds an answer the log does not
                        self._tenants.pop(client_id, None)
                    raise
                tenant.since_snapshot += 1
                if now_flagged and not flagged:
                    report = self.detect.report(client_id) if self.detect is not None else None
                    detail = "" if report is None else (
                        f"PRADA flagged query #{report.first_alarm} (W = {report.last_w:.4f}); "
                        f"action: {self.on_alarm}")  # fmt: skip
                    self.store.alarm(client_id, "prada", detail)
                if tenant.since_snapshot >= self.snapshot_every:
                    self._snapshot(client_id, tenant)
            return answers

    def close(self) -> None:
        """Snapshot every client's state into the store (nothing to do without one)."""
        if self.store is None:
            return
        for cid in self.clients:
            tenant = self._tenants[cid]
            with tenant.lock:
                if tenant.since_snapshot:
                    self._snapshot(cid, tenant)

    def oracle(self, client_id: str) -> Oracle:
        """``client_id``'s defended oracle (the owner's handle: evidence, verification)."""
        return self._tenant(client_id).oracle

    @property
    def clients(self) -> list[str]:
        return sorted(self._tenants)

    def spent(self, client_id: str) -> int:
        """Samples answered to ``client_id`` (with a store: since its account was made)."""
        tenant = self._tenants.get(client_id)
        if tenant is not None:
            return tenant.base.ledger.count
        if self.store is not None:
            return self.store.spent(client_id).get(client_id, 0)
        return 0

    def remaining(self, client_id: str) -> int | None:
        """Samples ``client_id`` may still have answered (``None``: no budget)."""
        tenant = self._tenants.get(client_id)
        if tenant is not None:
            budget = tenant.base.ledger.budget
        elif self.store is not None:
            budget = self.store.account(client_id).budget
        else:
            budget = self.budget
        return None if budget is None else max(budget - self.spent(client_id), 0)

    def burst(self, client_id: str) -> int | None:
        """The largest batch ``client_id`` may send (its rate limit's burst), or ``None``."""
        tenant = self._tenants.get(client_id)
        if tenant is not None:
            return None if tenant.bucket is None else tenant.bucket.burst
        if self.store is not None:
            account = self.store.account(client_id)
            return None if account.rate is None else account.burst
        return None

    def usage(self) -> dict[str, dict[str, Any]]:
        """Per client: samples answered, budget left, and PRADA's verdict when it runs."""
        out: dict[str, dict[str, Any]] = {}
        for cid in self.clients:
            row: dict[str, Any] = {"spent": self.spent(cid), "remaining": self.remaining(cid)}
            if self.detect is not None:
                row["flagged"] = self.detect.flagged(cid)
            out[cid] = row
        return out

    def state_dict(self) -> dict[str, Any]:
        """Every client's stack state (ledger, defence evidence) and the PRADA monitor's."""
        clients = {}
        for cid in self.clients:
            tenant = self._tenants[cid]
            with tenant.lock:
                clients[cid] = stack_state_dict(tenant.oracle)
        state: dict[str, Any] = {"clients": clients}
        if self.detect is not None:
            state["prada"] = self.detect.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved into an API built with the same configuration."""
        if not isinstance(state, dict) or not isinstance(state.get("clients"), dict):
            raise InputError("served API state: expected a dict with 'clients'")
        if ("prada" in state) != (self.detect is not None):
            raise InputError("served API state: PRADA state and this API's detector do not match")
        for cid, stack in state["clients"].items():
            tenant = self._tenant(str(cid))
            budget = tenant.base.ledger.budget  # the budget is this API's configuration
            load_stack_state_dict(tenant.oracle, stack)
            tenant.base.ledger.budget = budget
        if self.detect is not None:
            self.detect.load_state_dict(state["prada"])
