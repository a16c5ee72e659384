"""Layer peeling (``mextract.attacks.direct.peel``): exact at depth 2 and 3 with counted
queries, the new paths (relaxed isolating steps, rows followed along their surfaces, fitted
last-layer entries, kink refits) on tiny nets, and named errors instead of wrong models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mextract.attacks.direct import DirectExtractionError, UnsupportedVictimError
from mextract.attacks.direct.peel import (
    DeepReLUCryptanalysis,
    _cell,
    _Cluster,
    _isolating_step,
    _refit,
    _walk_to_boundary,
    align_relu_deep,
    deep_relu_model,
    deep_relu_parameters,
)
from mextract.errors import MextractError
from mextract.oracle import VictimOracle


def _net(dims: list[int], seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten()]
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    net = nn.Sequential(*layers).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    return net.eval()


def _oracle(net: nn.Module, d: int, k: int, dtype: torch.dtype = torch.float64) -> VictimOracle:
    return VictimOracle(net, input_shape=(d,), num_classes=k, mode="logits", dtype=dtype, device="cpu")


def _func_error(a: nn.Module, b: nn.Module, d: int) -> float:
    x = torch.randn(20_000, d, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want, got = a(x), b(x)
    return float((got - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("seed", [3, 4])
def test_peel_depth2_exact_with_counted_queries(seed: int) -> None:
    net = _net([10, 8, 6, 2], seed)
    oracle = _oracle(net, 10, 2)
    res = DeepReLUCryptanalysis(depth=2)(oracle, None, 1_000_000, seed=seed)
    assert res.queries == oracle.ledger.count
    assert res.metrics["verify_queries"] == 1024 and res.metrics["verify_rel_error"] <= 1e-7
    assert res.metrics["units_layer1"] == 8 and res.metrics["units_layer2"] == 6
    assert _func_error(net, res.model, 10) < 1e-6
    assert align_relu_deep(res.model, net).max_rel_error < 1e-7


@pytest.mark.parametrize("seed", [0, 7])
def test_peel_three_hidden_layers_exact(seed: int) -> None:
    # 5-4-4-3-2, N(0,1) weights: equal widths H2 = H1, so no cell lets a layer-2 unit move
    # alone except the all-on one; the signs come from the relaxed isolating steps (units known
    # to be off may move), none from votes. Seed 7 also needs a followed row in layer 3 and one
    # last-layer entry fitted to the outputs
    net = _net([5, 4, 4, 3, 2], seed)
    oracle = _oracle(net, 5, 2)
    res = DeepReLUCryptanalysis(depth=3, retries=0)(oracle, None, 1_000_000, seed=seed)
    m = res.metrics
    assert res.queries == oracle.ledger.count
    assert m["verify_rel_error"] <= 1e-7 and m["verify_queries"] == 1024
    assert m["units_layer1"] == 4 and m["units_layer2"] == 4
    assert m["signs_isolated_layer2"] == 4 and m.get("signs_voted_layer2", 0) == 0
    assert m["rows_followed_layer2"] >= 1
    if seed == 7:
        assert m["rows_followed_layer3"] >= 1 and m["filled_entries"] == 1
    assert _func_error(net, res.model, 5) < 1e-8
    blocks = align_relu_deep(res.model, net).block_rel_errors
    # layers 1-2 exact; a fitted last-layer entry (seed 7) is exact only as a function (it
    # acts where its layer-2 unit is on, and that unit never switches the layer-3 unit there)
    assert max(blocks[k] for k in ("A0", "B0", "A1", "B1")) < 1e-6
    assert seed == 7 or max(blocks.values()) < 1e-6
    assert "_counts" not in DeepReLUCryptanalysis(depth=3).config()


def test_peel_three_hidden_layers_raises_instead_of_a_wrong_model() -> None:
    # a layer-2 unit that is on for every input has no critical point and acts linearly: it
    # cannot be recovered, and the attack must say so rather than return a model without it
    net = _net([5, 4, 4, 3, 2], 0)
    with torch.no_grad():
        lin2 = [m for m in net.modules() if isinstance(m, nn.Linear)][1]
        lin2.weight[0].abs_()
        lin2.bias[0] = lin2.bias[0].abs() + 3.0
    oracle = _oracle(net, 5, 2)
    with pytest.raises(DirectExtractionError, match="layer"):
        DeepReLUCryptanalysis(depth=3, retries=0)(oracle, None, 1_000_000, seed=0)
    assert oracle.ledger.count > 0


def test_isolating_step_moves_one_unit_and_keeps_the_fixed_ones() -> None:
    rng = np.random.default_rng(0)
    m = rng.standard_normal((4, 3))  # 4 units of a layer, 3 directions: all 4 cannot be isolated
    assert _isolating_step(m, 0, np.array([False, True, True, True])) is None
    fixed = np.array([False, True, False, True])  # units 1 and 3 may be on: keep them still
    v = _isolating_step(m, 0, fixed)
    assert v is not None
    assert abs(m[0] @ v - 1.0) < 1e-12 and np.abs(m[fixed] @ v).max() < 1e-12


def test_walk_to_boundary_stays_on_the_surface() -> None:
    # known layers in u (layer 1 = identity, then 3 units); a layer-3 row r seen where unit 2
    # of layer 2 is off: the walk follows r·h(u) + 1 = 0 until that unit turns on
    rng = np.random.default_rng(2)
    w2, b2 = rng.standard_normal((3, 4)), rng.standard_normal(3)
    uknown = [(np.eye(4), np.zeros(4)), (w2, b2)]
    r = np.array([0.7, -0.4, np.nan])
    rr = np.nan_to_num(r)
    hits = 0
    for _ in range(400):
        at = 2.0 * rng.standard_normal(4)
        _z, _dz, h, dh = _cell(uknown, at)
        g = dh.T @ rr
        if h[2] > 0 or g @ g == 0:
            continue
        at = at - (rr @ h + 1.0) / (g @ g) * g  # onto the surface, if it stays in the cell
        if _cell(uknown, at)[2][2] > 0 or abs(rr @ _cell(uknown, at)[2] + 1.0) > 1e-9:
            continue
        out = _walk_to_boundary(uknown, r, at, 4 + 2, 4, 1.0)
        if out is None:
            continue
        b0, past, _g, _grad = out
        z, _dz, hb, _dh = _cell(uknown, b0)
        assert abs(z[4 + 2]) < 1e-9  # on unit 2's plane of layer 2
        assert abs(rr @ hb + 1.0) < 1e-9  # and on the row's surface
        assert _cell(uknown, b0 + past)[2][2] > 0  # just past it, unit 2 is on
        hits += 1
    assert hits >= 20


def test_refit_recovers_a_row_from_its_kinks() -> None:
    rng = np.random.default_rng(1)
    w2, b2 = rng.standard_normal((3, 4)), rng.standard_normal(3)
    uknown = [(np.eye(4), np.zeros(4)), (w2, b2)]
    r_true = np.array([0.5, -1.2, 0.8])
    sights: list[tuple[np.ndarray, np.ndarray]] = []
    for _ in range(400):
        _z, _dz, h, dh = _cell(uknown, 3.0 * rng.standard_normal(4))
        g = dh.T @ r_true
        if g @ g == 0:
            continue
        p = 3.0 * rng.standard_normal(4)
        _z, _dz, h, dh = _cell(uknown, p)
        g = dh.T @ r_true
        if g @ g == 0:
            continue
        p = p - (r_true @ h + 1.0) / (g @ g) * g
        hp = _cell(uknown, p)[2]
        if abs(r_true @ hp + 1.0) < 1e-12:
            sights.append((p, hp > 0))
    assert np.linalg.matrix_rank(np.array([_cell(uknown, p)[2] for p, _ in sights])) == 3
    c = _Cluster(r_true + 1e-6 * rng.standard_normal(3), sights)  # rows from Jacobians: 1e-6 off
    _refit(c, uknown)
    assert np.abs(c.r - r_true).max() < 1e-10


def test_peel_refuses_a_shallower_victim() -> None:
    net = _net([10, 8, 6, 2], 4)
    with pytest.raises(DirectExtractionError, match="fewer than 3 hidden layers"):
        DeepReLUCryptanalysis(depth=3, retries=0)(_oracle(net, 10, 2), None, 1_000_000, seed=4)


def test_peel_refuses_float32_answers_before_querying() -> None:
    oracle = _oracle(_net([10, 8, 6, 2], 3), 10, 2, dtype=torch.float32)
    with pytest.raises(UnsupportedVictimError, match="float64"):
        DeepReLUCryptanalysis(depth=2)(oracle, None, 100_000, seed=0)
    assert oracle.ledger.count == 0


def test_peel_budget_is_a_hard_limit() -> None:
    oracle = _oracle(_net([10, 8, 6, 2], 3), 10, 2)
    with pytest.raises(MextractError):
        DeepReLUCryptanalysis(depth=2)(oracle, None, 500, seed=3)
    assert oracle.ledger.count <= 500


def test_deep_relu_model_round_trip() -> None:
    net = _net([6, 5, 4, 3, 2], 0)
    again = deep_relu_model(deep_relu_parameters(net))
    x = torch.randn(100, 6, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(again(x), net(x))
    assert align_relu_deep(again, net).max_rel_error < 1e-14
