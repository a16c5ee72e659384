"""Active extraction: selection strategies on hand-made data, budgets, and tiny steals."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import Counting
from torch import nn

from mextract.attacks import create_attack
from mextract.attacks.active import ActiveExtraction, ActiveHard, Marich, round_sizes
from mextract.attacks.base import BudgetWarning
from mextract.attacks.selection import (
    STRATEGIES,
    EntropySelection,
    KCenterSelection,
    create_strategy,
    deepfool_norms,
    gradient_embedding,
    k_center_greedy,
    kmeans,
)
from mextract.attacks.semi import SemiSupervised
from mextract.errors import InputError, UnknownNameError
from mextract.metrics import Evaluator
from mextract.oracle import APIDescription, VictimOracle
from mextract.training import TrainConfig

FAST = TrainConfig(epochs=12, batch_size=32, lr=0.05)


def _identity_features() -> nn.Module:
    """A model whose penultimate features are its 2-D input (the last Linear sees x itself)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(2, 3))


# --------------------------------------------------------------------- strategies, unit level


def test_k_center_picks_the_farthest_point_first() -> None:
    labeled = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    cand = torch.tensor([[0.5, 0.5], [5.0, 5.0], [0.0, 3.0], [5.0, 4.5]])
    picks = k_center_greedy(cand, labeled, 2, torch.Generator().manual_seed(0))
    # (5, 5) is farthest from the labelled set; then (0, 3): (5, 4.5) is now 0.5 from a centre
    assert picks.tolist() == [1, 2]


def test_k_center_strategy_works_in_the_substitute_feature_space() -> None:
    pool = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, 0.5], [5.0, 5.0], [0.0, 3.0], [5.0, 4.5]])
    chosen = KCenterSelection()(
        _identity_features(), pool, torch.arange(2, 6), torch.arange(2), 2, torch.Generator()
    )
    assert chosen.tolist() == [3, 4]


def test_dfal_ranks_points_nearer_the_boundary_first() -> None:
    # a linear 2-class model; the boundary is x0 = 0, logit gap 2·|x0|
    lin = nn.Linear(2, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
        lin.bias.zero_()
    model = nn.Sequential(nn.Flatten(), lin)
    x = torch.tensor([[3.0, 1.0], [-0.2, 5.0], [1.0, -2.0], [-2.0, 0.0], [0.05, 0.0]])
    norms = deepfool_norms(model, x)
    # DeepFool is exact on a linear model: distance |x0| (+ overshoot and DeepFool's 1e-4)
    assert torch.allclose(norms, x[:, 0].abs() * 1.02, atol=1e-3)
    chosen = create_strategy("dfal")(model, x, torch.arange(5), torch.arange(0), 3, torch.Generator())
    assert chosen.tolist() == [4, 1, 2]
    # every point flips after its perturbation: label(x + 1.02 r) differs
    assert model(x).argmax(1).tolist() == [0, 1, 0, 1, 0]


def test_entropy_ranks_the_most_uncertain_first() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(2, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
        model[1].bias.zero_()
    x = torch.tensor([[4.0, 0.0], [0.1, 0.0], [-1.0, 0.0], [0.0, 0.0], [-3.0, 0.0]])
    chosen = EntropySelection()(model, x, torch.arange(5), torch.arange(0), 3, torch.Generator())
    assert chosen.tolist() == [3, 1, 2]


def test_kmeans_finds_separated_clusters_and_gradient_embedding_is_closed_form() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.cat(
        [
            torch.randn(20, 2, generator=g) * 0.1 + torch.tensor(c)
            for c in ([0.0, 0.0], [10.0, 0.0], [0.0, 10.0])
        ]
    )
    _, assign = kmeans(x, 3, torch.Generator().manual_seed(1))
    assert sorted(torch.bincount(assign).tolist()) == [20, 20, 20]
    # BADGE: the gradient of CE(ŷ) w.r.t. the last layer's weight
    lin = nn.Linear(4, 3)
    h = torch.randn(5, 4, generator=g)
    logits = lin(h)
    loss = nn.functional.cross_entropy(logits, logits.argmax(1), reduction="sum")
    (grad,) = torch.autograd.grad(loss, lin.weight)
    emb = gradient_embedding(logits.detach(), h)
    assert torch.allclose(emb.view(5, 3, 4).sum(0), grad, atol=1e-5)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_returns_distinct_unqueried_candidates(name: str) -> None:
    g = torch.Generator().manual_seed(0)
    pool = torch.randn(60, 2, generator=g)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 3))
    cand, labeled = torch.arange(10, 60), torch.arange(10)
    chosen = create_strategy(name)(model, pool, cand, labeled, 7, torch.Generator().manual_seed(0))
    assert len(chosen) == 7 == len(set(chosen.tolist()))
    assert set(chosen.tolist()) <= set(cand.tolist())
    assert len(create_strategy(name)(model, pool, cand[:3], labeled, 7, g)) == 3  # n > |candidates|


