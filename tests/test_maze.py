"""MAZE (Kariyappa et al., CVPR 2021) on the tiny 8×8 digits victim: it learns beyond chance,
every image the victim sees is one counted query (the generator's perturbed images
included; the first clone step reuses the generator's answers), the budget is never
passed, and bad settings, label-only APIs and budgets below one iteration are refused
before any query."""

from __future__ import annotations

import pytest
import torch
from helpers import Counting

from mextract.attacks.base import AttackContext
from mextract.attacks.datafree import to_image
from mextract.attacks.maze import MAZE, MAZEGenerator, kl_per_sample
from mextract.attacks.registry import check_attack_spec, create_attack
from mextract.errors import InputError
from mextract.metrics import Evaluator
from mextract.models import create_model
from mextract.oracle import APIDescription, Client, VictimOracle
from mextract.training import TrainConfig

#: a short final phase for the 8×8 victim (a few thousand stored pairs)
QUICK = TrainConfig(epochs=8, batch_size=64, lr=0.05)


def _small_maze(**options: object) -> MAZE:
    base: dict[str, object] = {"batch_size": 32, "latent_dim": 32, "ngf": 16, "evaluations": 1}
    base["train"] = QUICK
    return MAZE(**{**base, **options})  # type: ignore[arg-type]


