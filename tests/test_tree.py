"""Decision trees behind the oracle (answer mode ``leaf``, incomplete queries) and their exact
extraction by path-finding (Tramèr et al., USENIX Security 2016, section 4.2)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.tree import DecisionTreeClassifier

from mextract.attacks import create_attack
from mextract.attacks.direct.common import AnswerModeError
from mextract.attacks.tree import (
    ExtractedTreeModel,
    TreeBudgetError,
    TreePathFinding,
    compare_leaves,
    f32_key,
    fresh_agreement,
    key_f32,
)
from mextract.data import UNBOUNDED, ValueRange, load_splits
from mextract.data.tabular import Feature, TabularSchema
from mextract.errors import DataError, InputError
from mextract.oracle import AnswerMode, APIDescription, Client, VictimOracle, answers_to_probs


def _tabular(name: str, depth: int | None) -> tuple[DecisionTreeClassifier, TabularSchema]:
    splits = load_splits(name)
    schema = TabularSchema.from_json(splits.meta["schema"])
    assert splits.victim_train.y is not None
    x, y = splits.victim_train.x.numpy(), splits.victim_train.y.numpy()
    return DecisionTreeClassifier(max_depth=depth, random_state=0).fit(x, y), schema


@pytest.fixture(scope="module")
def iris() -> tuple[DecisionTreeClassifier, TabularSchema]:
    return _tabular("iris", 5)


@pytest.fixture(scope="module")
def deep() -> tuple[DecisionTreeClassifier, TabularSchema]:
    """A depth-10 tree on 3 features: it tests features again and again below one another."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(800, 3)).astype(np.float32)
    y = (x[:, 0] * x[:, 1] + np.sin(3 * x[:, 2]) > 0).astype(int) + (x[:, 0] > 1)
    est = DecisionTreeClassifier(max_depth=10, random_state=0).fit(x, y)
    assert est.get_depth() == 10 and est.get_n_leaves() > 50
    return est, TabularSchema.numeric(x)


@pytest.fixture(scope="module")
def mixed() -> tuple[DecisionTreeClassifier, TabularSchema]:
    """Numeric, categorical (a one-hot block of 4 columns) and ordinal features."""
    rng = np.random.default_rng(1)
    n = 600
    num = rng.uniform(-2, 2, size=(n, 2)).astype(np.float32)
    cat, lev = rng.integers(0, 4, n), rng.integers(0, 5, n)
    x = np.concatenate([num[:, :1], np.eye(4, dtype=np.float32)[cat], lev[:, None].astype(np.float32),
                        num[:, 1:]], axis=1)  # fmt: skip
    y = (((cat == 1) | (cat == 3)) ^ (num[:, 0] > 0.3) ^ (lev >= 3)).astype(int) + (num[:, 1] > 1.5)
    schema = TabularSchema((
        Feature("a", "numeric", -2.0, 2.0), Feature("c", "categorical", levels=("p", "q", "r", "s")),
        Feature("o", "ordinal", levels=tuple("vwxyz")), Feature("b", "numeric", -2.0, 2.0),
    ))  # fmt: skip
    est = DecisionTreeClassifier(max_depth=8, random_state=0).fit(x, y)
    cat_columns = set(range(1, 5))
    assert cat_columns & set(est.tree_.feature.tolist()), "the tree must split on the categorical block"
    return est, schema


def _walk(est: DecisionTreeClassifier, row: np.ndarray) -> int:
    """Reference: BigML's rule, one record at a time (a NaN stops the path at its node)."""
    t, node = est.tree_, 0
    while t.children_left[node] != -1:
        v = np.float32(row[t.feature[node]])
        if np.isnan(v):
            break
        node = t.children_left[node] if float(v) <= t.threshold[node] else t.children_right[node]
    return int(node)