def test_round_sizes_spend_exactly_the_total() -> None:
    assert round_sizes(250, 0.1, 10) == [25] + [22] * 5 + [23] * 5
    assert sum(round_sizes(3000, 0.1, 10)) == 3000
    assert round_sizes(7, 0.1, 10) == [1, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    assert round_sizes(40, 0.5, 0) == [40]
    # the random warm start's floor (initial_per_class · K): 200 of 250 random, then 10 rounds
    assert round_sizes(250, 0.1, 10, 200) == [200] + [5] * 10
    assert round_sizes(150, 0.1, 10, 200) == [150] + [0] * 10  # below the floor: all random
    assert round_sizes(3000, 0.1, 10, 200)[0] == 300  # ActiveThief's 10% when it is larger


def test_small_budgets_are_random_with_fixmatch_for_labels(digits_splits, digits_victim, caplog) -> None:  # type: ignore[no-untyped-def]
    """Below ``initial_per_class · K`` queries the active attack selects nothing (every query is
    the random warm start), and label answers on a large pool get FixMatch automatically."""
    ev = Evaluator.from_victim(digits_victim, digits_splits.test)
    for mode, fixmatch in (("label", True), ("probs", False)):
        victim = Counting(digits_victim)
        oracle = VictimOracle(victim, input_shape=(1, 8, 8), num_classes=10, mode=mode)
        events: list[dict[str, object]] = []
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="mextract.attacks.semi"):
            result = ActiveHard(train=FAST, labels="auto")(
                oracle, digits_splits.pool, 100, substitute="cnn", evaluator=ev, seed=0,
                callback=events.append,
            )  # fmt: skip
        assert result.queries == oracle.ledger.count == victim.evaluated == 100
        assert not [e for e in events if e.get("stage") == "select"]  # 100 < 20 · 10: no selection round
        assert ("fixmatch:" in caplog.text) is fixmatch, caplog.text
        assert result.metrics["fidelity"] >= 0.6, result.metrics  # chance is ~0.1


def test_semi_supervised_when_and_schedule() -> None:
    auto = SemiSupervised(when="auto")
    assert auto.applies(soft=False, labeled=250, unlabeled=1750)
    assert not auto.applies(soft=False, labeled=1000, unlabeled=1000)  # fewer than ratio · |L| unqueried
    assert not auto.applies(soft=True, labeled=250, unlabeled=1750)  # probabilities: off
    assert SemiSupervised().applies(soft=True, labeled=1000, unlabeled=10)  # "always", what semi={} asks
    assert SemiSupervised().repeats(250, 1750) == 3  # ⌈1750 / (3·250)⌉ labelled cycles per epoch
    assert SemiSupervised().repeats(1000, 1000) == 1
    assert SemiSupervised(epochs_over="labeled").repeats(250, 1750) == 1
    with pytest.raises(UnknownNameError, match="unknown when 'sometimes'"):
        SemiSupervised(when="sometimes")
    with pytest.raises(UnknownNameError, match="unknown epochs_over"):
        SemiSupervised(epochs_over="pool")
    # the registry: active's default is automatic; semi={} turns it on, semi=None off
    assert create_attack("active_hard").semi == SemiSupervised(when="auto")
    assert create_attack("active_hard", semi={}).semi == SemiSupervised()
    assert create_attack("active_hard", semi=None).semi is None
    assert create_attack("hard").semi is None  # the sources' baselines stay supervised


# ------------------------------------------------------------------------ the attack, tiny steals


