"""The query ledger: the one place where queries to a victim are counted and limited."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mextract.errors import BudgetExceededError, InputError


class Ledger:
    """Counts every *sample* sent to a victim, enforces budgets, and optionally logs queries.

    ``charge(n)`` is called by an oracle *before* its victim sees a batch of ``n``
    samples. If the batch would pass the hard ``budget`` or any active :meth:`cap`, it
    raises :class:`~mextract.errors.BudgetExceededError` and nothing is counted, so no
    sample of an over-budget batch ever reaches the victim.

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

    @property
    def limit(self) -> int | None:
        """The tightest absolute count currently allowed (budget and caps), or ``None``."""
        limits = [*self._caps, *([self.budget] if self.budget is not None else [])]
        return min(limits) if limits else None

    @property
    def remaining(self) -> int | None:
        limit = self.limit
        return None if limit is None else max(limit - self.count, 0)

    def charge(self, n: int) -> None:
        """Count ``n`` samples about to be answered, or raise if that breaks a limit."""
        limit = self.limit
        if limit is not None and self.count + n > limit:
            raise BudgetExceededError(n, self.count, limit)
        self.count += n
        self.calls += 1

    def refund(self, n: int) -> None:
        """Undo a charge whose batch the victim failed to answer (an exception)."""
        self.count -= n
        self.calls -= 1

    @contextlib.contextmanager
    def cap(self, n: int) -> Iterator[Ledger]:
        """Allow at most ``n`` more samples inside the block (nested caps all apply)."""
        if not isinstance(n, int) or n < 0:
            raise InputError(f"budget: expected a non-negative integer, got {n!r}")
        self._caps.append(self.count + n)
        try:
            yield self
        finally:
            self._caps.pop()

    def record(self, x: torch.Tensor, answers: torch.Tensor) -> None:
        if self.log_enabled:
            self._xs.append(x.detach().cpu())
            self._answers.append(answers.detach().cpu())

    def log(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All logged queries and answers, concatenated (empty if logging is off)."""
        if not self._xs:
            return torch.empty(0), torch.empty(0)
        return torch.cat(self._xs), torch.cat(self._answers)

    def save_log(self, path: str | Path) -> None:
        """Write the logged queries and answers to an ``.npz`` (arrays ``x`` and ``answers``)."""
        x, a = self.log()
        np.savez_compressed(path, x=x.numpy(), answers=a.numpy())

    def state_dict(self) -> dict[str, Any]:
        return {"budget": self.budget, "count": self.count, "calls": self.calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.budget, self.count, self.calls = state["budget"], state["count"], state["calls"]

    def __repr__(self) -> str:
        return f"Ledger(count={self.count}, calls={self.calls}, budget={self.budget})"
