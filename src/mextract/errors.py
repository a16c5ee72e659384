"""Exceptions raised by mextract.

Every error a user can trigger with bad input derives from :class:`MextractError`, so a
caller (and the command line) can catch one type and show its message, which always
says what was expected and what was given.
"""

from __future__ import annotations

import difflib


class MextractError(Exception):
    """Base class of every error mextract raises on purpose."""


class InputError(MextractError, ValueError):
    """An array, tensor or argument has the wrong shape, dtype or values."""


class UnknownNameError(MextractError, KeyError):
    """A dataset, model, attack or answer-mode name that is not registered."""

    def __init__(self, kind: str, name: str, known: list[str] | tuple[str, ...]) -> None:
        self.kind, self.name, self.known = kind, name, list(known)
        close = difflib.get_close_matches(str(name), self.known, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        super().__init__(f"unknown {kind} {name!r}; {hint}expected one of: {', '.join(self.known)}")

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class DataError(MextractError):
    """A data path is missing or does not hold what it should."""


class BudgetExceededError(MextractError):
    """A batch of queries would take the ledger past its budget; none of it was answered."""

    def __init__(self, requested: int, spent: int, budget: int) -> None:
        self.requested, self.spent, self.budget = requested, spent, budget
        super().__init__(
            f"query budget exhausted: a batch of {requested} sample(s) was refused because "
            f"{spent} of {budget} queries are already spent ({budget - spent} left)"
        )
