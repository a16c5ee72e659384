"""Small shared helpers: devices, explicit seeding, input checks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from mextract.errors import InputError


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"`` picks CUDA when present, else the CPU; anything else is parsed."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"expected a device such as 'cpu', 'cuda' or 'auto', got {device!r}") from exc
    if dev.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"expected a device such as 'cpu', 'cuda' or 'auto', got {device!r}")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"device {str(device)!r}: MPS is not available here; use 'cpu' or 'auto'")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {str(device)!r}: CUDA is not available here; use 'cpu' or 'auto'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(
            f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    return dev


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with torch's RNG seeded to ``seed``, restoring the caller's RNG after.

    PyTorch layers draw their initial weights and dropout masks from the global generator;
    forking it keeps runs reproducible without leaking state into the caller's program.
    """
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def as_tensor(x: object, *, name: str = "x", dtype: torch.dtype | None = None) -> torch.Tensor:
    """Convert an array-like to a floating tensor, refusing non-numeric input and NaN/inf."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        try:
            arr = np.asarray(x)
        except (TypeError, ValueError) as exc:
            raise InputError(f"{name}: expected a numeric array, got {type(x).__name__}") from exc
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
            raise InputError(f"{name}: expected a numeric array, got dtype {arr.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.is_complex():
        raise InputError(f"{name}: expected real numbers, got dtype {t.dtype}")
    if not t.is_floating_point():
        t = t.to(torch.get_default_dtype())
    if dtype is not None:
        t = t.to(dtype)
    if t.numel() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise InputError(f"{name}: contains {bad} NaN or infinite value(s)")
    return t


def check_shape(x: torch.Tensor, expected: Sequence[int], *, name: str = "x") -> None:
    """Require ``x`` to be a batch ``(N, *expected)``."""
    exp = tuple(int(s) for s in expected)
    if x.dim() != len(exp) + 1 or tuple(x.shape[1:]) != exp:
        raise InputError(
            f"{name}: expected a batch of shape (N, {', '.join(map(str, exp))}), got {tuple(x.shape)}"
        )


def parse_spec(spec: str, kind: str) -> tuple[str, dict[str, object]]:
    """``"name"`` or ``"name:{json options}"`` → ``(name, options)``; ``kind`` names the
    vocabulary (``"attack"``, ``"defence"``) in error messages."""
    import json

    name, sep, rest = spec.partition(":")
    if not sep:
        return name, {}
    try:
        options = json.loads(rest)
    except json.JSONDecodeError as exc:
        raise InputError(f"{kind} spec {spec!r}: expected name:{{json options}} ({exc})") from exc
    if not isinstance(options, dict):
        raise InputError(f"{kind} spec {spec!r}: expected a JSON object of options")
    return name, options
