"""What a client of a prediction API has — and all an attack ever gets.

A remote client knows the API's public description (input shape and value range, number
of classes, answer mode and its public parameters), can send queries, and may be told
how many it has spent and has left. :class:`Client` is exactly that over any
:class:`~mextract.oracle.Oracle` (a local victim, a defended one, a remote endpoint): it
exposes no inner oracle, no ledger controls (no ``refund``, no writable budget), no
defence state and no evaluator. Its own budget is checked before a batch is forwarded,
so an attack cannot overspend; the oracle's ledger still counts every sample, and the
runner checks that the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mextract._utils import check_shape
from mextract.data.base import UNBOUNDED, ValueRange
from mextract.data.tabular import TabularSchema
from mextract.errors import BudgetExceededError, InputError
from mextract.oracle.base import Oracle, query_tensor
from mextract.oracle.modes import AnswerMode
from mextract.oracle.trees import check_missing

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class APIDescription:
    """The public description of a prediction API.

    ``value_range`` is the declared range of input values (:class:`~mextract.data.ValueRange`,
    unbounded when the API declares none); ``dtype`` the precision of queries and answers;
    ``features`` a tabular API's record fields (:class:`~mextract.data.tabular.TabularSchema`);
    ``missing`` whether the API takes incomplete queries (``"stop"``: a NaN is a missing
    feature and a decision tree's path stops at the first node that tests one; ``None``: a
    NaN is refused). Answers have :attr:`answer_width` values per row (``num_classes``,
    plus the node identifier in mode ``leaf``).
    """

    input_shape: tuple[int, ...]
    num_classes: int
    mode: AnswerMode = AnswerMode.PROBS
    k: int | None = None
    decimals: int | None = None
    value_range: ValueRange = UNBOUNDED
    dtype: torch.dtype = torch.float32
    #: a tabular API's record fields (types, ranges, categories), as BigML's API lists them
    features: TabularSchema | None = None
    #: incomplete queries: ``"stop"`` (BigML's missing-feature behaviour) or ``None`` (refused)
    missing: str | None = None

    @property
    def answer_width(self) -> int:
        """Values in one answer row: ``num_classes`` (plus the node identifier in mode ``leaf``)."""
        return self.mode.width(self.num_classes)

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.input_shape)
        if not shape or min(shape) < 1:
            raise InputError(f"input_shape: expected positive sizes, got {self.input_shape}")
        object.__setattr__(self, "input_shape", shape)
        object.__setattr__(self, "mode", AnswerMode.parse(self.mode))
        k = self.num_classes
        if isinstance(k, bool) or not isinstance(k, int) or k < 2:
            raise InputError(f"num_classes: expected an integer >= 2, got {self.num_classes!r}")
        if self.mode is AnswerMode.TOPK and (not isinstance(self.k, int) or not self.k >= 1):
            raise InputError(f"answer mode 'topk' needs an integer k >= 1, got {self.k!r}")
        if self.mode is AnswerMode.ROUNDED and (not isinstance(self.decimals, int) or self.decimals < 0):
            raise InputError(f"answer mode 'rounded' needs integer decimals >= 0, got {self.decimals!r}")
        if self.features is not None and self.features.width != int(np.prod(shape)):
            raise InputError(
                f"features: the schema has {self.features.width} columns, the input shape {shape} "
                f"holds {int(np.prod(shape))} values"
            )
        if self.dtype not in _DTYPES.values():
            raise InputError(f"dtype: expected torch.float32 or torch.float64, got {self.dtype}")
        check_missing(self.missing)

    @classmethod
    def of(cls, oracle: Oracle) -> APIDescription:
        """What ``oracle`` tells its clients (the answer mode's parameters from the outermost
        layer that sets them, e.g. a top-k defence around a logits victim)."""
        return cls(
            input_shape=tuple(oracle.input_shape),
            num_classes=int(oracle.num_classes),
            mode=oracle.mode,
            k=oracle.k if oracle.mode is AnswerMode.TOPK else None,
            decimals=oracle.decimals if oracle.mode is AnswerMode.ROUNDED else None,
            value_range=oracle.value_range or UNBOUNDED,
            dtype=oracle.dtype,
            features=oracle.features,
            missing=oracle.missing,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "mode": self.mode.value,
            "k": self.k,
            "decimals": self.decimals,
            "value_range": self.value_range.to_json(),
            "dtype": str(self.dtype).removeprefix("torch."),
            "features": None if self.features is None else self.features.to_json(),
            "missing": self.missing,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> APIDescription:
        try:
            shape = tuple(int(s) for s in data["input_shape"])
            return cls(
                input_shape=shape,
                num_classes=int(data["num_classes"]),
                mode=AnswerMode.parse(data.get("mode", "probs")),
                k=data.get("k"),
                decimals=data.get("decimals"),
                value_range=ValueRange.from_json(data.get("value_range"), shape),
                dtype=_DTYPES[str(data.get("dtype", "float32"))],
                features=None if data.get("features") is None else TabularSchema.from_json(data["features"]),
                missing=data.get("missing"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"API description: malformed ({exc!r})") from exc


class Client:
    """A client's view of a prediction API: ``query``, ``description``, ``spent``, ``remaining``.

    Args:
        oracle: the API (held in a closure, not as an attribute: nothing but ``query``
            reaches it).
        budget: the most samples this client may have answered (``None``: only the API's
            own quota, if any, applies). A batch that would pass it is refused before the
            API sees any of it.
    """

    __slots__ = ("_answer", "_api_remaining", "_budget", "_spent", "description")

    def __init__(self, oracle: Oracle, budget: int | None = None) -> None:
        if not isinstance(oracle, Oracle):
            raise InputError(f"oracle: expected an mextract Oracle, got {type(oracle).__name__}")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 0):
            raise InputError(f"budget: expected a non-negative integer or None, got {budget!r}")
        self.description = APIDescription.of(oracle)
        self._budget = budget
        self._spent = 0
        self._answer = oracle.query
        self._api_remaining = lambda: oracle.ledger.remaining

    # the description's fields, read-only, under the names attacks use
    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.description.input_shape

    @property
    def num_classes(self) -> int:
        return self.description.num_classes

    @property
    def mode(self) -> AnswerMode:
        return self.description.mode

    @property
    def dtype(self) -> torch.dtype:
        return self.description.dtype

    @property
    def value_range(self) -> ValueRange:
        return self.description.value_range

    @property
    def spent(self) -> int:
        """Samples this client has had answered."""
        return self._spent

    @property
    def remaining(self) -> int | None:
        """Samples this client may still have answered (``None``: no limit known)."""
        limits = [self._budget - self._spent] if self._budget is not None else []
        api = self._api_remaining()
        if api is not None:
            limits.append(api)
        return min(limits) if limits else None

    def query(self, x: object) -> torch.Tensor:
        """Answer a batch ``(N, *input_shape)``; refused whole if it would pass the budget."""
        t = query_tensor(x, dtype=self.description.dtype, missing=self.description.missing)
        check_shape(t, self.description.input_shape, name="query")
        n = int(t.shape[0])
        if self._budget is not None and self._spent + n > self._budget:
            raise BudgetExceededError(n, self._spent, self._budget)
        answers = self._answer(t)
        self._spent += n
        return answers

    __call__ = query

    def __repr__(self) -> str:
        return f"Client(spent={self._spent}, budget={self._budget}, {self.description})"
