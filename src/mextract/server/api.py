"""One victim served to many clients, each behind its own defence stack and ledger.

:class:`ServedAPI` is the prediction API as its owner runs it, with no HTTP in it: the
web layer (:mod:`mextract.server.app`) only decodes requests and encodes answers.

Per-client state: every client id gets, on its first query, its own view of the shared
victim (:meth:`VictimOracle.fork`: the same model, a new ledger with the per-client
budget) wrapped in a fresh stack of the served defence spec, so PRADA histories, DAWN's
and the cosine watermark's evidence, noise generators and budgets are per client, as the
papers deploy them. The owner's models that the defences use (the misinformation model,
the surrogate) are built once and shared. A client's requests are answered one at a
time (a lock per client), different clients in parallel; the PRADA monitor, shared by
all clients, keeps its own lock.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import torch

from mextract.defences.detection import Prada, PradaClient
from mextract.defences.registry import Owner, build_defence
from mextract.errors import InputError
from mextract.oracle import APIDescription, Oracle, VictimOracle, load_stack_state_dict, stack_state_dict

#: client ids are what a caller states in a header: short printable text
MAX_CLIENT_ID = 128


@dataclass
class _Tenant:
    oracle: Oracle
    base: VictimOracle
    lock: threading.Lock


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
        budget: samples each client may have answered (``None``: unlimited).
        detect: a PRADA monitor shared by all clients, outermost in every stack (it sees
            each query with the answer the client gets); ``block`` refuses a flagged
            client's later queries.

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
        block: bool = False,
    ) -> None:
        if not isinstance(victim, VictimOracle):
            raise InputError(f"victim: expected a VictimOracle, got {type(victim).__name__}")
        if not name or not all(c.isalnum() or c in "-_." for c in name):
            raise InputError(f"name: expected letters, digits, '-', '_' or '.', got {name!r}")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
            raise InputError(f"budget: expected a positive integer or None, got {budget!r}")
        self.victim, self.name, self.defence, self.budget = victim, name, defence, budget
        self.detect, self.block = detect, block
        self._owner = owner
        self._tenants: dict[str, _Tenant] = {}
        self._lock = threading.Lock()
        # one stack built now checks the spec and gives the public description
        self.description = APIDescription.of(self._stack("", victim.fork()))

    def _stack(self, client_id: Hashable, base: VictimOracle) -> Oracle:
        oracle = build_defence(self.defence, base, self._owner)
        if self.detect is not None:
            oracle = PradaClient(oracle, self.detect, client_id, block=self.block)
        return oracle

    def _tenant(self, client_id: str) -> _Tenant:
        tenant = self._tenants.get(client_id)
        if tenant is None:
            check_client_id(client_id)
            with self._lock:
                tenant = self._tenants.get(client_id)
                if tenant is None:
                    base = self.victim.fork(budget=self.budget)
                    tenant = _Tenant(self._stack(client_id, base), base, threading.Lock())
                    self._tenants[client_id] = tenant
        return tenant

    def query(self, client_id: str, x: object) -> torch.Tensor:
        """Answer ``client_id``'s batch through its own stack (checks and budget included)."""
        tenant = self._tenant(client_id)
        with tenant.lock:
            return tenant.oracle.query(x)

    def oracle(self, client_id: str) -> Oracle:
        """``client_id``'s defended oracle (the owner's handle: evidence, verification)."""
        return self._tenant(client_id).oracle

    @property
    def clients(self) -> list[str]:
        return sorted(self._tenants)

    def spent(self, client_id: str) -> int:
        tenant = self._tenants.get(client_id)
        return 0 if tenant is None else tenant.base.ledger.count

    def remaining(self, client_id: str) -> int | None:
        if self.budget is None:
            return None
        return max(self.budget - self.spent(client_id), 0)

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
            load_stack_state_dict(tenant.oracle, stack)
            tenant.base.ledger.budget = self.budget  # the budget is this API's configuration
        if self.detect is not None:
            self.detect.load_state_dict(state["prada"])