# --------------------------------------------------------------------------- the leaf mode
def test_leaf_mode_answers_sklearns_apply_and_predict_proba(iris: Any) -> None:
    est, schema = iris
    g = torch.Generator().manual_seed(0)
    x = schema.sample_uniform(2000, g).double()
    # records exactly on every threshold and one float32 step either side of it
    t = est.tree_
    inner = np.flatnonzero(t.children_left != -1)
    base = x[: len(inner)].clone()
    edges = []
    for row, node in zip(base, inner, strict=True):
        thr = np.float32(t.threshold[node])
        for v in (thr, np.nextafter(thr, np.float32(-np.inf)), np.nextafter(thr, np.float32(np.inf))):
            r = row.clone()
            r[t.feature[node]] = float(v)
            edges.append(r)
    x = torch.cat([x, torch.stack(edges)])
    oracle = VictimOracle(est, mode="leaf", dtype=torch.float64)
    answers = oracle.query(x).numpy()
    x32 = x.numpy().astype(np.float32)
    assert answers.shape == (len(x), 4) and oracle.answer_width == 4
    np.testing.assert_array_equal(answers[:, -1], est.apply(x32))
    np.testing.assert_array_equal(answers[:, :-1], est.predict_proba(x32))
    assert oracle.ledger.count == len(x)
    # the identifier is dropped when an answer is read as probabilities
    np.testing.assert_array_equal(answers_to_probs(torch.from_numpy(answers), AnswerMode.LEAF).numpy(),
                                  answers[:, :-1])  # fmt: skip
    assert oracle.query(np.zeros((0, 4))).shape == (0, 4)


def test_leaf_mode_on_a_skops_file_answers_like_the_tree(iris: Any, tmp_path: Path) -> None:
    sio = pytest.importorskip("skops.io")
    from mextract.models import load_external

    est, schema = iris
    path = tmp_path / "tree.skops"
    sio.dump(est, path)
    model = load_external(path, trusted=[str(t) for t in sio.get_untrusted_types(file=path)])
    x = schema.sample_uniform(500, torch.Generator().manual_seed(1))
    answers = VictimOracle(model, mode="leaf").query(x).numpy()
    np.testing.assert_array_equal(answers[:, -1], est.apply(x.numpy()))


def test_leaf_mode_and_incomplete_queries_need_a_tree_victim(iris: Any) -> None:
    est, _ = iris
    x = np.random.default_rng(0).normal(size=(50, 4))
    logreg = LogisticRegression(max_iter=500).fit(x, np.arange(50) % 3)
    with pytest.raises(InputError, match=r"answer mode 'leaf' needs a decision-tree victim.*LogisticRegr"):
        VictimOracle(logreg, mode="leaf")
    with pytest.raises(InputError, match="missing='stop' needs a decision-tree victim"):
        VictimOracle(logreg, mode="probs", missing="stop")
    with pytest.raises(InputError, match=r"missing: expected None .* or 'stop'"):
        VictimOracle(est, mode="leaf", missing="skip")
    with pytest.raises(InputError, match="answer mode 'leaf'"):
        from mextract.oracle import restrict

        restrict(torch.zeros(2, 3), AnswerMode.LEAF)


def test_a_missing_feature_stops_the_path_at_the_node_that_tests_it(iris: Any) -> None:
    est, schema = iris
    oracle = VictimOracle(est, mode="leaf", dtype=torch.float64, missing="stop")
    root = oracle.query(np.full((1, 4), np.nan))[0].numpy()
    value = est.tree_.value[0, 0]
    np.testing.assert_array_equal(root, [*(value / value.sum()), 0.0])  # the root's distribution, id 0
    x = schema.sample_uniform(400, torch.Generator().manual_seed(2)).double().numpy()
    mask = np.random.default_rng(3).random(x.shape) < 0.4
    x[mask] = np.nan
    ids = oracle.query(x)[:, -1].numpy()
    want = [_walk(est, row) for row in x]
    np.testing.assert_array_equal(ids, want)
    assert len(set(want) - set(est.apply(np.nan_to_num(x).astype(np.float32)))) > 0  # inner nodes answered
    # the option is public, and without it a NaN stays a refused query
    assert Client(oracle).description.missing == "stop"
    assert APIDescription.from_json(APIDescription.of(oracle).to_json()).missing == "stop"
    with pytest.raises(InputError, match="NaN"):
        VictimOracle(est, mode="leaf").query(x)
    with pytest.raises(InputError, match="NaN"):
        Client(VictimOracle(est, mode="leaf")).query(x)
    with pytest.raises(InputError, match="infinite"):
        oracle.query(np.full((1, 4), np.inf))


