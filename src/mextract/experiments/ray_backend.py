"""A Ray backend for the experiments runner: a map of one function over many items.

:func:`ray_map` runs ``fn(item)`` for every item as a Ray task, each in a worker whose torch
threads are pinned, retries a failing task, hands each result to the caller as soon as it is
back (so records can be written as cells finish) and returns every result in input order, an
item that failed even after its retries as its exception (its own type, even one whose
``__init__`` takes other arguments than a message, like :class:`~mextract.errors.UnknownNameError`).
``fn`` must be a *picklable top-level function* (defined at module level, not a lambda or a
closure) of a module the workers can import: the module is installed, or on a path the
workers see; it is pickled by reference, as for the local process-pool backend, so the two
backends take the same functions.

Where it runs:

- ``address=None`` and this process not yet connected to Ray: a fresh local instance is
  started (:func:`local_ray`) and shut down again when the map is over. The instance is bound
  to the loopback interface only: every TCP socket its processes listen on (GCS, raylet with
  node and object manager, core workers, autoscaler monitor, runtime-env agent, and with the
  ``ray[default]`` packages the dashboard and metrics agents) is on 127.0.0.1; nothing of it
  is reachable from another machine. Ray maps a loopback ``_node_ip_address`` to the host's
  outward address unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` is off, so :func:`local_ray`
  turns that off for its processes (and for the driver while it starts them), refuses to go
  on if the node still came up on another address, starts no dashboard and reports no usage
  statistics. Token authentication stays on, with a random token for this process passed in
  the environment, so nothing is written to ``~/.ray``; Ray's files go under ``temp_dir``
  (Ray's default ``/tmp/ray`` otherwise).
- ``address=None`` and this process already connected (``ray.is_initialized()``, e.g. inside
  ``with local_ray(num_cpus=4):``): that connection is used and left open.
- ``address="ray://host:10001"`` (Ray Client) or ``"host:port"`` (the GCS of a cluster):
  connect to that existing cluster, never start one; disconnect at the end. Its binding is
  the cluster's own. The module of ``fn`` (for the runner's cells: ``mextract``, with torch)
  must be importable on its nodes; the task wrapper itself travels by value.

Determinism: a task calls ``torch.set_num_threads(threads)`` and runs with
``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` set to ``threads`` before ``fn``; it is otherwise the
same call as in-process. So for a cell function that seeds itself from its item, the results
equal those of the local process-pool backend (and of ``fn(item)`` called directly under
``torch.set_num_threads(threads)``) for the same items, bit for bit; only wall-clock times
recorded inside results differ. Retries re-run ``fn`` from scratch, so they change nothing
either.
"""

from __future__ import annotations

import contextlib
import importlib
import ipaddress
import logging
import os
import re
import secrets
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from mextract.errors import InputError, MextractError

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

RAY_MISSING = "the Ray backend needs the [ray] extra: pip install 'mextract[ray]'"
LOOPBACK = "127.0.0.1"

#: environment of the processes a local instance starts, on top of the driver's own
_LOCAL_ENV = {
    # Ray maps a loopback node address to the host's outward one unless this is off
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}
_token: str | None = None  # this process's token for the local instances it starts


def _import_ray() -> Any:
    try:
        return importlib.import_module("ray")
    except ImportError as err:
        raise InputError(RAY_MISSING) from err


def _process_token() -> str:
    global _token
    if _token is None:
        _token = secrets.token_hex(32)
    return _token


@contextlib.contextmanager
def _environ(values: dict[str, str], also_restore: Sequence[str] = ()) -> Iterator[None]:
    before = {key: os.environ.get(key) for key in [*values, *also_restore]}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _loopback_stays_loopback(ray: Any) -> Iterator[None]:
    """While Ray starts or connects: a loopback address is not swapped for the host's outward one.

    The driver read ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` when it imported ray; this is that
    switch, off for the duration only (its child processes get the environment variable).
    """
    constants = ray._private.ray_constants
    enabled = getattr(constants, "ENABLE_RAY_CLUSTER", None)
    if enabled is not None:
        constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if enabled is not None:
            constants.ENABLE_RAY_CLUSTER = enabled


def _is_loopback(address: str) -> bool:
    host = address.removeprefix("ray://").rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextlib.contextmanager
def local_ray(num_cpus: int | None = None, temp_dir: str | None = None) -> Iterator[None]:
    """Start a local Ray instance bound to 127.0.0.1 only; shut it down on leaving.

    ``num_cpus`` is the instance's size (Ray's default: every core); ``temp_dir`` where Ray
    keeps its session files and sockets (keep it short: Ray's unix socket paths must stay under
    about 100 characters; Ray's default is ``/tmp/ray``). :func:`ray_map` with ``address=None``
    uses this instance while it runs.
    """
    ray = _import_ray()
    if ray.is_initialized():
        raise MextractError("this process is already connected to Ray; local_ray() starts its own instance")
    env = dict(_LOCAL_ENV)
    explicit = {"RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"} & os.environ.keys()
    if os.environ.get("RAY_AUTH_MODE", "token").lower() == "token" and not explicit:
        env["RAY_AUTH_TOKEN"] = _process_token()  # in memory, never in ~/.ray/auth_token
        with contextlib.suppress(Exception):  # a token cached from another cluster would be sent
            ray._raylet.AuthenticationTokenLoader.instance().reset_cache()
    with _environ(env, also_restore=["RAY_AUTH_MODE"]):  # ray.init sets RAY_AUTH_MODE
        try:
            with _loopback_stays_loopback(ray):
                ray.init(
                    address="local",  # never an existing cluster (nor RAY_ADDRESS)
                    num_cpus=num_cpus,
                    include_dashboard=False,
                    _node_ip_address=LOOPBACK,
                    _temp_dir=temp_dir,
                    configure_logging=False,
                )
        except BaseException:
            with contextlib.suppress(Exception):
                ray.shutdown()  # whatever it had started
            raise
        try:
            addresses = {node["NodeManagerAddress"] for node in ray.nodes()}
            if addresses != {LOOPBACK}:
                raise MextractError(
                    f"the local Ray instance came up on {sorted(addresses)}, not {LOOPBACK} only; "
                    "this Ray version ignores the loopback settings"
                )
            yield
        finally:
            ray.shutdown()


