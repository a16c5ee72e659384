"""The command line's process settings: torch threads (explicit, from the environment, default)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from mextract.cli import runtime
from mextract.errors import InputError


def test_explicit_threads_win_and_are_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    line = runtime.configure_runtime("cpu", 1)
    assert torch.get_num_threads() == 1
    assert line.startswith("device cpu, torch threads 1 of ") and "cores (--threads)" in line


def test_environment_then_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 2)
    assert "torch threads 2 of" in runtime.configure_runtime("auto", None)
    assert torch.get_num_threads() == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(runtime, "_DEFAULT", 3)  # torch's own count, read when the CLI starts
    assert "torch threads 3 of 2 cores (default; set --threads)" in runtime.configure_runtime("cpu", None)
    assert torch.get_num_threads() == 3


@pytest.mark.parametrize("value", ["abc", "0", "-3"])
def test_a_bad_environment_value_is_named(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    with pytest.raises(InputError, match=r"\$OMP_NUM_THREADS: expected a positive integer"):
        runtime.configure_runtime("cpu", None)


def test_an_unavailable_device_is_named() -> None:
    with pytest.raises(InputError, match="'xla'"):
        runtime.configure_runtime("xla", 1)
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            runtime.configure_runtime("cuda", 1)


@pytest.mark.parametrize(("given", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_the_command_line_waits_passively_unless_told(given: str | None, expected: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    code = "import os, mextract.cli; print(os.environ['OMP_WAIT_POLICY'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected


def test_the_wait_policy_is_reported_only_when_not_passive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert "OMP_WAIT_POLICY" not in runtime.configure_runtime("cpu", 1)
    monkeypatch.setenv("OMP_WAIT_POLICY", "active")
    assert runtime.configure_runtime("cpu", 1).endswith(", OMP_WAIT_POLICY=active")