@pytest.mark.parametrize(
    ("strategy", "mode"),
    [
        ("random", "probs"),
        ("entropy", "label"),
        ("kcenter", "probs"),
        ("dfal", "label"),
        ("dfal_kcenter", "probs"),
        ("entropy_kmeans", "probs"),
        ("entropy_kmeans_grad", "label"),
    ],
)
def test_every_strategy_steals_the_tiny_victim_within_budget(
    digits_splits,
    digits_victim,
    strategy,
    mode,  # type: ignore[no-untyped-def]
) -> None:
    ev = Evaluator.from_victim(digits_victim, digits_splits.test)
    budget = 150
    # a cheaper DeepFool for the test (the defaults are exercised on the hand-made model above)
    options = {"max_iter": 4, "classes": 3} if strategy.startswith("dfal") else {}
    attack = ActiveExtraction(  # the selection itself: no random floor, no FixMatch
        strategy=strategy, strategy_options=options, train=FAST, rounds=3, round_epochs=4,
        initial_per_class=0, semi=None,
    )  # fmt: skip
    fids = []
    for seed in range(3):
        victim = Counting(digits_victim)
        oracle = VictimOracle(victim, input_shape=(1, 8, 8), num_classes=10, mode=mode)
        result = attack(oracle, digits_splits.pool, budget, substitute="cnn", evaluator=ev, seed=seed)
        assert result.queries == oracle.ledger.count == victim.evaluated == budget
        assert result.history[-1].queries == budget
        assert [h.queries for h in result.history[:4]] == [15, 60, 105, 150]  # one point per round
        fids.append(result.metrics["fidelity"])
    # chance is ~0.1; pure uncertainty sampling (entropy, dfal) is the weakest at tiny budgets
    assert min(fids) >= 0.6 and sum(fids) / 3 >= 0.75, fids


def test_presets_and_semi_supervised(digits_splits, digits_victim) -> None:  # type: ignore[no-untyped-def]
    ev = Evaluator.from_victim(digits_victim, digits_splits.test)
    for attack, mode in [
        (Marich(train=FAST, rounds=2, round_epochs=3, initial_per_class=0), "probs"),
        (ActiveHard(train=FAST, rounds=2, initial_per_class=0, semi=None), "label"),
        (ActiveExtraction(strategy="random", rounds=0, train=FAST, semi=SemiSupervised(ratio=2)), "probs"),
        (ActiveExtraction(strategy="kcenter", rounds=2, train=FAST, semi=SemiSupervised(ratio=2)), "label"),
    ]:
        victim = Counting(digits_victim)
        oracle = VictimOracle(victim, input_shape=(1, 8, 8), num_classes=10, mode=mode)
        result = attack(oracle, digits_splits.pool, 120, substitute="cnn", evaluator=ev, seed=0)
        assert result.queries == oracle.ledger.count == victim.evaluated == 120
        assert result.metrics["fidelity"] >= 0.6, (attack.name, result.metrics)  # chance is ~0.1


def test_budget_larger_than_pool_takes_the_pool_once(digits_splits, digits_victim) -> None:  # type: ignore[no-untyped-def]
    victim = Counting(digits_victim)
    oracle = VictimOracle(victim, input_shape=(1, 8, 8), num_classes=10, mode="label")
    pool = digits_splits.pool.x[:40]
    with pytest.warns(BudgetWarning, match="pool of 40 samples"):
        result = ActiveExtraction(train=TrainConfig(epochs=1), round_epochs=1, rounds=3, initial_per_class=0)(
            oracle, pool, 1000, seed=0
        )
    assert result.queries == 40 == victim.evaluated


