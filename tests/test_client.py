"""The client view: all an attack gets of the victim is what a remote client would have."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mextract.attacks import KnockoffDistillation
from mextract.attacks.base import Attack, AttackContext
from mextract.data import IMAGE_RANGE, UNBOUNDED, Dataset, ValueRange, check_disjoint
from mextract.defences.perturb import Rounding, TopK
from mextract.errors import BudgetExceededError, DataError, InputError
from mextract.metrics import Evaluator
from mextract.oracle import AnswerMode, APIDescription, Client, VictimOracle
from mextract.training import TrainConfig


def _oracle(victim: nn.Module, **kw: object) -> VictimOracle:
    return VictimOracle(victim, input_shape=(1, 8, 8), num_classes=10, **kw)  # type: ignore[arg-type]


def test_the_client_exposes_query_description_spent_and_remaining_only(digits_victim) -> None:  # type: ignore[no-untyped-def]
    oracle = _oracle(digits_victim, mode="logits", budget=100, value_range=IMAGE_RANGE)
    client = Client(TopK(oracle, k=3), budget=40)
    public = {n for n in dir(client) if not n.startswith("_")}
    assert public == {"query", "description", "spent", "remaining", "input_shape", "num_classes", "mode",
                      "dtype", "value_range"}  # fmt: skip
    assert not hasattr(client, "__dict__")  # no attribute can be added to smuggle an oracle in
    d = client.description
    assert (d.mode, d.k, d.decimals, d.value_range, d.input_shape) == (AnswerMode.TOPK, 3, None, IMAGE_RANGE,
                                                                        (1, 8, 8))  # fmt: skip
    with pytest.raises(AttributeError):
        client.spent = 0  # type: ignore[misc]
    x = torch.rand(30, 1, 8, 8)
    assert client.query(x).shape == (30, 10)
    assert (client.spent, client.remaining, oracle.ledger.count) == (30, 10, 30)
    with pytest.raises(BudgetExceededError):  # refused whole, before the API sees it
        client.query(x[:11])
    assert oracle.ledger.count == 30
    # the API's own quota is what a client is told when it is the smaller
    small = Client(_oracle(digits_victim, budget=5))
    assert small.remaining == 5


def test_description_round_trips_and_checks_its_fields() -> None:
    d = APIDescription((1, 8, 8), 10, mode="rounded", decimals=2, value_range=IMAGE_RANGE,
                       dtype=torch.float64)  # type: ignore[arg-type]  # fmt: skip
    assert APIDescription.from_json(d.to_json()) == d
    assert APIDescription.of(Rounding(_oracle(nn.Flatten(), mode="logits"), decimals=3)).decimals == 3
    with pytest.raises(InputError, match="needs an integer k"):
        APIDescription((4,), 3, mode=AnswerMode.TOPK)
    with pytest.raises(InputError, match="num_classes"):
        APIDescription((4,), 1)
    with pytest.raises(InputError, match="malformed"):
        APIDescription.from_json({"num_classes": 3})


def test_an_attack_sees_no_oracle_ledger_or_evaluator(digits_splits, digits_victim) -> None:  # type: ignore[no-untyped-def]
    seen: list[AttackContext] = []

    class Spy(KnockoffDistillation):
        def run(self, ctx: AttackContext) -> nn.Module:
            seen.append(ctx)
            return super().run(ctx)

    ev = Evaluator.from_victim(digits_victim, digits_splits.test)
    result = Spy(train=TrainConfig(epochs=3))(_oracle(digits_victim), digits_splits.pool, 60, evaluator=ev)
    ctx = seen[0]
    assert isinstance(ctx.api, Client)
    for value in vars(ctx).values():  # nothing in the context is an oracle, a ledger or an evaluator
        assert type(value).__name__ not in ("VictimOracle", "Ledger", "Evaluator", "Dataset")
    assert not hasattr(ctx, "evaluator") and not hasattr(ctx, "oracle")
    # the learning curve is still there, scored on the runner's side: one point per epoch here,
    # the last one on the final substitute
    assert [(p.epoch, p.queries) for p in result.history] == [(1, 60), (2, 60), (3, 60)]
    assert result.history[-1].fidelity == pytest.approx(result.metrics["fidelity"])


def test_the_oracle_refuses_queries_outside_the_declared_range(digits_victim) -> None:  # type: ignore[no-untyped-def]
    oracle = _oracle(digits_victim, value_range=IMAGE_RANGE)
    with pytest.raises(DataError, match=r"query: values lie in \[0, 1.5\], expected \[0, 1\]"):
        oracle.query(torch.full((2, 1, 8, 8), 1.5).index_fill_(0, torch.tensor([0]), 0.0))
    assert oracle.ledger.count == 0
    assert oracle.query(torch.rand(2, 1, 8, 8)).shape == (2, 10)
    topk = TopK(_oracle(digits_victim, mode="logits", value_range=IMAGE_RANGE), k=2)
    assert topk.value_range == IMAGE_RANGE


class _Probe(Attack):
    """Queries beyond [0, 1] unless it reads the declared range."""

    name = "probe"

    def __init__(self, clamp: bool) -> None:
        self.clamp = clamp

    def run(self, ctx: AttackContext) -> nn.Module:
        x = ctx.pool[:4] + 0.5  # type: ignore[index]
        if self.clamp:
            x = x.clamp(ctx.api.value_range.low, ctx.api.value_range.high)
        ctx.api.query(x)
        return nn.Identity()


def test_attacks_read_the_range_from_the_description(digits_splits, digits_victim) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(DataError, match="expected"):
        _Probe(clamp=False)(_oracle(digits_victim, value_range=IMAGE_RANGE), digits_splits.pool, 10)
    result = _Probe(clamp=True)(_oracle(digits_victim, value_range=IMAGE_RANGE), digits_splits.pool, 10)
    assert result.queries == 4


# --------------------------------------------------------------------------- leaking pools


def test_content_keys_find_the_same_sample_through_different_paths() -> None:
    x8 = np.random.default_rng(0).integers(0, 256, size=(20, 1, 8, 8), dtype=np.uint8)
    a = Dataset(torch.from_numpy((x8 / 255.0).astype(np.float32)), None, tuple("0123456789"), "a")
    b = Dataset(torch.from_numpy(x8.astype(np.float32) / np.float32(255)), None, tuple("0123456789"), "b")
    with pytest.raises(DataError, match="shares 20 sample"):
        check_disjoint(a, {"the test set": b})
    other = Dataset(torch.rand(20, 1, 8, 8), None, tuple("0123456789"), "c")
    check_disjoint(a, {"the test set": other})
    tab = Dataset(torch.randn(5, 4), None, ("a", "b"), "t", UNBOUNDED)
    with pytest.raises(DataError, match="shares 1"):
        check_disjoint(tab, {"the victim's training data": tab.subset(torch.tensor([2]))})
    assert ValueRange.for_shape((4,)) == UNBOUNDED


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mextract.experiments import train_victim_run

    out = tmp_path_factory.mktemp("run")
    train_victim_run(out, dataset="digits", device="cpu")
    return out


def test_a_pool_holding_the_victims_own_data_is_refused(digits_run: Path, tmp_path: Path) -> None:
    from mextract.data import load_splits
    from mextract.experiments import attack_run

    kw = {"attack": "kd", "budget": 10, "attack_options": {"train": {"epochs": 1}}, "device": "cpu"}
    with pytest.raises(DataError, match=r"shares \d+ sample\(s\) with the victim's training data"):
        attack_run(digits_run / "victim", pool_dataset="digits", **kw)  # type: ignore[arg-type]
    test = load_splits("digits", seed=0).test
    np.savez(tmp_path / "pool.npz", x=test.x[:30].numpy())
    with pytest.raises(DataError, match=r"shares 30 sample\(s\) with the test set"):
        attack_run(digits_run / "victim", pool_data=tmp_path / "pool.npz", **kw)  # type: ignore[arg-type]
    rec = attack_run(digits_run / "victim", pool_dataset="mnist", **kw)  # type: ignore[arg-type]
    assert rec.metrics["queries"] == 10
