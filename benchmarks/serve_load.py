"""The prediction API with accounts under load, and after ``kill -9``: ``mextract serve --store --detect``.

    python benchmarks/serve_load.py            # about 1.5-2.5 minutes on 2 cores
    python benchmarks/serve_load.py --quick    # smaller budgets: under a minute
    python benchmarks/serve_load.py --threads 1 --keep runs/serve_load   # keep the stores and logs

One run, loopback only (127.0.0.1, free ports), with the torch thread count and the machine's
cores printed with every figure (and the load average: on a shared machine the figures move):

1. Load. An untrained, seeded mnist ``cnn`` checkpoint (inference cost does not depend on the
   weights) served by the real ``mextract serve VICTIM --store DB --detect`` in its own
   process. 32 concurrent clients (threads of this process, each with its own ``httpx``
   connection and its own account: an API key, a query budget; every other account also has
   a generous token-bucket rate limit, so that path runs too) send batches of 1 to 16 random
   images in [0, 1] as binary tensors until the server refuses their budget (403
   ``budget_exhausted``; a client refused with samples left asks ``/usage`` and sends a
   smaller batch, so each budget is spent to the last sample). Reported: requests/s,
   samples/s, p50/p99/max latency of the answered requests, throughput by quarter of the run,
   the CPU the server and the clients used. Then the SQLite file is audited
   (``Store.log_rows``): every sample a client got an answer for has its log row (count per
   account == samples received; logged requests == answered requests), no budget is overspent
   by one sample (logged <= budget, received <= budget), and every answer's
   ``X-Queries-Spent``, ``GET .../usage`` and the admin view equal the account's log count.
   While the load runs, this process writes to the same file through its own connection (an
   account created, the admin view read): SQLite's one-writer lock seen from outside. The
   server is then stopped with SIGTERM (as ``docker stop`` and systemd stop it), which should
   snapshot every account on the way out: checked.
2. Crash. The same with batches of 1 to 2 (more requests: the server snapshots an account's
   state every 100 of its requests, and the kill waits until most accounts have a snapshot,
   so that the restart loads snapshots *and* replays the log after them), 4 of the 32 clients
   probing like a boundary search so that PRADA flags them. The admin view is read
   (``GET /v2/admin/accounts``), then the server is killed with SIGKILL mid-load and restarted
   on the same store and port. Clients whose request failed keep what they received, count
   the request as *in doubt* (it may have been answered and logged before the kill), wait for
   the restart and go on. Checked: every received answer has its log row (log >= received per
   account; the surplus is at most the in-doubt samples, and reported); right after the
   restart each account's ``spent`` (``GET /v2/models/victim/usage`` with its key, and the
   admin view) equals its log count; each account's first answer after the restart carries
   ``X-Queries-Spent`` = log count (the ledger rebuilt from snapshot + replay); no budget is
   overspent; the accounts PRADA flagged before the kill are flagged at the end. Latency is
   reported before the kill, for each account's first request after the restart (it rebuilds
   the account's state) and after. Finally the server is stopped with SIGINT (Ctrl-C) and every
   account's snapshot — the state the server carried through the crash — is compared with an
   uninterrupted replay of the same log in this process: ledger and PRADA's whole per-client
   state, exactly.
3. The SQLite settings a store's connection runs with (journal mode, synchronous, busy timeout,
   WAL checkpoint interval ...), ``Store.log`` timed alone, the file sizes, bytes per logged
   sample and snapshot sizes.

Every server process is started here and killed here, in ``try``/``finally`` (Ctrl-C too); each
runs in its own session (the terminal's Ctrl-C does not reach it), and a watchdog thread in it
exits when this process disappears or after ``SERVER_LIFETIME`` seconds, whatever happens. Each
phase has a time limit (clients stop at it and the phase reports what was done). The exit
status is 1 when a check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import os
import platform
import resource
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

SHAPE = (1, 28, 28)
NUM_CLASSES = 10
MODEL = "victim"
CLIENTS = 32
PROBERS = 4
SEED = 0
#: seconds a server may take to become ready (imports, building the API)
START_TIMEOUT = 120.0
#: seconds a server process lives at most, whatever happens to the benchmark
SERVER_LIFETIME = 900.0
#: seconds per HTTP request
REQUEST_TIMEOUT = 60.0
#: the server's snapshot interval (ServedAPI's default; `mextract serve` has no option for it)
SNAPSHOT_EVERY = 100
#: the generous rate limit of every other account: queries/s and burst
RATE, BURST = 100_000.0, 64

#: run in the server process: a watchdog (exit when the benchmark is gone or the lifetime is
#: over), then the real command line, ``mextract serve ...``
_LAUNCHER = """
import os, sys, threading, time
parent, lifetime = os.getppid(), float(sys.argv.pop(1))
def _watch():
    end = time.monotonic() + lifetime
    while os.getppid() == parent and time.monotonic() < end:
        time.sleep(0.5)
    os._exit(3)
threading.Thread(target=_watch, daemon=True).start()
sys.argv[0] = "mextract"
from mextract.cli import main
main()
"""


@dataclass(frozen=True)
class Plan:
    """One phase: clients' budgets and batches, how many probe PRADA, when the server is killed."""

    name: str
    budget: int
    max_batch: int
    probers: int
    kill_at: float | None  # kill -9 once the clients received this fraction of all budgets (None: no kill)
    deadline: float  # seconds the clients may run
    #: kill -9 earlier, once this fraction of the accounts has had SNAPSHOT_EVERY + 5 requests answered
    #: (so that the restart restores snapshots and replays the log after them)
    kill_after_snapshots: float | None = None
    #: accounts whose carried state is compared with an uninterrupted replay (the first ones: the probers)
    compare: int = CLIENTS


