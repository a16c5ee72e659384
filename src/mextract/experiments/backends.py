"""Run a plan: skip finished cells, run the rest where the backend says, keep every record.

* ``local`` (default): ``jobs=1`` runs cells one after another in this process; ``jobs>1``
  in that many worker processes (spawned, each with ``threads`` torch threads: on a small
  machine one thread per worker is the fast choice, ``docs`` measure why).
* ``ray``: on a Ray cluster (``address``), or a local Ray instance bound to 127.0.0.1
  (:mod:`~mextract.experiments.ray_backend`; the ``[ray]`` extra).

Both follow one contract: a cell whose record exists with the same key is skipped; a cell
that fails is retried ``retries`` times, then reported while the others go on; each record
is written by the worker that ran the cell, atomically, as soon as it is done, so a run
killed midway loses at most the cells in flight. With threads pinned, a cell gives the same
metrics on every backend (wall times, timestamps and host excepted): every random choice in
a cell comes from its seed.

Victims run first (every other cell needs its victim's weights digest), then the rest.

``time_limit`` makes a run stop cleanly before a deadline, for short loans of a machine: a
cell starts only while the time left exceeds the longest cell of its kind finished so far
in this run (no cell is cut short: a record is whole or absent), and the cells left are
listed in the result; a rerun in the same folder starts where this one stopped.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mextract.attacks.base import Callback
from mextract.errors import InputError, MextractError
from mextract.experiments.cells import digest_of, finished, run_cell
from mextract.experiments.plan import CellSpec, Plan
from mextract.experiments.records import Record

logger = logging.getLogger(__name__)

Backend = Literal["local", "ray"]


@dataclass
class PlanResult:
    """What a run of a plan left: every record of the plan (reused or new), and the failures."""

    records: list[Record]
    ran: int = 0
    reused: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (cell, error)
    wall_s: float = 0.0
    left: list[str] = field(default_factory=list)  # cells not started before the time limit


class _Gate:
    """Whether a cell may still start before the deadline: the time left must exceed the
    longest cell of its kind finished so far (nothing is known before the first one)."""

    def __init__(self, time_limit: float | None, kind_of: Callable[[int], str]) -> None:
        self.deadline = None if time_limit is None else time.monotonic() + time_limit
        self.kind_of = kind_of
        self.longest: dict[str, float] = {}
        self.started: dict[int, float] = {}

    def start(self, i: int) -> bool:
        now = time.monotonic()
        if self.deadline is not None and now + self.longest.get(self.kind_of(i), 0.0) >= self.deadline:
            return False
        self.started[i] = now
        return True

    def done(self, i: int) -> None:
        t0 = self.started.pop(i, None)
        if t0 is not None:
            kind = self.kind_of(i)
            self.longest[kind] = max(self.longest.get(kind, 0.0), time.monotonic() - t0)


def _work(item: tuple[str, str, str, str | None]) -> dict[str, Any]:
    """One cell in a worker: ``(spec JSON, run folder, victim digest, device)`` → the record as
    JSON-ready data. A top-level function, so that process pools and Ray can ship it."""
    spec_json, out, digest, device = item
    spec = CellSpec.model_validate_json(spec_json)
    return run_cell(spec, out, victim_digest=digest, device=device).model_dump()


def _init_worker(threads: int) -> None:
    import torch

    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


Item = tuple[str, str, str, str | None]  # (spec JSON, run folder, victim digest, device)
#: called with a finished item's id and record data; returns the items that may now run
FollowUp = Callable[[int, dict[str, Any]], list[tuple[int, Item]]]
OnError = Callable[[int, BaseException], None]
OnLeft = Callable[[int], None]


def _serial(
    initial: list[tuple[int, Item]],
    retries: int,
    on_result: FollowUp,
    on_error: OnError,
    callback: Callback | None,
    gate: _Gate,
    on_left: OnLeft,
) -> None:
    queue = list(initial)
    while queue:
        i, item = queue.pop(0)
        if not gate.start(i):
            on_left(i)
            continue
        for attempt in range(retries + 1):
            try:
                spec = CellSpec.model_validate_json(item[0])
                data = run_cell(
                    spec, item[1], victim_digest=item[2], device=item[3], callback=callback
                ).model_dump()
            except MextractError as exc:  # the user's problem: retrying will not help
                on_error(i, exc)
                break
            except Exception as exc:
                logger.warning("cell %d failed (attempt %d of %d): %r", i, attempt + 1, retries + 1, exc)
                if attempt == retries:
                    on_error(i, exc)
                continue
            gate.done(i)
            queue += on_result(i, data)
            break


def _processes(
    initial: list[tuple[int, Item]],
    jobs: int,
    threads: int,
    retries: int,
    on_result: FollowUp,
    on_error: OnError,
    gate: _Gate,
    on_left: OnLeft,
) -> None:
    """Worker processes; a cell's follow-ups (a victim's cells) start as soon as it is done.
    At most ``jobs`` cells are submitted at a time, so that each starts when a worker is free
    (the time limit is checked then)."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait

    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(
        max_workers=jobs, mp_context=ctx, initializer=_init_worker, initargs=(threads,)
    ) as pool:
        pending: dict[Future[dict[str, Any]], tuple[int, Item]] = {}
        attempts: dict[int, int] = {}
        backlog = list(initial)

        def submit(i: int, item: Item) -> None:
            pending[pool.submit(_work, item)] = (i, item)

        def fill() -> None:
            while backlog and len(pending) < jobs:
                i, item = backlog.pop(0)
                if i in attempts or gate.start(i):  # a retry goes on regardless
                    submit(i, item)
                else:
                    on_left(i)

        fill()
        while pending:
            finished_now, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for fut in finished_now:
                i, item = pending.pop(fut)
                try:
                    data = fut.result()
                except MextractError as exc:
                    on_error(i, exc)
                    continue
                except Exception as exc:
                    attempts[i] = attempts.get(i, 0) + 1
                    if attempts[i] > retries:
                        on_error(i, exc)
                    else:
                        logger.warning("cell %d failed (attempt %d): %r; retrying", i, attempts[i], exc)
                        backlog.insert(0, (i, item))
                    continue
                gate.done(i)
                backlog.extend(on_result(i, data))
            fill()