def test_a_categorical_feature_is_missing_as_a_whole_block(mixed: Any) -> None:
    est, schema = mixed
    oracle = VictimOracle(est, mode="leaf", features=schema, missing="stop")
    x = schema.sample_uniform(300, torch.Generator().manual_seed(4)).numpy()
    x[:150, 1:5] = np.nan  # the category is missing in half the records
    ids = oracle.query(x)[:, -1].numpy()
    np.testing.assert_array_equal(ids, [_walk(est, row) for row in x])
    partial = x[150:151].copy()
    partial[0, 2] = np.nan
    with pytest.raises(DataError, match=r"feature 'c' is categorical.*whole block of NaN"):
        oracle.query(partial)


# --------------------------------------------------------------------------- path-finding
@pytest.mark.parametrize("name", ["iris", "wine"])
@pytest.mark.parametrize("incomplete", [False, True])
def test_path_finding_recovers_bundled_trees_exactly(name: str, incomplete: bool) -> None:
    est, schema = _tabular(name, 6)
    oracle = VictimOracle(est, mode="leaf", features=schema, missing="stop", log=True)
    result = TreePathFinding(incomplete=incomplete)(oracle, None, 100_000, seed=0)
    cmp = compare_leaves(result.model, est)
    assert cmp["true_leaves"] == est.get_n_leaves() == cmp["extracted_leaves"] == cmp["matched"]
    assert cmp["same_id"] == cmp["matched"]
    agree = fresh_agreement(result.model, est, 10_000, seed=1)
    assert agree == {"label_agreement": 1.0, "distribution_agreement": 1.0}
    # every query went through the one counted path
    assert result.queries == oracle.ledger.count == len(oracle.ledger.log()[0])
    assert result.metrics["complete"] == 1.0 and result.metrics["incomplete_queries"] == float(incomplete)
    assert result.metrics["leaves"] == est.get_n_leaves()


@pytest.mark.parametrize("incomplete", [False, True])
def test_path_finding_recovers_a_deep_tree_that_reuses_features(deep: Any, incomplete: bool) -> None:
    est, schema = deep
    oracle = VictimOracle(est, mode="leaf", features=schema, missing="stop" if incomplete else None)
    result = create_attack("path_finding")(oracle, None, 100_000, seed=3)
    assert result.metrics["incomplete_queries"] == float(incomplete)  # None: as the API declares
    cmp = compare_leaves(result.model, est)
    assert cmp["matched"] == cmp["true_leaves"] == cmp["extracted_leaves"] == est.get_n_leaves()
    assert fresh_agreement(result.model, est, 10_000)["distribution_agreement"] == 1.0
    # the extracted module answers like the victim: logits are the log of the leaf distribution
    x = schema.sample_uniform(1000, torch.Generator().manual_seed(5))
    probs = torch.softmax(result.model(x), dim=1).double().numpy()
    np.testing.assert_allclose(probs, est.predict_proba(x.numpy()), atol=1e-6)


def test_incomplete_queries_make_extraction_cheaper(deep: Any) -> None:
    est, schema = deep
    spent = {}
    for incomplete in (False, True):
        oracle = VictimOracle(est, mode="leaf", features=schema, missing="stop")
        spent[incomplete] = TreePathFinding(incomplete=incomplete)(oracle, None, 100_000).queries
    assert spent[True] < spent[False] / 2, spent