# ============================================================================ the server


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``mextract serve VICTIM --store DB --detect`` on 127.0.0.1:PORT, in its own process and session."""

    def __init__(self, victim: Path, store: Path, port: int, threads: int, log: Path) -> None:
        self.victim, self.store, self.port, self.threads, self.log = victim, store, port, threads, log
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts: list[float] = []
        self.runtime = ""

    def start(self) -> float:
        """Start it and wait until it answers ``/v2/health/ready``; seconds that took."""
        if self.proc is not None:
            raise RuntimeError("the server is running already")
        cmd = [
            sys.executable,
            "-c",
            _LAUNCHER,
            str(SERVER_LIFETIME),
            "serve",
            str(self.victim),
            "--store",
            str(self.store),
            "--detect",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--threads",
            str(self.threads),
            "--device",
            "cpu",
        ]
        env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
        start = time.perf_counter()
        with self.log.open("ab") as out:
            out.write(f"\n--- start at {time.strftime('%H:%M:%S')}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        deadline = start + START_TIMEOUT
        with httpx.Client(timeout=2.0) as http:
            while True:
                if self.proc.poll() is not None:
                    code = self.proc.returncode
                    self.proc = None
                    raise RuntimeError(
                        f"the server exited before it was ready (status {code}):\n{self.tail()}"
                    )
                with contextlib.suppress(httpx.TransportError):
                    if http.get(f"{self.url}/v2/health/ready").status_code == 200:
                        break
                if time.perf_counter() > deadline:
                    self.kill()
                    raise RuntimeError(
                        f"the server was not ready within {START_TIMEOUT:.0f} s:\n{self.tail()}"
                    )
                time.sleep(0.05)
        took = time.perf_counter() - start
        self.starts.append(took)
        for line in self.log.read_text(errors="replace").splitlines():
            if "torch threads" in line:
                self.runtime = line.strip()
        return took

    def kill(self) -> None:
        """SIGKILL to its whole session (``kill -9``): no shutdown code runs."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)

    def cpu_seconds(self) -> float | None:
        """User + system CPU seconds the server process has used (Linux ``/proc``; ``None`` elsewhere)."""
        if self.proc is None:
            return None
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return None

    def stop(self, sig: signal.Signals = signal.SIGINT, timeout: float = 30.0) -> int | None:
        """A polite stop: ``sig`` (SIGINT is Ctrl-C; uvicorn shuts down, then ``mextract serve`` is
        meant to snapshot every account); SIGKILL if it takes longer than ``timeout``. Returns its
        exit status (``None``: it had to be killed)."""
        proc = self.proc
        if proc is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None
        self.proc = None
        return code

    def tail(self, n: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-n:]
        return ""


def _victim(folder: Path) -> Path:
    """An untrained, seeded mnist cnn checkpoint with the metadata ``mextract train-victim`` writes."""
    from mextract._utils import seeded
    from mextract.data import load_splits
    from mextract.models import create_model, save_checkpoint

    splits = load_splits("mnist", seed=SEED)
    with seeded(SEED):
        net = create_model("cnn", SHAPE, NUM_CLASSES)
    meta = {
        "architecture": "cnn",
        "input_shape": list(SHAPE),
        "value_range": splits.victim_train.declared_range.to_json(),
        "num_classes": NUM_CLASSES,
        "classes": list(splits.test.classes),
        "dataset": "mnist",
        "split": splits.meta,
        "seed": SEED,
        "data_root": None,
        "test_accuracy": None,
    }
    return save_checkpoint(folder / "victim", net, meta)


# ============================================================================ the clients


