"""A decision-tree victim answered node by node: answer mode ``leaf`` and incomplete queries.

The oracle walks a fitted scikit-learn ``DecisionTreeClassifier`` itself, from its
``tree_`` arrays (``children_left``/``children_right``, ``feature``, ``threshold``,
``value``), exactly as scikit-learn does: a record goes left at a node when its value,
cast to float32 (scikit-learn's ``DTYPE``) and compared in float64, is ``<= threshold``.
So on complete records the node reached is ``tree.apply(x)`` and its normalised class
distribution is ``tree.predict_proba(x)``.

Incomplete queries (``missing="stop"``): a NaN means "this feature is missing", and the
path stops at the first node that tests a missing feature (BigML's behaviour, which
Tramèr et al., USENIX Security 2016, section 4.2, exploit); the answer is that node's own
class distribution and identifier.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mextract.errors import InputError

#: the values of the ``missing`` option of an oracle: ``None`` (a NaN is refused) or ``"stop"``
MISSING_OPTIONS: tuple[str, ...] = ("stop",)


def check_missing(missing: str | None) -> str | None:
    if missing is not None and missing not in MISSING_OPTIONS:
        raise InputError(
            f"missing: expected None (incomplete queries refused) or 'stop' (a missing feature "
            f"stops the path at the node that tests it), got {missing!r}"
        )
    return missing


def is_tree_classifier(obj: Any) -> bool:
    """A fitted single-output scikit-learn decision-tree classifier."""
    tree = getattr(obj, "tree_", None)
    return (
        tree is not None
        and hasattr(obj, "classes_")
        and hasattr(tree, "children_left")
        and np.ndim(obj.classes_) == 1
        and int(getattr(obj, "n_outputs_", 1)) == 1
    )


def find_tree(victim: Any) -> Any | None:
    """The fitted scikit-learn tree classifier behind ``victim`` (itself, or the estimator of a
    ``.skops`` :class:`~mextract.models.external.ExternalModel`), else ``None``."""
    if is_tree_classifier(victim):
        return victim
    est = getattr(victim, "estimator", None)  # an ExternalModel read from .skops
    return est if is_tree_classifier(est) else None


@dataclass(frozen=True)
class TreeWalker:
    """The arrays of a fitted tree, walked record by record (vectorised over the batch)."""

    left: np.ndarray
    right: np.ndarray
    feature: np.ndarray
    threshold: np.ndarray
    distribution: np.ndarray  # (nodes, K): each node's normalised class distribution
    num_features: int

    @classmethod
    def of(cls, est: Any) -> TreeWalker:
        t = est.tree_
        value = np.asarray(t.value, dtype=np.float64)[:, 0, :]
        total = value.sum(axis=1, keepdims=True)
        total[total == 0.0] = 1.0  # predict_proba's normaliser
        return cls(
            left=np.asarray(t.children_left, dtype=np.int64),
            right=np.asarray(t.children_right, dtype=np.int64),
            feature=np.asarray(t.feature, dtype=np.int64),
            threshold=np.asarray(t.threshold, dtype=np.float64),
            distribution=value / total,
            num_features=int(est.n_features_in_),
        )

    @property
    def num_nodes(self) -> int:
        return len(self.left)

    def apply(self, x: np.ndarray, *, stop_missing: bool = False) -> np.ndarray:
        """The node where each row's path ends: a leaf for complete rows (``tree.apply``); with
        ``stop_missing``, the first node that tests a NaN feature."""
        x = np.asarray(x).reshape(len(x), -1)
        if x.shape[1] != self.num_features:
            raise InputError(f"tree victim: expected rows of {self.num_features} features, got {x.shape[1]}")
        x32 = x.astype(np.float32).astype(np.float64)  # scikit-learn compares float32 values
        node = np.zeros(len(x), dtype=np.int64)
        active = np.flatnonzero(self.left[node] != -1)
        while active.size:
            n = node[active]
            v = x32[active, self.feature[n]]
            if stop_missing:
                keep = ~np.isnan(v)
                active, n, v = active[keep], n[keep], v[keep]
            node[active] = np.where(v <= self.threshold[n], self.left[n], self.right[n])
            active = active[self.left[node[active]] != -1]
        return node

    def answer(self, x: np.ndarray, *, stop_missing: bool = False) -> np.ndarray:
        """Rows ``(N, K + 1)``: the end node's class distribution, then its identifier."""
        node = self.apply(x, stop_missing=stop_missing)
        return np.concatenate([self.distribution[node], node[:, None].astype(np.float64)], axis=1)


__all__ = ["MISSING_OPTIONS", "TreeWalker", "check_missing", "find_tree", "is_tree_classifier"]
