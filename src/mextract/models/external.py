"""Victims from files: any classifier its owner has, in a format that loads without pickle.

=============== ================================= ======================================
format          files                              loaded with
=============== ================================= ======================================
ONNX            ``.onnx``                          ``onnxruntime`` (extra ``onnx``)
scikit-learn    ``.skops``                         ``skops.io`` (extra ``sklearn-io``)
XGBoost         ``.json``, ``.ubj``                ``xgboost`` (extra ``xgboost``)
LightGBM        ``.txt`` (a saved Booster)         ``lightgbm`` (extra ``lightgbm``)
=============== ================================= ======================================

:func:`load_external` reads what the file says (input shape, classes, whether it answers
logits or probabilities) and takes the rest from its arguments; the result,
:class:`ExternalModel`, maps a numpy batch ``(N, *input_shape)`` to scores ``(N, K)`` and
goes behind a :class:`~mextract.oracle.VictimOracle` like any other victim. Pickle files
(``.pkl``, ``.joblib``) are refused: loading one runs arbitrary code. A ``.skops`` file is
loaded only when every type in it is trusted (skops' defaults, plus ``trusted``).
"""

from __future__ import annotations

import hashlib
import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mextract.data.base import ValueRange
from mextract.errors import DataError, InputError

Output = Literal["logits", "probs"]

#: file suffix -> format
FORMATS: dict[str, str] = {
    ".onnx": "onnx",
    ".skops": "skops",
    ".json": "xgboost",
    ".ubj": "xgboost",
    ".txt": "lightgbm",
}
_PICKLE = {".pkl", ".pickle", ".joblib", ".pt", ".pth", ".sav"}
#: format -> (module to import, the extra that installs it)
_NEEDS = {
    "onnx": ("onnxruntime", "onnx"),
    "skops": ("skops.io", "sklearn-io"),
    "xgboost": ("xgboost", "xgboost"),
    "lightgbm": ("lightgbm", "lightgbm"),
}
_NAMES = {"onnx": "ONNX", "skops": "skops (scikit-learn)", "xgboost": "XGBoost", "lightgbm": "LightGBM"}


def is_model_file(path: str | Path) -> bool:
    """Whether a victim path means a model file rather than a checkpoint folder: an existing
    file, or a missing path with a model file's suffix (then :func:`load_external` says so)."""
    p = Path(path)
    return p.is_file() or (not p.exists() and p.suffix.lower() in {*FORMATS, *_PICKLE})


@dataclass(frozen=True)
class ExternalModel:
    """A classifier loaded from a file: ``model(x)`` maps ``(N, *input_shape)`` to ``(N, K)``
    scores, logits or probabilities as ``output`` says.

    Attributes:
        path, format: the file and its format (``onnx``, ``skops``, ``xgboost``, ``lightgbm``).
        input_shape: the shape of one input; tabular models take ``(D,)`` (or any shape of
            ``D`` values, flattened for the model).
        num_classes, classes: ``K`` and the class names, in the order of the score columns.
        value_range: the declared range of input values (given, else mextract's
            convention for the shape: ``[0, 1]`` images, unbounded features).
        output: ``"logits"`` or ``"probs"`` (rows of non-negative numbers summing to one).
        sha256: the file's digest.
    """

    path: Path
    format: str
    input_shape: tuple[int, ...]
    num_classes: int
    classes: tuple[str, ...]
    value_range: ValueRange
    output: Output
    sha256: str
    _predict: Callable[[np.ndarray], np.ndarray] = field(repr=False, compare=False)
    details: str = ""

    @property
    def estimator(self) -> Any:
        """The scikit-learn estimator of a ``.skops`` file (``None`` for other formats)."""
        return getattr(self._predict, "estimator", None)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim < 1 or tuple(x.shape[1:]) != self.input_shape:
            raise InputError(
                f"{self.path.name}: expected inputs of shape (N, {', '.join(map(str, self.input_shape))}), "
                f"got {tuple(x.shape)}"
            )
        if len(x) == 0:
            return np.zeros((0, self.num_classes))
        out = np.asarray(self._predict(x), dtype=np.float64)
        if out.shape != (len(x), self.num_classes):
            raise DataError(
                f"{self.path.name}: the model answered shape {out.shape}, "
                f"expected ({len(x)}, {self.num_classes})"
            )
        return out

    def describe(self) -> str:
        """One line: format, file, inputs, classes, answers."""
        extra = f", {self.details}" if self.details else ""
        return (
            f"{_NAMES[self.format]} model {self.path.name}{extra}: inputs {list(self.input_shape)} in "
            f"{self.value_range}, {self.num_classes} classes, answers {self.output}"
        )

    def to_json(self) -> dict[str, Any]:
        """What a record keeps of the victim."""
        return {
            "victim": str(self.path),
            "victim_format": self.format,
            "victim_sha256": self.sha256,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "value_range": self.value_range.to_json(),
            "output": self.output,
        }


