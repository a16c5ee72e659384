"""Process settings that the command line owns: the device and torch's CPU threads.

The default thread count comes from ``benchmarks/threads.py`` (README, "Threads"). On a
2-core machine, the demo's KD step with torch's own default (two threads, OpenMP spinning
while it waits) took 26–31 s alone and 120–230 s beside a busy process; with passive waits
(which :mod:`mextract.cli` sets) 32–34 s and 67–68 s; with one thread 47–50 s and 42–65 s,
the setting that degraded least. The default is therefore half the cores, leaving the rest
to whatever else runs (a second run, a test suite): one thread on 2 cores, as measured; on
larger machines the same reasoning, not a measurement. ``--threads N`` or
``$OMP_NUM_THREADS`` choose otherwise.
"""

from __future__ import annotations

import os


def default_threads() -> int:
    """Torch CPU threads when neither ``--threads`` nor ``$OMP_NUM_THREADS`` says otherwise."""
    return max(1, (os.cpu_count() or 2) // 2)


def _env_threads() -> int | None:
    raw = os.environ.get("OMP_NUM_THREADS")
    if raw is None or not raw.strip():
        return None
    try:
        n = int(raw.split(",")[0])  # OpenMP allows a list per nesting level; the first is ours
    except ValueError:
        from mextract.errors import InputError

        raise InputError(f"$OMP_NUM_THREADS: expected a positive integer, got {raw!r}") from None
    if n < 1:
        from mextract.errors import InputError

        raise InputError(f"$OMP_NUM_THREADS: expected a positive integer, got {raw!r}")
    return n


def configure_runtime(device: str, threads: int | None) -> str:
    """Check the device, set torch's intra-op threads, and return the line that says so.

    ``threads``: an explicit count (``--threads``), else ``$OMP_NUM_THREADS``, else
    :func:`default_threads`.
    """
    import torch

    from mextract._utils import resolve_device

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
