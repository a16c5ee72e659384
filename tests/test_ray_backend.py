"""The Ray backend: one local instance on 127.0.0.1 for the module (Ray starts slowly).

The cell functions below are top-level, as ray_map asks; the workers cannot import this test
module by name, so the fixture has Ray pickle it by value.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from mextract.errors import InputError, MextractError, UnknownNameError
from mextract.experiments.ray_backend import RAY_MISSING, local_ray, ray_map


def train_cell(seed: int) -> dict[str, Any]:
    """A tiny deterministic cell: a 2-layer net trained a few steps from its seed."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(128, 16, generator=g), torch.randn(128, 1, generator=g)
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for _ in range(25):
        opt.zero_grad()
        loss = nn.functional.mse_loss(net(x), y)
        loss.backward()
        opt.step()
    checksum = sum(float(p.detach().double().abs().sum()) for p in net.parameters())
    return {"seed": seed, "loss": loss.item(), "checksum": checksum, "threads": torch.get_num_threads()}


def environment(_: int) -> dict[str, Any]:
    return {"omp": os.environ.get("OMP_NUM_THREADS"), "threads": torch.get_num_threads(), "pid": os.getpid()}


def fail_once(item: tuple[str, int]) -> int:
    """Fails the first time it sees an item (a marker file remembers), then succeeds."""
    marker, value = Path(item[0]), item[1]
    if not marker.exists():
        marker.touch()
        raise RuntimeError(f"first attempt at {value} fails")
    return value * 10


def fail_on_two(item: int) -> int:
    if item == 2:
        raise ValueError(f"item {item} always fails")
    return item + 100


def unknown_name(item: int) -> int:
    raise UnknownNameError("attack", f"knockof{item}", ["knockoff0", "jbda"])  # __init__ is not (message)


def crash_on_one(item: int) -> int:
    if item == 1:
        os._exit(3)  # the worker process dies: a system failure, not an exception
    return item


def _listening(pids: set[int]) -> list[tuple[str, int, str]]:
    psutil = pytest.importorskip("psutil")
    names = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            names[pid] = psutil.Process(pid).name()
    return [
        (c.laddr.ip, c.laddr.port, names.get(c.pid, "?"))
        for c in psutil.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.pid in pids
    ]


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)  # a dual-stack socket bound to ::ffff:127.0.0.1
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


# these two run first, before the module starts Ray
def test_arguments_are_checked() -> None:
    pytest.importorskip("ray")
    for kwargs in ({"threads": 0}, {"retries": -1}, {"num_cpus": 0}, {"address": " "}):
        with pytest.raises(InputError):
            ray_map(environment, [0], **kwargs)
    assert ray_map(environment, []) == []  # nothing to run: no Ray started


def test_without_ray_the_error_says_which_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if not installed
    for call in (lambda: ray_map(environment, [0]), lambda: local_ray().__enter__()):
        with pytest.raises(MextractError) as err:
            call()
        assert isinstance(err.value, InputError)
        assert str(err.value) == RAY_MISSING
        assert "pip install 'mextract[ray]'" in str(err.value)


@pytest.fixture(scope="module")
def ray_instance() -> Iterator[dict[str, Any]]:
    ray = pytest.importorskip("ray")
    psutil = pytest.importorskip("psutil")
    me = os.getpid()
    before = {port for _, port, _ in _listening({me})}  # the test process's own, if any
    temp = tempfile.mkdtemp(prefix="mxray", dir="/tmp")  # short: Ray's socket paths are limited
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        with local_ray(num_cpus=2, temp_dir=temp):
            yield {"ray": ray, "psutil": psutil, "temp": temp, "before": before}
        assert not ray.is_initialized()
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        shutil.rmtree(temp, ignore_errors=True)