def _task() -> Callable[[Callable[[T], R], T, int], R]:
    """The Ray task: pin torch's threads, then the plain call.

    Made here, a closure, so that Ray ships it by value: a worker imports only torch and what
    ``fn`` needs, not this package (nor must it be installed on a cluster for this).
    """

    def ray_map_task(fn: Callable[[T], R], item: T, threads: int) -> R:
        import copyreg
        import pickle

        import torch

        torch.set_num_threads(threads)
        try:
            return fn(item)
        except Exception as err:
            try:  # an exception whose __init__ takes other arguments than its message would
                pickle.loads(pickle.dumps(err))  # reach the caller as Ray's UnserializableException
            except Exception:

                def rebuild(e: BaseException) -> tuple[Any, ...]:  # same type, args and fields; no __init__
                    return type(e).__new__, (type(e), *e.args), dict(e.__dict__)

                copyreg.pickle(type(err), rebuild)
            raise

    return ray_map_task


def _as_failure(err: Exception, retries: int) -> BaseException:
    """A task's final error: the exception ``fn`` raised where there is one, else Ray's own."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException):
        remote = re.sub(r"\x1b\[[0-9;]*m", "", str(err))  # Ray colours the remote traceback
        cause.add_note(f"raised in a Ray task, which failed {retries + 1} time(s):\n{remote}")
        return cause
    return err


def ray_map(
    fn: Callable[[T], R],
    items: Sequence[T],
    *,
    address: str | None = None,
    retries: int = 2,
    threads: int = 1,
    num_cpus: int | None = None,
    on_result: Callable[[int, R], None] | None = None,
    on_error: Callable[[int, BaseException], None] | None = None,
) -> list[R | BaseException]:
    """``[fn(item) for item in items]`` as Ray tasks; a failed item comes back as its exception.

    ``fn`` must be a picklable top-level function (no lambda, closure or nested function) of a
    module Ray's workers can import. Each task runs ``fn(item)`` with torch's threads (and
    ``OMP_NUM_THREADS``) set to ``threads`` and reserves ``num_cpus`` CPUs (``threads`` if
    None, so one by default). A task that raises or whose worker dies is run again, up to
    ``retries`` more times. As each task ends, ``on_result(index, result)`` or
    ``on_error(index, exception)`` is called in this process, in completion order; the list
    returned is in input order, a failure as the exception ``fn`` raised (or Ray's error, say
    for a dead worker). One item's failure never stops the others.

    ``address``: None to use this process's Ray connection or else start a local instance bound
    to 127.0.0.1 only (see :func:`local_ray`; shut down at the end), ``"ray://host:port"`` or
    ``"host:port"`` to connect to an existing cluster (never started here).
    """
    ray = _import_ray()
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise InputError(f"retries must be an integer >= 0, got {retries!r}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise InputError(f"threads must be an integer >= 1, got {threads!r}")
    cpus = threads if num_cpus is None else num_cpus
    if isinstance(cpus, bool) or not isinstance(cpus, int) or cpus < 1:
        raise InputError(f"num_cpus must be an integer >= 1 or None, got {num_cpus!r}")
    if address is not None and not address.strip():
        raise InputError("address must be None, 'ray://host:port' or 'host:port', got an empty string")
    items = list(items)
    if not items:
        return []

    task = ray.remote(_task()).options(
        num_cpus=cpus,
        max_retries=retries,
        retry_exceptions=True,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}},
    )
    results: list[Any] = [None] * len(items)
    with contextlib.ExitStack() as stack:
        if ray.is_initialized():
            if address is not None:
                logger.info("already connected to Ray; address %r is not used", address)
        elif address is None:
            stack.enter_context(local_ray())
        else:
            # connects, never starts one; a loopback address is meant as given (a local_ray()
            # of another process, say), where Ray would swap in the host's outward address
            loopback = _loopback_stays_loopback(ray) if _is_loopback(address) else contextlib.nullcontext()
            with loopback:
                ray.init(address=address, configure_logging=False)
            stack.callback(ray.shutdown)
        refs = [task.remote(fn, item, threads) for item in items]
        where = {ref: i for i, ref in enumerate(refs)}
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    i = where[ref]
                    try:
                        value = ray.get(ref)
                    except Exception as err:
                        failure = _as_failure(err, retries)
                        results[i] = failure
                        logger.warning("item %d failed after %d retries: %r", i, retries, failure)
                        if on_error is not None:
                            on_error(i, failure)
                    else:
                        results[i] = value
                        if on_result is not None:
                            on_result(i, value)
        finally:
            for ref in pending:  # a callback raised, or an interrupt: drop what has not run
                with contextlib.suppress(Exception):
                    ray.cancel(ref)
    return results
