"""Process settings that the command line owns: the device and torch's CPU threads.

The defaults come from ``benchmarks/threads.py`` (README, "Threads"). On a 2-core
machine, the demo's KD step with torch's own default (two threads, OpenMP spinning while it
waits) took 26–31 s alone and 120–230 s beside a busy process: the collapse users saw.
With passive waits (which :mod:`mextract.cli` sets) it took 32–34 s and 67–68 s; with one
thread 47–50 s and 42–65 s. Passive waits remove the collapse; what remains of the worst
case is one thread's within the run-to-run noise (up to 30% on that machine), and alone
two threads are a third faster. So the default is torch's own thread count (one per core)
with passive waits; ``--threads N`` or ``$OMP_NUM_THREADS`` choose otherwise (one thread
degraded least beside busy loops).
"""

from __future__ import annotations

import os

import torch

from mextract._utils import resolve_device
from mextract.errors import InputError

#: torch's thread count before the command line changes it (its own default: one per core)
_DEFAULT = torch.get_num_threads()


def default_threads() -> int:
    """Torch CPU threads when neither ``--threads`` nor ``$OMP_NUM_THREADS`` says otherwise:
    torch's own choice (one per core), as it was before the command line changed it."""
    return _DEFAULT


def _env_threads() -> int | None:
    raw = os.environ.get("OMP_NUM_THREADS")
    if raw is None or not raw.strip():
        return None
    try:
        n = int(raw.split(",")[0])  # OpenMP allows a list per nesting level; the first is ours
    except ValueError:
        raise InputError(f"$OMP_NUM_THREADS: expected a positive integer, got {raw!r}") from None
    if n < 1:
        raise InputError(f"$OMP_NUM_THREADS: expected a positive integer, got {raw!r}")
    return n


def configure_runtime(device: str, threads: int | None) -> str:
    """Check the device, set torch's intra-op threads, and return the line that says so.

    ``threads``: an explicit count (``--threads``), else ``$OMP_NUM_THREADS``, else
    :func:`default_threads`.
    """
    dev = resolve_device(device)
    source = "--threads"
    if threads is None:
        threads, source = _env_threads(), "OMP_NUM_THREADS"
    if threads is None:
        threads, source = default_threads(), "default; set --threads"
    torch.set_num_threads(threads)
    name = str(dev) if dev.type != "cuda" else f"{dev} ({torch.cuda.get_device_name(dev)})"
    line = f"device {name}, torch threads {threads} of {os.cpu_count()} cores ({source})"
    policy = os.environ.get("OMP_WAIT_POLICY", "")
    if policy.upper() != "PASSIVE":  # mextract.cli's choice, unless the user made another
        line += f", OMP_WAIT_POLICY={policy or 'unset'}"
    return line
