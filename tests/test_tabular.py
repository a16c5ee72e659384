"""Tabular data (the user's CSV/Parquet file, feature types, valid rows) and the tabular
retraining attack (Tramèr et al. 2016) on scikit-learn and file victims."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from typer.testing import CliRunner

from mextract.attacks import create_attack
from mextract.attacks.tabular import SklearnSubstitute, schema_for
from mextract.cli import app
from mextract.data import dataset_info, load_splits
from mextract.data.tabular import Feature, TabularSchema, read_table, table_spec
from mextract.errors import DataError, InputError, UnknownNameError
from mextract.metrics import Evaluator
from mextract.oracle import APIDescription, VictimOracle

runner = CliRunner()


@pytest.fixture(scope="module")
def credit_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small credit table: numbers, a text category, ordered levels, an identifier, a class."""
    rng = np.random.default_rng(0)
    n = 400
    age = rng.integers(18, 80, n)
    income = rng.lognormal(10, 0.5, n).round(2)
    job = rng.choice(["admin", "blue-collar", "technician", "student"], n)
    edu = rng.choice(["primary", "secondary", "tertiary"], n)
    score = 0.05 * (age - 45) + 2 * (np.log(income) - 10) - 1.5 * (job == "student") + (edu == "tertiary")
    risk = np.where(score > 0.5, "high", np.where(score > -0.5, "medium", "low"))
    frame = pd.DataFrame(
        {"id": np.arange(n), "age": age, "income": income, "job": job, "education": edu, "risk": risk}
    )
    path = tmp_path_factory.mktemp("table") / "credit.csv"
    frame.to_csv(path, index=False)
    return path


def _credit_spec(path: Path) -> str:
    return table_spec(path, "risk", drop=["id"], ordinal=["education"])


# --- the file and its schema ---------------------------------------------------------
def test_read_table_types_columns_and_parquet(credit_csv: Path, tmp_path: Path) -> None:
    t = read_table(
        credit_csv, "risk", drop=["id"], ordinal={"education": ["primary", "secondary", "tertiary"]}
    )
    kinds = {f.name: f.kind for f in t.schema.features}
    assert kinds == {"age": "numeric", "income": "numeric", "job": "categorical", "education": "ordinal"}
    assert t.schema.width == 1 + 1 + 4 + 1 == t.x.shape[1]
    assert t.classes == ("high", "low", "medium")
    job = t.x[:, t.schema.columns(2)]
    assert set(np.unique(job)) == {0.0, 1.0} and (job.sum(1) == 1).all()
    assert set(np.unique(t.x[:, 6])) == {0.0, 1.0, 2.0}  # ordinal codes
    t.schema.check(t.x)  # every row of the file is a valid record
    parquet = tmp_path / "credit.parquet"
    pd.read_csv(credit_csv).to_parquet(parquet)
    tp = read_table(parquet, "risk", drop=["id"], ordinal={"education": ["primary", "secondary", "tertiary"]})
    np.testing.assert_array_equal(tp.x, t.x)
    assert tp.schema == t.schema


def test_read_table_errors(credit_csv: Path, tmp_path: Path) -> None:
    with pytest.raises(UnknownNameError, match=r"'riks'.*risk"):
        read_table(credit_csv, "riks")
    with pytest.raises(DataError, match="'id' has 400 distinct values"):
        read_table(credit_csv, "risk", categorical=["id"])
    with pytest.raises(InputError, match="both categorical and ordinal"):
        read_table(credit_csv, "risk", categorical=["job"], ordinal=["job"])
    with pytest.raises(DataError, match="not among its levels"):
        read_table(credit_csv, "risk", drop=["id"], ordinal={"education": ["primary", "tertiary"]})
    gaps = tmp_path / "gaps.csv"
    frame = pd.read_csv(credit_csv)
    frame.loc[:4, "age"] = np.nan
    frame.to_csv(gaps, index=False)
    with pytest.warns(UserWarning, match="dropped 5 of 400 rows"):
        assert len(read_table(gaps, "risk", drop=["id"]).x) == 395
    sheet = tmp_path / "credit.xlsx"
    sheet.write_text("")
    with pytest.raises(DataError, match=r"expected a \.csv"):
        read_table(sheet, "risk")


