from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from torch import nn

from mextract.errors import BudgetExceededError, InputError, UnknownNameError
from mextract.oracle import AnswerMode, OracleWrapper, VictimOracle, answers_to_probs


def linear_victim() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(4, 5)


X = torch.randn(32, 4, generator=torch.Generator().manual_seed(1))


def oracle(mode: str = "probs", **kw: object) -> VictimOracle:
    return VictimOracle(linear_victim(), input_shape=(4,), num_classes=5, mode=mode, **kw)  # type: ignore[arg-type]


def test_logits_and_probs_are_consistent() -> None:
    logits = oracle("logits").query(X)
    probs = oracle("probs").query(X)
    assert logits.shape == probs.shape == (32, 5)
    torch.testing.assert_close(probs, torch.softmax(logits, 1))
    torch.testing.assert_close(probs.sum(1), torch.ones(32))


def test_topk_keeps_exactly_k_largest_probabilities() -> None:
    probs = oracle("probs").query(X)
    top = oracle("topk", k=2).query(X)
    assert ((top > 0).sum(1) == 2).all()
    expected = probs.topk(2, 1).values.sum(1)
    torch.testing.assert_close(top.sum(1), expected)
    assert (top.argmax(1) == probs.argmax(1)).all()
    assert (top.sum(1) < 1).all()  # not renormalised


def test_rounded_answers_have_the_requested_decimals() -> None:
    r = oracle("rounded", decimals=2).query(X).double()
    assert torch.allclose(r * 100, torch.round(r * 100), atol=1e-4)
    assert (r - oracle("probs").query(X).double()).abs().max() <= 0.005 + 1e-6


def test_label_mode_returns_one_hot_of_the_argmax() -> None:
    lab = oracle("label").query(X)
    assert set(lab.unique().tolist()) <= {0.0, 1.0}
    assert (lab.sum(1) == 1).all()
    assert (lab.argmax(1) == oracle("logits").query(X).argmax(1)).all()


def test_ledger_counts_samples_not_calls() -> None:
    o = oracle()
    o.query(X[:10])
    o.query(X[:7])
    assert o.ledger.count == 17 and o.ledger.calls == 2


def test_over_budget_batch_raises_before_the_victim_is_called(counting_victim) -> None:  # type: ignore[no-untyped-def]
    o = VictimOracle(counting_victim, input_shape=(4,), num_classes=3, budget=10)
    o.query(X[:8])
    assert counting_victim.evaluated == 8
    with pytest.raises(BudgetExceededError, match="8 of 10"):
        o.query(X[:3])
    assert counting_victim.evaluated == 8 and o.ledger.count == 8
    o.query(X[:2])  # exactly up to the budget is fine
    assert o.ledger.count == counting_victim.evaluated == 10
    with pytest.raises(BudgetExceededError):
        o.query(X[:1])
    assert counting_victim.evaluated == 10


def test_nested_caps_all_apply(counting_victim) -> None:  # type: ignore[no-untyped-def]
    o = VictimOracle(counting_victim, input_shape=(4,), num_classes=3, budget=100)
    with o.ledger.cap(20):
        o.query(X[:15])
        with o.ledger.cap(10):
            assert o.ledger.remaining == 5  # the outer cap is tighter
            with pytest.raises(BudgetExceededError):
                o.query(X[:6])
    o.query(X[:30])  # caps lifted: only the budget remains
    assert o.ledger.count == counting_victim.evaluated == 45


def test_failed_victim_call_is_refunded() -> None:
    def broken(x):  # type: ignore[no-untyped-def]
        return np.zeros((len(x), 7))  # wrong number of classes

    o = VictimOracle(broken, input_shape=(4,), num_classes=3)
    with pytest.raises(InputError, match=r"expected \(5, 3\)"):
        o.query(X[:5])
    assert o.ledger.count == 0


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (torch.zeros(3, 5), r"expected a batch of shape \(N, 4\), got \(3, 5\)"),
        (torch.zeros(4), r"expected a batch of shape \(N, 4\)"),
        (torch.tensor([[0.0, float("nan"), 0.0, 0.0]]), "NaN"),
        (np.array([["a", "b", "c", "d"]]), "numeric"),
    ],
)
def test_bad_queries_get_clear_errors(bad: object, message: str) -> None:
    o = oracle()
    with pytest.raises(InputError, match=message):
        o.query(bad)
    assert o.ledger.count == 0


def test_bad_oracle_configuration() -> None:
    with pytest.raises(UnknownNameError, match="expected one of: logits, probs"):
        oracle("soft")
    with pytest.raises(InputError, match="needs an integer k"):
        oracle("topk")
    with pytest.raises(InputError, match="needs integer decimals"):
        oracle("rounded")
    with pytest.raises(InputError, match="victim"):
        VictimOracle(42, input_shape=(4,), num_classes=3)


def test_sklearn_victim_gives_exact_float64_logits() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6))
    y = (x @ rng.normal(size=6) > 0).astype(int)
    lr = LogisticRegression().fit(x, y)
    o = VictimOracle(lr, mode="logits", dtype=torch.float64)
    assert o.input_shape == (6,) and o.num_classes == 2
    z = o.query(x[:10])
    assert z.dtype == torch.float64
    np.testing.assert_allclose(z[:, 1] - z[:, 0], lr.decision_function(x[:10]), rtol=0, atol=1e-12)
    p = VictimOracle(lr, mode="probs", dtype=torch.float64).query(x[:10])
    np.testing.assert_allclose(p.numpy(), lr.predict_proba(x[:10]), atol=1e-12)


def test_float64_torch_victim_is_copied_not_mutated() -> None:
    net = linear_victim()
    o = VictimOracle(net, input_shape=(4,), num_classes=5, mode="logits", dtype=torch.float64)
    out = o.query(X.double())
    assert out.dtype == torch.float64 and net.weight.dtype == torch.float32
    torch.testing.assert_close(out, net.double()(X.double()).detach())


def test_query_log_keeps_queries_and_answers(tmp_path) -> None:  # type: ignore[no-untyped-def]
    o = oracle("label", log=True)
    o.query(X[:3])
    o.query(X[3:5])
    xs, answers = o.ledger.log()
    assert xs.shape == (5, 4) and answers.shape == (5, 5)
    o.ledger.save_log(tmp_path / "log.npz")
    with np.load(tmp_path / "log.npz") as z:
        assert z["x"].shape == (5, 4)


def test_wrapper_shares_the_ledger_and_answers_like_the_inner_oracle() -> None:
    inner = oracle()
    outer = OracleWrapper(inner)
    torch.testing.assert_close(outer.query(X), inner.query(X))
    assert outer.ledger is inner.ledger and inner.ledger.count == 64


def test_answers_to_probs_reads_every_mode() -> None:
    logits = oracle("logits").query(X)
    probs = torch.softmax(logits, 1)
    torch.testing.assert_close(answers_to_probs(logits, AnswerMode.LOGITS), probs)
    top = oracle("topk", k=3).query(X)
    torch.testing.assert_close(answers_to_probs(top, AnswerMode.TOPK).sum(1), torch.ones(32))
    zero = torch.zeros(1, 5)
    torch.testing.assert_close(answers_to_probs(zero, AnswerMode.ROUNDED), torch.full((1, 5), 0.2))
