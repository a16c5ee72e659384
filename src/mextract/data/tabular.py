"""Tabular data: the user's CSV or Parquet file, feature types, and what a valid row is.

A tabular prediction API (a credit score, a fraud flag) takes records whose fields have
types: numbers, categories, ordered levels. Its public description says which (BigML's
API lists every field with its type, its range or its categories; Tramèr et al., USENIX
Security 2016, build their attacks on exactly that), and a thief that makes its own
queries must make *valid* rows. :class:`TabularSchema` is that description, in the
model's input representation (one row of floats):

============ ===================== =================================================
kind         columns               a valid value
============ ===================== =================================================
numeric      one                   any finite number; ``low``/``high`` is the range
                                   of the owner's training data (standardised with its
                                   mean and standard deviation), informative only
categorical  one per category      a one-hot block: one column 1, the others 0
ordinal      one                   an integer level code ``0 .. m-1`` (ordered levels)
============ ===================== =================================================

The oracle refuses a query whose categorical block is not one-hot or whose ordinal code
is not a level (:meth:`TabularSchema.check`); numeric values outside the training range
are answered, as a real API answers a record unlike those it was trained on.

:func:`read_table` reads a file into rows and a schema: string, boolean and pandas
``category`` columns are categorical, numeric columns numeric, unless the caller names
them (``categorical=``, ``ordinal=``); ``drop=`` leaves columns out (identifiers).
Rows with a missing value are dropped with a warning that counts them. The dataset spec
``table:{"path": ..., "target": ...}`` (:func:`table_spec`) names such a file wherever a
dataset name goes, so a checkpoint trained on it rebuilds the same split.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from mextract.errors import DataError, InputError, UnknownNameError

FeatureKind = Literal["numeric", "categorical", "ordinal"]
KINDS: tuple[str, ...] = ("numeric", "categorical", "ordinal")
#: A categorical column with more levels than this is almost always an identifier.
MAX_LEVELS = 100
TABLE_PREFIX = "table"


@dataclass(frozen=True)
class Feature:
    """One field of a record: its name, kind, range (numeric, ordinal) and levels
    (categorical: the one-hot columns' categories; ordinal: the levels in order)."""

    name: str
    kind: FeatureKind = "numeric"
    low: float | None = None
    high: float | None = None
    levels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UnknownNameError("feature kind", self.kind, KINDS)
        if self.kind != "numeric" and len(self.levels) < 2:
            raise InputError(f"feature {self.name!r}: a {self.kind} feature needs at least 2 levels")
        if self.kind == "ordinal":
            object.__setattr__(self, "low", 0.0)
            object.__setattr__(self, "high", float(len(self.levels) - 1))
        if self.kind == "categorical":
            object.__setattr__(self, "low", 0.0)
            object.__setattr__(self, "high", 1.0)
        if self.low is not None and self.high is not None and self.low > self.high:
            raise InputError(f"feature {self.name!r}: low {self.low} > high {self.high}")

    @property
    def width(self) -> int:
        """Columns this feature takes in a row."""
        return len(self.levels) if self.kind == "categorical" else 1

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind}
        if self.kind == "numeric":
            out.update(low=self.low, high=self.high)
        else:
            out["levels"] = list(self.levels)
        return out