def test_table_split_standardises_numbers_only(credit_csv: Path) -> None:
    spec = _credit_spec(credit_csv)
    info = dataset_info(spec)
    assert info.input_shape == (7,) and info.num_classes == 3
    s = load_splits(spec, seed=1)
    schema = TabularSchema.from_json(s.meta["schema"])
    xv = s.victim_train.x
    assert torch.allclose(xv[:, :2].mean(0), torch.zeros(2), atol=1e-5)  # numbers: the owner's scaling
    schema.check(s.victim_train.x)
    schema.check(s.test.x)  # categories and levels untouched
    age = schema.features[0]
    assert age.low == pytest.approx(float(xv[:, 0].min())) and age.high == pytest.approx(
        float(xv[:, 0].max())
    )
    assert load_splits(spec, seed=1).meta == s.meta  # a pure function of (spec, seed)


def test_bundled_sets_carry_numeric_schemas() -> None:
    s = load_splits("wine")
    schema = TabularSchema.from_json(s.meta["schema"])
    assert schema.is_numeric and schema.width == 13 and schema.features[0].name == "alcohol"
    assert "schema" not in load_splits("digits").meta


def test_schema_sampling_projection_and_json() -> None:
    schema = TabularSchema(
        (
            Feature("a", "numeric", -1.0, 2.0),
            Feature("c", "categorical", levels=("x", "y", "z")),
            Feature("o", "ordinal", levels=("lo", "mid", "hi")),
        )
    )
    g = torch.Generator().manual_seed(0)
    rows = schema.sample_uniform(500, g)
    schema.check(rows)
    assert rows[:, 0].min() >= -1 and rows[:, 0].max() <= 2
    assert set(rows[:, 1:4].argmax(1).tolist()) == {0, 1, 2} and set(rows[:, 4].tolist()) == {0.0, 1.0, 2.0}
    marg = schema.sample_marginals(300, rows[:10], g)
    schema.check(marg)
    assert set(marg[:, 0].tolist()) <= set(rows[:10, 0].tolist())  # values from the sample's column
    bad = torch.tensor([[0.5, 0.2, 0.7, 0.1, 1.4]])
    with pytest.raises(DataError, match="'c' is categorical"):
        schema.check(bad)
    fixed = schema.project(bad)
    schema.check(fixed)
    assert fixed.tolist() == [[0.5, 0.0, 1.0, 0.0, 1.0]]
    assert TabularSchema.from_json(json.loads(json.dumps(schema.to_json()))) == schema


def test_oracle_refuses_invalid_records_and_publishes_schema(credit_csv: Path) -> None:
    s = load_splits(_credit_spec(credit_csv))
    schema = TabularSchema.from_json(s.meta["schema"])
    est = LogisticRegression(max_iter=1000).fit(s.victim_train.x.numpy(), s.victim_train.y.numpy())
    oracle = VictimOracle(est, features=schema, budget=10)
    row = s.test.x[:1].clone()
    row[0, 2:6] = 0.5  # a job that is half of every category
    with pytest.raises(DataError, match="'job' is categorical"):
        oracle.query(row)
    row = s.test.x[:1].clone()
    row[0, 6] = 1.5
    with pytest.raises(DataError, match="'education' is ordinal"):
        oracle.query(row)
    assert oracle.ledger.count == 0  # refused before the victim or the budget
    desc = APIDescription.of(oracle)
    assert desc.features == schema
    assert APIDescription.from_json(json.loads(json.dumps(desc.to_json()))) == desc
    with pytest.raises(InputError, match="schema has 7 columns"):
        VictimOracle(est, input_shape=(8,), num_classes=3, features=schema)


# --- the attack ------------------------------------------------------------------------
def _victim(name: str, est: object) -> tuple[VictimOracle, object, Evaluator]:
    s = load_splits(name, seed=0)
    est.fit(s.victim_train.x.numpy(), s.victim_train.y.numpy())  # type: ignore[attr-defined]
    schema = TabularSchema.from_json(s.meta["schema"])
    return VictimOracle(est, mode="label", features=schema), s, Evaluator.from_victim(est, s.test)


