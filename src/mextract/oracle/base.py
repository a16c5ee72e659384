"""The oracle abstraction: the black box through which, and only through which, a victim answers."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from mextract._utils import as_tensor, check_shape
from mextract.data.base import ValueRange
from mextract.errors import InputError
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
        self.mode = inner.mode if mode is None else AnswerMode.parse(mode)
        if mode is None:  # a layer that keeps the answer mode keeps its parameters (a monitor around top-k)
            self.k, self.decimals = inner.k, inner.decimals

    @property
    def ledger(self) -> Ledger:
        return self.inner.ledger

    def _answer(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.query(x)


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


__all__ = ["Oracle", "OracleWrapper", "load_stack_state_dict", "oracle_layers", "stack_state_dict"]
