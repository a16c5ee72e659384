"""What every attack shares: the fixed outer call, its context and its one result type.

Following foolbox, an attack is a small configured object whose ``__call__`` is fixed:
it checks the arguments, gives the attack a :class:`~mextract.oracle.Client` of the API
with the attack's budget (and caps the oracle's ledger at it as well), seeds the run,
times it, and reads the query count back. A new attack writes only :meth:`Attack.run`.
The client is all the attack sees of the victim — what a remote client of the API would
have: ``query``, the API's public description, ``spent`` and ``remaining``; it cannot
overspend (a batch that would pass the budget raises before the victim sees any of it),
and it never holds the evaluator: it hands substitute snapshots to ``ctx.report``, and
the fixed outer call scores them into the learning curve.
"""

from __future__ import annotations

import logging
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from mextract._utils import as_tensor, check_shape, resolve_device, seeded
from mextract.data.base import Dataset
from mextract.errors import InputError
from mextract.metrics import Evaluator
from mextract.oracle import AnswerMode, APIDescription, Client, Oracle

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HistoryPoint:
    """One evaluation during an attack: queries spent so far, and the substitute's scores."""

    queries: int
    epoch: int
    test_accuracy: float
    fidelity: float
    elapsed_s: float


@dataclass
class AttackResult:
    """The common result: the substitute (or extracted model), the ledger's count, a history."""

    attack: str
    model: nn.Module
    queries: int
    budget: int
    wall_time_s: float
    history: list[HistoryPoint] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        """A JSON-ready summary (everything but the model itself)."""
        return {
            "attack": self.attack,
            "queries": self.queries,
            "budget": self.budget,
            "wall_time_s": self.wall_time_s,
            "metrics": self.metrics,
            "config": self.config,
            "history": [asdict(h) for h in self.history],
        }


Event = dict[str, Any]
Callback = Callable[[Event], None]


#: Receives a substitute snapshot and its epoch (or round); returns nothing to the attack.
Snapshot = Callable[[nn.Module, int], None]


@dataclass
class AttackContext:
    """Everything :meth:`Attack.run` may use. The victim is reachable only via ``api``, a
    :class:`~mextract.oracle.Client`: ``query``, ``description``, ``spent``, ``remaining``."""

    api: Client
    pool: torch.Tensor | None
    budget: int
    make_substitute: Callable[[], nn.Module]
    generator: torch.Generator
    seed: int
    device: torch.device
    callback: Callback | None
    #: scores a snapshot into the learning curve (``None``: nobody is scoring)
    snapshot: Snapshot | None = None
    #: attack-specific final metrics that :meth:`Attack.run` reports (e.g. a direct
    #: attack's verification error); they go into the result's ``metrics``
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def spent(self) -> int:
        return self.api.spent

    @property
    def remaining(self) -> int:
        """Queries left: the attack's budget, or less if the API's own quota is smaller."""
        left = self.budget - self.api.spent
        api = self.api.remaining
        return left if api is None else min(left, api)

    def emit(self, **event: Any) -> None:
        if self.callback is not None:
            self.callback(event)

    def report(self, model: nn.Module, epoch: int) -> None:
        """Hand a snapshot of the substitute to the runner, which scores it (queries spent so
        far, test accuracy, fidelity) into the learning curve. The attack learns nothing back."""
        if self.snapshot is not None:
            self.snapshot(model, epoch)


def _pool_tensor(pool: Dataset | torch.Tensor | object | None, api: APIDescription) -> torch.Tensor | None:
    if pool is None:
        return None
    x = pool.x if isinstance(pool, Dataset) else pool
    t = as_tensor(x, name="pool", dtype=torch.float32)
    check_shape(t, api.input_shape, name="pool")
    return t