@dataclass(frozen=True)
class TabularSchema:
    """The fields of a tabular API's records, in column order (see the module docstring)."""

    features: tuple[Feature, ...]
    _starts: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.features:
            raise InputError("a tabular schema needs at least one feature")
        names = [f.name for f in self.features]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise InputError(f"tabular schema: duplicate feature names {dup}")
        starts = np.cumsum([0] + [f.width for f in self.features])[:-1]
        object.__setattr__(self, "_starts", tuple(int(s) for s in starts))

    @property
    def width(self) -> int:
        """Columns of a row: the model's input size."""
        return sum(f.width for f in self.features)

    def columns(self, i: int) -> slice:
        """The columns of feature ``i``."""
        return slice(self._starts[i], self._starts[i] + self.features[i].width)

    @property
    def is_numeric(self) -> bool:
        return all(f.kind == "numeric" for f in self.features)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-column ``(low, high)``: a numeric feature's training range, a categorical
        block's ``[0, 1]``, an ordinal code's ``[0, m-1]``; ``nan`` where a numeric range is
        not declared."""
        low = np.full(self.width, np.nan)
        high = np.full(self.width, np.nan)
        for i, f in enumerate(self.features):
            cols = self.columns(i)
            low[cols] = np.nan if f.low is None else f.low
            high[cols] = np.nan if f.high is None else f.high
        return low, high

    # --- validity -------------------------------------------------------------------
    def check(self, x: torch.Tensor | np.ndarray, where: str = "query") -> None:
        """Raise a :class:`DataError` naming the feature when a row of ``x`` (``(N, width)``)
        is not a valid record: a categorical block that is not one-hot, an ordinal code that
        is not an integer level."""
        arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        if arr.ndim != 2 or arr.shape[1] != self.width:
            raise DataError(f"{where}: expected rows of {self.width} columns, got shape {arr.shape}")
        for i, f in enumerate(self.features):
            block = arr[:, self.columns(i)]
            if f.kind == "categorical":
                binary = np.isin(block, (0.0, 1.0)).all(1)
                bad = ~(binary & (block.sum(1) == 1))
                if bad.any():
                    row = int(np.argmax(bad))
                    raise DataError(
                        f"{where}: feature {f.name!r} is categorical ({len(f.levels)} one-hot columns); "
                        f"{int(bad.sum())} row(s) are not one-hot, e.g. row {row}: {block[row].tolist()}"
                    )
            elif f.kind == "ordinal":
                v = block[:, 0]
                bad = (v != np.round(v)) | (v < 0) | (v > len(f.levels) - 1)
                if bad.any():
                    raise DataError(
                        f"{where}: feature {f.name!r} is ordinal with levels 0..{len(f.levels) - 1}; "
                        f"{int(bad.sum())} row(s) hold another value, e.g. {float(v[bad][0]):g}"
                    )

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The nearest valid rows: each categorical block to the one-hot of its largest
        column, each ordinal code rounded and clipped to a level; numbers unchanged."""
        out = x.clone()
        for i, f in enumerate(self.features):
            cols = self.columns(i)
            if f.kind == "categorical":
                block = out[:, cols]
                out[:, cols] = torch.nn.functional.one_hot(block.argmax(1), f.width).to(out.dtype)
            elif f.kind == "ordinal":
                out[:, cols] = out[:, cols].round().clamp(0, len(f.levels) - 1)
        return out

    # --- sampling -------------------------------------------------------------------
    def sample_uniform(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` random valid rows: numbers uniform in their declared range, categories and
        levels uniform. A numeric feature without a declared range is an error."""
        out = torch.zeros(n, self.width)
        for i, f in enumerate(self.features):
            cols = self.columns(i)
            if f.kind == "numeric":
                if f.low is None or f.high is None:
                    raise DataError(f"feature {f.name!r} declares no range: uniform queries need one")
                out[:, cols] = f.low + (f.high - f.low) * torch.rand(n, 1, generator=generator)
            else:
                level = torch.randint(len(f.levels), (n,), generator=generator)
                if f.kind == "categorical":
                    out[:, cols] = torch.nn.functional.one_hot(level, f.width).float()
                else:
                    out[:, cols] = level.float()[:, None]
        return out

    def sample_marginals(self, n: int, sample: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``n`` rows whose features are drawn independently, each from its own column(s) of
        ``sample`` (the per-feature marginals of a small real sample; correlations dropped)."""
        if len(sample) == 0:
            raise DataError("per-feature marginals need a non-empty sample")
        self.check(sample, "marginal sample")
        out = torch.zeros(n, self.width)
        for i in range(len(self.features)):
            cols = self.columns(i)
            rows = torch.randint(len(sample), (n,), generator=generator)
            out[:, cols] = sample[rows][:, cols].float()
        return out

    # --- serialisation --------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"features": [f.to_json() for f in self.features]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TabularSchema:
        try:
            feats = [
                Feature(
                    str(f["name"]),
                    f.get("kind", "numeric"),
                    None if f.get("low") is None else float(f["low"]),
                    None if f.get("high") is None else float(f["high"]),
                    tuple(str(v) for v in f.get("levels", ())),
                )
                for f in data["features"]
            ]
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"tabular schema: malformed description ({exc!r})") from exc
        return cls(tuple(feats))

    @classmethod
    def numeric(cls, x: np.ndarray, names: Sequence[str] | None = None) -> TabularSchema:
        """All-numeric features with the ranges of ``x`` (the owner's training rows)."""
        names = list(names) if names is not None else [f"x{i}" for i in range(x.shape[1])]
        if len(names) != x.shape[1]:
            raise InputError(f"{len(names)} feature names for {x.shape[1]} columns")
        lo, hi = x.min(0), x.max(0)
        return cls(
            tuple(Feature(n, "numeric", float(a), float(b)) for n, a, b in zip(names, lo, hi, strict=True))
        )

    def describe(self) -> str:
        parts = []
        for f in self.features:
            if f.kind == "numeric":
                parts.append(f"{f.name} (numeric)")
            else:
                parts.append(f"{f.name} ({f.kind}, {len(f.levels)} levels)")
        return ", ".join(parts)


# --- the user's file ------------------------------------------------------------------
@dataclass(frozen=True)
class Table:
    """A file read into rows: ``x`` (N, width) float32 in the schema's encoding (numbers
    not yet standardised), ``y`` class codes, class names, the schema (numeric ranges
    unset: the split sets them), and which columns are numeric (to standardise)."""

    x: np.ndarray
    y: np.ndarray
    classes: tuple[str, ...]
    schema: TabularSchema
    numeric_columns: np.ndarray
    sha256: str


def read_table(
    path: str | Path,
    target: str,
    *,
    categorical: Sequence[str] = (),
    ordinal: Sequence[str] | dict[str, Sequence[str]] = (),
    drop: Sequence[str] = (),
) -> Table:
    """Read a CSV (``.csv``, ``.csv.gz``, ``.tsv``) or Parquet (``.parquet``, ``.pq``; the
    ``[parquet]`` extra) file into rows and a schema.

    Args:
        target: the column holding the class; its distinct values, sorted, are the classes.
        categorical: columns to treat as categories even when they hold numbers.
        ordinal: columns of ordered levels: a list (levels in sorted order) or a dict
            ``{column: [levels in order]}``.
        drop: columns to leave out (identifiers, free text).
    """
    import pandas as pd

    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file (expected a .csv or .parquet table)")
    name = p.name.lower()
    try:
        if name.endswith((".parquet", ".pq")):
            try:
                frame = pd.read_parquet(p)
            except ImportError as exc:
                raise DataError(
                    f"{p}: reading Parquet needs pyarrow: pip install 'mextract[parquet]'"
                ) from exc
        elif name.endswith((".csv", ".csv.gz", ".tsv", ".txt")):
            frame = pd.read_csv(p, sep="\t" if name.endswith(".tsv") else ",")
        else:
            raise DataError(f"{p}: expected a .csv, .tsv or .parquet file")
    except DataError:
        raise
    except Exception as exc:  # a parser's error: name the file
        raise DataError(f"{p}: cannot read the table ({type(exc).__name__}: {exc})") from exc
    columns = [str(c) for c in frame.columns]
    frame.columns = columns
    order = dict(ordinal) if isinstance(ordinal, dict) else {c: None for c in ordinal}
    for what, names in (("target", [target]), ("categorical", categorical), ("ordinal", order),
                        ("drop", drop)):  # fmt: skip
        for c in names:
            if c not in columns:
                raise UnknownNameError(f"{what} column of {p.name}", c, columns)
    both = set(categorical) & set(order)
    if both:
        raise InputError(f"columns {sorted(both)} are named both categorical and ordinal")
    if target in set(categorical) | set(order) | set(drop):
        raise InputError(f"the target column {target!r} cannot also be a feature option")
    frame = frame.drop(columns=list(drop))
    missing = frame.isna().any(axis=1)
    if missing.any():
        warnings.warn(f"{p.name}: dropped {int(missing.sum())} of {len(frame)} rows with a missing value",
                      stacklevel=2)  # fmt: skip
        frame = frame[~missing]
    if len(frame) < 10:
        raise DataError(f"{p}: {len(frame)} complete rows; a split needs at least 10")
    labels = frame.pop(target).astype(str)
    classes = tuple(sorted(labels.unique()))
    if len(classes) < 2:
        raise DataError(f"{p}: target {target!r} holds one class ({classes[0]!r}); a classifier needs two")
    y = labels.map({c: i for i, c in enumerate(classes)}).to_numpy(np.int64)
    blocks: list[np.ndarray] = []
    feats: list[Feature] = []
    numeric_cols: list[int] = []
    width = 0
    for col in frame.columns:
        s = frame[col]
        if col in order:
            levels = order[col]
            values = s.astype(str)
            lv = [str(v) for v in levels] if levels is not None else _sorted_levels(s)
            unknown = sorted(set(values) - set(lv))
            if unknown:
                raise DataError(
                    f"{p}: ordinal column {col!r} holds values {unknown[:5]} not among its levels {lv}"
                )
            blocks.append(values.map({v: i for i, v in enumerate(lv)}).to_numpy(np.float32)[:, None])
            feats.append(Feature(col, "ordinal", levels=tuple(lv)))
            width += 1
        elif col in categorical or not pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s):
            lv = _sorted_levels(s)
            if len(lv) > MAX_LEVELS:
                raise DataError(
                    f"{p}: column {col!r} has {len(lv)} distinct values (more than {MAX_LEVELS}); "
                    "an identifier or free text: leave it out (drop=[...], --drop); "
                    "a number: it must parse as one"
                )
            if len(lv) < 2:
                warnings.warn(f"{p.name}: column {col!r} holds one value; left out", stacklevel=2)
                continue
            codes = s.astype(str).map({v: i for i, v in enumerate(lv)}).to_numpy(np.int64)
            blocks.append(np.eye(len(lv), dtype=np.float32)[codes])
            feats.append(Feature(col, "categorical", levels=tuple(lv)))
            width += len(lv)
        else:
            blocks.append(s.to_numpy(np.float32)[:, None])
            feats.append(Feature(col, "numeric"))
            numeric_cols.append(width)
            width += 1
    if not feats:
        raise DataError(f"{p}: no feature column left besides the target {target!r}")
    x = np.concatenate(blocks, axis=1)
    if not np.isfinite(x).all():
        raise DataError(f"{p}: numeric columns hold infinite values")
    digest = hashlib.sha256(p.read_bytes()).hexdigest()
    return Table(x, y, classes, TabularSchema(tuple(feats)), np.asarray(numeric_cols, dtype=np.int64), digest)


def _sorted_levels(s: Any) -> list[str]:
    """Distinct values as strings, in numeric order where they are numbers."""
    uniq = list(dict.fromkeys(s.tolist()))
    try:
        uniq.sort(key=float)
    except (TypeError, ValueError):
        uniq.sort(key=str)
    return [str(v) for v in uniq]


# --- dataset specs ----------------------------------------------------------------------
def table_spec(
    path: str | Path,
    target: str,
    *,
    categorical: Sequence[str] = (),
    ordinal: Sequence[str] = (),
    drop: Sequence[str] = (),
) -> str:
    """The dataset name of a file: ``table:{"path": <absolute path>, "target": ...}`` (options
    only where given), usable wherever a dataset name is (``load_splits``, a plan, a
    checkpoint's metadata)."""
    opts: dict[str, Any] = {"path": str(Path(path).resolve()), "target": target}
    for key, value in (("categorical", categorical), ("ordinal", ordinal), ("drop", drop)):
        if value:
            opts[key] = list(value)
    return f"{TABLE_PREFIX}:{json.dumps(opts, sort_keys=True)}"


def is_table_spec(name: str | None) -> bool:
    return isinstance(name, str) and name.startswith(TABLE_PREFIX + ":")


def parse_table_spec(name: str) -> dict[str, Any]:
    """``table:{json}`` → its options, checked (a path and a target)."""
    try:
        opts = json.loads(name[len(TABLE_PREFIX) + 1 :])
    except json.JSONDecodeError as exc:
        raise InputError(f'dataset {name!r}: expected table:{{"path": ..., "target": ...}} ({exc})') from exc
    if (
        not isinstance(opts, dict)
        or not isinstance(opts.get("path"), str)
        or not isinstance(opts.get("target"), str)
    ):
        raise InputError(f'dataset {name!r}: a table spec needs a "path" and a "target" (strings)')
    extra = set(opts) - {"path", "target", "categorical", "ordinal", "drop"}
    if extra:
        raise InputError(f"dataset {name!r}: unknown table options {sorted(extra)}")
    return opts


def read_table_spec(name: str) -> Table:
    """The table a spec names. A file read once per process while it is unchanged (same size and
    modification time): checking a command line, splitting it and serving it read it once."""
    opts = parse_table_spec(name)
    try:
        st = Path(opts["path"]).stat()
    except OSError:
        return _read_spec(name, -1, -1)  # read_table names the problem
    return _read_spec(name, st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=2)
def _read_spec(name: str, size: int, mtime_ns: int) -> Table:
    opts = parse_table_spec(name)
    return read_table(
        opts["path"], opts["target"], categorical=opts.get("categorical", ()),
        ordinal=opts.get("ordinal", ()), drop=opts.get("drop", ()),
    )  # fmt: skip


def with_ranges(schema: TabularSchema, x: np.ndarray) -> TabularSchema:
    """The schema with each numeric feature's range set to that of rows ``x`` (encoded)."""
    feats = []
    for i, f in enumerate(schema.features):
        if f.kind == "numeric":
            col = x[:, schema.columns(i)][:, 0]
            f = Feature(f.name, "numeric", float(col.min()), float(col.max()))
        feats.append(f)
    return TabularSchema(tuple(feats))


__all__ = [
    "Feature",
    "Table",
    "TabularSchema",
    "is_table_spec",
    "parse_table_spec",
    "read_table",
    "read_table_spec",
    "table_spec",
    "with_ranges",
]
