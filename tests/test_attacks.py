"""Learning-based attacks: budgets honoured exactly, and tiny steals that reach fidelity."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import Counting

from mextract.attacks import ATTACKS, HardLabel, KnockoffDistillation, create_attack
from mextract.attacks.base import BudgetWarning
from mextract.errors import BudgetExceededError, InputError, UnknownNameError
from mextract.metrics import Evaluator
from mextract.oracle import VictimOracle
from mextract.training import TrainConfig

FAST = TrainConfig(epochs=15, batch_size=32, lr=0.05)


@pytest.mark.parametrize(
    ("attack", "mode", "budget", "threshold"),
    [
        (KnockoffDistillation(train=FAST), "probs", 400, 0.90),
        (KnockoffDistillation(train=FAST), "topk", 400, 0.90),
        (HardLabel(train=FAST), "label", 400, 0.90),
    ],
)
def test_tiny_steal_reaches_fidelity_and_spends_exactly_the_budget(
    digits_splits,
    digits_victim,
    attack,
    mode,
    budget,
    threshold,  # type: ignore[no-untyped-def]
) -> None:
    victim = Counting(digits_victim)
    oracle = VictimOracle(victim, input_shape=(1, 8, 8), num_classes=10, mode=mode, k=3)
    ev = Evaluator.from_victim(digits_victim, digits_splits.test)
    assert ev.victim_accuracy > 0.9
    result = attack(oracle, digits_splits.pool, budget, substitute="cnn", evaluator=ev, seed=0)
    assert result.queries == oracle.ledger.count == victim.evaluated == budget
    assert result.metrics["fidelity"] >= threshold, result.metrics
    assert result.history and result.history[-1].queries == budget
    assert result.history[-1].fidelity == result.metrics["fidelity"]


def test_budget_larger_than_pool_spends_only_the_pool(digits_splits, digits_victim) -> None:  # type: ignore[no-untyped-def]
    oracle = VictimOracle(digits_victim, input_shape=(1, 8, 8), num_classes=10)
    pool = digits_splits.pool.x[:50]
    with pytest.warns(BudgetWarning, match="budget 10,000 is more than attack 'kd' can spend from a pool"):
        result = KnockoffDistillation(train=TrainConfig(epochs=1)).__call__(oracle, pool, 10_000, seed=0)
    assert result.queries == 50 == oracle.ledger.count and result.budget == 10_000


def test_attacks_that_make_their_queries_have_no_pool_cap(digits_splits, digits_victim) -> None:  # type: ignore[no-untyped-def]
    from mextract.attacks.hard import HardMixup

    oracle = VictimOracle(digits_victim, input_shape=(1, 8, 8), num_classes=10, mode="label")
    assert HardMixup().max_queries(20) is None and KnockoffDistillation().max_queries(20) == 20
    with warnings.catch_warnings():
        warnings.simplefilter("error", BudgetWarning)
        result = HardMixup(train=TrainConfig(epochs=1))(oracle, digits_splits.pool.x[:20], 60, seed=0)
    assert result.queries == 60


def test_an_attack_cannot_pass_its_budget(digits_splits, digits_victim) -> None:  # type: ignore[no-untyped-def]
    """The cap sits in the ledger: even a misbehaving attack is stopped before the victim."""
    victim = Counting(digits_victim)
    oracle = VictimOracle(victim, input_shape=(1, 8, 8), num_classes=10)

    class Greedy(KnockoffDistillation):
        def run(self, ctx):  # type: ignore[no-untyped-def]
            ctx.api.query(ctx.pool[: ctx.budget])
            ctx.api.query(ctx.pool[:1])  # one too many
            raise AssertionError("unreachable")

    with pytest.raises(BudgetExceededError):
        Greedy()(oracle, digits_splits.pool, 30, seed=0)
    assert victim.evaluated == oracle.ledger.count == 30


def test_the_oracle_budget_also_binds_attacks(digits_splits, digits_victim) -> None:  # type: ignore[no-untyped-def]
    oracle = VictimOracle(digits_victim, input_shape=(1, 8, 8), num_classes=10, budget=20)
    with pytest.raises(BudgetExceededError, match="0 of 20"):
        HardLabel(train=TrainConfig(epochs=1))(oracle, digits_splits.pool, 100, seed=0)
    assert oracle.ledger.count == 0


def test_attacks_are_seeded(digits_splits, digits_victim) -> None:  # type: ignore[no-untyped-def]
    def run(seed: int) -> torch.Tensor:
        oracle = VictimOracle(digits_victim, input_shape=(1, 8, 8), num_classes=10)
        model = HardLabel(train=TrainConfig(epochs=2))(oracle, digits_splits.pool, 64, seed=seed).model
        return torch.cat([p.flatten() for p in model.parameters()])

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_bad_attack_arguments(digits_splits, digits_victim) -> None:  # type: ignore[no-untyped-def]
    oracle = VictimOracle(digits_victim, input_shape=(1, 8, 8), num_classes=10)
    kd = KnockoffDistillation()
    with pytest.raises(InputError, match="budget: expected a positive integer"):
        kd(oracle, digits_splits.pool, 0)
    with pytest.raises(InputError, match=r"pool: expected a batch of shape \(N, 1, 8, 8\)"):
        kd(oracle, torch.zeros(5, 64), 10)
    with pytest.raises(InputError, match="needs a non-empty attacker pool"):
        kd(oracle, None, 10)
    with pytest.raises(UnknownNameError, match="unknown model"):
        kd(oracle, digits_splits.pool, 10, substitute="nope")
    with pytest.raises(InputError, match="temperature"):
        KnockoffDistillation(temperature=0)(oracle, digits_splits.pool, 10)
    with pytest.raises(InputError, match="oracle"):
        kd(digits_victim, digits_splits.pool, 10)  # a bare model is not an oracle
    assert oracle.ledger.count == 0


def test_attack_registry() -> None:
    assert {"kd", "hard"} <= set(ATTACKS)
    assert create_attack("kd", temperature=2.0).temperature == 2.0
    with pytest.raises(UnknownNameError, match="unknown attack 'kdd'"):
        create_attack("kdd")
    with pytest.raises(InputError, match="bad options"):
        create_attack("kd", tempreature=2.0)


@pytest.mark.parametrize("attack", ["kd", "hard"])
def test_semi_supervised_option_spends_no_query(digits_splits, digits_victim, attack) -> None:  # type: ignore[no-untyped-def]
    victim = Counting(digits_victim)
    oracle = VictimOracle(victim, input_shape=(1, 8, 8), num_classes=10, mode="probs")
    ev = Evaluator.from_victim(digits_victim, digits_splits.test)
    atk = create_attack(attack, semi={}, train={"epochs": 40, "batch_size": 32})
    result = atk(oracle, digits_splits.pool, 200, evaluator=ev, seed=0)
    assert result.queries == oracle.ledger.count == victim.evaluated == 200
    assert result.metrics["fidelity"] > 0.9
