"""Stage-1 soft-label attacks: random-erasing distillation and SPSG."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import Counting

from mextract.attacks.base import AttackContext
from mextract.attacks.soft import ErasingDistillation
from mextract.attacks.spsg import SPSG, superpixels
from mextract.attacks.substitute import soft_targets
from mextract.errors import InputError
from mextract.metrics import Evaluator
from mextract.oracle import Client, VictimOracle
from mextract.training import TrainConfig

FAST = TrainConfig(epochs=15, batch_size=32, lr=0.05)


def _oracle(victim, mode: str = "probs", **kw):  # type: ignore[no-untyped-def]
    return VictimOracle(victim, input_shape=(1, 8, 8), num_classes=10, mode=mode, **kw)


def _context(oracle: VictimOracle, pool: torch.Tensor, budget: int) -> AttackContext:
    return AttackContext(
        api=Client(oracle, budget), pool=pool, budget=budget, make_substitute=lambda: torch.nn.Identity(),
        generator=torch.Generator().manual_seed(0), seed=0, device=torch.device("cpu"), callback=None,
    )  # fmt: skip


# ------------------------------------------------------------------ kd_erasing


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_erasing_kd_reaches_fidelity_and_spends_exactly_the_budget(
    digits_splits, digits_victim, seed
) -> None:  # type: ignore[no-untyped-def]
    victim = Counting(digits_victim)
    oracle = _oracle(victim, log=True)
    ev = Evaluator.from_victim(digits_victim, digits_splits.test)
    result = ErasingDistillation(train=FAST)(
        oracle, digits_splits.pool, 400, substitute="cnn", evaluator=ev, seed=seed
    )
    assert result.queries == oracle.ledger.count == victim.evaluated == 400
    assert result.metrics["fidelity"] >= 0.9, result.metrics
    assert result.history[-1].queries == 400
    # the victim saw clean pool images only: erasing happens after the query
    queried, _ = oracle.ledger.log()
    pool = digits_splits.pool.x.flatten(1)
    assert bool((torch.cdist(queried.flatten(1), pool).amin(1) == 0).all())


def test_erasing_transform_erases_rectangles_with_zeros() -> None:
    x = torch.ones(200, 1, 8, 8)
    attack = ErasingDistillation(erase_p=1.0)
    out = attack._erase(x, torch.Generator().manual_seed(0))
    erased = (out == 0).flatten(1).float().mean(1)
    assert bool((erased > 0).all()) and float(erased.max()) <= 0.5  # area ≤ 0.33 up to rounding
    assert torch.equal(ErasingDistillation(erase_p=0.0)._erase(x, torch.Generator()), x)


def test_erasing_kd_bad_parameters(digits_splits, digits_victim) -> None:  # type: ignore[no-untyped-def]
    oracle = _oracle(digits_victim)
    with pytest.raises(InputError, match="erase_p: expected a probability"):
        ErasingDistillation(erase_p=1.5)(oracle, digits_splits.pool, 10)
    with pytest.raises(InputError, match="erase_scale: expected 0 < low <= high <= 1"):
        ErasingDistillation(erase_scale=(0.5, 0.1))(oracle, digits_splits.pool, 10)
    with pytest.raises(InputError, match="temperature"):
        ErasingDistillation(temperature=0)(oracle, digits_splits.pool, 10)
    tabular = VictimOracle(lambda a: a[:, :3], input_shape=(4,), num_classes=3)
    with pytest.raises(InputError, match=r"expected image inputs shaped \(C, H, W\), got \(4,\)"):
        ErasingDistillation()(tabular, torch.rand(10, 4), 10)
    assert oracle.ledger.count == 0 and tabular.ledger.count == 0


# ------------------------------------------------------------------ spsg


def test_superpixels_label_every_pixel_contiguously(digits_splits) -> None:  # type: ignore[no-untyped-def]
    labels, counts = superpixels(digits_splits.pool.x[:30], 16, 0.1)
    assert labels.shape == (30, 8, 8) and counts.shape == (30,)
    assert bool((counts >= 2).all()) and int(counts.max()) <= 30
    for lab, k in zip(labels, counts, strict=True):  # every label 0..k-1 is used
        assert torch.equal(lab.unique(), torch.arange(int(k)))
    smooth = torch.rand(3, 3, 4, 4, generator=torch.Generator().manual_seed(0))  # a natural-ish image
    rgb = torch.nn.functional.interpolate(smooth, size=(16, 16), mode="bilinear")
    rgb_labels, rgb_counts = superpixels(rgb, 16, 10.0)
    assert rgb_labels.shape == (3, 16, 16) and bool((rgb_counts > 4).all())


@pytest.mark.parametrize("difference", ["forward", "central"])
def test_spsg_probes_estimate_the_victims_superpixel_gradient(
    digits_splits, digits_victim, difference
) -> None:  # type: ignore[no-untyped-def]
    """Ĝ is the victim's Jacobian summed over superpixels: the victim itself (as the
    substitute) has a gradient distance far below ‖Ĝ‖², and each image costs 1 + k or 1 + 2k."""
    victim = Counting(copy.deepcopy(digits_victim).double())
    oracle = _oracle(victim, dtype=torch.float64)
    x = digits_splits.pool.x[:20]
    attack = SPSG(difference=difference, projections=None)
    labels, counts = superpixels(x, attack.n_segments, 0.1)
    answers, g_hat = attack._probe(_context(oracle, digits_splits.pool.x, 10**6), x, labels, counts)
    per_segment = 1 if difference == "forward" else 2
    assert oracle.ledger.count == victim.evaluated == int((1 + per_segment * counts).sum())
    s = g_hat.shape[2]
    soft = soft_targets(answers, _context(oracle, x, 1), attack.temperature)
    targets = torch.cat([soft, torch.ones(20, 1), g_hat.flatten(1), labels.flatten(1).float()], 1)
    model = copy.deepcopy(digits_victim).eval()
    full = attack._loss(10, s, 0)(model, x, targets)
    outputs_only = SPSG(grad_weight=0)._loss(10, s, 0)(model, x, targets)
    distance = float((full - outputs_only).detach())
    norm = float((g_hat**2).sum((1, 2)).mean())
    assert norm > 0.1 and 0 <= distance < 0.1 * norm
    # a Rademacher projection estimates the same distance without bias
    sketched = [float((SPSG()._loss(10, s, i)(model, x, targets) - outputs_only).detach()) for i in range(40)]
    assert sum(sketched) / 40 == pytest.approx(distance, rel=0.5, abs=0.02)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_spsg_reaches_fidelity_and_spends_exactly_the_budget(digits_splits, digits_victim, seed) -> None:  # type: ignore[no-untyped-def]
    victim = Counting(digits_victim)
    oracle = _oracle(victim)
    ev = Evaluator.from_victim(digits_victim, digits_splits.test)
    attack = SPSG(train=FAST)
    result = attack(oracle, digits_splits.pool, 300, substitute="cnn", evaluator=ev, seed=seed)
    assert result.queries == oracle.ledger.count == victim.evaluated == 300
    assert result.metrics["fidelity"] >= 0.65, result.metrics  # 0.78–0.80 over seeds 0–2
    assert result.history[-1].queries == 300


def test_spsg_accounts_every_probe(digits_splits, digits_victim) -> None:  # type: ignore[no-untyped-def]
    """Without the remainder, it spends exactly Σ(1 + k_i) over the images it probes, the
    longest random prefix of the pool that fits the budget."""
    budget, one = 200, TrainConfig(epochs=1, batch_size=32)
    for difference, per_segment in (("forward", 1), ("central", 2)):
        victim = Counting(digits_victim)
        oracle = _oracle(victim, log=True)
        attack = SPSG(difference=difference, spend_remainder=False, match_kd_steps=False, train=one)
        result = attack(oracle, digits_splits.pool, budget, seed=0)
        order = torch.randperm(len(digits_splits.pool.x), generator=torch.Generator().manual_seed(0))
        _, counts = superpixels(digits_splits.pool.x[order[:50]], attack.n_segments, 0.1)
        cum = (1 + per_segment * counts).cumsum(0)
        n = int((cum <= budget).sum())
        assert result.queries == oracle.ledger.count == victim.evaluated == int(cum[n - 1]) <= budget
        assert budget - result.queries < 1 + per_segment * int(counts[n])
        queried, _ = oracle.ledger.log()
        assert torch.equal(queried[:n], digits_splits.pool.x[order[:n]])  # clean images first


def test_spsg_below_one_image_degrades_to_distillation(digits_splits, digits_victim) -> None:  # type: ignore[no-untyped-def]
    victim = Counting(digits_victim)
    oracle = _oracle(victim)
    result = SPSG(train=TrainConfig(epochs=1))(oracle, digits_splits.pool, 5, seed=0)
    assert result.queries == victim.evaluated == 5
    with pytest.raises(InputError, match="buys no image"):
        SPSG(spend_remainder=False, train=TrainConfig(epochs=1))(
            _oracle(digits_victim), digits_splits.pool, 5
        )


def test_spsg_bad_parameters_and_modes(digits_splits, digits_victim) -> None:  # type: ignore[no-untyped-def]
    oracle = _oracle(digits_victim)
    pool = digits_splits.pool
    bad = [
        (SPSG(n_segments=0), "n_segments: expected a positive integer, got 0"),
        (SPSG(epsilon=0.0), "epsilon: expected a positive number"),
        (SPSG(grad_weight=-1.0), "grad_weight: expected a non-negative number"),
        (SPSG(difference="backward"), "difference: expected 'forward' or 'central', got 'backward'"),  # type: ignore[arg-type]
        (SPSG(projections=0), "projections: expected a positive integer or None, got 0"),
        (SPSG(compactness=-1.0), "compactness: expected a positive number or None"),
        (SPSG(temperature=0.0), "temperature: expected a positive number"),
    ]
    for attack, message in bad:
        with pytest.raises(InputError, match=message):
            attack(oracle, pool, 100)
    with pytest.raises(InputError, match=r"expected soft answers .* got 'label'"):
        SPSG()(_oracle(digits_victim, "label"), pool, 100)
    tabular = VictimOracle(lambda a: a[:, :3], input_shape=(4,), num_classes=3)
    with pytest.raises(InputError, match=r"expected image inputs shaped \(C, H, W\)"):
        SPSG()(tabular, torch.rand(10, 4), 10)
    assert oracle.ledger.count == 0