def _ray(
    initial: list[tuple[int, Item]],
    address: str | None,
    threads: int,
    retries: int,
    on_result: FollowUp,
    on_error: OnError,
    gate: _Gate,
    on_left: OnLeft,
) -> None:
    """Ray, in waves: the victims, then every cell they release (a cluster runs the cells of
    all victims together). The time limit is checked as each wave starts."""
    from mextract.experiments.ray_backend import local_ray, ray_map

    def wave(cells: list[tuple[int, Item]]) -> list[tuple[int, Item]]:
        kept = []
        for i, item in cells:
            if gate.start(i):
                kept.append((i, item))
            else:
                on_left(i)
        cells = kept
        ids = [i for i, _ in cells]
        follow: list[tuple[int, Item]] = []

        def done(j: int, data: dict[str, Any]) -> None:
            gate.done(ids[j])
            follow.extend(on_result(ids[j], data))

        def failed(j: int, exc: BaseException) -> None:
            on_error(ids[j], exc)

        ray_map(_work, [item for _, item in cells], address=address, retries=retries, threads=threads,
                on_result=done, on_error=failed)  # fmt: skip
        return follow

    def waves() -> None:
        cells = initial
        while cells:
            cells = wave(cells)

    import sys

    ray = sys.modules.get("ray")
    if address is None and not (ray is not None and ray.is_initialized()):
        with local_ray():  # one local instance (127.0.0.1 only) for every wave
            waves()
    else:  # a cluster, or the connection this process already has
        waves()