def test_results_equal_in_process_calls_and_arrive_incrementally(ray_instance: dict[str, Any]) -> None:
    seeds = [0, 1, 2, 3]
    seen: list[int] = []
    results = ray_map(train_cell, seeds, threads=1, on_result=lambda i, r: seen.append(i))
    torch.set_num_threads(1)  # the conftest fixture restores it
    assert results == [train_cell(s) for s in seeds]  # bit for bit, input order
    assert sorted(seen) == [0, 1, 2, 3]
    assert [r["seed"] for r in results if isinstance(r, dict)] == seeds
    assert ray_instance["ray"].is_initialized()  # ray_map used the fixture's instance, left it open
    # threads pinned in the worker, OMP_NUM_THREADS set by the runtime env
    env = ray_map(environment, [0, 1], threads=1)
    assert all(isinstance(e, dict) and e["omp"] == "1" and e["threads"] == 1 for e in env)
    assert all(isinstance(e, dict) and e["pid"] != os.getpid() for e in env)


def test_every_listening_socket_is_on_loopback(ray_instance: dict[str, Any]) -> None:
    psutil, temp = ray_instance["psutil"], ray_instance["temp"]
    snapshot: list[tuple[str, int, str]] = []

    def look(i: int, _: Any) -> None:  # while the tasks' workers are alive
        if snapshot:
            return
        me = psutil.Process()
        pids = {me.pid} | {p.pid for p in me.children(recursive=True)}
        for p in psutil.process_iter(["pid", "cmdline"]):  # anything of this session, even reparented
            if temp in " ".join(p.info["cmdline"] or []):
                pids.add(p.pid)
        snapshot.extend(s for s in _listening(pids) if s[1] not in ray_instance["before"])

    ray_map(environment, [0, 1, 2], on_result=look)
    names = {name for _, _, name in snapshot}
    assert {"gcs_server", "raylet"} <= names, snapshot  # the check saw Ray's servers
    assert len(snapshot) >= 4, snapshot
    outside = [s for s in snapshot if not _loopback(s[0])]
    assert not outside, f"Ray listens beyond loopback: {outside} (all: {snapshot})"
    nodes = ray_instance["ray"].nodes()
    assert {n["NodeManagerAddress"] for n in nodes} == {"127.0.0.1"}


def test_a_task_that_fails_once_succeeds_on_retry(ray_instance: dict[str, Any], tmp_path: Path) -> None:
    items = [(str(tmp_path / f"m{i}"), i) for i in range(3)]
    assert ray_map(fail_once, items, retries=1) == [0, 10, 20]
    fresh = [(str(tmp_path / f"n{i}"), i) for i in range(2)]
    without = ray_map(fail_once, fresh, retries=0)
    assert all(isinstance(r, RuntimeError) and "first attempt" in str(r) for r in without)


def test_an_item_that_always_fails_comes_back_as_its_exception(ray_instance: dict[str, Any]) -> None:
    ok: dict[int, Any] = {}
    errors: dict[int, BaseException] = {}
    results = ray_map(
        fail_on_two, [0, 1, 2, 3], retries=1, on_result=ok.__setitem__, on_error=errors.__setitem__
    )
    assert results[:2] == [100, 101] and results[3] == 103
    assert isinstance(results[2], ValueError) and "item 2 always fails" in str(results[2])
    assert ok == {0: 100, 1: 101, 3: 103}
    assert list(errors) == [2] and errors[2] is results[2]


def test_an_exception_with_its_own_init_keeps_its_type_and_fields(ray_instance: dict[str, Any]) -> None:
    (err,) = ray_map(unknown_name, [0], retries=0)
    assert type(err) is UnknownNameError  # not Ray's UnserializableException
    assert (err.kind, err.name, err.known) == ("attack", "knockof0", ["knockoff0", "jbda"])
    assert str(err).startswith("unknown attack 'knockof0'; did you mean 'knockoff0'?")
    assert any(
        "Ray task" in note and "unknown_name" in note for note in err.__notes__
    )  # the remote traceback


def test_a_dead_worker_fails_its_item_only(ray_instance: dict[str, Any]) -> None:
    results = ray_map(crash_on_one, [0, 1, 2], retries=0)
    assert results[0] == 0 and results[2] == 2
    assert isinstance(results[1], ray_instance["ray"].exceptions.RayError)
