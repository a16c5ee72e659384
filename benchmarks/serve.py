"""What does serving cost? The prediction API (Open Inference Protocol over HTTP) against ``model(x)``.

    python benchmarks/serve.py              # about 2-3.5 minutes on 2 cores
    python benchmarks/serve.py --quick      # fewer batches, no adaptive_misinformation: under a minute
    python benchmarks/serve.py --threads 1  # another torch thread count (raw and server alike)
    python benchmarks/serve.py --store-dir /var/lib/x  # the query log on another file system

Measures, in one run, with the torch thread count and the machine's cores printed with
every figure:

1. Throughput at batch 64 of ``resnet18`` at CIFAR-10 shape (3, 32, 32), 10 classes: raw
   ``model(x)`` under ``torch.inference_mode()`` against the same model served by
   :class:`~mextract.server.ServedAPI` + :func:`~mextract.server.create_app` and queried
   with :class:`~mextract.oracle.RemoteOracle`, with binary tensors and with JSON tensors,
   and served with accounts and the query log on (binary tensors, an API key); one client,
   and two concurrent clients (without accounts); and where a served request's time goes
   (each piece of the request path timed on its own, the log's pieces included, and an
   HTTP round trip of a request that the server refuses after decoding it).
2. The latency a request adds on the mnist ``cnn`` (1, 28, 28): batch 1 and batch 64,
   served without and with accounts and the query log, against raw.
3. Every defence's overhead: served ms per batch of 64 on the mnist ``cnn`` per defence
   spec, and with PRADA, against no defence.

Accounts and the query log. A served API with a :class:`~mextract.server.store.Store`
authenticates every request (``Authorization: Bearer <key>``: a SHA-256 and a SELECT) and
appends one row per answered sample (the input's and the answer's bytes: about 786 KB of
input per resnet18 batch of 64, 200 KB per cnn batch) in one transaction committed before
the answer leaves: SQLite in WAL mode with ``synchronous=FULL``, so at least one fsync per
request. Its store is a fresh SQLite file in a temporary folder (``--store-dir``; the
folder's file system and the median fsync there are printed: the log costs what that disk's
fsync costs, and on tmpfs fsync costs nothing), with one account created before its server
starts (as ``mextract keys create`` before ``mextract serve --store``). It runs in a server
process of its own, built like the server without accounts but for the store, and the
benchmark queries it with ``RemoteOracle(url, api_key=key)``, in the same interleaved rounds
as raw and the server without accounts. At the end the stores' sizes are printed with the
rows they logged, checked against the samples the benchmark was answered.

Fairness. The models are untrained and seeded: inference cost does not depend on the
weights (the same architecture, shapes and operations), and the server builds the same
seeded model, so its answers are checked against ``softmax(model(x))`` before timing.
Each server runs in its own process (``running()`` of :mod:`mextract.server.app` on
127.0.0.1, port 0: a free port), so the client's Python work does not take the server's
GIL; the benchmark starts it, waits for it within a time limit, and kills it at the end,
on error too (it also exits when its stdin closes or its own time limit passes). Torch
threads are set to the same count in the benchmark and in every server process, and
``OMP_WAIT_POLICY`` (``PASSIVE`` by default, as the ``mextract`` command line sets it) is
the same for both. So are glibc's malloc thresholds (``--malloc``): left to themselves they
move with what a process did before, and with them the page faults of every forward pass
(the benchmark prints the effect on the mnist cnn in a fresh process; a third of its
forward time at batch 64 on the 2-core machine this was written on); pinned, the benchmark's
process and the servers' run the same allocator. Every path is warmed up first (the first
request of a client builds its defence stack). Raw and served batches are interleaved,
round by round in a rotating order, so that a change in the machine's load hits every
path alike; each figure is the median over a fixed number of batches (30, ``--quick``:
fewer), answers/s = 64 / median.
On a machine shared with other work the figures still move: the load average is printed
before and after.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch and mextract load after OMP_WAIT_POLICY is set (main)
    import torch
    from torch import nn

    from mextract.oracle import RemoteOracle

HERE = Path(__file__).resolve()
BATCH = 64
NUM_CLASSES = 10
SEED = 0
CIFAR: tuple[str, tuple[int, ...]] = ("resnet18", (3, 32, 32))
MNIST: tuple[str, tuple[int, ...]] = ("cnn", (1, 28, 28))
#: images in the owner's training set (the defences that need the owner's data)
OWNER_IMAGES = 200
#: seconds a server may take to start (imports, building the defences' models)
START_TIMEOUT = 180.0
#: seconds a server process lives at most, whatever happens to the benchmark
SERVER_LIFETIME = 1800.0
#: glibc's mallopt parameters, and the values every process of the benchmark sets (_pin_malloc)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's ceiling for the threshold on 64-bit
TRIM_THRESHOLD = 64 * 2**20
#: the one account of a server with accounts and the query log (created before the server starts)
ACCOUNT = "bench"


@dataclass(frozen=True)
class Served:
    """One served configuration: a label, a defence spec, PRADA or not."""

    label: str
    spec: str
    prada: bool = False


DEFENCES: list[Served] = [
    Served("none", "none"),
    Served('topk:{"k": 3}', 'topk:{"k": 3}'),
    Served('rounding:{"decimals": 2}', 'rounding:{"decimals": 2}'),
    Served("label_only", "label_only"),
    Served("reverse_sigmoid", "reverse_sigmoid"),
    Served('dp_noise:{"epsilon": 1.0}', 'dp_noise:{"epsilon": 1.0}'),
    Served("honey", "honey"),
    Served("dawn", "dawn"),
    Served("dawn+label_only", "dawn+label_only"),
    Served("mad", "mad"),
    Served("cosine", "cosine"),
    Served("adaptive_misinformation", "adaptive_misinformation"),
    Served("none + PRADA", "none", prada=True),
]
#: left out of ``--quick``: its misinformation model is trained when the server starts
SLOW_TO_BUILD = {"adaptive_misinformation"}


# ============================================================================ shared helpers


def _pin_malloc(mode: str) -> str:
    """Fix glibc's malloc thresholds in this process (``pinned``), or leave them (``default``).

    By default glibc serves a large block with a fresh ``mmap`` and returns freed memory to the
    system, raising both thresholds as it sees larger blocks freed: how many page faults a forward
    pass takes then depends on what the process did before (a process that once freed a 30 MB
    tensor runs the mnist cnn at batch 64 a third faster than a fresh one). Raw and served must
    not differ by that, so every process of the benchmark fixes the same thresholds.
    """
    if mode == "default":
        return "glibc's default malloc thresholds (they move with each process's history)"
    try:
        libc = ctypes.CDLL(None)
        ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
        ok = ok and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    except (OSError, AttributeError):
        return "the platform's allocator (no glibc mallopt)"
    if not ok:
        return "glibc's default malloc thresholds (mallopt refused)"
    mib = f"mmap {MMAP_THRESHOLD >> 20} MiB, trim {TRIM_THRESHOLD >> 20} MiB"
    return f"glibc malloc thresholds pinned: {mib} (the same in every process)"


def _forward_faults(model: nn.Module, x: torch.Tensor, reps: int) -> tuple[float, float]:
    """(median ms, minor page faults per call) of ``model(x)`` in this process."""
    import resource

    import torch

    times = []
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(reps):
        start = time.perf_counter()
        with torch.inference_mode():
            model(x)
        times.append(time.perf_counter() - start)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / reps
    return _median_ms(times), faults


def _allocator(mode: str, reps: int) -> list[str]:
    """The allocator's effect, in this fresh process: the mnist cnn at batch 64 before and after pinning."""
    name, shape = MNIST
    model, x = _model(name, shape), _batches(shape, 1, BATCH, SEED)[0]
    _forward_faults(model, x, 3)
    ms, faults = _forward_faults(model, x, reps)  # before pinning
    line = f"{name} ×{BATCH} forward in a fresh process, glibc's default thresholds: {ms:.2f} ms, "
    line += f"{faults:.0f} page faults per call"
    allocator = _pin_malloc(mode)
    if mode != "default":
        _forward_faults(model, x, 3)
        pinned_ms, pinned_faults = _forward_faults(model, x, reps)
        line += f"; pinned: {pinned_ms:.2f} ms, {pinned_faults:.0f} page faults per call"
    return [f"Allocator: {allocator}", line]