@dataclass
class Client:
    """One account's client: sends batches until its budget is refused; records everything."""

    name: str
    key: str
    budget: int
    max_batch: int
    prober: bool
    seed: int
    received: int = 0
    answered: int = 0  # requests answered (200)
    latencies: list[float] = field(default_factory=list)  # s, answered requests
    finished_at: list[float] = field(default_factory=list)  # s since the phase began, answered requests
    #: per answered request: 0 before the kill, 1 the first answer after the restart, 2 the later ones
    eras: list[int] = field(default_factory=list)
    snapshot_latencies: list[float] = field(default_factory=list)  # the requests that took a snapshot
    refused: int = 0  # 403 budget_exhausted
    refused_latencies: list[float] = field(default_factory=list)
    rate_limited: int = 0  # 429
    connect_errors: int = 0  # never sent
    in_doubt_requests: int = 0  # sent, no answer: maybe answered and logged
    in_doubt: int = 0  # their samples
    errors: list[str] = field(default_factory=list)
    spent_checked: int = 0
    spent_mismatches: list[str] = field(default_factory=list)
    done: bool = False
    waiting: bool = False  # waiting for the server to come back
    inflight: int = 0  # samples of the request on the wire (0: none)
    # the X-Queries-Spent check: the log count at the start of this server's life + received since
    restarted: bool = False
    base: int = 0
    received_since_base: int = 0
    answered_since_base: int = 0
    first_after_restart: tuple[int, int] | None = None  # (X-Queries-Spent, expected)
    probes: int = 0
    probe_base: np.ndarray | None = field(default=None, repr=False)

    def batch(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` images in [0, 1]: random ones, or (a prober) a boundary search: from a random image,
        8 queries in steps halving each time, then a new image."""
        if not self.prober:
            return rng.random((n, *SHAPE), dtype=np.float32)
        out = np.empty((n, *SHAPE), dtype=np.float32)
        for i in range(n):
            if self.probes % 8 == 0 or self.probe_base is None:
                self.probe_base = rng.random(SHAPE, dtype=np.float32)
            step = 0.1 * 0.5 ** (self.probes % 8)
            out[i] = np.clip(self.probe_base + step * (rng.random(SHAPE, dtype=np.float32) - 0.5), 0.0, 1.0)
            self.probes += 1
        return out

    def run(self, url: str, up: threading.Event, stop: threading.Event, clock0: float) -> None:
        from mextract.protocol import JSON_LENGTH_HEADER, decode_response, encode_request, error_message

        rng = np.random.default_rng(self.seed)
        infer, usage = f"{url}/v2/models/{MODEL}/infer", f"{url}/v2/models/{MODEL}/usage"
        cap: int | None = None  # what the server said is left
        http = httpx.Client(timeout=REQUEST_TIMEOUT, headers={"Authorization": f"Bearer {self.key}"})
        try:
            while not stop.is_set():
                if not up.is_set():
                    self.waiting = True
                    while not up.wait(0.05):
                        if stop.is_set():
                            return
                    self.waiting = False
                n = int(rng.integers(1, self.max_batch + 1))
                if cap is not None:
                    n = max(1, min(n, cap))  # cap 0: one more, to hear the refusal
                content, headers = encode_request(
                    self.batch(rng, n), input_name="input", output_name="output"
                )
                self.inflight = n
                start = time.perf_counter()
                try:
                    response = http.post(infer, content=content, headers=headers)
                except httpx.ConnectError:
                    self.inflight = 0
                    self.connect_errors += 1
                    up.wait(1.0)
                    continue
                except httpx.TransportError:  # sent, and no answer: it may have been answered and logged
                    self.inflight = 0
                    self.in_doubt_requests += 1
                    self.in_doubt += n
                    up.wait(1.0)
                    continue
                took = time.perf_counter() - start
                self.inflight = 0
                if response.status_code == 200:
                    out = decode_response(
                        response.content, response.headers.get(JSON_LENGTH_HEADER), "output"
                    )
                    if out.shape != (n, NUM_CLASSES) or not np.all(np.isfinite(out)):
                        self.errors.append(f"answer of shape {out.shape} for {n} samples")
                        return
                    self.received += n
                    self.answered += 1
                    self.received_since_base += n
                    self.answered_since_base += 1
                    self.latencies.append(took)
                    self.finished_at.append(time.perf_counter() - clock0)
                    self.eras.append(0 if not self.restarted else 1 if self.answered_since_base == 1 else 2)
                    if self.answered_since_base == SNAPSHOT_EVERY and not self.restarted:
                        self.snapshot_latencies.append(took)  # this request saved the account's state
                    spent = int(response.headers["x-queries-spent"])
                    expected = self.base + self.received_since_base
                    self.spent_checked += 1
                    if spent != expected:
                        self.spent_mismatches.append(f"X-Queries-Spent {spent}, log count {expected}")
                    if self.first_after_restart is None and self.restarted:
                        self.first_after_restart = (spent, expected)
                    cap = int(response.headers["x-queries-remaining"])
                elif response.status_code == 403 and _kind(response) == "budget_exhausted":
                    self.refused += 1
                    self.refused_latencies.append(took)
                    try:
                        left = http.get(usage)
                    except httpx.TransportError:  # the server was killed meanwhile: ask again later
                        up.wait(1.0)
                        continue
                    if left.status_code != 200:
                        self.errors.append(f"usage: {left.status_code} {error_message(left.content)}")
                        return
                    cap = int(left.json()["remaining"])
                    if cap == 0:
                        self.done = True
                        return
                elif response.status_code == 429:
                    self.rate_limited += 1
                    time.sleep(min(1.0, float(response.headers.get("retry-after", "1"))))
                else:
                    self.errors.append(f"{response.status_code}: {error_message(response.content)[:200]}")
                    if len(self.errors) >= 5:
                        return
        except Exception as exc:  # reported, not raised in a thread where nobody sees it
            self.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            self.inflight = 0
            http.close()


def _kind(response: httpx.Response) -> str | None:
    with contextlib.suppress(ValueError, AttributeError):
        return str(response.json().get("kind"))
    return None


def _accounts(store: Path, plan: Plan) -> list[Client]:
    """The clients' accounts (``Store.create_account``: 32 ``mextract keys create`` processes would take
    a minute of imports); the admin account is made by the command line (see ``_admin_key``)."""
    from mextract.server.store import Store

    clients = []
    with Store(store) as st:
        for i in range(CLIENTS):
            prober = i < plan.probers
            name = f"{'prober' if prober else 'client'}-{i:02d}"
            rate = (RATE, BURST) if i % 2 else (None, None)
            _, key = st.create_account(name, budget=plan.budget, rate=rate[0], burst=rate[1])
            clients.append(Client(name, key, plan.budget, plan.max_batch, prober, SEED + 1000 * i))
    return clients


def _admin_key(store: Path, cli: bool) -> tuple[str, float]:
    """An admin account's key, and the seconds its creation took: with ``cli``, made by
    ``mextract keys create admin --admin`` (a process start: seconds of imports), else by the Store."""
    start = time.perf_counter()
    if not cli:
        from mextract.server.store import Store

        with Store(store) as st:
            _, key = st.create_account("admin", admin=True)
        return key, time.perf_counter() - start
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from mextract.cli import main; main()",
            "keys",
            "create",
            "admin",
            "--store",
            str(store),
            "--admin",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"mextract keys create failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout.strip().splitlines()[-1], time.perf_counter() - start


def _admin(url: str, key: str) -> dict[str, dict[str, Any]]:
    response = httpx.get(f"{url}/v2/admin/accounts", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    response.raise_for_status()
    return {row["name"]: row for row in response.json()}


def _usage(url: str, clients: list[Client]) -> dict[str, dict[str, Any]]:
    out = {}
    with httpx.Client(timeout=30) as http:
        for c in clients:
            r = http.get(f"{url}/v2/models/{MODEL}/usage", headers={"Authorization": f"Bearer {c.key}"})
            r.raise_for_status()
            out[c.name] = r.json()
    return out


def _log_counts(store: Path) -> tuple[dict[str, int], dict[str, int]]:
    """Per account: logged samples, and logged requests (``Store.log_rows``)."""
    from mextract.server.store import Store

    with Store(store) as st:
        rows = st.log_rows()
    samples: dict[str, int] = {}
    requests: dict[str, set[str]] = {}
    for _, account, request, _ in rows:
        samples[account] = samples.get(account, 0) + 1
        requests.setdefault(account, set()).add(request)
    return samples, {a: len(r) for a, r in requests.items()}


def _snapshots(store: Path) -> dict[str, tuple[int, int]]:
    """Per account: (log position its snapshot covers, snapshot bytes)."""
    with contextlib.closing(sqlite3.connect(f"file:{store}?mode=ro", uri=True)) as db:
        rows = db.execute("SELECT account, seq, LENGTH(state) FROM snapshots").fetchall()
    return {a: (int(s), int(n)) for a, s, n in rows}


# ============================================================================ figures


def _ms(values: list[float], q: float) -> float:
    return float(1000 * np.percentile(values, q)) if values else float("nan")


def _threads_tag(threads: int, server: Server) -> str:
    return f"[torch threads {threads}, server: {server.runtime or '?'}; {os.cpu_count()} cores]"


@dataclass
class Result:
    """What a phase measured and what its audit found."""

    plan: Plan
    wall: float = 0.0
    requests: int = 0
    samples: int = 0
    latencies: list[float] = field(default_factory=list)
    refused: int = 0
    rate_limited: int = 0
    errors: list[str] = field(default_factory=list)
    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    db: Path | None = None
    starts: list[float] = field(default_factory=list)

    def check(self, what: str, ok: bool, detail: str) -> None:
        self.checks.append((what, ok, detail))
        print(f"  [{'ok' if ok else 'FAIL'}] {what}: {detail}", flush=True)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"  {text}", flush=True)


def _run_clients(
    clients: list[Client], url: str, up: threading.Event, stop: threading.Event
) -> tuple[list[threading.Thread], float]:
    clock0 = time.perf_counter()
    workers = [
        threading.Thread(target=c.run, args=(url, up, stop, clock0), name=c.name, daemon=True)
        for c in clients
    ]
    for w in workers:
        w.start()
    return workers, clock0


def _join(workers: list[threading.Thread], until: float) -> bool:
    for w in workers:
        w.join(max(0.0, until - time.perf_counter()))
    return not any(w.is_alive() for w in workers)


def _audit_load(result: Result, clients: list[Client], store: Path, in_doubt_ok: bool) -> dict[str, int]:
    """Log rows against what the clients received; budgets. Returns the log count per account."""
    logged, requests = _log_counts(store)
    lost = {c.name: c.received - logged.get(c.name, 0) for c in clients if c.received > logged.get(c.name, 0)}
    result.check(
        "no lost log rows",
        not lost,
        f"{sum(logged.values()):,} rows for {sum(c.received for c in clients):,} samples received"
        + (f"; accounts missing rows: {lost}" if lost else ""),
    )
    extra = {
        c.name: logged.get(c.name, 0) - c.received for c in clients if logged.get(c.name, 0) > c.received
    }
    if in_doubt_ok:
        beyond = {n: e for n, e in extra.items() if e > next(c.in_doubt for c in clients if c.name == n)}
        result.check(
            "log rows beyond received are in-doubt requests",
            not beyond,
            f"{sum(extra.values())} samples logged but never received, by {len(extra)} accounts "
            f"(in doubt: {sum(c.in_doubt for c in clients)} samples in "
            f"{sum(c.in_doubt_requests for c in clients)} requests)"
            + (f"; more than in doubt: {beyond}" if beyond else ""),
        )
    else:
        result.check(
            "log rows == samples received, per account",
            not extra and not lost,
            "every account" if not extra else f"extra rows: {extra}",
        )
        wrong = {
            c.name: (requests.get(c.name, 0), c.answered)
            for c in clients
            if requests.get(c.name, 0) != c.answered
        }
        result.check(
            "logged requests == answered requests",
            not wrong,
            f"{sum(requests.values()):,} requests" + (f"; differ: {wrong}" if wrong else ""),
        )
    over_log = {c.name: logged.get(c.name, 0) for c in clients if logged.get(c.name, 0) > c.budget}
    over_recv = {c.name: c.received for c in clients if c.received > c.budget}
    result.check(
        "no budget overspent (log)",
        not over_log,
        f"max logged per account {max(logged.values(), default=0)} of {clients[0].budget}"
        + (f"; over: {over_log}" if over_log else ""),
    )
    result.check(
        "no budget overspent (received)",
        not over_recv,
        f"max received per account {max(c.received for c in clients)} of {clients[0].budget}",
    )
    drained = sum(1 for c in clients if logged.get(c.name, 0) == c.budget)
    result.check(
        "every budget spent to the last sample",
        drained == len(clients),
        f"{drained}/{len(clients)} accounts logged exactly their budget, then were refused (403)",
    )
    mism = [m for c in clients for m in c.spent_mismatches]
    result.check(
        "X-Queries-Spent == log count",
        not mism,
        f"{sum(c.spent_checked for c in clients):,} answers checked"
        + (f"; {len(mism)} differ, e.g. {mism[:3]}" if mism else ""),
    )
    return logged


def _figures(result: Result, clients: list[Client], wall: float, tag: str) -> None:
    result.wall = wall
    result.requests = sum(c.answered for c in clients)
    result.samples = sum(c.received for c in clients)
    result.latencies = [t for c in clients for t in c.latencies]
    result.refused = sum(c.refused for c in clients)
    result.rate_limited = sum(c.rate_limited for c in clients)
    result.errors = [f"{c.name}: {e}" for c in clients for e in c.errors]
    lat = result.latencies
    print(
        f"  {result.requests:,} requests answered, {result.samples:,} samples in {wall:.1f} s: "
        f"{result.requests / wall:.0f} requests/s, {result.samples / wall:.0f} samples/s; latency p50 "
        f"{_ms(lat, 50):.1f} ms, p90 {_ms(lat, 90):.1f}, p99 {_ms(lat, 99):.1f}, max {_ms(lat, 100):.1f} "
        f"{tag}",
        flush=True,
    )
    refused = [t for c in clients for t in c.refused_latencies]
    print(
        f"  refused: {result.refused} budget_exhausted (p50 {_ms(refused, 50):.1f} ms), "
        f"{result.rate_limited} rate-limited (429), {len(result.errors)} other errors",
        flush=True,
    )
    for e in result.errors[:10]:
        print(f"    error: {e}", flush=True)
    # the slowest requests: when they finished, and whose
    slow = sorted(
        ((t, f, c.name) for c in clients for t, f in zip(c.latencies, c.finished_at, strict=True)),
        reverse=True,
    )[:5]
    result.note(
        "slowest answered requests: "
        + ", ".join(f"{1000 * t:.0f} ms ({n}, done at {f:.1f} s)" for t, f, n in slow)
    )
    # throughput over time: answered requests per second of the run, by quarter
    ends = sorted(f for c in clients for f in c.finished_at)
    if ends and wall > 0:
        edges = [wall * q / 4 for q in range(5)]
        rates = [sum(1 for f in ends if lo <= f < hi) / (hi - lo) for lo, hi in itertools.pairwise(edges)]
        busy = [sum(1 for c in clients if c.finished_at and c.finished_at[-1] >= lo) for lo in edges[:4]]
        result.note(
            "requests/s by quarter of the run: "
            + ", ".join(f"{r:.0f} ({b} clients active)" for r, b in zip(rates, busy, strict=True))
        )


def _cpu_note(result: Result, server: Server, server_cpu0: float | None, here0: float, wall: float) -> None:
    cpu = server.cpu_seconds()
    used = "?" if cpu is None or server_cpu0 is None else f"{cpu - server_cpu0:.1f}"
    result.note(
        f"CPU over the {wall:.1f} s: server process {used} s, this process (the {CLIENTS} client threads) "
        f"{_own_cpu() - here0:.1f} s, of {(os.cpu_count() or 1) * wall:.0f} core-s on "
        f"{os.cpu_count()} cores"
    )


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ============================================================================ phases


def phase_load(plan: Plan, victim: Path, tmp: Path, threads: int, servers: list[Server]) -> Result:
    print(
        f"\n## 1. Load: {CLIENTS} clients, budget {plan.budget} each, batches of 1-{plan.max_batch}",
        flush=True,
    )
    result = Result(plan)
    store = tmp / f"{plan.name}.db"
    result.db = store
    clients = _accounts(store, plan)
    admin, admin_s = _admin_key(store, cli=True)
    print(
        f"  accounts: {CLIENTS} with Store.create_account, the admin with `mextract keys create --admin` "
        f"({admin_s:.1f} s, a process start)",
        flush=True,
    )
    server = Server(victim, store, _free_port(), threads, tmp / f"{plan.name}-server.log")
    servers.append(server)
    up, stop = threading.Event(), threading.Event()
    up.set()
    try:
        print(f"  server ready in {server.start():.1f} s: {server.runtime}", flush=True)
        side: dict[str, Any] = {}
        cpu0, here0 = server.cpu_seconds(), _own_cpu()
        workers, clock0 = _run_clients(clients, server.url, up, stop)
        side_thread = threading.Thread(target=_side_writes, args=(store, side), daemon=True)
        time.sleep(0.5)
        side_thread.start()
        finished = _join(workers, clock0 + plan.deadline)
        wall = time.perf_counter() - clock0
        stop.set()
        side_thread.join(30)
        if not finished:
            result.note(f"TIME LIMIT: the clients were stopped after {plan.deadline:.0f} s")
        _figures(result, clients, wall, _threads_tag(threads, server))
        _cpu_note(result, server, cpu0, here0, wall)
        if "error" in side:
            result.note(f"write from another connection during the load FAILED: {side['error']}")
        elif side:
            result.note(
                f"during the load, through this process's own connection to the file: an account "
                f"created in {1000 * side['write']:.0f} ms, the admin view (Store.usage) read in "
                f"{1000 * side['read']:.0f} ms; no SQLITE_BUSY"
            )
        usage = _usage(server.url, clients)
        logged = _audit_load(result, clients, store, in_doubt_ok=False)
        wrong = {n: u["spent"] for n, u in usage.items() if u["spent"] != logged.get(n, 0)}
        result.check("GET usage spent == log count", not wrong, "every account" if not wrong else str(wrong))
        view = _admin(server.url, admin)
        wrong = {n: r["spent"] for n, r in view.items() if n in logged and r["spent"] != logged[n]}
        result.check(
            "admin view (GET /v2/admin/accounts) spent == log count",
            not wrong and all(c.name in view for c in clients),
            "every account" if not wrong else str(wrong),
        )
        before = _snapshots(store)
        code = server.stop(signal.SIGTERM)
        after = _snapshots(store)
        current = sum(1 for c in clients if after.get(c.name, (0, 0))[0] == _last_seq(store, c.name))
        result.check(
            "SIGTERM (docker stop, systemd): the server snapshots every account on the way out",
            current == len(clients),
            f"exit status {code}; accounts with a snapshot: {len(before)} before the stop, {len(after)} "
            f"after, {current} of them at the account's last log row",
        )
    finally:
        stop.set()
        up.set()
        server.kill()
    result.starts = server.starts
    _server_log_scan(result, server)
    return result


def _last_seq(store: Path, account: str) -> int | None:
    with contextlib.closing(sqlite3.connect(f"file:{store}?mode=ro", uri=True)) as db:
        row = db.execute("SELECT MAX(seq) FROM queries WHERE account = ?", (account,)).fetchone()
    return None if row is None or row[0] is None else int(row[0])


def _side_writes(store: Path, out: dict[str, Any]) -> None:
    """A write and a read through another connection to the file while the server writes."""
    from mextract.server.store import Store

    try:
        with Store(store) as st:
            start = time.perf_counter()
            st.create_account("written-during-load", budget=1)
            out["write"] = time.perf_counter() - start
            start = time.perf_counter()
            st.usage()
            out["read"] = time.perf_counter() - start
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"


def _kill_now(plan: Plan, clients: list[Client], total: int) -> bool:
    assert plan.kill_at is not None
    if sum(c.received for c in clients) >= plan.kill_at * total:
        return True
    if plan.kill_after_snapshots is None:
        return False
    past = sum(1 for c in clients if c.answered > SNAPSHOT_EVERY + 5)
    return past >= plan.kill_after_snapshots * len(clients)


def phase_crash(plan: Plan, victim: Path, tmp: Path, threads: int, servers: list[Server]) -> Result:
    assert plan.kill_at is not None
    when = f"{100 * plan.kill_at:.0f}% of all budgets received"
    if plan.kill_after_snapshots is not None:
        when = (
            f"{100 * plan.kill_after_snapshots:.0f}% of the accounts past {SNAPSHOT_EVERY + 5} answered "
            f"requests (a snapshot each), or {when}"
        )
    print(
        f"\n## 2. Crash: {CLIENTS} clients ({plan.probers} probing), budget {plan.budget} each, batches of "
        f"1-{plan.max_batch}; kill -9 at {when}",
        flush=True,
    )
    result = Result(plan)
    store = tmp / f"{plan.name}.db"
    result.db = store
    clients = _accounts(store, plan)
    admin, _ = _admin_key(store, cli=False)
    server = Server(victim, store, _free_port(), threads, tmp / f"{plan.name}-server.log")
    servers.append(server)
    up, stop = threading.Event(), threading.Event()
    up.set()
    total = CLIENTS * plan.budget
    try:
        print(f"  server ready in {server.start():.1f} s: {server.runtime}", flush=True)
        cpu0, here0 = server.cpu_seconds(), _own_cpu()
        workers, clock0 = _run_clients(clients, server.url, up, stop)
        until = clock0 + plan.deadline
        while not _kill_now(plan, clients, total) and time.perf_counter() < until:
            if not any(w.is_alive() for w in workers):
                break
            time.sleep(0.005)
        before = _admin(server.url, admin)
        inflight = sum(1 for c in clients if c.inflight)
        cpu_first = server.cpu_seconds()
        up.clear()
        server.kill()
        killed_at = time.perf_counter() - clock0
        received_at_kill = {c.name: c.received for c in clients}
        print(
            f"  killed (SIGKILL) at {killed_at:.1f} s with {sum(received_at_kill.values()):,} samples "
            f"received, {inflight} requests on the wire",
            flush=True,
        )
        snaps_at_kill = _snapshots(store)
        t = time.perf_counter()
        while not all(c.waiting or c.done or not w.is_alive() for c, w in zip(clients, workers, strict=True)):
            if time.perf_counter() - t > 10:
                result.note("not every client noticed the kill within 10 s")
                break
            time.sleep(0.01)
        logged_at_kill, _ = _log_counts(store)
        for c in clients:  # the X-Queries-Spent check goes on from the log count
            c.base, c.received_since_base, c.answered_since_base = logged_at_kill.get(c.name, 0), 0, 0
            c.restarted = True
        lost = {
            n: r - logged_at_kill.get(n, 0)
            for n, r in received_at_kill.items()
            if r > logged_at_kill.get(n, 0)
        }
        result.check(
            "at the kill: every received answer has its row",
            not lost,
            f"{sum(logged_at_kill.values()):,} rows, {sum(received_at_kill.values()):,} received"
            + (f"; missing: {lost}" if lost else ""),
        )
        covered = sum(1 for n in logged_at_kill if n in snaps_at_kill)
        replay = sum(
            logged_at_kill[n] - _rows_before(store, n, snaps_at_kill[n][0])
            for n in snaps_at_kill
            if n in logged_at_kill
        )
        unsnapped = sum(v for n, v in logged_at_kill.items() if n not in snaps_at_kill)
        result.note(
            f"at the kill: {covered}/{CLIENTS} accounts had a snapshot (every {SNAPSHOT_EVERY} "
            f"requests; {sum(n for _, n in snaps_at_kill.values()) / 2**20:.1f} MiB in all); the restart "
            f"replays {replay:,} logged samples after them"
            + (
                f", plus all {unsnapped:,} of the {CLIENTS - covered} accounts without one"
                if covered < CLIENTS
                else ""
            )
        )

        took = server.start()
        print(f"  restarted on the same store and port, ready in {took:.1f} s", flush=True)
        cpu_restart = server.cpu_seconds()
        after = _admin(server.url, admin)
        usage = _usage(server.url, clients)
        wrong = {
            n: (u["spent"], logged_at_kill.get(n, 0))
            for n, u in usage.items()
            if u["spent"] != logged_at_kill.get(n, 0)
            or u["remaining"] != plan.budget - logged_at_kill.get(n, 0)
        }
        result.check(
            "after the restart: GET usage spent == log count, remaining == budget - log",
            not wrong,
            "every account" if not wrong else str(wrong),
        )
        wrong = {
            n: (r["spent"], logged_at_kill.get(n, 0))
            for n, r in after.items()
            if n in usage and r["spent"] != logged_at_kill.get(n, 0)
        }
        result.check(
            "after the restart: admin view spent == log count",
            not wrong,
            "every account" if not wrong else str(wrong),
        )
        flagged_before = {n for n, r in before.items() if r["flagged"]}
        flagged_restart = {n for n, r in after.items() if r["flagged"]}
        alarms_restart = {n for n, r in after.items() if r["alarms"]}
        result.note(
            f"PRADA: flagged before the kill {sorted(flagged_before)}; in the admin view right after "
            f"the restart, before these accounts send anything: flagged {sorted(flagged_restart)}, "
            f"with a logged alarm {sorted(alarms_restart)}"
        )
        up.set()
        finished = _join(workers, until)
        wall = time.perf_counter() - clock0
        stop.set()
        if not finished:
            result.note(f"TIME LIMIT: the clients were stopped after {plan.deadline:.0f} s")
        _figures(result, clients, wall, _threads_tag(threads, server))
        cpu_end = server.cpu_seconds()
        if None not in (cpu0, cpu_first, cpu_restart, cpu_end):
            assert (
                cpu0 is not None and cpu_first is not None and cpu_restart is not None and cpu_end is not None
            )
            result.note(
                f"CPU: server {cpu_first - cpu0:.1f} s before the kill, {cpu_end - cpu_restart:.1f} s "
                f"after the restart; this process (the {CLIENTS} client threads) "
                f"{_own_cpu() - here0:.1f} s; {(os.cpu_count() or 1) * wall:.0f} core-s in "
                f"{wall:.1f} s on {os.cpu_count()} cores"
            )
        result.note(f"the wall time includes the kill and the restart ({took:.1f} s to ready)")
        by_era: dict[int, list[float]] = {0: [], 1: [], 2: []}
        for c in clients:
            for lat, era in zip(c.latencies, c.eras, strict=True):
                by_era[era].append(lat)
        names = {
            0: "before the kill",
            1: "each account's first answer after the restart (restores its state)",
            2: "later after the restart",
        }
        result.note(
            "latency "
            + "; ".join(
                f"{names[e]}: p50 {_ms(v, 50):.0f} ms, p99 {_ms(v, 99):.0f}, max {_ms(v, 100):.0f} ({len(v)})"
                for e, v in by_era.items()
                if v
            )
        )
        snap = [t for c in clients for t in c.snapshot_latencies]
        if snap:
            result.note(
                f"requests that saved a snapshot (each account's {SNAPSHOT_EVERY}th): p50 "
                f"{_ms(snap, 50):.0f} ms, max {_ms(snap, 100):.0f} ms ({len(snap)} of them), against "
                f"p50 {_ms(by_era[0], 50):.0f} ms before the kill"
            )
        firsts = {c.name: c.first_after_restart for c in clients if c.first_after_restart is not None}
        wrong_first = {n: f for n, f in firsts.items() if f[0] != f[1]}
        result.check(
            "first answer after the restart: X-Queries-Spent == log count (ledger rebuilt)",
            not wrong_first and len(firsts) == sum(1 for c in clients if c.answered_since_base),
            f"{len(firsts)} accounts" + (f"; differ (spent, log): {wrong_first}" if wrong_first else ""),
        )
        logged = _audit_load(result, clients, store, in_doubt_ok=True)
        end = _admin(server.url, admin)
        usage = _usage(server.url, clients)
        wrong = {
            n: (u["spent"], logged.get(n, 0)) for n, u in usage.items() if u["spent"] != logged.get(n, 0)
        }
        result.check(
            "at the end: GET usage spent (restored ledger) == log count",
            not wrong,
            "every account" if not wrong else str(wrong),
        )
        flagged_end = {n for n, r in end.items() if r["flagged"]}
        result.check(
            "PRADA: flagged before the kill => flagged after the restart",
            flagged_before <= flagged_end,
            f"before the kill {len(flagged_before)} {sorted(flagged_before)}, at the end "
            f"{len(flagged_end)} {sorted(flagged_end)}",
        )
        if flagged_before - flagged_restart:
            hidden = sorted(flagged_before - flagged_restart)
            result.note(
                f"NOTE: GET /v2/admin/accounts said flagged=false for {hidden} right after the restart "
                "(their PRADA state is restored only by their next request)"
            )
        code = server.stop(signal.SIGINT)
        result.note(f"server stopped with SIGINT (Ctrl-C): exit status {code}")
    finally:
        stop.set()
        up.set()
        server.kill()
    result.starts = server.starts
    _server_log_scan(result, server)
    _compare_replay(result, clients[: plan.compare], victim, store, threads, plan.budget)
    return result


def _rows_before(store: Path, account: str, seq: int) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{store}?mode=ro", uri=True)) as db:
        query = "SELECT COUNT(*) FROM queries WHERE account = ? AND seq <= ?"
        return int(db.execute(query, (account, seq)).fetchone()[0])


def _same(a: Any, b: Any) -> bool:
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and bool(torch.equal(a, b))
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:  # NaN
        return True
    return bool(a == b)


def _compare_replay(
    result: Result, clients: list[Client], victim: Path, store: Path, threads: int, budget: int
) -> None:
    """The state each account carried through the crash against an uninterrupted replay of its log here.

    The carried state is the account's snapshot written when the server stopped, if it covers the
    account's last log row; otherwise (the stop wrote none) what a server restarted on the store
    rebuilds (latest snapshot + replay of the log after it), and the note says so."""
    import torch

    from mextract.experiments import served_api
    from mextract.oracle import stack_state_dict
    from mextract.server.store import Store

    start = time.perf_counter()
    snaps = _snapshots(store)
    logging.getLogger("mextract.defences.detection").setLevel(logging.ERROR)  # the probers' alarms, again
    # a fresh server without a store, fed every account's logged requests in order, never stopped
    reference = served_api(victim, detect=True, device="cpu", budget=budget)
    restored = None
    assert reference.detect is not None
    sources: dict[str, int] = {"snapshot at the stop": 0, "restored from the store": 0}
    differ = []
    with Store(store) as st:
        last = {a: seq for seq, a, _, _ in st.log_rows()}
        for c in clients:
            snap = st.snapshot(c.name) if snaps.get(c.name, (None, 0))[0] == last.get(c.name) else None
            if snap is not None:
                got = snap[1]
                sources["snapshot at the stop"] += 1
            else:
                if restored is None:
                    restored = served_api(victim, detect=True, device="cpu", store=store)
                oracle = restored.oracle(c.name)  # restores the account: snapshot + replay of the log
                assert restored.detect is not None
                got = {"stack": stack_state_dict(oracle), "prada": restored.detect.client_state_dict(c.name)}
                sources["restored from the store"] += 1
            for _, batch in st.requests(c.name, 0, SHAPE, np.dtype(np.float32)):
                reference.query(c.name, torch.from_numpy(batch.copy()))
            want = {
                "stack": stack_state_dict(reference.oracle(c.name)),
                "prada": reference.detect.client_state_dict(c.name),
            }
            if not _same(got, want):
                differ.append(c.name)
    if restored is not None and restored.store is not None:
        restored.store.close()
    result.check(
        "state carried through the crash == uninterrupted replay (ledger, PRADA state)",
        not differ,
        f"{len(clients) - len(differ)}/{len(clients)} accounts identical"
        + (
            ""
            if len(clients) == CLIENTS
            else f" (the first {len(clients)} of {CLIENTS}: the probers and more)"
        )
        + (f"; differ: {differ}" if differ else "")
        + f" (compared: {', '.join(f'{k} {v}' for k, v in sources.items() if v)}; "
        f"{time.perf_counter() - start:.1f} s to replay, torch threads {threads})",
    )


def _server_log_scan(result: Result, server: Server) -> None:
    text = server.tail(10**7)
    counts = {w: text.count(w) for w in ("database is locked", "SQLITE_BUSY", "Traceback", "internal error")}
    found = {w: n for w, n in counts.items() if n}
    result.note(
        f"server log ({server.log.name}): "
        + (str(found) if found else "no 'database is locked', SQLITE_BUSY, traceback or internal error")
    )


# ============================================================================ SQLite


def sqlite_settings(store: Path) -> list[tuple[str, str]]:
    """What a Store's connection runs with (PRAGMAs are per connection: read on a Store's own)."""
    from mextract.server.store import Store

    rows = [("SQLite library", sqlite3.sqlite_version)]
    with Store(store) as st:
        db = st._db  # the store's own connection: synchronous and busy_timeout are per connection
        for pragma in (
            "journal_mode",
            "synchronous",
            "busy_timeout",
            "wal_autocheckpoint",
            "page_size",
            "locking_mode",
        ):
            value = db.execute(f"PRAGMA {pragma}").fetchone()[0]
            if pragma == "synchronous":
                value = f"{value} ({ {0: 'OFF', 1: 'NORMAL', 2: 'FULL', 3: 'EXTRA'}.get(int(value), '?') })"
            rows.append((pragma, str(value)))
    return rows


def store_log_alone(folder: Path, commits: int, batch: int) -> str:
    """``Store.log`` alone in this process (no HTTP, no model): ms per committed request of ``batch``
    samples."""
    from mextract.server.store import Store

    rng = np.random.default_rng(SEED)
    x = rng.random((batch, *SHAPE), dtype=np.float32)
    answers = rng.random((batch, NUM_CLASSES), dtype=np.float32)
    times = []
    with Store(folder / "log-alone.db") as st:
        pages = int(st._db.execute("PRAGMA wal_autocheckpoint").fetchone()[0])
        page = int(st._db.execute("PRAGMA page_size").fetchone()[0])
        for i in range(commits):
            start = time.perf_counter()
            st.log("alone", str(i), x, answers)
            times.append(time.perf_counter() - start)
    slow = sum(1 for t in times if t > 0.002)
    written = commits * batch * (x[0].nbytes + answers[0].nbytes)
    return (
        f"Store.log alone (this process, {commits} commits of {batch} samples, synchronous=FULL): p50 "
        f"{_ms(times, 50):.2f} ms, p99 {_ms(times, 99):.2f}, max {_ms(times, 100):.1f} per commit; "
        f"{commits / sum(times):,.0f} commits/s; {slow} commits over 2 ms (the WAL is checkpointed every "
        f"{pages} pages, {pages * page / 2**20:.0f} MiB: {written / 2**20:.0f} MiB of samples written)"
    )


def sizes(store: Path) -> tuple[str, int]:
    """The files (database, WAL, shared memory), the log rows, and what the log and snapshots hold."""
    parts = []
    for suffix in ("", "-wal", "-shm"):
        p = Path(f"{store}{suffix}")
        if p.exists():
            parts.append(f"{p.name} {p.stat().st_size / 2**20:.1f} MiB")
    with contextlib.closing(sqlite3.connect(f"file:{store}?mode=ro", uri=True)) as db:
        rows, payload = db.execute(
            "SELECT COUNT(*), SUM(LENGTH(input) + LENGTH(answer)) FROM queries"
        ).fetchone()
        snaps, snap_bytes = db.execute("SELECT COUNT(*), SUM(LENGTH(state)) FROM snapshots").fetchone()
    rows, payload, snaps, snap_bytes = int(rows), int(payload or 0), int(snaps), int(snap_bytes or 0)
    total = sum(Path(f"{store}{s}").stat().st_size for s in ("", "-wal") if Path(f"{store}{s}").exists())
    text = (
        f"{', '.join(parts)}; {rows:,} log rows ({total / max(rows, 1):,.0f} file bytes per row; input + "
        f"answer {payload / max(rows, 1):,.0f} bytes), {snaps} snapshots: {snap_bytes / 2**20:.1f} MiB "
        f"({snap_bytes / max(snaps, 1) / 2**10:,.0f} KiB each)"
    )
    return text, rows


# ============================================================================ main


def _machine() -> str:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {os.cpu_count()} cores"


def _load() -> str:
    with contextlib.suppress(OSError, AttributeError):
        one, five, _ = os.getloadavg()
        return f"{one:.2f} (1 min), {five:.2f} (5 min)"
    return "unknown"


def markdown(
    results: list[Result],
    header: list[str],
    sqlite_rows: list[tuple[str, str]],
    files: list[str],
    threads: int,
    server_runtime: str,
) -> str:
    lines = [
        *header,
        "",
        f"**Serving with accounts, log and PRADA** (`mextract serve --store DB --detect`; {CLIENTS} "
        f"clients; torch threads {threads} here, server: {server_runtime}; {os.cpu_count()} cores)",
        "",
        "| phase | budget × clients | batch | requests | samples | wall s | requests/s | samples/s | "
        "p50 ms | p99 ms | max ms | 403 | 429 | errors | server ready s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lat, p = r.latencies, r.plan
        lines.append(
            f"| {p.name} | {p.budget} × {CLIENTS} | 1–{p.max_batch} | {r.requests:,} | {r.samples:,} | "
            f"{r.wall:.1f} | {r.requests / r.wall:.0f} | {r.samples / r.wall:.0f} | {_ms(lat, 50):.1f} | "
            f"{_ms(lat, 99):.1f} | {_ms(lat, 100):.1f} | {r.refused} | {r.rate_limited} | "
            f"{len(r.errors)} | {' / '.join(f'{s:.1f}' for s in r.starts)} |"
        )
    lines += ["", "| phase | check | result |", "|---|---|---|"]
    for r in results:
        for what, ok, detail in r.checks:
            lines.append(f"| {r.plan.name} | {what} | {'ok' if ok else '**FAIL**'}: {detail} |")
    lines += ["", "| SQLite | |", "|---|---|", *[f"| {k} | {v} |" for k, v in sqlite_rows]]
    lines += [f"| files | {f} |" for f in files]
    lines += [""] + [f"- {r.plan.name}: {n}" for r in results for n in r.notes]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller budgets (under a minute)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads, here and in the server (default: torch's, one per core)",
    )
    p.add_argument("--keep", type=Path, default=None, help="keep the stores and server logs in this folder")
    args = p.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the command line (and so the server) sets it

    import torch

    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    if args.quick:
        plans = [Plan("load", 100, 16, 0, None, 40.0), Plan("crash", 150, 4, PROBERS, 0.75, 60.0, compare=8)]
    else:
        plans = [
            Plan("load", 400, 16, 0, None, 90.0),
            Plan("crash", 200, 2, PROBERS, 0.9, 150.0, kill_after_snapshots=0.75),
        ]
    header = [
        f"Machine: {_machine()}; Python {platform.python_version()}, torch {torch.__version__}",
        f"Runtime: torch threads {threads} of {os.cpu_count()} cores here (the clients) and in the server "
        f"(--threads {threads}); OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}",
        f"Load average at the start: {_load()}",
    ]
    print("\n".join(header), flush=True)
    start = time.perf_counter()
    servers: list[Server] = []
    results: list[Result] = []
    with contextlib.ExitStack() as stack:
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            tmp = args.keep
        else:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="serve_load-")))
        try:
            victim = _victim(tmp)
            for plan in plans:
                phase = phase_load if plan.kill_at is None else phase_crash
                results.append(phase(plan, victim, tmp, threads, servers))
            print("\n## 3. SQLite", flush=True)
            assert results[-1].db is not None
            settings = sqlite_settings(results[-1].db)
            for k, v in settings:
                print(f"  {k}: {v}", flush=True)
            alone = store_log_alone(tmp, 300 if args.quick else 1000, 8)
            settings.append(("Store.log alone", alone.split(": ", 1)[1]))
            print(f"  {alone}", flush=True)
            files = []
            for r in results:
                assert r.db is not None
                text, _ = sizes(r.db)
                files.append(f"{r.plan.name}: {text}")
                print(f"  {files[-1]}", flush=True)
        finally:
            for server in servers:  # on error and Ctrl-C too
                server.kill()
    header.append(
        f"Load average at the end: {_load()}; total {time.perf_counter() - start:.0f} s"
        f"{' (--quick)' if args.quick else ''}"
    )
    runtime = next((s.runtime for s in servers if s.runtime), "?")
    print("\n" + markdown(results, header, settings, files, threads, runtime))
    if any(not ok for r in results for _, ok, _ in r.checks):
        sys.exit(1)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # the servers were killed on the way out (main's finally)
        print("\ninterrupted: every server process this run started is stopped", file=sys.stderr)
        sys.exit(130)
