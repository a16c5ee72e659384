"""Helpers for the ``state_dict`` / ``load_state_dict`` of oracles, defences and ledgers.

A state holds only tensors and plain values (int, float, str, bool, None, lists and dicts
of them), so ``torch.save`` and ``torch.load(weights_only=True)`` round-trip it; loading
checks every field and copies it. :class:`StateLock` guards the mutable state of objects
that concurrent clients share.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

import torch

from mextract.errors import InputError


class StateLock:
    """A re-entrant lock around an object's mutable state that copies and pickles as a
    fresh, unlocked lock (a plain :class:`threading.RLock` makes ``copy.deepcopy`` and
    ``pickle`` of its owner fail). It is never part of a state dict."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.RLock()

    def __enter__(self) -> StateLock:
        self._lock.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    def __reduce__(self) -> tuple[type[StateLock], tuple[()]]:
        return StateLock, ()


def check_state_keys(owner: str, state: object, keys: Iterable[str]) -> dict[str, Any]:
    """``state`` as a dict with exactly ``keys``, or an :class:`InputError` naming ``owner``
    and the missing and unexpected keys."""
    if not isinstance(state, dict):
        raise InputError(f"{owner}: expected a state dict, got {type(state).__name__}")
    expected = list(keys)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = [f"missing keys {missing}"] if missing else []
        parts += [f"unexpected keys {unexpected}"] if unexpected else []
        wanted = f"expected keys {expected}" if expected else "it holds no state: expected {}"
        raise InputError(f"{owner}: state has {' and '.join(parts)} ({wanted})")
    return state


def state_int(owner: str, name: str, value: object) -> int:
    """A non-negative int read from a state, or an :class:`InputError`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InputError(f"{owner}: state {name!r}: expected a non-negative integer, got {value!r}")
    return value


def state_tensor(
    owner: str, name: str, value: object, *, dtype: torch.dtype, shape: tuple[int | None, ...]
) -> torch.Tensor:
    """A private CPU copy of the tensor ``value`` read from a state, checked for ``dtype``
    and ``shape`` (``None``: any size on that dimension); an :class:`InputError` otherwise."""
    if not isinstance(value, torch.Tensor):
        raise InputError(f"{owner}: state {name!r}: expected a tensor, got {type(value).__name__}")
    want = "(" + ", ".join("N" if s is None else str(s) for s in shape) + ")"
    if value.dim() != len(shape) or any(
        s is not None and s != v for s, v in zip(shape, value.shape, strict=False)
    ):
        raise InputError(f"{owner}: state {name!r}: expected shape {want}, got {tuple(value.shape)}")
    if value.dtype != dtype:
        raise InputError(f"{owner}: state {name!r}: expected dtype {dtype}, got {value.dtype}")
    return value.detach().to(device="cpu", copy=True)


def generator_state(generator: torch.Generator) -> torch.Tensor:
    """A copy of a CPU generator's state (a ``uint8`` tensor)."""
    return generator.get_state().clone()


def state_generator(owner: str, name: str, value: object) -> torch.Tensor:
    """A CPU generator state read from a state, checked by loading it into a scratch generator."""
    t = state_tensor(owner, name, value, dtype=torch.uint8, shape=(None,))
    try:
        torch.Generator().set_state(t)
    except RuntimeError as exc:
        raise InputError(f"{owner}: state {name!r}: not a CPU generator state ({exc})") from exc
    return t