def _set_wait_policy(policy: str) -> None:
    """Before torch loads: ``PASSIVE`` (the command line's choice) or ``default`` (OpenMP's own)."""
    if policy == "default":
        os.environ.pop("OMP_WAIT_POLICY", None)
    else:
        os.environ["OMP_WAIT_POLICY"] = policy


def _runtime_line(threads: int) -> str:
    """As :func:`mextract.cli.runtime.configure_runtime` says it (without importing the command line)."""
    policy = os.environ.get("OMP_WAIT_POLICY") or "unset (OpenMP's default: spin, then sleep)"
    return f"device cpu, torch threads {threads} of {os.cpu_count()} cores, OMP_WAIT_POLICY={policy}"


def _model(name: str, shape: tuple[int, ...]) -> nn.Module:
    """The zoo model, untrained and seeded: the same weights in every process."""
    from mextract._utils import seeded
    from mextract.models import create_model

    with seeded(SEED):
        return create_model(name, shape, NUM_CLASSES).eval()


def _batches(shape: tuple[int, ...], n: int, size: int, seed: int) -> list[torch.Tensor]:
    """``n`` batches of random images in [0, 1] (fresh ones, so that stateful defences see new queries)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(size, *shape, generator=gen) for _ in range(n)]


# ============================================================================ the server process


def _serve(config: dict[str, Any]) -> None:
    """The server process: one app per configuration, each on its own free port of 127.0.0.1.

    Prints one JSON line (the URLs, the build times, the threads it runs with), then serves
    until its stdin closes (the benchmark ended or died) or ``lifetime`` seconds pass. With a
    ``store`` (a path: its account made before this process started), its one app has accounts and
    the query log; at the end the API saves its clients' state and the store is closed (its WAL
    checkpointed into the file), as ``mextract serve --store`` does.
    """
    watchdog = threading.Timer(float(config["lifetime"]), lambda: os._exit(3))
    watchdog.daemon = True
    watchdog.start()
    _pin_malloc(str(config["malloc"]))

    import torch

    threads = int(config["threads"])
    torch.set_num_threads(threads)

    from mextract.data import IMAGE_RANGE
    from mextract.data.base import Dataset
    from mextract.defences.detection import Prada
    from mextract.defences.registry import Owner
    from mextract.oracle import VictimOracle
    from mextract.server import ServedAPI, create_app, running
    from mextract.server.store import Store

    store = None if config.get("store") is None else Store(str(config["store"]))
    shape = tuple(int(s) for s in config["shape"])
    model = _model(str(config["model"]), shape)
    victim = VictimOracle(model, input_shape=shape, num_classes=NUM_CLASSES, mode="probs",
                          value_range=IMAGE_RANGE, device="cpu")  # fmt: skip
    gen = torch.Generator().manual_seed(SEED + 1)
    owner_x = torch.rand(OWNER_IMAGES, *shape, generator=gen)
    owner_y = torch.arange(OWNER_IMAGES) % NUM_CLASSES
    owner = Owner(victim=model, train=Dataset(owner_x, owner_y, tuple(map(str, range(NUM_CLASSES))), "owner"),
                  architecture=str(config["model"]), seed=SEED)  # fmt: skip

    # the threads a request is answered in (starlette's thread pool) read torch's count lazily
    seen: list[int] = []
    probe = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    probe.start()
    probe.join()

    urls: dict[str, str] = {}
    builds: dict[str, float] = {}
    errors: dict[str, str] = {}
    apis: list[ServedAPI] = []
    try:
        with contextlib.ExitStack() as stack:
            for item in config["apps"]:
                label = str(item["label"])
                start = time.perf_counter()
                try:
                    api = ServedAPI(victim, name="victim", defence=str(item["spec"]), owner=owner,
                                    detect=Prada() if item["prada"] else None, store=store)  # fmt: skip
                except Exception as exc:  # a row of the table, not the end of the benchmark
                    errors[label] = f"{type(exc).__name__}: {exc}"
                    continue
                apis.append(api)
                builds[label] = time.perf_counter() - start
                base = stack.enter_context(running(create_app(api), host="127.0.0.1", port=0))
                urls[label] = f"{base}/v2/models/victim"
            print(json.dumps({"urls": urls, "builds": builds, "errors": errors, "pid": os.getpid(),
                              "threads": torch.get_num_threads(), "threads_in_pool": seen[0],
                              "runtime": _runtime_line(torch.get_num_threads())}), flush=True)  # fmt: skip
            sys.stdin.read()  # until the benchmark closes the pipe
    finally:
        for api in apis:
            api.close()  # with a store: every client's state into it
        if store is not None:
            store.close()


class Server:
    """A server process started and stopped by the benchmark (``with Server(...) as s:``, or
    :func:`_started` for several at once).

    ``store``: an SQLite store with its account already made; the server then has accounts and the
    query log, and serves one app (a store holds the log of one API).
    """

    def __init__(
        self,
        model: str,
        shape: tuple[int, ...],
        apps: Sequence[Served],
        threads: int,
        malloc: str,
        store: Path | None = None,
    ) -> None:
        if store is not None and len(apps) != 1:
            raise ValueError("a server with a store serves one app (a store logs one API)")
        self.config = {
            "malloc": malloc,
            "model": model,
            "shape": list(shape),
            "threads": threads,
            "lifetime": SERVER_LIFETIME,
            "apps": [{"label": a.label, "spec": a.spec, "prada": a.prada} for a in apps],
            "store": None if store is None else str(store),
        }
        self.threads = threads
        self.info: dict[str, Any] = {}
        self._proc: subprocess.Popen[str] | None = None
        self._log: IO[str] | None = None

    def __enter__(self) -> Server:
        try:
            self.start()
            self.wait()
        except BaseException:
            self.stop()
            raise
        return self

    def start(self) -> None:
        """Start the process (it imports and builds its apps while the benchmark goes on)."""
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads), PYTHONUNBUFFERED="1")
        self._log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed by stop())
        # its own session: the kill at the end reaches every process it may start
        cmd = [sys.executable, str(HERE), "--serve", json.dumps(self.config)]
        self._proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=self._log, text=True, start_new_session=True)  # fmt: skip

    def wait(self) -> None:
        """Wait for its first line (its URLs), within ``START_TIMEOUT``."""
        assert self._proc is not None, "start() first"
        self.info = self._first_line(self._proc)

    def _first_line(self, proc: subprocess.Popen[str]) -> dict[str, Any]:
        lines: queue.Queue[str] = queue.Queue()
        assert proc.stdout is not None
        stdout = proc.stdout
        threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
        try:
            line = lines.get(timeout=START_TIMEOUT)
        except queue.Empty:
            raise RuntimeError(
                f"the server did not start within {START_TIMEOUT:.0f} s{self._stderr()}"
            ) from None
        if not line.strip():
            raise RuntimeError(f"the server exited before it started (status {proc.poll()}){self._stderr()}")
        return dict(json.loads(line))

    def _stderr(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        tail = self._log.read()[-3000:]
        return f"; its stderr:\n{tail}" if tail.strip() else ""

    def url(self, label: str) -> str:
        if label not in self.info["urls"]:
            raise RuntimeError(f"{label}: not served ({self.info['errors'].get(label, 'unknown')})")
        return str(self.info["urls"][label])

    def stop(self) -> None:
        """Close its stdin (it saves its state and exits), kill its session after 10 s; idempotent."""
        proc = self._proc
        if proc is None:
            return
        with contextlib.suppress(OSError):
            if proc.stdin is not None:
                proc.stdin.close()  # the polite way: it returns from stdin.read() and exits
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
        if self._log is not None:
            self._log.close()
        self._proc = None

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def _started(*servers: Server) -> Iterator[None]:
    """Every server process started at once (their imports and builds overlap), then each waited for;
    all stopped at the end, on error too."""
    with contextlib.ExitStack() as stack:
        for server in servers:
            stack.callback(server.stop)
            server.start()
        for server in servers:
            server.wait()
        yield


# ============================================================================ timing


def _median_ms(times: Sequence[float]) -> float:
    return 1000.0 * statistics.median(times)


def _spread(times: Sequence[float], digits: int = 1) -> str:
    """The middle half of the times, in ms: how much the machine moved."""
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return f"{1000 * q[0]:.{digits}f}–{1000 * q[2]:.{digits}f}"


def _interleave(paths: dict[str, Callable[[int], object]], rounds: int) -> dict[str, list[float]]:
    """Seconds per call of every path, one call of each per round, the order rotating per round."""
    names = list(paths)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            start = time.perf_counter()
            paths[name](r)
            times[name].append(time.perf_counter() - start)
    return times


def _time_all(fn: Callable[[], object], reps: int, warm: int = 2) -> list[float]:
    """Seconds of each of ``reps`` calls of ``fn`` after ``warm`` unmeasured ones."""
    for _ in range(warm):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _time_fn(fn: Callable[[], object], reps: int, warm: int = 2) -> float:
    """Median ms of ``fn`` over ``reps`` calls after ``warm`` unmeasured ones."""
    return _median_ms(_time_all(fn, reps, warm))


def _raw_path(model: nn.Module, pick: Callable[[int], torch.Tensor]) -> Callable[[int], object]:
    """Round ``r``: ``model(pick(r))`` under ``torch.inference_mode()``."""
    import torch

    def raw(r: int) -> None:
        with torch.inference_mode():
            model(pick(r))

    return raw


def _served_path(oracle: RemoteOracle, pick: Callable[[int], torch.Tensor]) -> Callable[[int], object]:
    """Round ``r``: ``oracle.query(pick(r))``, one HTTP request."""
    return lambda r: oracle.query(pick(r))


def _fixed(x: torch.Tensor) -> Callable[[int], torch.Tensor]:
    """The same batch every round."""
    return lambda _: x


def _concurrent(
    oracles: Sequence[RemoteOracle], batches: Sequence[torch.Tensor]
) -> tuple[float, list[float]]:
    """Every oracle (one client each, in its own thread) answers every batch; (wall s, per-request s)."""
    barrier = threading.Barrier(len(oracles) + 1)
    per_request: list[float] = []
    failures: list[BaseException] = []
    lock = threading.Lock()

    def client(oracle: RemoteOracle) -> None:
        barrier.wait()
        try:
            for x in batches:
                start = time.perf_counter()
                oracle.query(x)
                with lock:
                    per_request.append(time.perf_counter() - start)
        except BaseException as exc:
            failures.append(exc)

    workers = [threading.Thread(target=client, args=(o,)) for o in oracles]
    for w in workers:
        w.start()
    barrier.wait()
    start = time.perf_counter()
    for w in workers:
        w.join()
    wall = time.perf_counter() - start
    if failures:
        raise failures[0]
    return wall, per_request


def _remote(url: str, client_id: str | None, *, binary: bool = True, key: str | None = None) -> RemoteOracle:
    """A client of ``url``: a client id (servers without accounts) or an API key (with accounts)."""
    from mextract.oracle import RemoteOracle

    # no retries: a failure is reported, not hidden in the timings
    return RemoteOracle(url, client_id=client_id, api_key=key, batch_size=BATCH, binary=binary, retries=0,
                        timeout=120.0)  # fmt: skip


def _check_answers(model: nn.Module, oracle: RemoteOracle, x: torch.Tensor) -> float:
    """Max |served − softmax(model(x))|: the server runs the very model the raw figure times."""
    import torch

    with torch.inference_mode():
        expected = torch.softmax(model(x), dim=1)
    diff = float((oracle.query(x) - expected).abs().max())
    if diff > 1e-4:
        raise RuntimeError(f"the served answers differ from softmax(model(x)) by {diff:g}")
    return diff


def _refused_request(url: str, x: torch.Tensor, *, binary: bool, reps: int) -> float:
    """Median ms of a request the server decodes and then refuses (an unknown input name, answered 400
    from its thread pool): HTTP, the body's upload, decoding, the thread hop, an error answer; no
    copy, no checks, no model, no encoding of answers."""
    import httpx

    from mextract.protocol import encode_request

    content, headers = encode_request(
        x.numpy(), input_name="not-the-input", output_name="output", binary=binary
    )
    with httpx.Client(timeout=120.0) as http:

        def post() -> None:
            response = http.post(f"{url}/infer", content=content, headers=headers)
            if response.status_code != 400 or "expected one tensor named" not in response.text:
                raise RuntimeError(f"expected a 400 for the unknown input, got {response.status_code}")

        return _time_fn(post, reps)


# ============================================================================ the query log


def _filesystem(folder: Path) -> str:
    """The file system ``folder`` is on, from /proc/mounts: its fsync is what a logged request waits for."""
    where, fstype, device = "", "unknown file system", "?"
    path = str(folder.resolve())
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mount, kind = line.split()[:3]
            mount = mount.replace("\\040", " ")
            inside = path == mount or path.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) >= len(where):
                where, fstype, device = mount, kind, dev
    return f"{fstype} ({device} on {where or '?'})"


def _fsync_times(folder: Path, reps: int) -> list[float]:
    """Seconds of each fsync after a 4 KiB append to a file in ``folder``: the least a commit waits."""
    fd, name = tempfile.mkstemp(dir=folder, suffix=".fsync")
    block = b"\0" * 4096
    try:

        def append() -> None:
            os.write(fd, block)
            os.fsync(fd)

        return _time_all(append, reps)
    finally:
        os.close(fd)
        os.unlink(name)


def _new_store(folder: Path, name: str) -> tuple[Path, str]:
    """A fresh store in ``folder`` with the benchmark's account (its key), made before its server starts
    and closed, as ``mextract keys create`` does before ``mextract serve --store``."""
    from mextract.server.store import Store

    path = folder / f"{name}.db"
    with Store(path) as store:
        _, key = store.create_account(ACCOUNT)
    return path, key


def _store_summary(label: str, path: Path, answered: int) -> str:
    """The store's size once its server stopped, and the rows it logged (checked against ``answered``,
    the samples its account was answered)."""
    import sqlite3

    def mib(p: Path) -> float:
        return p.stat().st_size / 2**20 if p.exists() else 0.0

    size, wal = mib(path), mib(Path(f"{path}-wal"))
    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
            rows, requests, inputs, answers = db.execute(
                "SELECT COUNT(*), COUNT(DISTINCT request), COALESCE(SUM(LENGTH(input)), 0), "
                "COALESCE(SUM(LENGTH(answer)), 0) FROM queries"
            ).fetchone()
            snapshots = db.execute("SELECT COUNT(*) FROM snapshots").fetchone()[0]
    except sqlite3.Error as exc:
        return f"{label}: store {path.name} {size:.1f} MiB (+ WAL {wal:.1f} MiB); could not be read ({exc})"
    if rows == answered:
        check = f"= the {answered} samples answered to its account"
    else:
        missed = "THE LOG MISSED SOME" if rows < answered else "more rows than answers"
        check = f"≠ the {answered} samples answered to its account: {missed}"
    left = "none left: checkpointed when the server closed it" if wal == 0 else f"{wal:.1f} MiB left"
    per_row = (size + wal) * 2**10 / rows if rows else float("nan")
    return (
        f"{label}: store file {size:.1f} MiB at the end (WAL: {left}), "
        f"{rows} rows logged {check}, in {requests} requests; inputs "
        f"{inputs / 2**20:.1f} MiB, answers {answers / 2**10:.0f} KiB, {per_row:.1f} KiB of file per row; "
        f"{snapshots} snapshot row(s) (the latest state per account)"
    )


def _log_pieces(
    x: torch.Tensor, answers: torch.Tensor, folder: Path, reps: int
) -> dict[str, dict[str, float]]:
    """What accounts and the log add to a request, each piece timed alone on a fresh store in ``folder``
    (WAL, synchronous=FULL, as served): {piece: {"bin": ms}} (measured with binary tensors only)."""
    import uuid

    import numpy as np

    from mextract.server.store import Store

    arr, ans = x.numpy(), answers.numpy()
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix="pieces-"))
    out: dict[str, float] = {}
    try:
        with Store(tmp / "pieces.db") as store:
            _, key = store.create_account(ACCOUNT)
            out["accounts: authenticate the key (SHA-256, one SELECT)"] = _time_fn(
                lambda: store.authenticate(key), reps
            )

            def row_bytes() -> None:  # what Store.log copies before its INSERTs
                for i in range(len(arr)):
                    np.ascontiguousarray(arr[i]).tobytes()
                    np.ascontiguousarray(ans[i]).tobytes()

            out["log: the rows' bytes (a copy of every input and answer)"] = _time_fn(row_bytes, reps)

            def log() -> None:
                store.log(ACCOUNT, uuid.uuid4().hex, arr, ans)

            full = _time_all(log, reps)
            out["log: Store.log as served (bytes, INSERTs, COMMIT + fsync; median)"] = _median_ms(full)
            out["log: Store.log as served, mean (WAL checkpoints every ~4 MB included)"] = (
                1000 * statistics.fmean(full)
            )
            # the same calls without their fsync: the connection's own setting, for this measurement only
            store._db.execute("PRAGMA synchronous=OFF")
            out["  of which no fsync: Store.log with synchronous=OFF (bytes, INSERTs, COMMIT)"] = _time_fn(
                log, reps
            )
        out["  fsync of a 4 KiB append in the store's folder"] = _median_ms(_fsync_times(folder, reps))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {piece: {"bin": ms} for piece, ms in out.items()}


# ============================================================================ a request, piece by piece


def _breakdown(
    model: nn.Module, x: torch.Tensor, reps: int, forward_ms: float | None, log_folder: Path
) -> dict[str, dict[str, float]]:
    """Each piece of a served request's path, timed on its own in this process: {piece: {bin, json}};
    then what accounts and the query log add, on a store in ``log_folder`` ({piece: {bin}}).

    ``forward_ms``: the raw forward's median when already measured (resnet18: too slow to time again).
    """
    import numpy as np
    import torch

    from mextract._utils import as_tensor, check_shape
    from mextract.data import IMAGE_RANGE
    from mextract.oracle import VictimOracle
    from mextract.oracle.modes import AnswerMode, restrict
    from mextract.protocol import (
        JSON_LENGTH_HEADER,
        decode_request,
        decode_response,
        encode_request,
        encode_response,
    )

    shape = tuple(x.shape[1:])
    victim = VictimOracle(model, input_shape=shape, num_classes=NUM_CLASSES, mode="probs",
                          value_range=IMAGE_RANGE, device="cpu")  # fmt: skip
    out: dict[str, dict[str, float]] = {}

    def both(piece: str, fn: Callable[[bool], object]) -> None:
        out[piece] = {"bin": _time_fn(lambda: fn(True), reps), "json": _time_fn(lambda: fn(False), reps)}

    def same(piece: str, fn: Callable[[], object]) -> None:
        ms = _time_fn(fn, reps)
        out[piece] = {"bin": ms, "json": ms}

    def checks() -> None:  # Oracle.query's checks, once per layer of a stack (client side: once)
        t = as_tensor(x, name="query", dtype=torch.float32)
        check_shape(t, shape, name="query")
        IMAGE_RANGE.check(t, "query")

    arr = x.numpy()
    requests = {
        b: encode_request(arr, input_name="input", output_name="output", binary=b) for b in (True, False)
    }
    with torch.no_grad():
        answers = victim._answer(x)
    responses = {
        b: encode_response("victim", {"output": answers.numpy()}, binary={"output": b}) for b in (True, False)
    }
    decoded = decode_request(*_body(requests[True]))[1]["input"]

    same("client: Oracle.query checks (as_tensor, isfinite, shape, ValueRange.check)", checks)
    both(
        "client: encode_request",
        lambda b: encode_request(arr, input_name="input", output_name="output", binary=b),
    )
    both("server: decode_request (orjson, pydantic, tensor)", lambda b: decode_request(*_body(requests[b])))
    same(
        "server: np.array copy + torch.from_numpy",
        lambda: torch.from_numpy(np.array(decoded, dtype=np.float32)),
    )
    same("server: Oracle.query checks, per stack layer", checks)
    same("  of which ValueRange.check (isfinite, min, max)", lambda: IMAGE_RANGE.check(x, "query"))
    same("  of which as_tensor (torch.isfinite)", lambda: as_tensor(x, name="query", dtype=torch.float32))
    if forward_ms is None:

        def forward() -> None:
            with torch.inference_mode():
                model(x)

        same("server: forward model(x)", forward)
    else:
        out["server: forward model(x)"] = {"bin": forward_ms, "json": forward_ms}  # the raw figure's median
    logits = model(x).detach()
    same("server: answer mode probs (softmax)", lambda: restrict(logits, AnswerMode.PROBS))
    both("server: encode_response",
         lambda b: encode_response("victim", {"output": answers.numpy()}, binary={"output": b}))  # fmt: skip

    def decode(b: bool) -> None:
        content, headers = responses[b]
        got = decode_response(content, headers.get(JSON_LENGTH_HEADER), "output")
        torch.from_numpy(np.asarray(got, dtype=np.float64)).to(torch.float32)

    both("client: decode_response + tensor", decode)
    out.update(_log_pieces(x, answers, log_folder, reps))
    return out


def _columns(
    report: Report, pieces: dict[str, dict[str, float]], binary: str, as_json: str | None, x: torch.Tensor
) -> None:
    """The breakdown's pieces into the report's columns (the log's: binary tensors only)."""
    report.piece_notes.append(
        f"{binary}: a logged request writes {x.numpy().nbytes / 1e3:.1f} KB of input and "
        f"{len(x) * NUM_CLASSES * 4 / 1e3:.2f} KB of answers in {len(x)} row{'s' if len(x) > 1 else ''}"
    )
    report.breakdown[binary] = {k: {"ms": v["bin"]} for k, v in pieces.items() if "bin" in v}
    if as_json is not None:
        report.breakdown[as_json] = {k: {"ms": v["json"]} for k, v in pieces.items() if "json" in v}


def _body(encoded: tuple[bytes, dict[str, str]]) -> tuple[bytes, str | None]:
    from mextract.protocol import JSON_LENGTH_HEADER

    content, headers = encoded
    return content, headers.get(JSON_LENGTH_HEADER)


# ============================================================================ the parts


@dataclass(frozen=True)
class Latency:
    """One batch size of the latency table: medians in ms, and medians of the per-round differences."""

    batch: int
    raw: float
    served: float
    logged: float  # served with accounts and the query log
    paired: float  # served − raw
    logged_paired: float  # logged − raw
    log_paired: float  # logged − served


@dataclass
class Report:
    """Every figure, for the Markdown at the end."""

    threads: int
    batches: int
    server_threads: str = ""
    #: path, ms, answers/s, vs raw, the middle half of the batches' ms
    throughput: list[tuple[str, float, float, str, str]] = field(default_factory=list)
    ratio_notes: list[str] = field(default_factory=list)
    breakdown: dict[str, dict[str, dict[str, float]]] = field(
        default_factory=dict
    )  # column -> piece -> bin/json
    refused: dict[str, float] = field(default_factory=dict)  # column -> ms
    served_minus_raw: dict[str, float] = field(default_factory=dict)  # column -> ms
    #: column -> (logged − served: the medians' difference, the median of the per-round differences), ms
    log_minus_served: dict[str, tuple[float, float]] = field(default_factory=dict)
    latency: list[Latency] = field(default_factory=list)
    #: where the stores are, their file system, the fsync there; the stores at the end
    log_notes: list[str] = field(default_factory=list)
    piece_notes: list[str] = field(default_factory=list)
    store_notes: list[str] = field(default_factory=list)
    defences: list[tuple[str, str, float, float, float]] = field(default_factory=list)
    defence_notes: list[str] = field(default_factory=list)


def _tag(report: Report) -> str:
    return f"[torch threads: raw {report.threads}, server {report.server_threads}; {os.cpu_count()} cores]"


def part_throughput(args: argparse.Namespace, report: Report) -> None:
    """resnet18 at batch 64: raw, served with binary and JSON tensors and with accounts and the query log,
    1 client, and 2 clients."""

    name, shape = CIFAR
    print(f"\n## 1. Throughput: {name} {shape}, batch {BATCH}", flush=True)
    model = _model(name, shape)
    x = _batches(shape, 1, BATCH, SEED)[0]
    store, key = _new_store(args.log_dir, name)
    none = Served("none", "none")
    server = Server(name, shape, [none], report.threads, args.malloc)
    with_log = Server(name, shape, [none], report.threads, args.malloc, store=store)
    answered = 0
    with _started(server, with_log):
        report.server_threads = f"{server.info['threads']} (pool thread: {server.info['threads_in_pool']})"
        print(f"server pid {server.info['pid']}: {server.info['runtime']}", flush=True)
        print(f"server with accounts + query log pid {with_log.info['pid']}: {with_log.info['runtime']}; "
              f"store {store}", flush=True)  # fmt: skip
        url = server.url("none")
        binary, as_json = _remote(url, "binary"), _remote(url, "json", binary=False)
        logged = _remote(with_log.url("none"), None, key=key)
        try:
            diff = _check_answers(model, binary, x)
            diff_logged = _check_answers(model, logged, x)
            print(f"served answers = softmax(model(x)) within {diff:.1e} (with accounts + log: "
                  f"{diff_logged:.1e})", flush=True)  # fmt: skip

            fixed = _fixed(x)
            paths = {
                "raw": _raw_path(model, fixed),
                "binary": _served_path(binary, fixed),
                "json": _served_path(as_json, fixed),
                "logged": _served_path(logged, fixed),
            }
            _interleave(paths, args.warmup)
            times = _interleave(paths, args.batches)
            raw_ms = _median_ms(times["raw"])
            labels = {
                "raw": "raw model(x), inference_mode",
                "binary": "served, binary tensors, 1 client",
                "json": "served, JSON tensors, 1 client",
                "logged": "served with accounts + query log, binary tensors, 1 client",
            }
            for key_, label in labels.items():
                ms = _median_ms(times[key_])
                vs = f"{100 * raw_ms / ms:.1f}%"
                report.throughput.append((label, ms, 1000 * BATCH / ms, vs, _spread(times[key_])))
                print(f"{label}: {ms:.1f} ms per batch (p25–p75 {_spread(times[key_])}), "
                      f"{1000 * BATCH / ms:.1f} answers/s, {vs} of raw "
                      f"(median of {args.batches}) {_tag(report)}", flush=True)  # fmt: skip
            ratios: dict[str, float] = {}
            for key_ in ("binary", "json", "logged"):
                per_round = zip(times["raw"], times[key_], strict=True)
                ratios[key_] = statistics.median(r / s for r, s in per_round)
                what = "accounts + query log" if key_ == "logged" else key_
                note = (f"{what}: median of the per-round ratios raw/served {100 * ratios[key_]:.1f}% "
                        f"(raw and served timed in the same round)")  # fmt: skip
                report.ratio_notes.append(note)
                print(note, flush=True)
            log_ms = _median_ms(times["logged"]) - _median_ms(times["binary"])
            log_paired = 1000 * statistics.median(
                b - a for a, b in zip(times["binary"], times["logged"], strict=True)
            )
            logged_vs = raw_ms / _median_ms(times["logged"])
            met = "met" if min(logged_vs, ratios["logged"]) >= 0.8 else "NOT MET"
            same_round = 100 * ratios["logged"]
            note = (f"accounts + query log cost {log_ms:+.1f} ms per batch of {BATCH} against served without "
                    f"(difference of the medians; median of the per-round differences {log_paired:+.1f} ms); "
                    f"target ≥ 80% of raw: {100 * logged_vs:.1f}% (same-round {same_round:.1f}%), "
                    f"{met}. The two servers are two processes: a difference smaller than their batches' "
                    "spread is the machine's, not the log's; the log's own cost is its pieces in the "
                    "table of where a request's time goes (Store.log)")  # fmt: skip
            report.ratio_notes.append(note)
            print(note, flush=True)
            report.log_minus_served["resnet18 ×64, binary"] = (log_ms, log_paired)

            pair = [_remote(url, f"concurrent-{i}") for i in range(2)]
            try:
                for o in pair:
                    o.query(x)  # each client's stack
                wall, per = _concurrent(pair, [x] * args.concurrent_batches)
            finally:
                for o in pair:
                    o.close()
            n = 2 * args.concurrent_batches
            rate = n * BATCH / wall
            vs = f"{100 * rate / (1000 * BATCH / raw_ms):.1f}%"
            label = "served, binary tensors, 2 concurrent clients"
            report.throughput.append((label, 1000 * wall / n, rate, vs, ""))
            print(f"{label}: {rate:.1f} answers/s in all ({n} batches in {wall:.1f} s; one request's median "
                  f"{_median_ms(per):.0f} ms), {vs} of raw {_tag(report)}", flush=True)  # fmt: skip

            for binary_body, col in ((True, "resnet18 ×64, binary"), (False, "resnet18 ×64, JSON")):
                report.refused[col] = _refused_request(url, x, binary=binary_body, reps=args.profile_reps)
                key_ = "binary" if binary_body else "json"
                report.served_minus_raw[col] = _median_ms(times[key_]) - raw_ms
        finally:
            answered = logged.ledger.count
            binary.close()
            as_json.close()
            logged.close()
    # the server stopped: its store is closed, its WAL checkpointed
    report.store_notes.append(_store_summary(f"{name} ×{BATCH}", store, answered))
    print(report.store_notes[-1], flush=True)
    pieces = _breakdown(model, x, args.profile_reps, forward_ms=raw_ms, log_folder=args.log_dir)
    _columns(report, pieces, "resnet18 ×64, binary", "resnet18 ×64, JSON", x)


def part_mnist(args: argparse.Namespace, report: Report) -> None:
    """The mnist cnn: the latency a request adds (batch 1 and 64), then every defence's overhead."""

    name, shape = MNIST
    apps = [d for d in DEFENCES if not (args.quick and d.label in SLOW_TO_BUILD)]
    print(f"\n## 2-3. Latency and defences: {name} {shape}", flush=True)
    model = _model(name, shape)
    x1, x64 = _batches(shape, 1, 1, SEED)[0], _batches(shape, 1, BATCH, SEED)[0]
    store, key = _new_store(args.log_dir, name)
    server = Server(name, shape, apps, report.threads, args.malloc)
    with_log = Server(name, shape, [Served("none", "none")], report.threads, args.malloc, store=store)
    with _started(server, with_log):
        report.server_threads = report.server_threads or (
            f"{server.info['threads']} (pool thread: {server.info['threads_in_pool']})"
        )
        print(f"server pid {server.info['pid']}: {server.info['runtime']}; "
              f"{len(server.info['urls'])} apps", flush=True)  # fmt: skip
        print(f"server with accounts + query log pid {with_log.info['pid']}: {with_log.info['runtime']}; "
              f"store {store}", flush=True)  # fmt: skip
        for label, error in server.info["errors"].items():
            print(f"{label}: could not be built: {error}", flush=True)
            report.defence_notes.append(f"{label}: could not be built ({error})")
        builds = server.info["builds"]
        none = _remote(server.url("none"), "latency")
        logged = _remote(with_log.url("none"), None, key=key)
        answered = 0
        try:
            print(f"served answers = softmax(model(x)) within {_check_answers(model, none, x64):.1e} "
                  f"(with accounts + log: {_check_answers(model, logged, x64):.1e})", flush=True)  # fmt: skip

            # 2. latency
            for x, rounds in ((x1, args.latency_rounds), (x64, args.batches)):
                fixed = _fixed(x)
                paths = {
                    "raw": _raw_path(model, fixed),
                    "served": _served_path(none, fixed),
                    "logged": _served_path(logged, fixed),
                }
                _interleave(paths, args.warmup)
                times = _interleave(paths, rounds)
                r, s, lg = (_median_ms(times[k]) for k in ("raw", "served", "logged"))

                def paired(a: str, b: str, t: dict[str, list[float]] = times) -> float:
                    return 1000 * statistics.median(tb - ta for ta, tb in zip(t[a], t[b], strict=True))

                row = Latency(len(x), r, s, lg, paired("raw", "served"), paired("raw", "logged"),
                              paired("served", "logged"))  # fmt: skip
                report.latency.append(row)
                print(f"batch {len(x)}: raw {r:.2f} ms, served {s:.2f} ms, added {s - r:.2f} ms "
                      f"(median of the per-round differences {row.paired:.2f} ms); with accounts + query log "
                      f"{lg:.2f} ms, added {lg - r:.2f} ms (paired {row.logged_paired:.2f} ms), "
                      f"{lg - s:+.2f} ms against served without (paired {row.log_paired:+.2f} ms); "
                      f"{rounds} rounds {_tag(report)}", flush=True)  # fmt: skip
            for x, col in ((x64, "cnn ×64, binary"), (x1, "cnn ×1, binary")):
                row = next(t for t in report.latency if t.batch == len(x))
                url = server.url("none")
                report.refused[col] = _refused_request(url, x, binary=True, reps=args.profile_reps)
                report.served_minus_raw[col] = row.served - row.raw
                report.log_minus_served[col] = (row.logged - row.served, row.log_paired)
        finally:
            answered = logged.ledger.count
            none.close()
            logged.close()
        with_log.stop()  # its store closed, its WAL checkpointed: its size and rows
        report.store_notes.append(_store_summary(f"{name} ×1 and ×{BATCH}", store, answered))
        print(report.store_notes[-1], flush=True)

        # 3. defences, round-robin: one batch per defence per round, fresh inputs every round
        served = [d for d in apps if d.label in server.info["urls"]]
        oracles = {d.label: _remote(server.url(d.label), "bench") for d in served}
        try:
            batches = _batches(shape, args.warmup + args.batches, BATCH, SEED + 2)

            def paths_from(offset: int) -> dict[str, Callable[[int], object]]:
                def pick(r: int) -> torch.Tensor:
                    return batches[r + offset]

                out = {"raw model(x)": _raw_path(model, pick)}
                out.update({label: _served_path(oracle, pick) for label, oracle in oracles.items()})
                return out

            # warm-up with the measured client: its stack is built, PRADA's history begins
            _interleave(paths_from(0), args.warmup)
            times = _interleave(paths_from(args.warmup), args.batches)
        finally:
            for oracle in oracles.values():
                oracle.close()
        base = _median_ms(times["none"])
        for label, series in times.items():
            ms = _median_ms(series)
            k = max(1, min(5, len(series) // 3))
            trend = f"{_median_ms(series[:k]):.1f} → {_median_ms(series[-k:]):.1f}"
            build = "" if label not in builds else f"{builds[label]:.2f}"
            over = ms - base
            pct = 100 * over / base
            report.defences.append((label, build, ms, over, pct))
            print(
                f"{label}: {ms:.1f} ms per batch of {BATCH}, {1000 * BATCH / ms:.0f} answers/s, "
                f"{over:+.1f} ms ({pct:+.0f}%) vs none; first/last {k}: {trend} ms {_tag(report)}",
                flush=True,
            )
            report.defence_notes.append(f"{label}|{trend}")
        total = (args.warmup + args.batches) * BATCH
        report.defence_notes.append(
            f"PRADA: one client, {args.warmup} warm-up + {args.batches} measured batches of {BATCH} "
            f"fresh random images ({total} queries in its history at the end); "
            "its cost per batch grows with that history"
        )

        wall_pair: tuple[float, list[float]]
        pair = [_remote(server.url("none"), f"concurrent-{i}") for i in range(2)]
        try:
            for o in pair:
                o.query(x64)
            wall_pair = _concurrent(pair, [x64] * args.batches)
        finally:
            for o in pair:
                o.close()
        n = 2 * args.batches
        rate = n * BATCH / wall_pair[0]
        raw_rate = 1000 * BATCH / report.latency[-1].raw  # the raw batch of 64 of the latency table
        report.defence_notes.append(
            f"cnn, none, 2 concurrent clients ({args.batches} batches each): {rate:.0f} answers/s in all "
            f"({100 * rate / raw_rate:.0f}% of the raw batch of 64 of the latency table)"
        )
        report.defence_notes.append(
            "raw model(x) in this table runs once per round, after the round's served batches (this "
            "process waits for them); in the latency table raw and served alternate one to one. The two raw "
            "figures differ by what ran just before them (idle waits, other processes in the caches)"
        )
        print(f"cnn none, 2 concurrent clients: {rate:.0f} answers/s in all, "
              f"{100 * rate / raw_rate:.0f}% of raw "
              f"{_tag(report)}", flush=True)  # fmt: skip

    pieces64 = _breakdown(model, x64, args.profile_reps * 4, forward_ms=None, log_folder=args.log_dir)
    pieces1 = _breakdown(model, x1, args.profile_reps * 4, forward_ms=None, log_folder=args.log_dir)
    _columns(report, pieces64, "cnn ×64, binary", None, x64)
    _columns(report, pieces1, "cnn ×1, binary", None, x1)


# ============================================================================ the Markdown


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


def markdown(report: Report, header: list[str]) -> str:
    lines = [*header, ""]
    threads = f"raw {report.threads} / server {report.server_threads}"
    lines += [f"**Throughput, resnet18 (3, 32, 32), batch {BATCH}** (torch threads {threads}; "
              f"{os.cpu_count()} cores)", "",
              "| path | ms per batch | answers/s | vs raw | p25–p75 ms |",
              "|---|---:|---:|---:|---:|"]  # fmt: skip
    for label, ms, rate, vs, spread in report.throughput:
        lines.append(f"| {label} | {ms:.1f} | {rate:.1f} | {vs} | {spread} |")
    lines += ["", *[f"- {n}" for n in report.ratio_notes]]
    lines += [
        f"- Untrained models, seeded (inference cost does not depend on the weights); the server's answers "
        f"were checked equal to softmax(model(x)). Each figure: the median over {report.batches} batches, "
        f"answers/s = {BATCH} / median; raw and served batches interleaved round by round.",
        "- 2 concurrent clients: two client threads, two client ids (so the server answers them in "
        "parallel); ms per batch there is the wall time over the batches of both.",
        "- Accounts + query log: its own server process, built the same but for a store (one account made "
        "before it started); every request authenticated by its API key and its 64 samples logged (input "
        "and answer bytes) in one SQLite transaction, WAL, synchronous=FULL, committed before the answer "
        "leaves.",
        *[f"- {n}" for n in report.log_notes],
    ]

    cols = list(report.breakdown)
    if cols:
        lines += ["", f"**Where a served request's time goes** (ms, median; each piece timed alone; "
                  f"torch threads {report.threads}; {os.cpu_count()} cores)", "",
                  "| piece | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]  # fmt: skip
        pieces: list[str] = []  # every column's, in order (the log's: binary columns only)
        for c in cols:
            pieces += [piece for piece in report.breakdown[c] if piece not in pieces]
        for piece in pieces:
            cells = [
                f"{report.breakdown[c][piece]['ms']:.3f}" if piece in report.breakdown[c] else "–"
                for c in cols
            ]
            lines.append(f"| {piece} | " + " | ".join(cells) + " |")
        lines.append("| HTTP round trip of a request refused after decoding (upload, decode, thread hop, "
                     "error answer) | "
                     + " | ".join(f"{report.refused.get(c, float('nan')):.2f}" for c in cols)
                     + " |")  # fmt: skip
        lines.append(
            "| measured: served − raw (medians) | "
            + " | ".join(f"{report.served_minus_raw.get(c, float('nan')):.2f}" for c in cols)
            + " |"
        )
        log = report.log_minus_served
        lines.append(
            "| measured: served with accounts + log − served without (medians; per-round, paired) | "
            + " | ".join(f"{log[c][0]:.2f}; {log[c][1]:.2f}" if c in log else "–" for c in cols)
            + " |"
        )
        lines += ["", "- The log's pieces: on a fresh store in the same folder as the servers' (WAL, "
                  "synchronous=FULL as served; synchronous=OFF set on that connection for the one row that "
                  "says so); the mean includes the WAL's checkpoints (every 1000 pages, ~4 MB).",
                  *[f"- {n}" for n in report.piece_notes]]  # fmt: skip

    if report.latency:
        lines += ["", f"**Added latency, mnist cnn (1, 28, 28)** (binary tensors; torch threads {threads}; "
                  f"{os.cpu_count()} cores)", "",
                  "| batch | server | raw model(x) ms | served ms | added ms | added ms, paired "
                  "| vs served without accounts, ms (paired) |",
                  "|---:|---|---:|---:|---:|---:|---:|"]  # fmt: skip
        for t in report.latency:
            lines.append(f"| {t.batch} | without accounts | {t.raw:.2f} | {t.served:.2f} | "
                         f"{t.served - t.raw:.2f} | {t.paired:.2f} | |")  # fmt: skip
            lines.append(f"| {t.batch} | accounts + query log | {t.raw:.2f} | {t.logged:.2f} | "
                         f"{t.logged - t.raw:.2f} | {t.logged_paired:.2f} | {t.logged - t.served:+.2f} "
                         f"({t.log_paired:+.2f}) |")  # fmt: skip
        lines += ["", "- Raw, served without and with accounts + query log interleaved in the same rounds; "
                  "paired: the median of the per-round differences. The server with accounts saves its "
                  "client's state every 100 requests (a snapshot: one more transaction)."]  # fmt: skip

    if report.defences:
        trends = dict(n.split("|", 1) for n in report.defence_notes if "|" in n)
        lines += ["", f"**Defence overhead, mnist cnn, batch {BATCH}, served** (binary tensors; "
                  f"torch threads {threads}; {os.cpu_count()} cores)", "",
                  "| defence | ms per batch | answers/s | overhead vs none | first → last batches, ms "
                  "| build s |", "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
        for label, build, ms, over, pct in report.defences:
            lines.append(f"| {label} | {ms:.1f} | {1000 * BATCH / ms:.0f} | {over:+.1f} ms ({pct:+.0f}%) | "
                         f"{trends.get(label, '')} | {build} |")  # fmt: skip
        lines += ["", *[f"- {n}" for n in report.defence_notes if "|" not in n]]

    if report.store_notes:
        lines += ["", "**The query logs at the end** (SQLite, WAL, synchronous=FULL)", ""]
        lines += [f"- {n}" for n in report.store_notes]
    return "\n".join(lines)


# ============================================================================ main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer batches, no adaptive_misinformation (< 1 min)")
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads, raw and server (default: torch's)"
    )
    p.add_argument(
        "--wait-policy",
        default="PASSIVE",
        choices=("PASSIVE", "ACTIVE", "default"),
        help="OMP_WAIT_POLICY for every process (default: PASSIVE, as the command line)",
    )
    p.add_argument(
        "--batches", type=int, default=None, help="measured batches per figure (default 30, quick 8)"
    )
    p.add_argument(
        "--malloc",
        default="pinned",
        choices=("pinned", "default"),
        help="glibc malloc thresholds: the same fixed ones in every process (default), or glibc's own",
    )
    p.add_argument("--skip-resnet", action="store_true", help="only the mnist cnn parts (2 and 3)")
    p.add_argument(
        "--store-dir",
        type=Path,
        default=None,
        help="folder for the query logs' temporary SQLite files (default: the system's temporary folder); "
        "its disk's fsync is what a logged request waits for",
    )
    p.add_argument("--serve", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    _set_wait_policy(args.wait_policy)
    if args.serve is not None:
        return _serve(json.loads(args.serve))

    import torch

    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    quick = args.quick
    args.batches = args.batches or (5 if quick else 30)
    args.warmup = 2 if quick else 3
    args.concurrent_batches = 2 if quick else 8
    args.latency_rounds = 40 if quick else 200
    args.profile_reps = 5 if quick else 20

    header = [
        f"Machine: {_machine()}; Python {platform.python_version()}, torch {torch.__version__}",
        f"Runtime: {_runtime_line(threads)} (the same in every server process)",
        f"Load average at the start: {_load()}",
    ]
    print("\n".join(header), flush=True)
    allocator = _allocator(args.malloc, 10 if quick else 30)
    print("\n".join(allocator), flush=True)
    header += allocator
    report = Report(threads=threads, batches=args.batches)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mextract-serve-bench-", dir=args.store_dir) as folder:
        args.log_dir = Path(folder)
        fsync = _fsync_times(args.log_dir, 10 if quick else 30)
        report.log_notes.append(
            f"Query logs: fresh SQLite files in {folder}, on {_filesystem(args.log_dir)}; fsync after a "
            f"4 KiB append there, at the start: median {_median_ms(fsync):.2f} ms "
            f"(p25–p75 {_spread(fsync, 2)} ms, {len(fsync)} calls); the files are removed at the end"
        )
        print(report.log_notes[-1], flush=True)
        if not args.skip_resnet:
            part_throughput(args, report)
        part_mnist(args, report)
        fsync = _fsync_times(args.log_dir, len(fsync))
        report.log_notes.append(
            f"fsync there at the end: median {_median_ms(fsync):.2f} ms (p25–p75 {_spread(fsync, 2)} ms; "
            "a shared virtual disk's fsync moves with the other work on it)"
        )
        print(report.log_notes[-1], flush=True)
    header.append(f"Load average at the end: {_load()}; total {time.perf_counter() - start:.0f} s"
                  f"{' (--quick)' if quick else ''}")  # fmt: skip
    print("\n" + markdown(report, header))


if __name__ == "__main__":
    main()