def test_maze_learns_counts_every_image_and_its_final_phase_can_be_switched_off(  # type: ignore[no-untyped-def]
    digits_splits, digits_victim
) -> None:
    """Same seed, same game, same queries: the online clone alone (``retrain=False``), then a
    substitute retrained on every stored pair. Cost ``B·(N_G·(m+1) + N_C − 1)`` = 32·15 =
    480; ledger = reported = images the victim saw = ⌊3000/480⌋·480 = 2,880 ≤ budget.
    Measured for seeds 0-2: retrained 0.56-0.63, online 0.32-0.45 (chance 0.1)."""
    ev = Evaluator.from_victim(digits_victim, digits_splits.test)
    budget, cost = 3000, 32 * (1 * (10 + 1) + 5 - 1)
    runs = {}
    for retrain in (False, True):
        victim = Counting(digits_victim)
        oracle = VictimOracle(victim, input_shape=(1, 8, 8), num_classes=10, mode="probs")
        attack = _small_maze(retrain=retrain)
        assert attack.queries_per_iteration == cost
        result = attack(oracle, None, budget, substitute="cnn", evaluator=ev, seed=0, device="cpu")
        n = (budget // cost) * cost
        assert result.queries == oracle.ledger.count == victim.evaluated == len(victim.queried) == n <= budget
        runs[retrain] = (result.metrics["fidelity"], victim.queried)
    assert torch.equal(runs[False][1], runs[True][1])  # the final phase queries nothing more
    assert runs[False][0] >= 0.2, runs  # the online clone alone, beyond chance
    assert runs[True][0] >= 0.4, runs
    assert runs[True][0] >= runs[False][0] + 0.1, runs


@pytest.mark.parametrize(
    ("options", "cost"),
    [
        ({}, 64 * (11 + 5 - 1)),  # 960, the defaults
        ({"batch_size": 128}, 1920),  # the paper's batch (the reference code's budget_per_iter)
        ({"n_generator": 0}, 64 * 5),  # no generator step: nothing to reuse
        ({"n_generator": 2, "directions": 1}, 64 * (2 * 2 + 5 - 1)),
    ],
)
def test_the_cost_of_one_iteration(options: dict[str, int], cost: int) -> None:
    assert MAZE(**options).queries_per_iteration == cost  # type: ignore[arg-type]


def test_every_query_is_counted_with_several_generator_steps_and_one_clone_step(digits_victim) -> None:  # type: ignore[no-untyped-def]
    """``N_G = 2``, ``m = 2``, ``N_C = 1``: the only clone step reuses the last generator
    batch, so an iteration costs 16·2·3 = 96 queries; 1,000 buys 10 of them, 40 unspent."""
    victim = Counting(digits_victim)
    oracle = VictimOracle(victim, input_shape=(1, 8, 8), num_classes=10, mode="logits")
    attack = _small_maze(batch_size=16, n_generator=2, directions=2, n_clone=1, n_replay=2, retrain=False)
    assert attack.queries_per_iteration == 96
    result = attack(oracle, None, 1000, substitute="cnn", seed=1, device="cpu")
    assert result.queries == oracle.ledger.count == victim.evaluated == 960


def test_the_gradient_estimate_points_along_the_true_gradient(digits_victim) -> None:  # type: ignore[no-untyped-def]
    """With many random unit directions, the forward-difference estimate of ``d(−KL)/d(pre)``
    correlates with the exact (white-box) gradient; each point costs ``m + 1`` queries and
    its unperturbed image and answer come back for the first clone step."""
    oracle = VictimOracle(digits_victim, input_shape=(1, 8, 8), num_classes=10, mode="logits")
    torch.manual_seed(0)
    sub = create_model("cnn", (1, 8, 8), 10).eval()
    ctx = AttackContext(
        api=Client(oracle, 10_000), pool=None, budget=10_000, make_substitute=lambda: sub,
        generator=torch.Generator().manual_seed(0), seed=0, device=torch.device("cpu"), callback=None,
    )  # fmt: skip
    attack = MAZE(directions=400)
    pre = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    est, _, base, base_probs = attack._estimate_gradient(ctx, sub, pre, None)
    assert oracle.ledger.count == 4 * 401
    assert torch.equal(base, to_image(pre))
    pre_t = pre.clone().requires_grad_(True)
    img = to_image(pre_t)
    p_victim = torch.softmax(digits_victim.eval()(img), 1)  # the victim's own gradient included
    assert torch.allclose(base_probs.float(), p_victim.detach(), atol=1e-5)
    loss = -kl_per_sample(p_victim, sub(img)).mean()
    (true,) = torch.autograd.grad(loss, pre_t)
    cos = torch.nn.functional.cosine_similarity(est.flatten(1), true.flatten(1), dim=1)
    assert bool((cos > 0.5).all()), cos


def test_the_generator_is_dfmes_with_an_affine_last_batch_norm() -> None:
    g = MAZEGenerator((1, 28, 28), latent_dim=100)
    assert g.block2[-1].affine
    assert g(torch.randn(3, 100)).shape == (3, 1, 28, 28)
    p = torch.softmax(torch.tensor([[1.0, 0.0, -1.0]]), 1)
    assert float(kl_per_sample(p, torch.tensor([[1.0, 0.0, -1.0]]) + 4.0)) < 1e-6


@pytest.mark.parametrize(
    ("options", "budget", "message"),
    [
        ({}, 959, r"budget: expected at least 960 queries \(one MAZE iteration: 64·\(1·\(10\+1\) \+ 5 - 1"),
        ({"batch_size": 1}, 10_000, "batch_size: expected at least 2"),
        ({"n_clone": 0}, 10_000, "n_clone: expected a positive integer"),
        ({"n_replay": -1}, 10_000, "n_replay: expected a non-negative integer"),
        ({"n_generator": 1.5}, 10_000, "n_generator: expected a non-negative integer"),
        ({"directions": 0}, 10_000, "directions: expected a positive integer"),
        ({"epsilon": 0}, 10_000, "epsilon: expected a positive number"),
        ({"lr_generator": -1e-3}, 10_000, "lr_generator: expected a positive number"),
        ({"momentum": 1.0}, 10_000, r"momentum: expected a number in \[0, 1\)"),
        ({"weight_decay": -1}, 10_000, "weight_decay: expected a non-negative number"),
        ({"pixels": "raw"}, 10_000, r"pixels: expected one of \['clip', 'affine'\]"),
        ({"retrain": "yes"}, 10_000, "retrain: expected true or false"),
        ({"retrain_loss": "mse"}, 10_000, r"retrain_loss: expected one of \['l1', 'kl'\]"),
        ({"train": {"epochs": 3}}, 10_000, "train: expected training settings"),
    ],
)
def test_maze_refuses_bad_settings_before_any_query(digits_victim, options, budget, message) -> None:  # type: ignore[no-untyped-def]
    victim = Counting(digits_victim)
    oracle = VictimOracle(victim, input_shape=(1, 8, 8), num_classes=10, mode="probs")
    with pytest.raises(InputError, match=message):
        MAZE(**options)(oracle, None, budget, seed=0)
    assert oracle.ledger.count == victim.evaluated == 0


@pytest.mark.parametrize(("mode", "extra"), [("label", {}), ("topk", {"k": 3}), ("rounded", {"decimals": 2})])
def test_maze_refuses_answers_without_the_full_distribution(digits_victim, mode, extra) -> None:  # type: ignore[no-untyped-def]
    oracle = VictimOracle(digits_victim, input_shape=(1, 8, 8), num_classes=10, mode=mode, **extra)
    with pytest.raises(InputError, match=f"answer mode: MAZE .* expected 'logits' or 'probs', got '{mode}'"):
        MAZE()(oracle, None, 10_000, seed=0)
    assert oracle.ledger.count == 0


def test_maze_is_registered_and_checked_by_its_spec() -> None:
    assert isinstance(create_attack("maze", train={"epochs": 3}), MAZE)
    with pytest.raises(InputError, match="bad train options"):
        create_attack("maze", train={"epochz": 3})
    api = APIDescription(input_shape=(1, 28, 28), num_classes=10, mode="label")
    with pytest.raises(InputError, match="answer mode: MAZE"):
        check_attack_spec("maze", api, budget=20_000)
    tabular = APIDescription(input_shape=(13,), num_classes=3, mode="probs")
    with pytest.raises(InputError, match=r"expected \(C, H, W\)"):
        check_attack_spec("maze", tabular, budget=20_000)
