"""Direct extraction: exact recovery, exact query counts, budgets and clear failures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer, load_wine
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch import nn

from mextract.attacks.direct import (
    AnswerModeError,
    DirectExtractionError,
    EquationSolving,
    NotPiecewiseLinearError,
    ReLUCryptanalysis,
    align_relu1,
    linear_error,
    query_floor,
    relu1_parameters,
)
from mextract.attacks.direct.align import sklearn_linear_params
from mextract.errors import BudgetExceededError, InputError, MextractError
from mextract.oracle import VictimOracle


def _tabular(loader):  # standardised features, fixed split
    x, y = loader(return_X_y=True)
    x = StandardScaler().fit_transform(x)
    return x[:400], y[:400], x[400:] if len(x) > 400 else x


@pytest.fixture(scope="module")
def cancer_lr():
    x, y, test = _tabular(load_breast_cancer)
    return LogisticRegression(max_iter=5000).fit(x, y), test


@pytest.fixture(scope="module")
def wine_lr():
    x, y, _ = _tabular(load_wine)
    return LogisticRegression(max_iter=5000).fit(x, y), x


def _oracle(victim, **kw):
    kw.setdefault("dtype", torch.float64)
    kw.setdefault("device", "cpu")
    return VictimOracle(victim, **kw)


def _net(d: int, h: int, k: int, seed: int, act: type[nn.Module] = nn.ReLU) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(d, h), act(), nn.Linear(h, k)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    return net.eval()


# --------------------------------------------------------------- equation solving
@pytest.mark.parametrize("mode", ["logits", "probs"])
def test_binary_logreg_exact_with_d_plus_1_queries(cancer_lr, mode):
    est, _ = cancer_lr
    d = est.n_features_in_
    oracle = _oracle(est, mode=mode)
    res = EquationSolving()(oracle, None, 1000, seed=0)
    # d + 1 equations, then the default check on 16 fresh queries (counted and reported)
    assert res.queries == oracle.ledger.count == d + 1 + 16
    assert res.metrics["verify_queries"] == 16 and res.metrics["design_rounds"] == 1
    w, b = sklearn_linear_params(est)
    err = linear_error(res.model, w, b, gauge="raw" if mode == "logits" else "class0")
    assert err.max_rel_error < 1e-9
    assert res.metrics["exact"] == 1.0


def test_softmax_regression_exact_from_probs(wine_lr):
    est, x = wine_lr
    d, k = est.n_features_in_, len(est.classes_)
    oracle = _oracle(est, mode="probs")
    res = EquationSolving(verify=0)(oracle, None, d + 1, seed=0)
    assert res.queries == d + 1 and k == 3
    assert res.metrics["verify_queries"] == 0
    assert linear_error(res.model, est.coef_, est.intercept_).max_rel_error < 1e-9
    pred = res.model(torch.from_numpy(x)).argmax(1).numpy()
    assert (pred == est.predict(x)).all()


def test_torch_linear_model_logits_exact():
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(12, 4)).double()
    oracle = _oracle(lin, input_shape=(3, 4), num_classes=4, mode="logits")
    res = EquationSolving(verify=0)(oracle, None, 13, seed=0)
    assert res.queries == 13
    w, b = lin[1].weight.detach().numpy(), lin[1].bias.detach().numpy()
    assert linear_error(res.model, w, b, gauge="raw").max_rel_error < 1e-12


def test_rounded_answers_least_squares_reports_bound_and_full_fidelity(cancer_lr):
    est, test = cancer_lr
    oracle = _oracle(est, mode="rounded", decimals=4)
    res = EquationSolving()(oracle, None, 800, seed=0)
    assert res.queries == oracle.ledger.count <= 800
    w, b = sklearn_linear_params(est)
    err = linear_error(res.model, w, b).max_abs_error
    assert res.metrics["exact"] == 0.0
    assert 0 < err <= res.metrics["error_bound"] < 1.0  # the stated bound holds
    pred = res.model(torch.from_numpy(test)).argmax(1).numpy()
    assert (pred == est.predict(test)).all()


def test_equation_budget_too_small_is_refused_before_querying(cancer_lr):
    est, _ = cancer_lr
    oracle = _oracle(est, mode="logits")
    with pytest.raises(InputError, match="d \\+ 1"):
        EquationSolving()(oracle, None, 10, seed=0)
    assert oracle.ledger.count == 0


def test_equation_refuses_labels_and_detects_nonlinear_victim():
    with pytest.raises(AnswerModeError, match="expected 'logits'"):
        EquationSolving()(_oracle(_net(5, 4, 3, 0), input_shape=(5,), num_classes=3, mode="label"), None, 100)
    oracle = _oracle(_net(5, 4, 3, 0), input_shape=(5,), num_classes=3, mode="logits")
    with pytest.raises(DirectExtractionError, match="not a linear model"):
        EquationSolving(verify=4)(oracle, None, 100, seed=0)


# ------------------------------------------------------------- ReLU cryptanalysis
@pytest.mark.parametrize(("d", "h", "k", "seed"), [(20, 8, 3, 0), (20, 8, 3, 1), (10, 4, 2, 2)])
def test_relu1_exact_recovery(d, h, k, seed):
    net = _net(d, h, k, seed)
    oracle = _oracle(net, input_shape=(d,), num_classes=k, mode="logits")
    res = ReLUCryptanalysis()(oracle, None, 20 * int(query_floor(d, h, k)), seed=seed)
    assert res.queries == oracle.ledger.count
    assert res.queries <= 20 * query_floor(d, h, k)
    al = align_relu1(res.model, net)
    assert al.matched == h and al.missing == 0 and al.extra == 0
    assert al.max_rel_error < 1e-9
    x = torch.randn(20_000, d, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    assert torch.equal(res.model(x).argmax(1), net(x).argmax(1))
    assert res.metrics["hidden_units"] == h


def test_relu1_single_logit_and_image_shaped_input():
    """A 1-output net served as (0, f) with (1, 4, 4) inputs (the zoo relu1 flattens)."""
    inner = nn.Sequential(nn.Flatten(), *_net(16, 6, 1, 3))

    class Pad(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            f = inner(x)
            return torch.cat([torch.zeros_like(f), f], 1)

    oracle = _oracle(Pad(), input_shape=(1, 4, 4), num_classes=2, mode="logits")
    res = ReLUCryptanalysis()(oracle, None, 5000, seed=0)
    w0, b0, a1, b1 = relu1_parameters(inner)
    true = (w0, b0, np.vstack([np.zeros_like(a1), a1]), np.concatenate([[0.0], b1]))
    assert align_relu1(res.model, true).max_rel_error < 1e-9
    assert res.queries <= 20 * query_floor(16, 6, 1)


def test_relu1_probs_mode_recovers_hidden_layer():
    net = _net(8, 3, 3, 4)
    oracle = _oracle(net, input_shape=(8,), num_classes=3, mode="probs")
    res = ReLUCryptanalysis(input_scale=0.3)(oracle, None, 5000, seed=0)
    w0, b0, a1, b1 = relu1_parameters(net)
    true = (w0, b0, a1 - a1[:1], b1 - b1[:1])  # probabilities reveal logits minus logit 0
    assert align_relu1(res.model, true).max_rel_error < 1e-7


def test_relu1_budget_is_a_hard_limit():
    net = _net(20, 8, 3, 0)
    oracle = _oracle(net, input_shape=(20,), num_classes=3, mode="logits")
    with pytest.raises(BudgetExceededError):
        ReLUCryptanalysis()(oracle, None, 150, seed=0)
    assert oracle.ledger.count <= 150
    with pytest.raises(InputError, match="budget"):
        ReLUCryptanalysis()(oracle, None, 20, seed=0)


def test_relu1_refuses_tanh_victim():
    net = _net(6, 4, 3, 0, act=nn.Tanh)
    oracle = _oracle(net, input_shape=(6,), num_classes=3, mode="logits", budget=20_000)
    with pytest.raises(NotPiecewiseLinearError, match="piecewise linear"):
        ReLUCryptanalysis()(oracle, None, 20_000, seed=0)


def test_relu1_refuses_two_hidden_layers_instead_of_a_wrong_model():
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    net = net.double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    oracle = _oracle(net, input_shape=(6,), num_classes=2, mode="logits")
    with pytest.raises(MextractError):
        ReLUCryptanalysis()(oracle, None, 20_000, seed=0)


@pytest.mark.parametrize("mode", ["label", "rounded"])
def test_relu1_refuses_lossy_answer_modes(mode):
    net = _net(5, 3, 2, 0)
    oracle = _oracle(net, input_shape=(5,), num_classes=2, mode=mode, decimals=4)
    with pytest.raises(AnswerModeError, match="expected 'logits'"):
        ReLUCryptanalysis()(oracle, None, 1000)
    assert oracle.ledger.count == 0
