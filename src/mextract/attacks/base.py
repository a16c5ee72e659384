"""What every attack shares: the fixed outer call, its context and its one result type.

Following foolbox, an attack is a small configured object whose ``__call__`` is fixed:
it checks the arguments, caps the oracle's ledger at the attack's budget, seeds the
run, times it, and reads the query count back from the ledger. A new attack writes only
:meth:`Attack.run`. Because the cap lives in the ledger, an attack *cannot* overspend:
a batch that would pass the budget raises before the victim sees any of it.
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
from mextract.oracle import Oracle

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


@dataclass
class AttackContext:
    """Everything :meth:`Attack.run` may use. The victim is reachable only via ``oracle``."""

    oracle: Oracle
    pool: torch.Tensor | None
    budget: int
    make_substitute: Callable[[], nn.Module]
    evaluator: Evaluator | None
    generator: torch.Generator
    seed: int
    device: torch.device
    callback: Callback | None
    history: list[HistoryPoint] = field(default_factory=list)
    #: attack-specific final metrics that :meth:`Attack.run` reports (e.g. a direct
    #: attack's verification error); they go into the result's ``metrics``
    metrics: dict[str, float] = field(default_factory=dict)
    start_count: int = 0
    start_time: float = field(default_factory=time.perf_counter)

    @property
    def spent(self) -> int:
        return self.oracle.ledger.count - self.start_count

    @property
    def remaining(self) -> int:
        return self.budget - self.spent

    def emit(self, **event: Any) -> None:
        if self.callback is not None:
            self.callback(event)

    def evaluate(self, model: nn.Module, epoch: int) -> HistoryPoint | None:
        """Score ``model`` on the evaluator (if any), append to the history and report it."""
        if self.evaluator is None:
            return None
        scores = self.evaluator.evaluate(model)
        point = HistoryPoint(
            queries=self.spent,
            epoch=epoch,
            test_accuracy=scores["test_accuracy"],
            fidelity=scores["fidelity"],
            elapsed_s=time.perf_counter() - self.start_time,
        )
        self.history.append(point)
        return point


def _pool_tensor(pool: Dataset | torch.Tensor | object | None, oracle: Oracle) -> torch.Tensor | None:
    if pool is None:
        return None
    x = pool.x if isinstance(pool, Dataset) else pool
    t = as_tensor(x, name="pool", dtype=torch.float32)
    check_shape(t, oracle.input_shape, name="pool")
    return t


class Attack(ABC):
    """Base class of every attack. Subclasses are keyword-only dataclasses with a ``run``.

    Calling an attack::

        result = attack(oracle, pool, budget, substitute="cnn", evaluator=ev, seed=0)

    Args:
        oracle: the victim's black box (possibly defended or remote).
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
        x_pool = _pool_tensor(pool, oracle)
        if self.needs_pool and (x_pool is None or len(x_pool) == 0):
            raise InputError(f"attack {self.name!r} needs a non-empty attacker pool")
        self.check_params(oracle, x_pool, budget)
        check_budget(self, budget, None if x_pool is None else len(x_pool))
        gen = torch.Generator().manual_seed(seed)
        ctx = AttackContext(
            oracle=oracle,
            pool=x_pool,
            budget=budget,
            make_substitute=_substitute_factory(substitute, oracle),
            evaluator=evaluator,
            generator=gen,
            seed=seed,
            device=resolve_device(device),
            callback=callback,
            start_count=oracle.ledger.count,
        )
        logger.info(
            "attack %s: budget %d, pool %s", self.name, budget, None if x_pool is None else len(x_pool)
        )
        with oracle.ledger.cap(budget), seeded(seed):
            model = self.run(ctx)
        wall = time.perf_counter() - ctx.start_time
        metrics = {**ctx.metrics, **self.extra_metrics(ctx, model)}
        if evaluator is not None:
            metrics.update(evaluator.evaluate(model))
        return AttackResult(
            attack=self.name,
            model=model,
            queries=ctx.spent,
            budget=budget,
            wall_time_s=wall,
            history=ctx.history,
            metrics=metrics,
            config={"seed": seed, **self.config()},
        )

    def check_params(self, oracle: Oracle, pool: torch.Tensor | None, budget: int) -> None:  # noqa: B027
        """Validate the attack's own parameters against the oracle (override to add checks)."""

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
    substitute: str | Callable[[], nn.Module] | None, oracle: Oracle
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