class Attack(ABC):
    """Base class of every attack. Subclasses are keyword-only dataclasses with a ``run``.

    Calling an attack::

        result = attack(oracle, pool, budget, substitute="cnn", evaluator=ev, seed=0)

    Args:
        oracle: the victim's black box (possibly defended or remote); the attack gets only
            a :class:`~mextract.oracle.Client` of it.
        pool: the attacker's unlabeled inputs, a :class:`Dataset` or a tensor shaped like
            the oracle's inputs (``None`` only for attacks that make their own queries).
        budget: the most samples this attack may have answered.
        substitute: a model-zoo name or a zero-argument factory returning an ``nn.Module``.
        evaluator: optional scorer for the history (never charged to the budget).
        seed: seeds every random choice of the run.
        device: where the substitute trains (``None``: CUDA when present).
        callback: receives progress events (dicts with at least ``"stage"``).
    """

    name: ClassVar[str] = "attack"
    needs_pool: ClassVar[bool] = True
    #: reads answers in mode ``leaf`` (a tree node's distribution and identifier, one column
    #: more than the classes); every other attack refuses that mode
    leaf_answers: ClassVar[bool] = False

    def __call__(
        self,
        oracle: Oracle,
        pool: Dataset | torch.Tensor | None,
        budget: int,
        *,
        substitute: str | Callable[[], nn.Module] | None = None,
        evaluator: Evaluator | None = None,
        seed: int = 0,
        device: str | torch.device | None = None,
        callback: Callback | None = None,
    ) -> AttackResult:
        if not isinstance(oracle, Oracle):
            raise InputError(f"oracle: expected an mextract Oracle, got {type(oracle).__name__}")
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise InputError(f"budget: expected a positive integer, got {budget!r}")
        client = Client(oracle, budget)
        api = client.description
        x_pool = _pool_tensor(pool, api)
        if self.needs_pool and (x_pool is None or len(x_pool) == 0):
            raise InputError(f"attack {self.name!r} needs a non-empty attacker pool")
        self.check_api(api, x_pool, budget)
        check_budget(self, budget, None if x_pool is None else len(x_pool))
        start = time.perf_counter()
        history: list[HistoryPoint] = []

        def snapshot(model: nn.Module, epoch: int) -> None:  # the runner's side: the attack never sees it
            assert evaluator is not None
            scores = evaluator.evaluate(model)
            history.append(
                HistoryPoint(
                    queries=client.spent,
                    epoch=epoch,
                    elapsed_s=time.perf_counter() - start,
                    test_accuracy=scores["test_accuracy"],
                    fidelity=scores["fidelity"],
                )
            )
            if callback is not None:
                callback({"stage": "score", **scores})

        ctx = AttackContext(
            api=client,
            pool=x_pool,
            budget=budget,
            make_substitute=_substitute_factory(substitute, api),
            generator=torch.Generator().manual_seed(seed),
            seed=seed,
            device=resolve_device(device),
            callback=callback,
            snapshot=None if evaluator is None else snapshot,
        )
        logger.info(
            "attack %s: budget %d, pool %s", self.name, budget, None if x_pool is None else len(x_pool)
        )
        with oracle.ledger.cap(budget), seeded(seed):
            model = self.run(ctx)
        wall = time.perf_counter() - start
        metrics = {**ctx.metrics, **self.extra_metrics(ctx, model)}
        if evaluator is not None:
            metrics.update(evaluator.evaluate(model))
        return AttackResult(
            attack=self.name,
            model=model,
            queries=client.spent,
            budget=budget,
            wall_time_s=wall,
            history=history,
            metrics=metrics,
            config={"seed": seed, **self.config()},
        )

    def check_api(self, api: APIDescription, pool: torch.Tensor | None, budget: int) -> None:
        """Everything checked against the API's description before any query (the command line
        calls it before any work): the answer mode this attack can read, then
        :meth:`check_params`."""
        if api.mode is AnswerMode.LEAF and not self.leaf_answers:
            raise InputError(
                f"attack {self.name!r} reads class scores; this API answers in mode 'leaf' (a tree node's "
                "distribution and identifier): use path_finding"
            )
        self.check_params(api, pool, budget)

    def check_params(self, api: APIDescription, pool: torch.Tensor | None, budget: int) -> None:  # noqa: B027
        """Validate the attack's own parameters against the API's public description (override
        to add checks). Called before any query, and by the command line before any work."""

    def max_queries(self, pool_size: int | None) -> int | None:
        """The most queries this attack can spend from a pool of ``pool_size`` points, or
        ``None`` where no pool bounds it (the attack generates or perturbs its queries).

        The default, for attacks that query pool points as they are and each at most once,
        is the pool's size; attacks without a pool have no such bound."""
        return pool_size if self.needs_pool else None

    def config(self) -> dict[str, Any]:
        """The attack's parameters, for records."""
        from dataclasses import fields, is_dataclass

        if not is_dataclass(self):
            return {}
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = asdict(v) if is_dataclass(v) and not isinstance(v, type) else v
        return out

    def model_spec(self, model: nn.Module) -> tuple[str, dict[str, Any]] | None:
        """The zoo name and options that rebuild ``model`` for a checkpoint; ``None`` means
        the substitute architecture the attack was given (learning-based attacks)."""
        return None

    def extra_metrics(self, ctx: AttackContext, model: nn.Module) -> dict[str, float]:
        """Attack-specific final metrics (e.g. parameter error); empty by default."""
        return {}

    @abstractmethod
    def run(self, ctx: AttackContext) -> nn.Module:
        """Spend at most ``ctx.budget`` queries through ``ctx.oracle``; return the model."""


class BudgetWarning(UserWarning):
    """The budget asked for is more than the attack can spend (its record keeps both)."""


def check_budget(attack: Attack, budget: int, pool_size: int | None) -> None:
    """Warn (once per message) when ``budget`` exceeds :meth:`Attack.max_queries` for the pool."""
    cap = attack.max_queries(pool_size)
    if cap is not None and budget > cap:
        warnings.warn(
            BudgetWarning(
                f"budget {budget:,} is more than attack {attack.name!r} can spend from a pool of "
                f"{pool_size:,} samples (it queries each pool point at most once): it will spend at "
                f"most {cap:,}; give a larger pool (--pool-data) or a smaller budget"
            ),
            stacklevel=1,
        )


def _substitute_factory(
    substitute: str | Callable[[], nn.Module] | None, oracle: APIDescription
) -> Callable[[], nn.Module]:
    from mextract.models import check_model_name, create_model, default_model_for

    if substitute is None:
        substitute = default_model_for(oracle.input_shape)
    if isinstance(substitute, str):
        name = check_model_name(substitute)

        def factory() -> nn.Module:
            return create_model(name, oracle.input_shape, oracle.num_classes)

        return factory
    if callable(substitute):
        return substitute
    raise InputError(f"substitute: expected a model name or a factory, got {type(substitute).__name__}")
