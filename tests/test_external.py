"""Victims from model files: ONNX, skops, XGBoost, LightGBM — loaded, answered, attacked, served,
and every bad file a clear error. Tiny models, made here; nothing is downloaded."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from mextract.cli import app
from mextract.errors import DataError, InputError
from mextract.models import ExternalModel, load_external
from mextract.oracle import VictimOracle

runner = CliRunner()


def _double(x):  # type: ignore[no-untyped-def]
    """A user function inside a pipeline: a type skops does not trust by default."""
    return 2 * x


# --------------------------------------------------------------------------- ONNX


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory: pytest.TempPathFactory, digits_victim: nn.Module) -> Path:
    """The conftest's digits CNN exported by torch's (dynamo) ONNX exporter, as one file."""
    import onnxruntime  # noqa: F401  (the [onnx] extra; .ci/run installs it)
    import onnxscript  # noqa: F401
    path = tmp_path_factory.mktemp("onnx") / "digits.onnx"
    model = digits_victim.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.rand(2, 1, 8, 8),),
            str(path),
            dynamo=True,
            external_data=False,
            dynamic_shapes=({0: "batch"},),
            input_names=["x"],
            output_names=["logits"],
            verbose=False,
        )
    return path


def test_onnx_export_answers_like_the_original(
    onnx_file: Path, digits_victim: nn.Module, digits_splits
) -> None:  # type: ignore[no-untyped-def]
    model = load_external(onnx_file)
    assert model.format == "onnx" and model.input_shape == (1, 8, 8) and model.num_classes == 10
    assert model.output == "logits" and model.value_range.to_json() == {"low": 0.0, "high": 1.0}
    assert model.sha256 == hashlib.sha256(onnx_file.read_bytes()).hexdigest()
    assert "ONNX" in model.describe() and "logits" in model.describe()
    x = digits_splits.test.x
    with torch.no_grad():
        want = digits_victim.eval()(x)
    got = model(x.numpy())
    assert got.shape == (len(x), 10)
    assert np.abs(got - want.numpy()).max() < 1e-5
    assert (got.argmax(1) == want.argmax(1).numpy()).all()
    probs = VictimOracle(model, mode="probs").query(x)
    assert (probs - torch.softmax(want, 1)).abs().max() < 1e-5
    labels = VictimOracle(model, mode="label").query(x)
    assert torch.equal(labels.argmax(1), want.argmax(1)) and torch.equal(labels.sum(1), torch.ones(len(x)))
    logits = VictimOracle(model, mode="logits", budget=len(x))
    assert (logits.query(x) - want).abs().max() < 1e-5 and logits.ledger.count == len(x)


def _sklearn_onnx(est, path: Path, *, zipmap: bool) -> None:  # type: ignore[no-untyped-def]
    """What sklearn-onnx writes for a multinomial logistic regression: ``label`` and
    ``probabilities``, or ``label`` and a ZipMap ``output_probability`` (built by hand here)."""
    import onnx
    from onnx import TensorProto, helper

    k, d = est.coef_.shape
    nodes = [
        helper.make_node(
            "LinearClassifier",
            ["X"],
            ["label", "probabilities"],
            domain="ai.onnx.ml",
            coefficients=est.coef_.ravel().tolist(),
            intercepts=est.intercept_.tolist(),
            classlabels_ints=list(range(k)),
            post_transform="SOFTMAX",
        )
    ]
    outputs = [helper.make_tensor_value_info("label", TensorProto.INT64, ["N"])]
    if zipmap:
        nodes.append(
            helper.make_node(
                "ZipMap",
                ["probabilities"],
                ["output_probability"],
                domain="ai.onnx.ml",
                classlabels_int64s=list(range(k)),
            )
        )
        seq = helper.make_sequence_type_proto(
            helper.make_map_type_proto(
                TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, [])
            )
        )
        outputs.append(helper.make_value_info("output_probability", seq))
    else:
        outputs.append(helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", k]))
    graph = helper.make_graph(
        nodes, "lr", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", d])], outputs
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 1)]
    )
    model.ir_version = 8
    onnx.save(model, str(path))


@pytest.mark.parametrize("zipmap", [False, True])
def test_sklearn_onnx_label_and_probabilities_outputs(tmp_path: Path, zipmap: bool) -> None:
    import onnxruntime  # noqa: F401  (the [onnx] extra; .ci/run installs it)
    from sklearn.linear_model import LogisticRegression

    from mextract.data import load_splits

    splits = load_splits("iris", seed=0)
    est = LogisticRegression(max_iter=500).fit(splits.victim_train.x.numpy(), splits.victim_train.y.numpy())
    path = tmp_path / "lr.onnx"
    _sklearn_onnx(est, path, zipmap=zipmap)
    model = load_external(path)
    assert model.output == "probs" and model.input_shape == (4,) and model.classes == ("0", "1", "2")
    x = splits.test.x
    want = est.predict_proba(x.numpy())
    assert np.abs(model(x.numpy()) - want).max() < 1e-5
    probs = VictimOracle(model, mode="probs").query(x)  # the model's own probabilities, not softmax(log p)
    assert np.abs(probs.numpy() - want).max() < 1e-5
    assert torch.equal(VictimOracle(model, mode="label").query(x).argmax(1), torch.from_numpy(want.argmax(1)))
    top = VictimOracle(model, mode="topk", k=1).query(x)
    assert np.abs(top.max(1).values.numpy() - want.max(1)).max() < 1e-5


# --------------------------------------------------------------------------- scikit-learn (skops)


def test_skops_pipeline_answers_predict_proba_exactly(tmp_path: Path) -> None:
    import skops.io as sio
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from mextract.data import load_splits

    splits = load_splits("wine", seed=0)
    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500))
    pipe.fit(splits.victim_train.x.numpy(), splits.victim_train.y.numpy())
    path = tmp_path / "wine.skops"
    sio.dump(pipe, path)
    model = load_external(path)
    assert (model.format, model.input_shape, model.num_classes, model.output) == ("skops", (13,), 3, "probs")
    x = splits.test.x
    want = pipe.predict_proba(x.numpy().astype(np.float64))
    assert np.array_equal(model(x.numpy()), want)
    oracle = VictimOracle(model, mode="probs", dtype=torch.float64)
    assert np.array_equal(oracle.query(x).numpy(), want)
    assert oracle.value_range is not None and oracle.value_range.low is None  # features: unbounded

    fn = make_pipeline(
        __import__("sklearn.preprocessing").preprocessing.FunctionTransformer(_double),
        LogisticRegression(max_iter=500),
    )
    fn.fit(splits.victim_train.x.numpy(), splits.victim_train.y.numpy())
    risky = tmp_path / "risky.skops"
    sio.dump(fn, risky)
    name = f"{__name__}._double"
    with pytest.raises(InputError, match="does not trust") as err:
        load_external(risky)
    assert name in str(err.value) and f"--trust {name}" in str(err.value)
    assert load_external(risky, trusted=[name]).num_classes == 3


# --------------------------------------------------------------------------- XGBoost, LightGBM


@pytest.mark.parametrize("dataset", ["wine", "breast_cancer"])
def test_xgboost_and_lightgbm_answer_their_own_predict_proba(tmp_path: Path, dataset: str) -> None:
    import lightgbm as lgb
    import xgboost as xgb

    from mextract.data import load_splits

    splits = load_splits(dataset, seed=0)
    xtr, ytr, x = splits.victim_train.x.numpy(), splits.victim_train.y.numpy(), splits.test.x.numpy()
    k = splits.test.num_classes
    booster = xgb.XGBClassifier(n_estimators=8, max_depth=3, n_jobs=1).fit(xtr, ytr)
    light = lgb.LGBMClassifier(n_estimators=8, num_leaves=7, n_jobs=1, verbose=-1).fit(xtr, ytr)
    for suffix in (".json", ".ubj"):
        booster.save_model(tmp_path / f"xgb{suffix}")
        model = load_external(tmp_path / f"xgb{suffix}")
        assert (model.format, model.num_classes, model.output, model.input_shape) == (
            "xgboost",
            k,
            "probs",
            (x.shape[1],),
        )
        assert np.abs(model(x) - booster.predict_proba(x)).max() < 1e-6
    light.booster_.save_model(str(tmp_path / "lgb.txt"))
    model = load_external(tmp_path / "lgb.txt")
    assert (model.format, model.num_classes, model.output) == ("lightgbm", k, "probs")
    assert np.abs(model(x) - light.predict_proba(x)).max() < 1e-9
    probs = VictimOracle(model, mode="probs", dtype=torch.float64).query(torch.from_numpy(x))
    assert np.abs(probs.numpy() - light.predict_proba(x)).max() < 1e-12


# --------------------------------------------------------------------------- the command line


def test_attack_a_model_file_end_to_end(tmp_path: Path, onnx_file: Path) -> None:
    rec = tmp_path / "rec.json"
    r = runner.invoke(
        app,
        [
            "attack",
            str(onnx_file),
            "--dataset",
            "digits",
            "--attack",
            "kd",
            "--budget",
            "100",
            "--option",
            'train={"epochs": 3}',
            "--record",
            str(rec),
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 0, r.output
    record = json.loads(rec.read_text())
    assert record["metrics"]["queries"] == 100 and record["metrics"]["victim_accuracy"] > 0.8
    assert record["config"]["victim"] == str(onnx_file.resolve())
    assert record["config"]["victim_sha256"] == hashlib.sha256(onnx_file.read_bytes()).hexdigest()
    assert record["config"]["victim_format"] == "onnx" and record["config"]["dataset"] == "digits"


def test_serve_a_model_file_over_http(onnx_file: Path, digits_victim: nn.Module, digits_splits) -> None:  # type: ignore[no-untyped-def]
    from mextract.experiments import served_api
    from mextract.oracle import RemoteOracle
    from mextract.server import create_app, running

    api = served_api(onnx_file, mode="probs", budget=50)
    x = digits_splits.test.x[:20]
    with running(create_app(api)) as base, RemoteOracle(f"{base}/v2/models/victim") as remote:
        assert remote.input_shape == (1, 8, 8) and remote.num_classes == 10
        answers = remote.query(x)
    with torch.no_grad():
        want = torch.softmax(digits_victim.eval()(x), 1)
    assert (answers - want).abs().max() < 1e-5
    r = runner.invoke(app, ["serve", str(onnx_file), "--pow"])
    assert r.exit_code == 2 and "model file" in r.output


def _bad_files(tmp_path: Path, onnx_file: Path) -> dict[str, Path]:
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(onnx_file.read_bytes()[:2000])
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n")
    unknown = tmp_path / "model.h5"
    unknown.write_bytes(b"\x89HDF")
    return {"truncated": truncated, "text": text, "unknown": unknown}


@pytest.mark.parametrize(
    ("case", "extra", "message"),
    [
        ("truncated", [], "not a readable ONNX model file"),
        ("text", [], "not a readable ONNX model file"),
        ("unknown", [], "unknown model format '.h5'"),
        ("good", ["--input-shape", "1,9,9"], "not the given input shape [1, 9, 9]"),
        ("good", ["--classes", "3"], "answers 10 classes, not the given 3"),
    ],
)
def test_bad_model_files_are_clear_errors(
    tmp_path: Path, onnx_file: Path, case: str, extra: list[str], message: str
) -> None:
    path = onnx_file if case == "good" else _bad_files(tmp_path, onnx_file)[case]
    r = runner.invoke(
        app, ["attack", str(path), "--dataset", "digits", *extra, "--device", "cpu"], env={"COLUMNS": "300"}
    )
    assert r.exit_code == 2, r.output
    assert message in " ".join(r.output.split())
    assert r.exception is None or isinstance(r.exception, SystemExit)  # a usage error, no traceback


def test_a_bad_model_file_through_the_entry_point(tmp_path: Path, onnx_file: Path) -> None:
    """The real entry point: exit code 2, one message naming the file and format, no traceback."""
    bad = _bad_files(tmp_path, onnx_file)["truncated"]
    proc = subprocess.run(
        [sys.executable, "-c", "from mextract.cli import main; main()", "serve", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "300"},
    )
    assert proc.returncode == 2, proc.stderr
    assert "truncated.onnx" in proc.stderr and "ONNX" in proc.stderr and "Traceback" not in proc.stderr


def test_library_errors_name_the_file(tmp_path: Path, onnx_file: Path) -> None:
    with pytest.raises(DataError, match="no such model file"):
        load_external(tmp_path / "missing.onnx")
    pickled = tmp_path / "model.pkl"
    pickled.write_bytes(b"\x80\x04N.")
    with pytest.raises(DataError, match="pickle files are not loaded"):
        load_external(pickled)
    with pytest.raises(InputError, match="value range"):
        load_external(onnx_file, value_range="1,0")
    model = load_external(onnx_file, value_range="-1,1")
    assert isinstance(model, ExternalModel) and model.value_range.to_json() == {"low": -1.0, "high": 1.0}
    with pytest.raises(InputError, match="input_shape"):
        VictimOracle(model, input_shape=(64,))
    with pytest.raises(InputError, match="expected inputs of shape"):
        model(np.zeros((2, 64), dtype=np.float32))