def test_synthetic_label_only_queries_steal_logistic_regression() -> None:
    oracle, _, ev = _victim("wine", LogisticRegression(max_iter=2000))
    atk = create_attack("tabular", model="logreg")
    result = atk(oracle, None, 300, evaluator=ev, seed=0)
    assert result.queries == oracle.ledger.count == 300
    assert result.metrics["fidelity"] >= 0.95
    assert result.metrics["substitute_logreg"] == 1.0
    assert len(result.history) == atk.rounds  # a learning-curve point per round


def test_small_sample_marginals_steal_a_forest_better_than_uniform_boxes() -> None:
    oracle, s, ev = _victim("breast_cancer", RandomForestClassifier(n_estimators=50, random_state=0))
    sample = s.pool.x[:30]  # the thief's small real sample
    marg = create_attack("tabular", model="forest")(oracle, sample, 300, evaluator=ev, seed=0)
    uni = create_attack("tabular", model="forest", queries="uniform")(
        oracle.fork(), None, 300, evaluator=ev, seed=0
    )
    assert marg.metrics["fidelity"] >= 0.9
    assert marg.metrics["fidelity"] > uni.metrics["fidelity"]


def test_categorical_victim_gets_valid_rows_and_auto_family(credit_csv: Path) -> None:
    s = load_splits(_credit_spec(credit_csv))
    schema = TabularSchema.from_json(s.meta["schema"])
    est = LogisticRegression(max_iter=1000).fit(s.victim_train.x.numpy(), s.victim_train.y.numpy())
    oracle = VictimOracle(est, mode="probs", features=schema, log=True)
    ev = Evaluator.from_victim(est, s.test)
    for strategy in ("adaptive", "line_search"):
        result = create_attack("tabular", strategy=strategy, rounds=3, folds=3)(
            oracle.fork(log=True), None, 150, evaluator=ev, seed=1
        )
        assert result.queries == 150
        assert result.metrics["fidelity"] >= 0.85, strategy
        assert result.metrics["cv_agreement"] > 0.5
        assert sum(v for k, v in result.metrics.items() if k.startswith("substitute_")) == 1.0


def test_tabular_attack_errors() -> None:
    api = VictimOracle(
        lambda x: np.zeros((len(x), 2)), input_shape=(3,), num_classes=2
    )  # unbounded, no schema
    with pytest.raises(InputError, match="feature ranges"):
        create_attack("tabular")(api, None, 10)
    with pytest.raises(UnknownNameError, match="strategy"):
        create_attack("tabular", strategy="boundary")(api, torch.zeros(5, 3), 10)
    with pytest.raises(InputError, match="needs the thief's sample"):
        create_attack("tabular", queries="marginals")(api, None, 10)
    with pytest.raises(InputError, match="rounds"):
        create_attack("tabular", rounds=0)(api, torch.zeros(5, 3), 10)
    assert schema_for(APIDescription((3,), 2), torch.tensor([[0.0, 1, 2], [1, 3, 2]])).bounds()[
        1
    ].tolist() == [
        1.0,
        3.0,
        2.0,
    ]


def test_sklearn_substitute_scores_and_saves(tmp_path: Path) -> None:
    from mextract.models import load_external

    x = torch.randn(60, 4)
    labels = (x[:, 0] > 0).long() * 2  # classes 0 and 2 of 3: class 1 never seen
    sub = SklearnSubstitute(RandomForestClassifier(n_estimators=10, random_state=0).fit(x.numpy(), labels), 3)
    logits = sub(x)
    assert logits.shape == (60, 3) and (logits.argmax(1) == labels).float().mean() > 0.95
    assert (logits[:, 1] < -20).all()
    path = sub.save(tmp_path / "sub.skops")
    model = load_external(path, num_classes=2, trusted=["sklearn.tree._tree.Tree"])
    assert (np.asarray(model(x.numpy())).argmax(1) * 2 == labels.numpy()).mean() > 0.95