# --------------------------------------------------------------------------- parsing flags


def parse_shape(text: str | Sequence[int]) -> tuple[int, ...]:
    """``"1,28,28"`` (or a sequence) -> ``(1, 28, 28)``; every dimension a positive integer."""
    parts = [str(p).strip() for p in (text.replace("x", ",").split(",") if isinstance(text, str) else text)]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise InputError(f"input shape: expected positive integers like 1,28,28, got {text!r}") from None
    if not shape or any(s < 1 for s in shape):
        raise InputError(f"input shape: expected positive integers like 1,28,28, got {text!r}")
    return shape


def parse_value_range(text: str | ValueRange) -> ValueRange:
    """``"0,1"``, ``"-1,1"``, ``"-inf,inf"`` (unbounded) -> a :class:`ValueRange`."""
    if isinstance(text, ValueRange):
        return text
    parts = [p.strip() for p in str(text).split(",")]
    try:
        lo, hi = (float(p) for p in parts)
    except ValueError:
        raise InputError(f"value range: expected LOW,HIGH like 0,1 or -inf,inf, got {text!r}") from None
    if math.isnan(lo) or math.isnan(hi) or lo == math.inf or hi == -math.inf:
        raise InputError(f"value range: expected LOW,HIGH like 0,1 or -inf,inf, got {text!r}")
    return ValueRange(None if lo == -math.inf else lo, None if hi == math.inf else hi)


# --------------------------------------------------------------------------- loading


