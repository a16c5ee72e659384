"""Two-hidden-layer ReLU cryptanalysis: exact recovery, exact query counts, clear failures."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mextract.attacks.direct import AnswerModeError, DirectExtractionError, UnsupportedVictimError
from mextract.attacks.direct.deep import ReLU2Cryptanalysis, align_relu2, relu2_model, relu2_parameters
from mextract.errors import BudgetExceededError, MextractError
from mextract.oracle import VictimOracle


def _net2(d: int, h1: int, h2: int, k: int, seed: int, act: type[nn.Module] = nn.ReLU) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(d, h1), act(), nn.Linear(h1, h2), act(), nn.Linear(h2, k))
    net = net.double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    return net.eval()


def _oracle(net: nn.Module, d: int, k: int, mode: str = "logits") -> VictimOracle:
    extra = {"decimals": 2} if mode == "rounded" else {}
    return VictimOracle(
        net, input_shape=(d,), num_classes=k, mode=mode, dtype=torch.float64, device="cpu", **extra
    )


CASES = [(10, 8, 6, 2, 2), (20, 10, 5, 3, 3), (12, 6, 6, 4, 1)]  # the last: a layer-2 unit never on


@pytest.mark.parametrize(("d", "h1", "h2", "k", "seed"), CASES)
def test_relu2_exact_recovery(d, h1, h2, k, seed):
    net = _net2(d, h1, h2, k, seed)
    oracle = _oracle(net, d, k)
    res = ReLU2Cryptanalysis()(oracle, None, 100_000, seed=seed)
    assert res.queries == oracle.ledger.count
    assert res.metrics["layer1_units"] == h1
    al = align_relu2(res.model, net)
    assert res.metrics["layer2_units"] == h2 - al.irrelevant
    assert al.max_rel_error < 1e-8
    x = torch.randn(20_000, d, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want, got = net(x), res.model(x)
    assert float((got - want).abs().max()) <= 1e-8 * float(want.abs().max())
    assert torch.equal(got.argmax(1), want.argmax(1))
    lins = [m for m in res.model if isinstance(m, nn.Linear)]
    assert [type(m) for m in res.model] == [nn.Flatten, nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert lins[0].weight.dtype == torch.float64


def test_relu2_is_deterministic_per_seed():
    net = _net2(10, 8, 6, 2, 4)
    a = ReLU2Cryptanalysis()(_oracle(net, 10, 2), None, 100_000, seed=4)
    b = ReLU2Cryptanalysis()(_oracle(net, 10, 2), None, 100_000, seed=4)
    assert a.queries == b.queries
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_relu2_budget_is_a_hard_limit():
    oracle = _oracle(_net2(10, 8, 6, 2, 2), 10, 2)
    with pytest.raises(BudgetExceededError):
        ReLU2Cryptanalysis()(oracle, None, 500, seed=0)
    assert oracle.ledger.count <= 500


def test_relu2_refuses_one_hidden_layer_instead_of_a_wrong_model():
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 6), nn.ReLU(), nn.Linear(6, 3)).double().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    with pytest.raises(DirectExtractionError):
        ReLU2Cryptanalysis()(_oracle(net, 10, 3), None, 100_000, seed=0)


def test_relu2_refuses_tanh_victim():
    with pytest.raises(MextractError):
        ReLU2Cryptanalysis()(_oracle(_net2(8, 4, 4, 2, 0, act=nn.Tanh), 8, 2), None, 100_000, seed=0)


@pytest.mark.parametrize("mode", ["label", "rounded"])
def test_relu2_refuses_lossy_answer_modes(mode):
    net = _net2(10, 8, 6, 2, 2)
    with pytest.raises(AnswerModeError):
        ReLU2Cryptanalysis()(_oracle(net, 10, 2, mode=mode), None, 10_000)


def test_relu2_model_round_trip():
    net = _net2(6, 4, 3, 2, 0)
    params = relu2_parameters(net)
    again = relu2_model(params)
    x = torch.randn(100, 6, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(again(x), net(x))
    assert align_relu2(again, net).max_rel_error < 1e-14


def test_relu2_checks_on_fresh_counted_queries_by_default():
    net = _net2(10, 8, 6, 2, 2)
    oracle = _oracle(net, 10, 2)
    res = ReLU2Cryptanalysis()(oracle, None, 100_000, seed=2)
    assert res.metrics["verify_queries"] == 256 and res.metrics["verify_tol"] == 1e-7
    assert res.metrics["answer_eps"] == pytest.approx(2.22e-16, rel=1e-2)
    assert res.queries == oracle.ledger.count > 256
    smaller = ReLU2Cryptanalysis(verify_queries=64)(_oracle(net, 10, 2), None, 100_000, seed=2)
    assert res.queries - smaller.queries >= 192  # the check's queries are counted


def test_relu2_refuses_float32_answers_before_querying():
    net = _net2(10, 8, 6, 2, 2)
    oracle = VictimOracle(
        net, input_shape=(10,), num_classes=2, mode="logits", dtype=torch.float32, device="cpu"
    )
    with pytest.raises(UnsupportedVictimError, match="float64"):
        ReLU2Cryptanalysis()(oracle, None, 100_000, seed=0)
    assert oracle.ledger.count == 0