def test_active_attack_is_seeded(digits_splits, digits_victim) -> None:  # type: ignore[no-untyped-def]
    def run(seed: int) -> torch.Tensor:
        oracle = VictimOracle(digits_victim, input_shape=(1, 8, 8), num_classes=10)
        attack = ActiveExtraction(
            strategy="entropy_kmeans", train=TrainConfig(epochs=1), round_epochs=1, rounds=2,
            initial_per_class=0,
        )  # fmt: skip
        model = attack(oracle, digits_splits.pool, 60, seed=seed).model
        return torch.cat([p.flatten() for p in model.parameters()])

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_bad_names_and_parameters(digits_splits, digits_victim) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UnknownNameError, match="unknown selection strategy 'kcentre'"):
        ActiveExtraction(strategy="kcentre")
    with pytest.raises(UnknownNameError, match="unknown selection strategy"):
        create_strategy("nope")
    with pytest.raises(UnknownNameError, match="unknown label type 'sof'"):
        ActiveExtraction(labels="sof")
    with pytest.raises(InputError, match="bad options"):
        create_strategy("kcenter", rho=2)
    with pytest.raises(InputError, match=r"rho: expected a number >= 1, got 0\.5"):
        create_strategy("dfal_kcenter", rho=0.5)
    with pytest.raises(InputError, match="threshold: expected a value in"):
        SemiSupervised(threshold=1.5)
    label_oracle = VictimOracle(digits_victim, input_shape=(1, 8, 8), num_classes=10, mode="label")
    pool = digits_splits.pool
    with pytest.raises(
        InputError, match="labels: expected 'hard' or 'auto' for a 'label' oracle, got 'soft'"
    ):
        Marich()(label_oracle, pool, 50)
    with pytest.raises(InputError, match="initial: expected a share"):
        ActiveExtraction(initial=0)(label_oracle, pool, 50)
    with pytest.raises(InputError, match="rounds: expected a non-negative integer, got -1"):
        ActiveExtraction(rounds=-1)(label_oracle, pool, 50)
    with pytest.raises(InputError, match=r"initial_per_class: expected a non-negative integer, got 2\.5"):
        ActiveExtraction(initial_per_class=2.5)(label_oracle, pool, 50)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="bad options"):
        ActiveExtraction(strategy="dfal", strategy_options={"iters": 3})(label_oracle, pool, 50)
    assert label_oracle.ledger.count == 0


# --------------------------------------------------------------------- DFAL's adversarial examples


def test_dfal_adversarial_examples_cross_the_substitute_boundary() -> None:
    """Ducoffe & Precioso's DFAL trains on x + r(x), r the DeepFool perturbation: on a linear
    2-class model (boundary x₀ = 0) the example is x mirrored just past the boundary."""
    lin = nn.Linear(2, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
        lin.bias.zero_()
    model = nn.Sequential(lin)
    x = torch.tensor([[0.5, 1.0], [-2.0, 0.0]])
    adv = create_strategy("dfal").adversarial(model, x)  # type: ignore[attr-defined]
    assert (model(adv).argmax(1) != model(x).argmax(1)).all()
    # one DeepFool step r = −sign(x₀)(|x₀| + 1e-4/2)·e₀ reaches the boundary (gap 2|x₀|, ‖w‖ = 2);
    # the example is x + 1.02·r, i.e. x₀ ↦ −sign(x₀)(0.02|x₀| + 1.02·5e-5)
    torch.testing.assert_close(adv[:, 1], x[:, 1])
    expected = -x[:, 0].sign() * (0.02 * x[:, 0].abs() + 1.02 * 5e-5)
    torch.testing.assert_close(adv[:, 0], expected, atol=1e-5, rtol=0)


def test_dfal_with_adversarial_examples_spends_only_its_budget(digits_splits, digits_victim) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InputError, match="needs a 'dfal'"):
        ActiveExtraction(strategy="kcenter", adversarial_examples=True).check_params(
            APIDescription.of(VictimOracle(digits_victim, input_shape=(1, 8, 8), num_classes=10)), None, 10
        )
    ev = Evaluator.from_victim(digits_victim, digits_splits.test)
    attack = ActiveExtraction(
        strategy="dfal", strategy_options={"max_iter": 4, "classes": 3}, adversarial_examples=True,
        train=FAST, rounds=3, round_epochs=4, initial_per_class=0, semi=None,
    )  # fmt: skip
    victim = Counting(digits_victim)
    oracle = VictimOracle(victim, input_shape=(1, 8, 8), num_classes=10, mode="label")
    result = attack(oracle, digits_splits.pool, 150, substitute="cnn", evaluator=ev, seed=0)
    assert result.queries == oracle.ledger.count == victim.evaluated == 150  # the examples cost nothing
    assert result.metrics["fidelity"] >= 0.6, result.metrics  # chance is ~0.1
