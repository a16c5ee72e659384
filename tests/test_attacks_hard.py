"""Stage-2 hard-label attacks: augmentation, boundary probing and mixup.

Budgets are honoured exactly (every boundary-search step included), only the argmax of
each answer is used, and each attack steals the tiny digits victim well above chance.
"""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import Counting

from mextract.attacks import HardLabel
from mextract.attacks.hard import HardAugment, HardBoundary, HardMixup, _beta, _label_pairs
from mextract.errors import InputError
from mextract.metrics import Evaluator
from mextract.oracle import VictimOracle
from mextract.training import TrainConfig

FAST = TrainConfig(epochs=15, batch_size=32, lr=0.05)
ONE = TrainConfig(epochs=1, batch_size=64)


def _oracle(victim, mode: str = "label", **kw):  # type: ignore[no-untyped-def]
    return VictimOracle(victim, input_shape=(1, 8, 8), num_classes=10, mode=mode, k=3, decimals=4, **kw)


# --------------------------------------------------------------------- steals that work


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    ("attack", "budget", "threshold"),
    [
        # 8×8 digits: a flip changes a digit, and padding 4 would shift it by half its width
        (HardAugment(train=FAST, flip=False, pad=1), 400, 0.80),
        (HardBoundary(train=FAST), 600, 0.70),
        (HardMixup(train=FAST), 400, 0.85),
    ],
    ids=["augment", "boundary", "mixup"],
)
def test_tiny_hard_label_steal_reaches_fidelity_within_budget(
    digits_splits,
    digits_victim,
    attack,
    budget,
    threshold,
    seed,  # type: ignore[no-untyped-def]
) -> None:
    victim = Counting(digits_victim)
    oracle = _oracle(victim)
    ev = Evaluator.from_victim(digits_victim, digits_splits.test)
    result = attack(
        oracle, digits_splits.pool, budget, substitute="cnn", evaluator=ev, seed=seed, device="cpu"
    )
    assert result.queries == oracle.ledger.count == victim.evaluated == budget
    assert result.metrics["fidelity"] >= threshold, result.metrics
    assert result.history and result.history[-1].queries == budget
    assert result.attack == attack.name


@pytest.mark.parametrize(
    "attack",
    [HardAugment(train=ONE, pad=1), HardBoundary(train=ONE), HardMixup(train=ONE)],
    ids=["augment", "boundary", "mixup"],
)
def test_only_the_top1_label_is_used_and_runs_are_seeded(digits_splits, digits_victim, attack) -> None:  # type: ignore[no-untyped-def]
    def params(mode: str, seed: int) -> torch.Tensor:
        model = attack(_oracle(digits_victim, mode), digits_splits.pool, 150, seed=seed, device="cpu").model
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    ref = params("label", 0)
    # "rounded" is left out: rounding can tie the top two classes exactly at the boundary
    # points these attacks seek, and then the top-1 label is genuinely lost.
    for mode in ("probs", "logits", "topk"):
        assert torch.equal(ref, params(mode, 0)), mode
    assert not torch.equal(ref, params("label", 1))


# --------------------------------------------------------------------- augmentation


def test_augment_queries_new_views_beyond_the_pool(digits_splits, digits_victim) -> None:  # type: ignore[no-untyped-def]
    pool = digits_splits.pool.x[:100]
    victim = Counting(digits_victim)
    oracle = _oracle(victim)
    result = HardAugment(train=ONE, flip=True, pad=2)(oracle, pool, 250, seed=0, device="cpu")
    assert result.queries == oracle.ledger.count == victim.evaluated == 250
    q = victim.queried
    assert len(torch.unique(q.flatten(1), dim=0)) > 200  # new points, not 2.5 copies of the pool
    # each view is a transformed pool image: same total ink up to cropping and rotation
    assert float(q.sum((1, 2, 3)).mean()) == pytest.approx(float(pool.sum((1, 2, 3)).mean()), rel=0.2)


