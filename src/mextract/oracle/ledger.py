"""The query ledger: the one place where queries to a victim are counted and limited."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mextract.errors import BudgetExceededError, InputError
from mextract.oracle.state import StateLock, check_state_keys, state_int


class Ledger:
    """Counts every *sample* sent to a victim, enforces budgets, and optionally logs queries.

    ``charge(n)`` is called by an oracle *before* its victim sees a batch of ``n``
    samples. If the batch would pass the hard ``budget`` or any active :meth:`cap`, it
    raises :class:`~mextract.errors.BudgetExceededError` and nothing is counted, so no
    sample of an over-budget batch ever reaches the victim.

    Thread-safe: one ledger may count the queries of concurrent clients; :meth:`charge`
    checks the limits and counts under one lock, so concurrent batches never overspend.

    State (:meth:`state_dict`): ``budget``, ``count`` and ``calls``. Not state: open
    :meth:`cap` blocks (they belong to the running code) and the query log, a debugging
    aid that is neither saved nor restored.

    Args:
        budget: hard limit on the samples this ledger will ever answer (``None``: no limit).
        log: keep a copy of every query and answer (CPU tensors) for later inspection.
    """

    def __init__(self, budget: int | None = None, *, log: bool = False) -> None:
        if budget is not None and (not isinstance(budget, int) or budget < 0):
            raise InputError(f"budget: expected a non-negative integer or None, got {budget!r}")
        self.budget = budget
        self.log_enabled = log
        self.count = 0
        self.calls = 0
        self._caps: list[int] = []  # absolute counts that open caps allow
        self._xs: list[torch.Tensor] = []
        self._answers: list[torch.Tensor] = []
        self._lock = StateLock()

    @property
    def limit(self) -> int | None:
        """The tightest absolute count currently allowed (budget and caps), or ``None``."""
        with self._lock:
            limits = [*self._caps, *([self.budget] if self.budget is not None else [])]
            return min(limits) if limits else None

    @property
    def remaining(self) -> int | None:
        with self._lock:
            limit = self.limit
            return None if limit is None else max(limit - self.count, 0)

    def charge(self, n: int) -> None:
        """Count ``n`` samples about to be answered, or raise if that breaks a limit
        (checked and counted atomically)."""
        with self._lock:
            limit = self.limit
            if limit is not None and self.count + n > limit:
                raise BudgetExceededError(n, self.count, limit)
            self.count += n
            self.calls += 1

    def refund(self, n: int) -> None:
        """Undo a charge whose batch the victim failed to answer (an exception)."""
        with self._lock:
            self.count -= n
            self.calls -= 1

    @contextlib.contextmanager
    def cap(self, n: int) -> Iterator[Ledger]:
        """Allow at most ``n`` more samples inside the block (nested caps all apply; a cap
        limits every caller of this ledger while it is open, other threads included)."""
        if not isinstance(n, int) or n < 0:
            raise InputError(f"budget: expected a non-negative integer, got {n!r}")
        with self._lock:
            mark = self.count + n
            self._caps.append(mark)
        try:
            yield self
        finally:
            with self._lock:
                self._caps.remove(mark)  # this block's cap, even if another thread's closed first

    def record(self, x: torch.Tensor, answers: torch.Tensor) -> None:
        if self.log_enabled:
            x, answers = x.detach().cpu(), answers.detach().cpu()
            with self._lock:  # queries and answers stay paired under concurrent calls
                self._xs.append(x)
                self._answers.append(answers)

    def log(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All logged queries and answers, concatenated (empty if logging is off)."""
        with self._lock:
            xs, answers = list(self._xs), list(self._answers)
        if not xs:
            return torch.empty(0), torch.empty(0)
        return torch.cat(xs), torch.cat(answers)

    def save_log(self, path: str | Path) -> None:
        """Write the logged queries and answers to an ``.npz`` (arrays ``x`` and ``answers``)."""
        x, a = self.log()
        np.savez_compressed(path, x=x.numpy(), answers=a.numpy())

    def state_dict(self) -> dict[str, Any]:
        """``{"budget", "count", "calls"}`` (the query log is not state; see the class docstring)."""
        with self._lock:
            return {"budget": self.budget, "count": self.count, "calls": self.calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s ``budget``, ``count`` and ``calls`` (the log is untouched)."""
        state = check_state_keys("Ledger", state, ("budget", "count", "calls"))
        budget = None if state["budget"] is None else state_int("Ledger", "budget", state["budget"])
        count = state_int("Ledger", "count", state["count"])
        calls = state_int("Ledger", "calls", state["calls"])
        with self._lock:
            self.budget, self.count, self.calls = budget, count, calls

    def __repr__(self) -> str:
        return f"Ledger(count={self.count}, calls={self.calls}, budget={self.budget})"