def _import(fmt: str, path: Path) -> Any:
    module, extra = _NEEDS[fmt]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(
            f"{path}: reading {_NAMES[fmt]} models needs the package {module.split('.')[0]!r}: "
            f'pip install "mextract[{extra}]"'
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _corrupt(path: Path, fmt: str, exc: BaseException) -> DataError:
    return DataError(f"{path}: not a readable {_NAMES[fmt]} model file ({_first_line(exc)})")


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_external(
    path: str | Path,
    *,
    input_shape: Sequence[int] | str | None = None,
    num_classes: int | None = None,
    value_range: ValueRange | str | None = None,
    trusted: Sequence[str] | None = None,
    output: Output | None = None,
) -> ExternalModel:
    """Load a classifier from a model file (see the module's table of formats).

    Args:
        path: the model file; its suffix names the format.
        input_shape: the shape of one input, where the file does not fix it (an ONNX graph
            with dynamic dimensions); where it does, a different value is an error. For
            tabular models (scikit-learn, XGBoost, LightGBM) any shape of the model's
            ``D`` features, e.g. ``(1, 8, 8)`` for 64 pixels.
        num_classes: ``K``, checked against the file.
        value_range: the declared range of input values (default: ``[0, 1]`` for images
            ``(C, H, W)``, unbounded otherwise); queries outside it are refused.
        trusted: type names a ``.skops`` file may hold beyond skops' trusted defaults.
        output: ``"logits"`` or ``"probs"``, overriding the ONNX probe (which takes rows that
            are non-negative and sum to one for probabilities).

    Raises:
        DataError: a missing, unknown, pickled or unreadable file, a missing package.
        InputError: arguments that contradict the file, or untrusted types in a ``.skops``.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such model file")
    if p.is_dir():
        raise DataError(f"{p}: a folder, expected a model file ({', '.join(FORMATS)})")
    suffix = p.suffix.lower()
    if suffix in _PICKLE:
        raise DataError(
            f"{p}: pickle files are not loaded (loading one runs arbitrary code); save a scikit-learn "
            "model with skops.io.dump (.skops), a PyTorch model with torch.onnx.export (.onnx)"
        )
    if suffix not in FORMATS:
        raise DataError(
            f"{p}: unknown model format {suffix or '(no suffix)'!r}; expected .onnx (ONNX), .skops "
            "(scikit-learn), .json/.ubj (XGBoost) or .txt (LightGBM), or a checkpoint folder"
        )
    fmt = FORMATS[suffix]
    shape = None if input_shape is None else parse_shape(input_shape)
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 2):
        raise InputError(f"num_classes: expected an integer of at least 2, got {num_classes!r}")
    declared = None if value_range is None else parse_value_range(value_range)
    if output not in (None, "logits", "probs"):
        raise InputError(f"output: expected 'logits' or 'probs', got {output!r}")
    lib = _import(fmt, p)
    loader = {"onnx": _load_onnx, "skops": _load_skops, "xgboost": _load_xgboost, "lightgbm": _load_lightgbm}
    got = loader[fmt](lib, p, shape, trusted)
    shape, predict, classes, out_kind, details = got
    if num_classes is not None and num_classes != len(classes):
        raise InputError(f"{p.name}: the model answers {len(classes)} classes, not the given {num_classes}")
    if len(classes) < 2:
        raise DataError(f"{p}: a classifier of {len(classes)} class(es); expected at least 2")
    return ExternalModel(
        path=p.resolve(),
        format=fmt,
        input_shape=shape,
        num_classes=len(classes),
        classes=tuple(classes),
        value_range=declared if declared is not None else ValueRange.for_shape(shape),
        output=output or out_kind,
        sha256=_digest(p),
        _predict=predict,
        details=details,
    )


_Loaded = tuple[tuple[int, ...], Callable[[np.ndarray], np.ndarray], list[str], Output, str]


def _tabular_shape(p: Path, features: int, shape: tuple[int, ...] | None) -> tuple[int, ...]:
    if shape is None:
        return (features,)
    if math.prod(shape) != features:
        raise InputError(
            f"{p.name}: the model takes {features} features; the given input shape {list(shape)} "
            f"holds {math.prod(shape)}"
        )
    return shape


def _flat(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.reshape(len(x), -1), dtype=np.float32)


# ---- ONNX

_ONNX_FLOATS = {"tensor(float)": np.float32, "tensor(double)": np.float64}


def _load_onnx(ort: Any, p: Path, shape: tuple[int, ...] | None, trusted: Sequence[str] | None) -> _Loaded:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(str(p), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own pybind11 exception types
        raise _corrupt(p, "onnx", exc) from None
    inputs = session.get_inputs()
    if len(inputs) != 1:
        names = [i.name for i in inputs]
        raise DataError(
            f"{p}: the graph takes {len(inputs)} inputs {names}; expected one (a batch of inputs)"
        )
    inp = inputs[0]
    if inp.type not in _ONNX_FLOATS:
        raise DataError(
            f"{p}: the graph's input {inp.name!r} is a {inp.type}; expected tensor(float) or double"
        )
    dtype = _ONNX_FLOATS[inp.type]
    dims = list(inp.shape or [])
    if len(dims) < 2:
        raise DataError(f"{p}: the graph's input has shape {dims}; expected (batch, *input_shape)")
    batch, rest = dims[0], dims[1:]
    fixed_batch = batch if isinstance(batch, int) and batch > 0 else None
    graph = tuple(d if isinstance(d, int) and d > 0 else None for d in rest)
    if shape is None:
        if None in graph:
            raise InputError(
                f"{p.name}: the graph's input shape {['?' if d is None else d for d in graph]} has dynamic "
                "dimensions; give the input shape (--input-shape)"
            )
        shape = tuple(int(d) for d in graph if d is not None)
    elif len(shape) != len(graph) or any(
        g is not None and g != s for g, s in zip(graph, shape, strict=False)
    ):
        raise InputError(
            f"{p.name}: the graph takes inputs of shape {['?' if d is None else d for d in graph]}, "
            f"not the given input shape {list(shape)}"
        )

    outputs = session.get_outputs()
    zipmap = [o for o in outputs if o.type.startswith("seq(map(")]
    tensors = [o for o in outputs if o.type in _ONNX_FLOATS and len(o.shape or []) == 2]
    kind: Output | None = None
    if zipmap:  # sklearn-onnx's ZipMap: a list of {class: probability} per row
        chosen, kind = zipmap[0], "probs"
    elif len(tensors) == 1:
        chosen = tensors[0]
    elif tensors:
        named = [o for o in tensors if "prob" in o.name.lower()]
        if len(named) != 1:
            raise DataError(
                f"{p}: the graph has several score outputs {[o.name for o in tensors]}; expected one"
            )
        chosen = named[0]
    else:
        found = [f"{o.name}: {o.type} {o.shape}" for o in outputs]
        raise DataError(
            f"{p}: no output of scores (N, K) among {found}; expected logits or probabilities per class "
            "(sklearn-onnx: a 'probabilities' tensor or ZipMap output)"
        )
    name = chosen.name
    zip_keys: list[Any] = []

    def run(x: np.ndarray) -> np.ndarray:
        xs = np.ascontiguousarray(x, dtype=dtype)
        if fixed_batch is None:
            return _scores(session.run([name], {inp.name: xs})[0])
        parts = []
        for i in range(0, len(xs), fixed_batch):
            chunk = xs[i : i + fixed_batch]
            pad = fixed_batch - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.repeat(chunk[:1], pad, axis=0)])
            parts.append(_scores(session.run([name], {inp.name: chunk})[0])[: fixed_batch - pad])
        return np.concatenate(parts)

    def _scores(out: Any) -> np.ndarray:
        if isinstance(out, list):  # ZipMap
            if not zip_keys:
                zip_keys.extend(sorted(out[0]))
            return np.asarray([[row[c] for c in zip_keys] for row in out], dtype=np.float64)
        return np.asarray(out, dtype=np.float64)

    rng = np.random.default_rng(0)
    vr = ValueRange.for_shape(shape)
    probe = rng.random((8, *shape)) if vr.low is not None else rng.standard_normal((8, *shape))
    try:
        answer = run(probe)
    except Exception as exc:
        raise DataError(
            f"{p}: the ONNX model failed on a probe batch of shape {[8, *shape]} ({_first_line(exc)})"
        ) from None
    if answer.ndim != 2 or answer.shape[0] != 8:
        raise DataError(f"{p}: output {name!r} answered shape {answer.shape} for 8 inputs; expected (8, K)")
    k = answer.shape[1]
    if kind is None:
        rows = answer.sum(1)
        kind = "probs" if (answer >= 0).all() and np.allclose(rows, 1.0, atol=1e-4) else "logits"
    classes = [str(c) for c in zip_keys] if zip_keys else [str(i) for i in range(k)]
    return shape, run, classes, kind, f"output {name!r}"


# ---- scikit-learn (skops)


def _load_skops(sio: Any, p: Path, shape: tuple[int, ...] | None, trusted: Sequence[str] | None) -> _Loaded:
    try:
        untrusted = list(sio.get_untrusted_types(file=p))
    except Exception as exc:
        raise _corrupt(p, "skops", exc) from None
    allowed = set(trusted or ())
    refused = [t for t in untrusted if t not in allowed]
    if refused:
        raise InputError(
            f"{p.name} holds types that skops does not trust by default: {refused}; loading them may run "
            "their code. If you trust this file, allow them with trusted=[...] (command line: "
            + " ".join(f"--trust {t}" for t in refused)
            + ")"
        )
    try:
        est = sio.load(p, trusted=untrusted or None)
    except Exception as exc:
        raise _corrupt(p, "skops", exc) from None
    if not hasattr(est, "classes_") or not (
        hasattr(est, "predict_proba") or hasattr(est, "decision_function")
    ):
        raise DataError(f"{p}: holds a {type(est).__name__}, not a fitted scikit-learn classifier")
    features = getattr(est, "n_features_in_", None)
    if features is None:
        if shape is None:
            raise InputError(
                f"{p.name}: the model does not say how many features it takes; give the input shape"
            )
        features = math.prod(shape)
    shape = _tabular_shape(p, int(features), shape)
    classes = [str(c) for c in est.classes_]
    kind: Output = "probs" if hasattr(est, "predict_proba") else "logits"
    return shape, _SklearnScores(est), classes, kind, type(est).__name__


class _SklearnScores:
    """A scikit-learn classifier's scores: ``predict_proba``, else ``decision_function`` (a binary
    decision value ``d`` as the logit pair ``(0, d)``). Keeps the estimator (``estimator``),
    for the oracle's tree walk (answer mode ``leaf``)."""

    def __init__(self, estimator: Any) -> None:
        self.estimator = estimator

    def __call__(self, x: np.ndarray) -> np.ndarray:
        flat = _flat(x).astype(np.float64)
        if hasattr(self.estimator, "predict_proba"):
            return np.asarray(self.estimator.predict_proba(flat))
        d = np.asarray(self.estimator.decision_function(flat), dtype=np.float64)
        return np.stack([np.zeros_like(d), d], axis=1) if d.ndim == 1 else d


