"""The oracle abstraction: the black box through which, and only through which, a victim answers."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from mextract._utils import as_tensor, check_shape
from mextract.data.base import ValueRange
from mextract.oracle.ledger import Ledger
from mextract.oracle.modes import AnswerMode


class Oracle(ABC):
    """A prediction API: answers a batch ``(N, *input_shape)`` with ``(N, num_classes)``.

    Subclasses implement :meth:`_answer` only; :meth:`query` is fixed and does the input
    checks (shape, finiteness, dtype) first. Whatever the subclass — a local victim, a
    remote HTTP API, a defence wrapping another oracle — an attack sees the same four
    things: ``input_shape``, ``num_classes``, ``mode`` and ``ledger``, and ``query``.
    """

    input_shape: tuple[int, ...]
    num_classes: int
    mode: AnswerMode
    dtype: torch.dtype
    #: the answer mode's public parameters (classes revealed by ``topk``, digits kept by ``rounded``)
    k: int | None = None
    decimals: int | None = None
    #: the declared range of input values; a query outside it is refused (``None``: unchecked)
    value_range: ValueRange | None = None

    @property
    @abstractmethod
    def ledger(self) -> Ledger:
        """The ledger that counts this oracle's answered samples."""

    def query(self, x: object) -> torch.Tensor:
        """Answer a batch of inputs; raises on bad input (shape, NaN, values outside the declared
        range) or an exhausted budget."""
        t = as_tensor(x, name="query", dtype=self.dtype)
        check_shape(t, self.input_shape, name="query")
        if self.value_range is not None:
            self.value_range.check(t, "query")
        if t.shape[0] == 0:
            return torch.empty(0, self.num_classes, dtype=self.dtype)
        return self._answer(t)

    __call__ = query

    @abstractmethod
    def _answer(self, x: torch.Tensor) -> torch.Tensor:
        """Answer a validated, non-empty batch (CPU or device tensor in ``self.dtype``)."""


class OracleWrapper(Oracle):
    """An oracle built on another one (a defence, a monitor): it shares the inner ledger.

    Subclasses override :meth:`_answer`, usually calling ``self.inner.query``. Because
    the wrapper is itself an :class:`Oracle`, wrappers stack and attacks cannot tell.
    """

    def __init__(self, inner: Oracle, *, mode: AnswerMode | str | None = None) -> None:
        self.inner = inner
        self.input_shape = inner.input_shape
        self.num_classes = inner.num_classes
        self.dtype = inner.dtype
        self.value_range = inner.value_range
        self.mode = inner.mode if mode is None else AnswerMode.parse(mode)

    @property
    def ledger(self) -> Ledger:
        return self.inner.ledger

    def _answer(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.query(x)