@pytest.mark.parametrize("incomplete", [False, True])
def test_path_finding_with_categorical_and_ordinal_features(mixed: Any, incomplete: bool) -> None:
    est, schema = mixed
    oracle = VictimOracle(est, mode="leaf", features=schema, missing="stop")
    result = TreePathFinding(incomplete=incomplete)(oracle, None, 100_000)
    cmp = compare_leaves(result.model, est)
    assert cmp["matched"] == cmp["true_leaves"] == cmp["extracted_leaves"] == est.get_n_leaves()
    assert fresh_agreement(result.model, est, 10_000)["distribution_agreement"] == 1.0
    assert isinstance(result.model, ExtractedTreeModel)
    leaf_sets = [leaf.box[1] for leaf in result.model.tree.leaves]
    assert all(isinstance(s, frozenset) for s in leaf_sets) and any(len(s) < 4 for s in leaf_sets)
    record = json.loads(json.dumps(result.model.tree.to_json()))  # a record keeps the leaves
    assert len(record["leaves"]) == est.get_n_leaves() and record["complete"]
    assert record["leaves"][0]["box"][1] == sorted(result.model.tree.leaves[0].box[1])


def test_a_coarser_line_search_spends_fewer_queries_and_is_no_longer_exact(iris: Any) -> None:
    est, schema = iris
    exact = TreePathFinding()(VictimOracle(est, mode="leaf", features=schema), None, 100_000)
    coarse = TreePathFinding(epsilon=0.01)(VictimOracle(est, mode="leaf", features=schema), None, 100_000)
    assert coarse.queries < exact.queries / 2
    assert isinstance(coarse.model, ExtractedTreeModel)
    assert len(coarse.model.tree.leaves) == est.get_n_leaves()
    assert fresh_agreement(coarse.model, est, 10_000)["label_agreement"] >= 0.97


def test_an_exhausted_budget_is_an_error_not_an_incomplete_tree(deep: Any) -> None:
    est, schema = deep
    oracle = VictimOracle(est, mode="leaf", features=schema)
    with pytest.raises(TreeBudgetError, match=r"budget exhausted.*the tree is incomplete"):
        TreePathFinding()(oracle, None, 500)
    assert oracle.ledger.count <= 500


def test_a_bounded_value_range_stands_in_for_a_schema() -> None:
    rng = np.random.default_rng(6)
    x = rng.random((300, 2)).astype(np.float32)
    est = DecisionTreeClassifier(max_depth=4, random_state=0).fit(x, (x.sum(1) > 1).astype(int))
    oracle = VictimOracle(est, mode="leaf", value_range=ValueRange(0.0, 1.0))
    result = TreePathFinding()(oracle, None, 50_000)
    assert compare_leaves(result.model, est)["matched"] == est.get_n_leaves()


def test_path_finding_checks_the_api_first(iris: Any) -> None:
    est, schema = iris
    with pytest.raises(AnswerModeError, match="expected 'leaf'"):
        TreePathFinding()(VictimOracle(est, mode="probs", features=schema), None, 1000)
    with pytest.raises(InputError, match="incomplete=True needs an API that takes incomplete queries"):
        TreePathFinding(incomplete=True)(VictimOracle(est, mode="leaf", features=schema), None, 1000)
    with pytest.raises(InputError, match="bounded value_range"):
        TreePathFinding()(VictimOracle(est, mode="leaf", value_range=UNBOUNDED), None, 1000)
    with pytest.raises(InputError, match="epsilon: expected None or a positive number"):
        TreePathFinding(epsilon=0.0)(VictimOracle(est, mode="leaf", features=schema), None, 1000)
    no_range = TabularSchema(tuple(Feature(f"x{i}") for i in range(4)))
    with pytest.raises(InputError, match="feature 'x0' declares no range"):
        TreePathFinding()(VictimOracle(est, mode="leaf", features=no_range), None, 1000)


def test_float32_ranks_are_ordered_and_invertible() -> None:
    values = np.array([-3.5, -1e-30, -0.0, 0.0, 1e-45, 1e-30, 0.1, 2.0], dtype=np.float32)
    keys = [f32_key(v) for v in values]
    assert keys == sorted(keys) and keys[2] == keys[3] == 0
    assert [key_f32(k) for k in keys] == [float(v) for v in values]
    assert f32_key(np.nextafter(np.float32(0.1), np.float32(1))) == f32_key(np.float32(0.1)) + 1