# --- the command line -----------------------------------------------------------------
def test_cli_trains_on_a_csv_and_steals_it(credit_csv: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = runner.invoke(
        app,
        [
            "train-victim",
            "--data",
            str(credit_csv),
            "--target",
            "risk",
            "--drop",
            "id",
            "--ordinal",
            "education",
            "--out",
            str(out),
            "--threads",
            "1",
        ],
    )
    assert r.exit_code == 0, r.output
    meta = json.loads((out / "victim" / "model.json").read_text())
    assert meta["split"]["schema"]["features"][2]["kind"] == "categorical"
    r = runner.invoke(
        app,
        [
            "attack",
            str(out / "victim"),
            "-a",
            "tabular",
            "--budget",
            "200",
            "--mode",
            "label",
            "--option",
            "model=forest",
            "--option",
            "rounds=3",
            "--out",
            str(tmp_path / "a"),
            "--threads",
            "1",
        ],
    )
    assert r.exit_code == 0, r.output
    rec = json.loads(next((tmp_path / "a").glob("attack-*.json")).read_text())
    assert (
        rec["metrics"]["queries"] == 200 and rec["metrics"]["fidelity"] >= 0.75
    )  # measured 82.5%; chance ~40%
    assert list((tmp_path / "a").glob("substitute-*.skops"))  # scikit-learn: saved with skops, not as an MLP


def test_cli_table_flags_are_checked(credit_csv: Path, tmp_path: Path) -> None:
    r = runner.invoke(app, ["train-victim", "--data", str(credit_csv), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "--target" in r.output
    r = runner.invoke(app, ["train-victim", "--target", "risk", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "is for --data" in r.output
    r = runner.invoke(
        app, ["train-victim", "--data", str(credit_csv), "--target", "rsk", "--out", str(tmp_path / "x")]
    )
    assert r.exit_code == 2 and "rsk" in r.output and "risk" in r.output
    r = runner.invoke(
        app,
        [
            "train-victim",
            "--data",
            str(credit_csv),
            "--target",
            "risk",
            "--dataset",
            "wine",
            "--out",
            str(tmp_path / "x"),
        ],
    )
    assert r.exit_code == 2 and "not both" in r.output


# --- reference checks (docs/faithfulness.md#tabular) ------------------------------------
def test_adaptive_selection_is_the_smallest_margin_by_hand() -> None:
    """Tramèr et al.'s adaptive retraining queries the points the current model is least sure
    of: here the candidates whose two largest probabilities are closest, ranked by hand."""
    from mextract.attacks.tabular import _least_certain

    probs = [[0.9, 0.05, 0.05], [0.4, 0.35, 0.25], [0.5, 0.1, 0.4], [0.34, 0.33, 0.33], [0.7, 0.2, 0.1]]
    margins = [sorted(p)[-1] - sorted(p)[-2] for p in probs]  # 0.85, 0.05, 0.10, 0.01, 0.50
    want = sorted(range(len(probs)), key=lambda i: margins[i])[:3]  # [3, 1, 2]

    class Fixed(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.log(torch.tensor(probs))

    assert _least_certain(Fixed(), torch.zeros(5, 1), 3).tolist() == want == [3, 1, 2]


def test_line_search_brackets_the_boundary_as_bisection_does() -> None:
    """Lowd & Meek's line search, as Tramèr et al. use it: between two rows the victim labels
    differently, each query halves the segment, so after s steps the pair of probes that still
    disagree lies within |b - a| / 2**s of the boundary (a 1-D threshold at 0.3 here)."""
    schema = TabularSchema((Feature("x", "numeric", -1.0, 1.0),))

    def threshold(x: np.ndarray) -> np.ndarray:
        return np.concatenate([x - 0.3, 0.3 - x], axis=1)

    victim = VictimOracle(threshold, input_shape=(1,), num_classes=2, mode="label", log=True, features=schema)
    steps = 6
    atk = create_attack("tabular", strategy="line_search", line_steps=steps, model="logreg")
    atk(victim, None, 40, seed=0)
    xs, answers = victim.ledger.log()
    probes = xs[20:, 0]  # the second half of the budget: line-search probes
    labels = answers[20:].argmax(1)
    # every run of `steps` probes closes in on 0.3 from both sides; its last probes are within 2 / 2**steps
    runs = [probes[i : i + steps] for i in range(0, len(probes) - steps + 1, steps)]
    for run in runs:
        assert (run - 0.3).abs().min() <= 2.0 / 2**steps
    assert set(labels.tolist()) == {0, 1}


def test_cli_extracts_a_tree_file_with_incomplete_queries(tmp_path: Path) -> None:
    import skops.io as sio
    from sklearn.tree import DecisionTreeClassifier

    s = load_splits("iris")
    assert s.victim_train.y is not None
    tree = DecisionTreeClassifier(max_depth=4, random_state=0).fit(
        s.victim_train.x.numpy(), s.victim_train.y.numpy()
    )
    sio.dump(tree, tmp_path / "tree.skops")
    queries = {}
    for extra in ([], ["--missing", "stop"]):
        out = tmp_path / ("top-down" if extra else "complete")
        args = [
            "attack",
            str(tmp_path / "tree.skops"),
            "--dataset",
            "iris",
            "-a",
            "path_finding",
            "--mode",
            "leaf",
        ]
        trust = ["--trust", "sklearn.tree._tree.Tree"]
        r = runner.invoke(app, [*args, "--budget", "5000", *trust, "--out", str(out), *extra])
        assert r.exit_code == 0, r.output
        rec = json.loads(next(out.glob("attack-*.json")).read_text())
        assert rec["metrics"]["fidelity"] == 1.0 and rec["metrics"]["leaves"] == tree.get_n_leaves()
        leaves = json.loads(next(out.glob("tree-*.json")).read_text())["leaves"]
        assert len(leaves) == tree.get_n_leaves()
        queries[bool(extra)] = rec["metrics"]["queries"]
    assert queries[True] < queries[False]  # incomplete queries make it cheaper
    r = runner.invoke(app, ["attack", str(tmp_path / "tree.skops"), "--dataset", "iris", "-a", "kd",
                            "--mode", "leaf", "--trust", "sklearn.tree._tree.Tree"])  # fmt: skip
    assert r.exit_code == 2 and "path_finding" in r.output  # a learning attack cannot read leaf answers
    r = runner.invoke(app, [*args, "--missing", "skip", "--trust", "sklearn.tree._tree.Tree"])
    assert r.exit_code == 2 and "--missing" in r.output


def test_incomplete_queries_over_http(tmp_path: Path) -> None:
    """BigML's API: a served tree takes incomplete records (NaN over binary tensors) and the
    top-down path-finding runs through RemoteOracle exactly as locally."""
    from sklearn.tree import DecisionTreeClassifier

    from mextract.oracle import RemoteOracle
    from mextract.server import ServedAPI, create_app, running

    s = load_splits("wine")
    assert s.victim_train.y is not None
    schema = TabularSchema.from_json(s.meta["schema"])
    tree = DecisionTreeClassifier(max_depth=4, random_state=0).fit(
        s.victim_train.x.numpy(), s.victim_train.y.numpy()
    )
    local = VictimOracle(tree, mode="leaf", features=schema, missing="stop")
    want = create_attack("path_finding")(local, None, 5000, seed=0)
    api = ServedAPI(VictimOracle(tree, mode="leaf", features=schema, missing="stop"), name="tree")
    with running(create_app(api)) as url, RemoteOracle(f"{url}/v2/models/tree", client_id="thief") as remote:
        assert remote.missing == "stop"
        root = remote.query(torch.full((1, 13), float("nan")))  # nothing known: the root answers
        assert int(root[0, -1]) == 0
        got = create_attack("path_finding")(remote, None, 5000, seed=0)
    assert got.metrics["incomplete_queries"] == 1.0
    assert got.queries == want.queries == remote.ledger.count - 1 == api.spent("thief") - 1
    assert got.metrics["leaves"] == tree.get_n_leaves()
    plain = ServedAPI(VictimOracle(tree, mode="leaf", features=schema), name="tree")
    with pytest.raises(InputError, match="NaN"):
        plain.query("thief", torch.full((1, 13), float("nan")))  # without the option, NaN is refused


def test_line_search_spends_its_budget_when_every_answer_is_one_class() -> None:
    """No segment to search (a constant victim): the rest of the budget goes to the query source."""
    schema = TabularSchema((Feature("a", "numeric", 0.0, 1.0), Feature("b", "numeric", 0.0, 1.0)))

    def constant(x: np.ndarray) -> np.ndarray:
        return np.tile([1.0, 0.0], (len(x), 1))

    oracle = VictimOracle(constant, input_shape=(2,), num_classes=2, mode="label", features=schema)
    result = create_attack("tabular", strategy="line_search", model="forest")(oracle, None, 60, seed=0)
    assert result.queries == oracle.ledger.count == 60
