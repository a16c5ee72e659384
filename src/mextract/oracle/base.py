"""The oracle abstraction: the black box through which, and only through which, a victim answers."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch

from mextract._utils import as_tensor, check_shape
from mextract.data.base import ValueRange
from mextract.data.tabular import TabularSchema
from mextract.errors import DataError, InputError
from mextract.oracle.ledger import Ledger
from mextract.oracle.modes import AnswerMode
from mextract.oracle.state import check_state_keys


class Oracle(ABC):
    """A prediction API: answers a batch ``(N, *input_shape)`` with ``(N, num_classes)``.

    Subclasses implement :meth:`_answer` only; :meth:`query` is fixed and does the input
    checks (shape, finiteness, dtype) first. Whatever the subclass — a local victim, a
    remote HTTP API, a defence wrapping another oracle — an attack sees the same four
    things: ``input_shape``, ``num_classes``, ``mode`` and ``ledger``, and ``query``.

    State (PyTorch style): :meth:`state_dict` returns what a layer has accumulated from
    the queries it answered (a noise generator's position, a recorded watermark set) and
    :meth:`load_state_dict` restores it. Configuration — keys, options, models, the inner
    oracle — is *not* state: a state is loaded into an oracle built with the same spec.
    A state holds only CPU tensors, ``int``/``float``/``str``/``bool``/``None`` and
    lists, tuples and dicts of them, so ``torch.save`` and ``torch.load(weights_only=True)``
    round-trip it; both methods copy, so no tensor is shared with the oracle. Each method
    covers one layer; :func:`stack_state_dict` and :func:`load_stack_state_dict` cover a
    stack of wrappers. The ledger has its own ``state_dict``; it is in a layer's state
    only where the layer that owns it (the base oracle) puts it there.
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
    #: a tabular API's record fields (:class:`~mextract.data.tabular.TabularSchema`); a query
    #: whose categorical block is not one-hot or whose ordinal code is no level is refused
    features: TabularSchema | None = None
    #: incomplete queries: ``None`` refuses a NaN; ``"stop"`` (decision trees, BigML's
    #: behaviour) reads a NaN as a missing feature, and the path stops at the first node that
    #: tests one (a categorical feature is missing when its whole one-hot block is NaN)
    missing: str | None = None

    @property
    def answer_width(self) -> int:
        """Values in one answer row: ``num_classes`` (plus the node identifier in mode ``leaf``)."""
        return self.mode.width(self.num_classes)

    @property
    @abstractmethod
    def ledger(self) -> Ledger:
        """The ledger that counts this oracle's answered samples."""

    def query(self, x: object) -> torch.Tensor:
        """Answer a batch of inputs; raises on bad input (shape, NaN — unless the API takes
        incomplete queries, see ``missing`` —, values outside the declared range) or an
        exhausted budget."""
        t = query_tensor(x, dtype=self.dtype, missing=self.missing)
        check_shape(t, self.input_shape, name="query")
        check_query_values(t, self.value_range, self.features)
        if t.shape[0] == 0:
            return torch.empty(0, self.answer_width, dtype=self.dtype)
        return self._answer(t)

    __call__ = query

    @abstractmethod
    def _answer(self, x: torch.Tensor) -> torch.Tensor:
        """Answer a validated, non-empty batch (CPU or device tensor in ``self.dtype``)."""

    def state_dict(self) -> dict[str, Any]:
        """This layer's mutable state (a copy); ``{}`` for a stateless layer (the default)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` taken from a layer built with the same spec.

        The default, for a stateless layer, accepts only an empty dict."""
        check_state_keys(type(self).__name__, state, ())


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
        self.features = inner.features
        self.missing = inner.missing
        self.mode = inner.mode if mode is None else AnswerMode.parse(mode)
        if mode is None:  # a layer that keeps the answer mode keeps its parameters (a monitor around top-k)
            self.k, self.decimals = inner.k, inner.decimals

    @property
    def ledger(self) -> Ledger:
        return self.inner.ledger

    def _answer(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.query(x)


def query_tensor(x: object, *, dtype: torch.dtype, missing: str | None = None) -> torch.Tensor:
    """A query batch as a tensor of ``dtype``; NaN (a missing feature) is kept only when the API
    takes incomplete queries (``missing`` set), infinities never."""
    if missing is None:
        return as_tensor(x, name="query", dtype=dtype)
    if isinstance(x, torch.Tensor):
        nan = torch.isnan(x) if x.is_floating_point() else torch.zeros(x.shape, dtype=torch.bool)
        t = as_tensor(torch.where(nan, torch.zeros((), dtype=x.dtype), x), name="query", dtype=dtype)
    else:
        try:
            arr = np.asarray(x)
        except (TypeError, ValueError) as exc:
            raise InputError(f"query: expected a numeric array, got {type(x).__name__}") from exc
        nan_np = np.isnan(arr) if np.issubdtype(arr.dtype, np.floating) else np.zeros(arr.shape, dtype=bool)
        t = as_tensor(np.where(nan_np, 0, arr) if nan_np.any() else arr, name="query", dtype=dtype)
        nan = torch.from_numpy(np.ascontiguousarray(nan_np))
    return t.masked_fill(nan.to(t.device), float("nan")) if bool(nan.any()) else t


def check_query_values(
    t: torch.Tensor, value_range: ValueRange | None, features: TabularSchema | None
) -> None:
    """Refuse values outside the declared range and rows that are no valid record; NaN entries
    (missing features, see :func:`query_tensor`) are not checked, except that a categorical
    feature is missing only as a whole one-hot block."""
    nan = torch.isnan(t)
    has_nan = bool(nan.any())
    if value_range is not None:
        value_range.check(t[~nan] if has_nan else t, "query")
    if features is None:
        return
    flat = t.reshape(len(t), -1)
    if has_nan:
        flat = flat.clone()
        gaps = nan.reshape(len(t), -1)
        for i, f in enumerate(features.features):
            cols = features.columns(i)
            block = gaps[:, cols]
            if f.kind == "categorical":
                partial = block.any(1) & ~block.all(1)
                if bool(partial.any()):
                    row = int(torch.nonzero(partial)[0, 0])
                    raise DataError(
                        f"query: feature {f.name!r} is categorical ({f.width} one-hot columns); a missing "
                        f"category is a whole block of NaN, row {row} has {int(block[row].sum())} "
                        f"of {f.width}"
                    )
                fill = torch.zeros(f.width, dtype=flat.dtype)
                fill[0] = 1.0
                flat[:, cols] = torch.where(block.all(1, keepdim=True), fill, flat[:, cols])
            else:
                flat[:, cols] = flat[:, cols].nan_to_num(0.0)
    features.check(flat, "query")


def oracle_layers(oracle: Oracle) -> list[Oracle]:
    """The layers of a stack, outermost first: each :class:`OracleWrapper`'s ``inner`` in turn,
    down to (and including) the base oracle."""
    layers = [oracle]
    while isinstance(layers[-1], OracleWrapper):
        layers.append(layers[-1].inner)
    return layers


def stack_state_dict(oracle: Oracle) -> dict[str, Any]:
    """The state of every layer of a stack, outermost first:
    ``{"layers": [{"type": class name, "state": layer.state_dict()}, ...]}``.

    Configuration is not included (see :class:`Oracle`): load it with
    :func:`load_stack_state_dict` into a stack built from the same spec. Each layer's
    state is a consistent snapshot; take the stack's between queries for the whole stack
    to be one."""
    return {
        "layers": [
            {"type": type(layer).__name__, "state": layer.state_dict()} for layer in oracle_layers(oracle)
        ]
    }


def load_stack_state_dict(oracle: Oracle, state: dict[str, Any]) -> None:
    """Load a :func:`stack_state_dict` into a stack with the same layers (same classes, same
    order; an :class:`InputError` names the mismatch). All or nothing: if one layer refuses
    its state, the layers loaded before it are restored."""
    layers = oracle_layers(oracle)
    entries = check_state_keys("stack", state, ("layers",))["layers"]
    if not isinstance(entries, list | tuple):
        raise InputError(f"stack: state 'layers': expected a list, got {type(entries).__name__}")
    for i, entry in enumerate(entries):
        check_state_keys(f"stack: layer {i}", entry, ("type", "state"))
        if not isinstance(entry["type"], str):
            raise InputError(f"stack: layer {i}: expected a class name, got {entry['type']!r}")
    names = [str(entry["type"]) for entry in entries]
    ours = [type(layer).__name__ for layer in layers]
    theirs, here = ", ".join(names), ", ".join(ours)
    if len(names) != len(ours):
        raise InputError(f"state for {len(names)} layers ({theirs}), this stack has {len(ours)} ({here})")
    if names != ours:
        i = next(i for i, (a, b) in enumerate(zip(names, ours, strict=True)) if a != b)
        raise InputError(
            f"state for layers ({theirs}) does not match this stack ({here}): "
            f"layer {i} is {names[i]} in the state, {ours[i]} here"
        )
    backups = [layer.state_dict() for layer in layers]
    try:
        for layer, entry in zip(layers, entries, strict=True):
            layer.load_state_dict(entry["state"])
    except BaseException:
        for layer, backup in zip(layers, backups, strict=True):
            layer.load_state_dict(backup)
        raise


__all__ = [
    "Oracle",
    "OracleWrapper",
    "check_query_values",
    "load_stack_state_dict",
    "oracle_layers",
    "query_tensor",
    "stack_state_dict",
]