def run_plan(
    plan: Plan,
    out: str | Path,
    *,
    backend: Backend = "local",
    jobs: int = 1,
    threads: int = 1,
    address: str | None = None,
    retries: int = 1,
    device: str | None = None,
    callback: Callback | None = None,
    resume: bool = True,
    time_limit: float | None = None,
) -> PlanResult:
    """Run every cell of ``plan`` that has no record yet in ``out``; return all its records.

    ``time_limit`` (seconds): start no cell that would likely end after it (see the module's
    docstring); the cells not started are ``PlanResult.left``.

    ``threads``: torch threads per cell, on every backend (``jobs=1`` sets them in this
    process for the run, and restores them after), so that every backend computes the same.

    ``callback`` receives ``{"stage": "plan", "done", "total", "info"}`` as cells finish
    (and, with ``jobs=1`` on the local backend, each cell's own progress events).
    ``resume=False`` recomputes every cell.
    """
    if backend not in ("local", "ray"):
        raise InputError(f"backend: expected 'local' or 'ray', got {backend!r}")
    if jobs < 1 or threads < 1 or retries < 0:
        raise InputError(
            f"expected jobs >= 1, threads >= 1 and retries >= 0, got {jobs}, {threads} and {retries}"
        )
    if time_limit is not None and not time_limit > 0:
        raise InputError(f"time_limit: expected a positive number of seconds, got {time_limit!r}")
    out = Path(out)
    start = time.perf_counter()
    result = PlanResult(records=[])
    work = plan.work()
    got: dict[int, Record] = {}
    dependents: dict[str, list[int]] = {}
    for i, c in enumerate(work):
        if c.kind != "victim":
            dependents.setdefault(c.victim.key(), []).append(i)
    done = 0

    def tick(info: str) -> None:
        nonlocal done
        done += 1
        if callback is not None:
            callback({"stage": "plan", "done": done, "total": len(work), "info": info})

    def release(i: int, record: Record) -> list[tuple[int, Item]]:
        """Keep a finished cell's record; a victim releases its cells (those not done yet)."""
        got[i] = record
        if work[i].kind != "victim":
            return []
        digest = str(record.config["victim_digest"])
        todo = []
        for j in dependents.get(work[i].victim.key(), []):
            old = finished(out, work[j], digest) if resume else None
            if old is not None:
                got[j] = old
                result.reused += 1
                tick(f"reused: {work[j].label()}")
            else:
                todo.append((j, (work[j].model_dump_json(), str(out), digest, device)))
        return todo

    def on_result(i: int, data: dict[str, Any]) -> list[tuple[int, Item]]:
        result.ran += 1
        tick(work[i].label())
        return release(i, Record.model_validate(data))

    def on_error(i: int, exc: BaseException) -> None:
        result.failed.append((work[i].label(), f"{type(exc).__name__}: {exc}"))
        tick(f"FAILED: {work[i].label()}")
        if work[i].kind == "victim":
            for j in dependents.get(work[i].victim.key(), []):
                result.failed.append((work[j].label(), "its victim failed"))
                tick(f"FAILED: {work[j].label()}")

    def on_left(i: int) -> None:
        result.left.append(work[i].label())
        if work[i].kind == "victim":
            result.left += [work[j].label() for j in dependents.get(work[i].victim.key(), [])]

    gate = _Gate(time_limit, lambda i: work[i].kind)
    initial: list[tuple[int, Item]] = []
    for i, c in enumerate(work):
        if c.kind != "victim":
            continue
        old = _finished_victim(out, c) if resume else None
        if old is None:
            initial.append((i, (c.model_dump_json(), str(out), "", device)))
        else:
            result.reused += 1
            tick(f"reused: {c.label()}")
            initial += release(i, old)
    if backend == "ray":
        if initial:
            _ray(initial, address, threads, retries, on_result, on_error, gate, on_left)
    elif jobs == 1:
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(threads)  # the same threads as a worker's, so the same numbers
        try:
            _serial(initial, retries, on_result, on_error, callback, gate, on_left)
        finally:
            torch.set_num_threads(before)
    elif initial:
        _processes(initial, jobs, threads, retries, on_result, on_error, gate, on_left)
    result.records = [got[i] for i in sorted(got)]
    result.wall_s = time.perf_counter() - start
    return result


def _finished_victim(out: Path, spec: CellSpec) -> Record | None:
    rec = finished(out, spec, "")
    if rec is None:
        return None
    try:
        ok = digest_of(out, spec.victim) == rec.config.get("victim_digest")
    except MextractError:
        return None
    return rec if ok else None


def plan_record(plan: Plan, estimated_s: float) -> Record:
    """The plan itself, for its report: size, estimate, what it leaves out."""
    return Record(
        kind="plan",
        name=plan.name,
        seed=0,
        config={"cells": [c.model_dump() for c in plan.cells]},
        metrics={"cells": len(plan.work()), "estimated_s": estimated_s, "left_out": plan.left_out},
    )


def failures_message(result: PlanResult) -> str:
    lines = [f"{len(result.failed)} cell(s) failed (rerun to retry them; finished cells are kept):"]
    lines += [f"  {cell}: {err}" for cell, err in result.failed]
    return "\n".join(lines)


__all__ = ["Backend", "PlanResult", "failures_message", "plan_record", "run_plan"]
