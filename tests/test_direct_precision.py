"""Direct extraction never lies: default checks, precision-derived error bounds, scaled pipelines."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer, make_classification
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from mextract.attacks.direct import (
    DirectExtractionError,
    EquationSolving,
    ReLUCryptanalysis,
    UnsupportedVictimError,
    gaussian_relu1,
)
from mextract.oracle import VictimOracle


@pytest.fixture(scope="module")
def cancer():
    x, y = load_breast_cancer(return_X_y=True)
    return x[:400], y[:400], x


@pytest.fixture(scope="module")
def pipeline(cancer):
    x, y, _ = cancer
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)).fit(x, y)


def _raw_params(pipe) -> tuple[np.ndarray, float]:
    sc, lr = pipe[0], pipe[1]
    w = lr.coef_[0] / sc.scale_
    return w, float(lr.intercept_[0] - w @ sc.mean_)


def _diff_params(model) -> tuple[np.ndarray, float]:
    lin = model[1]
    w, b = lin.weight.detach().numpy(), lin.bias.detach().numpy()
    return w[1] - w[0], float(b[1] - b[0])


@pytest.mark.parametrize("mode", ["logits", "probs"])
def test_scaled_pipeline_is_recovered_not_refused(cancer, pipeline, mode):
    # at the raw origin the pipeline's logit is 31 and steps along small-scale features
    # saturate predict_proba: the attack must move to where the answers are informative
    _, _, x_all = cancer
    oracle = VictimOracle(pipeline, mode=mode, dtype=torch.float64, device="cpu")
    res = EquationSolving()(oracle, None, 1000, seed=0)
    assert res.queries == oracle.ledger.count
    assert res.metrics["design_rounds"] > 1 and res.metrics["verify_queries"] == 16
    w, b = _raw_params(pipeline)
    we, be = _diff_params(res.model)
    err = max(float(np.abs(we - w).max()), abs(be - b))
    assert err <= res.metrics["error_bound"] < 1e-9 * np.abs(w).max()
    pred = res.model(torch.from_numpy(x_all)).argmax(1).numpy()
    assert (pred == pipeline.predict(x_all)).all()


@pytest.mark.parametrize("mode", ["logits", "probs"])
def test_float32_answers_report_an_honest_bound(cancer, mode):
    x, y, _ = cancer
    xs = StandardScaler().fit_transform(x)
    est = LogisticRegression(max_iter=5000).fit(xs, y)
    oracle = VictimOracle(est, mode=mode, dtype=torch.float32, device="cpu")
    res = EquationSolving()(oracle, None, 1000, seed=0)
    lin = res.model[1]
    w, b = lin.weight.detach().numpy(), lin.bias.detach().numpy()
    if mode == "probs":
        w, b = w - w[0], b - b[0]
    err = max(float(np.abs(w[1] - est.coef_[0]).max()), abs(float(b[1] - est.intercept_[0])))
    assert res.metrics["answer_eps"] == pytest.approx(1.19e-7, rel=1e-2)
    # a non-zero bound that holds, and within 100x of what float32 allows
    assert 1e-8 < err <= res.metrics["error_bound"] < 1e-4


def _steep(bias: float) -> torch.nn.Module:
    net = torch.nn.Sequential(torch.nn.Linear(3, 2).double())
    with torch.no_grad():
        net[0].weight.zero_()
        net[0].weight[1, 0] = 1e6
        net[0].bias.zero_()
        net[0].bias[1] = bias
    return net.eval()


def test_steep_victim_steps_shrink_until_answers_inform():
    # unit steps move the logit by 1e6: probabilities underflow, those rows carry nothing
    oracle = VictimOracle(_steep(5.0), input_shape=(3,), num_classes=2, mode="probs", dtype=torch.float64)
    res = EquationSolving()(oracle, None, 1000, seed=0)
    we, be = _diff_params(res.model)
    assert np.allclose(we, [1e6, 0, 0], rtol=1e-9, atol=1e-3) and be == pytest.approx(5.0, rel=1e-6)
    assert res.metrics["design_rounds"] > 1


def test_saturated_start_is_left_for_the_decision_boundary():
    # probabilities underflow at the origin and at unit steps: random points at growing
    # distances and a bisection find where the answers carry information
    oracle = VictimOracle(_steep(1e5), input_shape=(3,), num_classes=2, mode="probs", dtype=torch.float64)
    res = EquationSolving()(oracle, None, 1000, seed=0)
    we, be = _diff_params(res.model)
    assert np.allclose(we, [1e6, 0, 0], rtol=1e-9, atol=1e-3) and be == pytest.approx(1e5, rel=1e-9)
    assert res.queries == oracle.ledger.count


def test_victim_saturated_everywhere_queried_raises_instead_of_lying():
    net = _steep(1e5)
    with torch.no_grad():
        net[0].weight.zero_()  # one class, saturated, everywhere: nothing to solve from
    oracle = VictimOracle(net, input_shape=(3,), num_classes=2, mode="probs", dtype=torch.float64)
    with pytest.raises(DirectExtractionError, match="saturates"):
        EquationSolving()(oracle, None, 1000, seed=0)


# ------------------------------------------------------------------ ReLU networks
def _relu_oracle(net, d: int, k: int, dtype=torch.float64, mode: str = "logits") -> VictimOracle:
    return VictimOracle(net, input_shape=(d,), num_classes=k, mode=mode, dtype=dtype, device="cpu")


def _functional_error(model, net, d: int) -> float:
    x = torch.randn(20_000, d, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want, got = net(x), model(x)
    return float((got - want).abs().max() / want.abs().max())


@pytest.mark.parametrize(("d", "h", "k", "seed"), [(20, 8, 3, 0), (10, 4, 2, 2)])
def test_relu1_float32_answers(d, h, k, seed):
    net = gaussian_relu1(d, h, k, seed)
    oracle = _relu_oracle(net, d, k, dtype=torch.float32)
    res = ReLUCryptanalysis()(oracle, None, 100_000, seed=seed)
    assert res.queries == oracle.ledger.count
    assert res.metrics["answer_eps"] == pytest.approx(1.19e-7, rel=1e-2)
    assert res.metrics["hidden_units"] == h and res.metrics["verify_queries"] == 32
    # within 10x of the victim's own float32 resolution (its float32 answers vs float64 ones)
    x = torch.randn(20_000, d, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = net(x)
        own = float((copy.deepcopy(net).float()(x.float()).double() - want).abs().max() / want.abs().max())
    assert res.metrics["queries_polish"] > 0
    assert _functional_error(res.model, net, d) < 10 * own


def test_relu1_expansive_layer_wider_than_input():
    d, h, k = 10, 24, 2  # 24 units > 10 inputs: the sign solve has a 4-dimensional null space
    net = gaussian_relu1(d, h, k, 0)
    res = ReLUCryptanalysis()(_relu_oracle(net, d, k), None, 100_000, seed=0)
    assert res.metrics["hidden_units"] == h
    assert _functional_error(res.model, net, d) < 1e-9


def test_relu1_far_too_wide_layer_names_the_cause():
    net = gaussian_relu1(10, 50, 2, 0)
    oracle = _relu_oracle(net, 10, 2)
    with pytest.raises(UnsupportedVictimError, match="wider than"):
        ReLUCryptanalysis()(oracle, None, 100_000, seed=0)
    assert oracle.ledger.count < 3000  # not retried on other lines: another line cannot help


def test_relu1_tiny_output_weight_unit_is_recovered():
    net = gaussian_relu1(20, 8, 3, 1)
    with torch.no_grad():
        net[-1].weight[:, 0] *= 1e-5
    res = ReLUCryptanalysis()(_relu_oracle(net, 20, 3), None, 100_000, seed=1)
    assert res.metrics["hidden_units"] == 8
    assert _functional_error(res.model, net, 20) < 1e-10


@pytest.mark.parametrize("mode", ["logits", "probs"])
def test_relu1_sklearn_mlp_classifier(mode):
    x, y = make_classification(n_samples=600, n_features=10, n_informative=6, n_classes=3, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = MLPClassifier(hidden_layer_sizes=(8,), max_iter=300, random_state=0).fit(x, y)
    oracle = VictimOracle(est, mode=mode, dtype=torch.float64, device="cpu")  # logits = log predict_proba
    res = ReLUCryptanalysis()(oracle, None, 100_000, seed=0)
    assert res.metrics["hidden_units"] == 8
    with torch.no_grad():
        got = res.model(torch.from_numpy(x)).numpy()
    want = np.log(est.predict_proba(x))
    assert np.abs((got - got[:, :1]) - (want - want[:, :1])).max() < 1e-9
    assert (got.argmax(1) == est.predict(x)).all()


def test_relu1_binary_sklearn_probabilities_saturate_with_a_clear_error():
    x, y = make_classification(n_samples=600, n_features=10, n_informative=6, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = MLPClassifier(hidden_layer_sizes=(8,), max_iter=300, random_state=0).fit(x, y)
    with pytest.raises(UnsupportedVictimError, match="saturated"):
        ReLUCryptanalysis()(VictimOracle(est, mode="probs", dtype=torch.float64), None, 100_000, seed=0)


def test_real_logits_with_a_constant_zero_logit_are_not_taken_for_log_probabilities():
    from mextract.attacks.direct.common import FlatOracle
    from mextract.oracle import Client

    class Pair(torch.nn.Module):  # a single logit f served as (0, f)
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            f = 50.0 - 100.0 * x.sum(1, keepdim=True) ** 2
            return torch.cat([torch.zeros_like(f), f], dim=1)

    served = VictimOracle(Pair(), input_shape=(3,), num_classes=2, mode="logits", dtype=torch.float64)
    flat = FlatOracle(Client(served))
    far = np.full((2, 3), 3.0)  # f = -8050: rows (0, f) read the same as log-probabilities
    assert np.array_equal(flat(far)[:, 1], [-8050.0, -8050.0]) and flat.log_probs is None
    flat(np.zeros((1, 3)))  # f = 50 > 0: not log-probabilities
    assert flat.log_probs is False
    x, y = load_breast_cancer(return_X_y=True)
    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)).fit(x, y)
    flat = FlatOracle(Client(VictimOracle(pipe, mode="logits", dtype=torch.float64)))
    flat(x[:4])  # log predict_proba: logits up to a per-row constant
    assert flat.log_probs is True


def test_rounded_answers_are_checked_on_fresh_counted_queries(cancer):
    x, y, _ = cancer
    est = LogisticRegression(max_iter=5000).fit(StandardScaler().fit_transform(x), y)
    oracle = VictimOracle(est, mode="rounded", decimals=4, dtype=torch.float64, device="cpu")
    res = EquationSolving()(oracle, None, 800, seed=0)
    assert res.metrics["verify_queries"] == 16 and res.metrics["verify_excess"] <= 1.0
    assert res.queries == oracle.ledger.count <= 800


def test_relu1_near_parallel_hyperplanes_are_resolved():
    net = gaussian_relu1(10, 6, 3, 0)
    with torch.no_grad():  # unit 1 = unit 0 moved by 1e-4: their kinks on any line nearly coincide
        g = torch.Generator().manual_seed(99)
        net[1].weight[1] = net[1].weight[0] + 1e-4 * torch.randn(10, generator=g, dtype=torch.float64)
        net[1].bias[1] = net[1].bias[0] + 1e-4
    res = ReLUCryptanalysis()(_relu_oracle(net, 10, 3), None, 100_000, seed=0)
    assert res.metrics["hidden_units"] == 6
    assert _functional_error(res.model, net, 10) < 1e-9


def test_relu1_retries_on_a_fresh_line_and_counts_every_query(monkeypatch):
    net = gaussian_relu1(10, 4, 2, 2)
    oracle = _relu_oracle(net, 10, 2)
    real = ReLUCryptanalysis._attempt
    calls = []

    def flaky(self, ctx, f, rng, spent0):
        calls.append(ctx.spent)
        if len(calls) == 1:
            f(np.zeros((5, 10)))  # spend a few queries, then fail as a merged kink would
            raise DirectExtractionError("gradient jump: expected rank one")
        return real(self, ctx, f, rng, spent0)

    monkeypatch.setattr(ReLUCryptanalysis, "_attempt", flaky)
    res = ReLUCryptanalysis()(oracle, None, 100_000, seed=2)
    assert res.metrics["lines_tried"] == 2 and calls[1] >= 5
    assert res.queries == oracle.ledger.count
    assert _functional_error(res.model, net, 10) < 1e-9


def test_relu1_failing_on_every_line_raises_with_the_cause(monkeypatch):
    def always(self, ctx, f, rng, spent0):
        raise DirectExtractionError("gradient jump: expected rank one")

    monkeypatch.setattr(ReLUCryptanalysis, "_attempt", always)
    with pytest.raises(DirectExtractionError, match=r"expected rank one \[failed on all 2 random lines\]"):
        ReLUCryptanalysis(retries=1)(_relu_oracle(gaussian_relu1(10, 4, 2, 2), 10, 2), None, 100_000, seed=2)


def _coinciding_kinks_net(
    d: int, h: int, k: int, seed: int, *, gap: float = 0.0
) -> tuple[torch.nn.Module, float]:
    """A random net whose units 0 and 1 cross the attack's first random line (seed ``seed``)
    at the same point (``gap = 0``; else ``gap`` apart): merged kinks no fine grid separates."""
    net = gaussian_relu1(d, h, k, seed)
    rng = np.random.default_rng(seed)  # the attack's first line: x0 ~ N(0, I), u uniform
    x0 = rng.standard_normal(d)
    u = rng.standard_normal(d)
    u /= np.linalg.norm(u)
    with torch.no_grad():
        w, b = net[1].weight.numpy(), net[1].bias.numpy()
        t0 = float(-(w[0] @ x0 + b[0]) / (w[0] @ u))
        net[1].bias[1] = float(-(w[1] @ (x0 + (t0 + gap) * u)))
    return net, t0


def test_relu1_merged_kinks_are_taken_from_further_lines() -> None:
    # units 0 and 1 cross the first line at the same point: their gradient jump there is rank
    # two on every grid; a second line separates them and explains the first line's jump
    net, _ = _coinciding_kinks_net(12, 8, 3, 4)
    oracle = _relu_oracle(net, 12, 3)
    res = ReLUCryptanalysis(retries=0)(oracle, None, 100_000, seed=4)
    assert res.metrics["extra_lines"] >= 1 and res.metrics["lines_tried"] == 1
    assert res.metrics["hidden_units"] == 8 and res.queries == oracle.ledger.count
    assert _functional_error(res.model, net, 12) < 1e-9


def test_relu1_merged_kinks_without_further_lines_raise_the_cause() -> None:
    net, _ = _coinciding_kinks_net(12, 8, 3, 4)
    with pytest.raises(DirectExtractionError, match="expected rank one"):
        ReLUCryptanalysis(retries=0, extra_lines=0)(_relu_oracle(net, 12, 3), None, 100_000, seed=4)


def _own_float32_error(net: torch.nn.Module, d: int) -> float:
    x = torch.randn(20_000, d, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = net(x)
        return float((copy.deepcopy(net).float()(x.float()).double() - want).abs().max() / want.abs().max())


def test_relu1_float32_chord_search_separates_kinks_the_slope_probes_merge() -> None:
    from mextract.attacks.direct.common import FlatOracle
    from mextract.attacks.direct.relu import Precision, _Line

    net, t0 = _coinciding_kinks_net(12, 8, 3, 4, gap=3e-3)  # two kinks 3e-3 apart on the line
    f = FlatOracle(_relu_oracle(net, 12, 3, dtype=torch.float32))
    rng = np.random.default_rng(4)
    x0 = rng.standard_normal(12)
    u = rng.standard_normal(12)
    u /= np.linalg.norm(u)
    w, b = net[1].weight.detach().numpy(), net[1].bias.detach().numpy()
    true = np.sort(-(w @ x0 + b) / (w @ u))
    att, prec = ReLUCryptanalysis(), Precision.of(f.eps, tol=1e-7, verify_tol=1e-7)
    slope, _ = att._find_kinks(_Line(f, x0, u), np.sqrt(12), 11, prec)
    chords, _ = att._find_kinks(_Line(f, x0, u), np.sqrt(12), 11, prec, chords=True)
    assert len(slope) == 7  # the float32 slope probes' tolerance merges the pair
    assert len(chords) == 8 and np.abs(np.sort(chords) - true).max() < 1e-4
    assert np.sum(np.abs(np.array(chords) - t0) < 1e-2) == 2


def test_relu1_float32_merged_kinks_within_the_float32_bound_or_a_named_error() -> None:
    net, _ = _coinciding_kinks_net(12, 8, 3, 4)  # units 0 and 1 meet the first line at one point
    oracle = _relu_oracle(net, 12, 3, dtype=torch.float32)
    res = ReLUCryptanalysis(retries=0)(oracle, None, 100_000, seed=4)
    assert res.metrics["extra_lines"] >= 1 and res.metrics["hidden_units"] == 8
    assert res.queries == oracle.ledger.count
    assert _functional_error(res.model, net, 12) < 10 * _own_float32_error(net, 12)
    with pytest.raises(DirectExtractionError, match="expected rank one"):
        ReLUCryptanalysis(retries=0, extra_lines=0)(
            _relu_oracle(net, 12, 3, dtype=torch.float32), None, 100_000, seed=4
        )