def test_augment_views_cover_the_pool_evenly() -> None:
    from types import SimpleNamespace

    from mextract.attacks.hard import _views

    ctx = SimpleNamespace(pool=torch.zeros(7, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(_views(ctx, 23), minlength=7)  # type: ignore[arg-type]
    assert int(counts.sum()) == 23 and int(counts.min()) == 3 and int(counts.max()) == 4
    assert len(_views(ctx, 5).unique()) == 5  # type: ignore[arg-type]


def test_augment_without_flip_crop_or_rotation_queries_the_pool_itself(digits_splits, digits_victim) -> None:  # type: ignore[no-untyped-def]
    victim = Counting(digits_victim)
    pool = digits_splits.pool.x[:40]
    HardAugment(train=ONE, flip=False, pad=0, degrees=0)(_oracle(victim), pool, 40, seed=0, device="cpu")
    d = torch.cdist(victim.queried.flatten(1), pool.flatten(1))
    assert bool((d.min(1).values == 0).all())  # each query is a pool image …
    assert len(d.argmin(1).unique()) == 40  # … and each pool image is queried once


# --------------------------------------------------------------------- boundary probing


class Threshold(torch.nn.Module):
    """A 1-D victim with its decision boundary at x = 0.5 (class 1 above)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.reshape(len(x), 1) - 0.5
        return torch.cat([-d, d], 1)


def test_boundary_search_halves_the_bracket_every_step_and_counts_every_probe() -> None:
    victim = Counting(Threshold())
    oracle = VictimOracle(victim, input_shape=(1,), num_classes=2, mode="label")
    pool = torch.rand(200, 1, generator=torch.Generator().manual_seed(0))
    result = HardBoundary(train=ONE, steps=10)(oracle, pool, 110, substitute="mlp", seed=0, device="cpu")
    # 110 = 10 seeds + 10 searches × 10 steps, all answered by the victim
    assert result.queries == oracle.ledger.count == victim.evaluated == 110
    probes = victim.queried[10:].view(10, 10)  # step × search
    # each step queries every search's midpoint at once and closes in on x = 0.5
    # (step s's midpoint is within half the bracket, 2^-(s+1) of the segment, of the boundary)
    gap = (probes - 0.5).abs()
    bound = 2.0 ** -torch.arange(1, 11, dtype=torch.float32).view(10, 1)
    assert bool((gap <= bound + 1e-6).all()), gap
    assert float(gap[-1].max()) <= 2.0**-10 + 1e-6


def test_boundary_with_a_small_budget_labels_seeds_only(digits_splits, digits_victim) -> None:  # type: ignore[no-untyped-def]
    victim = Counting(digits_victim)
    oracle = _oracle(victim)
    result = HardBoundary(train=ONE, steps=10)(oracle, digits_splits.pool, 11, seed=0, device="cpu")
    assert result.queries == victim.evaluated == 11
    d = torch.cdist(victim.queried.flatten(1), digits_splits.pool.x.flatten(1))
    assert bool((d.min(1).values == 0).all())  # pool images only, no probes


def test_boundary_stops_gracefully_when_the_oracle_budget_ends(digits_splits, digits_victim) -> None:  # type: ignore[no-untyped-def]
    victim = Counting(digits_victim)
    oracle = _oracle(victim, budget=75)
    # planned: 10 seeds + 10 searches × 10 steps = 110; the oracle stops it at 75
    result = HardBoundary(train=ONE)(oracle, digits_splits.pool, 110, seed=0, device="cpu")
    assert result.queries == oracle.ledger.count == victim.evaluated == 75


def test_boundary_without_differently_labelled_pairs_spends_only_the_seeds(digits_splits, caplog) -> None:  # type: ignore[no-untyped-def]
    class Constant(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.zeros(len(x), 10).index_fill_(1, torch.tensor([3]), 1.0)

    victim = Counting(Constant())
    oracle = _oracle(victim)
    with caplog.at_level(logging.WARNING, logger="mextract.attacks.hard"):
        result = HardBoundary(train=ONE)(oracle, digits_splits.pool, 110, seed=0, device="cpu")
    assert result.queries == victim.evaluated == 10
    assert "unspent" in caplog.text


def test_label_pairs_are_distinct_and_differently_labelled() -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.tensor([0, 0, 1, 1, 2])
    pairs = _label_pairs(y, 100, g)
    # 8 unordered differently labelled pairs exist among these five points
    assert len(pairs) == 8
    assert bool((y[pairs[:, 0]] != y[pairs[:, 1]]).all())
    assert len({tuple(sorted(p)) for p in pairs.tolist()}) == 8
    assert len(_label_pairs(torch.zeros(5, dtype=torch.long), 3, g)) == 0


# --------------------------------------------------------------------- mixup


def test_mixup_queries_mixtures_of_labelled_endpoints(digits_splits, digits_victim) -> None:  # type: ignore[no-untyped-def]
    pool = digits_splits.pool.x[:60]
    victim = Counting(digits_victim)
    oracle = _oracle(victim)
    result = HardMixup(train=ONE)(oracle, pool, 300, seed=0, device="cpu")
    # budget > 2·pool: every pool image is an endpoint, the other 240 queries are mixtures
    assert result.queries == oracle.ledger.count == victim.evaluated == 300
    q = victim.queried
    assert torch.equal(q[:60].sort(0).values, pool.sort(0).values)
    mixed = q[60:].flatten(1)
    # every mixture lies on a segment between two endpoints: it is within the pool's hull in ink
    assert len(torch.unique(mixed, dim=0)) == 240
    assert float(mixed.max()) <= float(pool.max()) + 1e-6


def test_mixup_target_option_changes_the_training_targets_of_the_same_queries(
    digits_splits, digits_victim, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """Same seed, same queries; "pair" trains on the endpoints' interpolated labels, "oracle" on
    the victim's label of each mixed image, "both" on their average."""
    import mextract.attacks.hard as hard

    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def capture(ctx, x, targets, **kw):  # type: ignore[no-untyped-def]
        seen[current] = (x.clone(), targets.clone())
        return ctx.make_substitute()

    monkeypatch.setattr(hard, "train_substitute", capture)
    for current in ("pair", "oracle", "both"):
        result = HardMixup(train=ONE, target=current)(_oracle(digits_victim), digits_splits.pool, 60, seed=0)
        assert result.queries == 60 and result.config["target"] == current
    x, pair = seen["pair"]
    assert torch.equal(seen["oracle"][0], x) and torch.equal(seen["both"][0], x)  # the same queries
    oracle, both = seen["oracle"][1], seen["both"][1]
    s = 30  # seed_fraction ½: 30 endpoints, then 30 mixed images
    with torch.no_grad():
        victim_labels = digits_victim(x).argmax(1)
    for t in (pair, oracle, both):  # endpoints: one-hot victim labels whatever the option
        assert torch.equal(t[:s], torch.nn.functional.one_hot(victim_labels[:s], 10).float())
    assert torch.equal(oracle[s:], torch.nn.functional.one_hot(victim_labels[s:], 10).float())
    assert torch.allclose(both[s:], (pair[s:] + oracle[s:]) / 2)
    assert torch.allclose(pair[s:].sum(1), torch.ones(s))
    assert int((pair[s:] > 0).sum(1).max()) == 2  # an interpolation of two labels, not a one-hot
    assert not torch.allclose(pair[s:], oracle[s:])


def test_beta_draws() -> None:
    g = torch.Generator().manual_seed(0)
    lam = _beta(1.0, 20_000, g)
    assert float(lam.min()) >= 0 and float(lam.max()) <= 1
    assert float(lam.mean()) == pytest.approx(0.5, abs=0.01)
    assert float(lam.var()) == pytest.approx(1 / 12, abs=0.005)  # Beta(1, 1) is uniform
    small = _beta(0.2, 20_000, g)
    assert float(((small < 0.1) | (small > 0.9)).float().mean()) > 0.6  # α < 1: mostly near the ends


# --------------------------------------------------------------------- together, and bad input


def test_hard_attacks_compose_with_the_basic_baseline_on_one_oracle(digits_splits, digits_victim) -> None:  # type: ignore[no-untyped-def]
    victim = Counting(digits_victim)
    oracle = _oracle(victim)
    runs = [(HardLabel(train=ONE), 50), (HardAugment(train=ONE, pad=1), 60), (HardBoundary(train=ONE), 70),
            (HardMixup(train=ONE), 80)]  # fmt: skip
    for attack, budget in runs:
        result = attack(oracle, digits_splits.pool, budget, seed=0, device="cpu")
        assert result.queries == budget, attack.name
    assert oracle.ledger.count == victim.evaluated == sum(b for _, b in runs)


def test_bad_hard_attack_arguments(digits_splits, digits_victim) -> None:  # type: ignore[no-untyped-def]
    oracle = _oracle(digits_victim)
    pool = digits_splits.pool
    cases = [
        (HardAugment(pad=-1), "pad: expected an integer >= 0, got -1"),
        (HardAugment(degrees=200), "degrees: expected a number in"),
        (HardAugment(flip="yes"), "flip: expected True or False"),  # type: ignore[arg-type]
        (HardBoundary(steps=0), "steps: expected an integer >= 1, got 0"),
        (HardBoundary(seed_fraction=1.5), r"seed_fraction: expected a number in \(0, 1\)"),
        (HardMixup(alpha=0), "alpha: expected a positive number, got 0"),
        (HardMixup(target="soft"), "target: expected one of pair, oracle, both, got 'soft'"),  # type: ignore[arg-type]
        (HardMixup(seed_fraction=0), "seed_fraction"),
    ]
    for attack, message in cases:
        with pytest.raises(InputError, match=message):
            attack(oracle, pool, 10)
    tabular = VictimOracle(lambda x: x[:, :3], input_shape=(4,), num_classes=3)
    with pytest.raises(InputError, match=r"expected image inputs shaped \(C, H, W\), got input shape \(4,\)"):
        HardAugment()(tabular, torch.zeros(5, 4), 10)
    assert oracle.ledger.count == tabular.ledger.count == 0