# ---- XGBoost


def _load_xgboost(xgb: Any, p: Path, shape: tuple[int, ...] | None, trusted: Sequence[str] | None) -> _Loaded:
    clf = xgb.XGBClassifier()
    try:
        clf.load_model(str(p))
    except TypeError as exc:  # a regressor or ranker saved by the scikit-learn interface
        raise DataError(f"{p}: not an XGBoost classifier ({_first_line(exc)})") from None
    except Exception as exc:
        raise _corrupt(p, "xgboost", exc) from None
    objective = str(clf.get_params().get("objective") or "")
    if not objective.startswith(("binary:", "multi:")):
        raise DataError(f"{p}: an XGBoost model with objective {objective!r}; expected a classifier")
    if objective == "multi:softmax":
        raise DataError(f"{p}: objective multi:softmax answers labels only; retrain with multi:softprob")
    shape = _tabular_shape(p, int(clf.n_features_in_), shape)
    classes = [str(c) for c in getattr(clf, "classes_", range(int(clf.n_classes_)))]
    return shape, lambda x: clf.predict_proba(_flat(x)), classes, "probs", objective


# ---- LightGBM


def _load_lightgbm(
    lgb: Any, p: Path, shape: tuple[int, ...] | None, trusted: Sequence[str] | None
) -> _Loaded:
    try:
        booster = lgb.Booster(model_file=str(p))
    except Exception as exc:
        raise _corrupt(p, "lightgbm", exc) from None
    objective = str(booster.params.get("objective", ""))
    if objective == "binary":
        k = 2

        def predict(x: np.ndarray) -> np.ndarray:
            q = np.asarray(booster.predict(_flat(x)), dtype=np.float64)
            return np.stack([1.0 - q, q], axis=1)

    elif objective in ("multiclass", "softmax"):
        k = int(booster.num_model_per_iteration())

        def predict(x: np.ndarray) -> np.ndarray:
            return np.asarray(booster.predict(_flat(x)), dtype=np.float64)

    else:
        raise DataError(
            f"{p}: a LightGBM model with objective {objective!r}; expected a classifier "
            "(objective binary or multiclass)"
        )
    shape = _tabular_shape(p, int(booster.num_feature()), shape)
    return shape, predict, [str(i) for i in range(k)], "probs", f"objective {objective}"
