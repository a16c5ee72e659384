"""A local victim behind an oracle: a PyTorch module, a scikit-learn classifier, a model
loaded from a file (:class:`~mextract.models.external.ExternalModel`) or a callable."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from mextract._utils import resolve_device
from mextract.data.base import ValueRange
from mextract.data.tabular import TabularSchema
from mextract.errors import InputError
from mextract.models.external import ExternalModel
from mextract.oracle.base import Oracle
from mextract.oracle.ledger import Ledger
from mextract.oracle.modes import AnswerMode, restrict
from mextract.oracle.trees import TreeWalker, check_missing, find_tree

ScoreFn = Callable[[torch.Tensor], torch.Tensor]


def _torch_scores(model: nn.Module, dtype: torch.dtype, device: torch.device) -> ScoreFn:
    params = list(model.parameters())
    needs_copy = any(p.dtype != dtype or p.device != device for p in params)
    model = copy.deepcopy(model).to(device=device, dtype=dtype) if needs_copy else model
    model.eval()

    @torch.no_grad()
    def scores(x: torch.Tensor) -> torch.Tensor:
        return model(x.to(device))

    return scores


_LINEAR_SKLEARN = {"LogisticRegression", "LogisticRegressionCV"}


def _sklearn_scores(est: Any) -> ScoreFn:
    """Logits of a fitted scikit-learn classifier.

    For logistic regression, ``decision_function`` *is* the logit (w·x + b), exact in
    float64; a binary decision value ``d`` becomes the logit pair ``(0, d)``, whose softmax
    is ``(1 - σ(d), σ(d))``. Other estimators give ``log(predict_proba)``, logits up to a
    per-row constant (which every answer mode is invariant to).
    """
    use_decision = type(est).__name__ in _LINEAR_SKLEARN or not hasattr(est, "predict_proba")

    def scores(x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().cpu().numpy().reshape(len(x), -1)
        if use_decision:
            d = np.asarray(est.decision_function(arr), dtype=np.float64)
            if d.ndim == 1:
                d = np.stack([np.zeros_like(d), d], axis=1)
        else:
            p = np.asarray(est.predict_proba(arr), dtype=np.float64)
            d = np.log(np.clip(p, np.finfo(np.float64).tiny, None))
        return torch.from_numpy(d)

    return scores


def _callable_scores(fn: Callable[[np.ndarray], Any]) -> ScoreFn:
    def scores(x: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(np.asarray(fn(x.detach().cpu().numpy())))

    return scores


def _restrict_probs(
    probs: torch.Tensor, mode: AnswerMode, *, k: int | None, decimals: int | None
) -> torch.Tensor:
    """The answer of ``mode`` for a victim that answers probabilities: the victim's own
    probabilities (not ``softmax(log p)``), top-k and rounding of them; logits are the
    log-probabilities (logits up to a per-row constant)."""
    if mode is AnswerMode.LOGITS:
        return torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny))
    if mode is AnswerMode.TOPK:
        assert k is not None
        top = probs.topk(min(k, probs.shape[1]), dim=1)
        return torch.zeros_like(probs).scatter_(1, top.indices, top.values)
    if mode is AnswerMode.ROUNDED:
        assert decimals is not None
        return torch.round(probs, decimals=decimals)
    if mode is AnswerMode.PROBS:
        return probs
    return restrict(probs, mode, k=k, decimals=decimals)  # label: the argmax


def _is_sklearn_classifier(obj: Any) -> bool:
    return hasattr(obj, "classes_") and (hasattr(obj, "predict_proba") or hasattr(obj, "decision_function"))


class VictimOracle(Oracle):
    """The black box around a local victim; the only object that calls it.

    Args:
        victim: an ``nn.Module`` returning logits, a fitted scikit-learn classifier
            (``decision_function`` for logistic regression, else ``predict_proba``), a model
            loaded from a file (:func:`~mextract.models.load_external`; it answers logits or
            probabilities, and mode ``probs`` returns its own probabilities, ``logits`` their
            logarithms), or any callable mapping a numpy batch ``(N, *input_shape)`` to
            logits ``(N, K)``.
        input_shape: the shape of one input (e.g. ``(1, 28, 28)`` or ``(30,)``); optional for
            scikit-learn victims (read from ``n_features_in_``) and model files.
        num_classes: ``K``; optional for scikit-learn victims (read from ``classes_``) and
            model files.
        mode: the answer mode (see :mod:`mextract.oracle.modes`).
        k: classes revealed by mode ``topk``; decimals: digits kept by mode ``rounded``.
        budget: hard limit on answered samples, checked before the victim is called.
        log: keep every query and answer in the ledger.
        dtype: the precision of queries and answers; ``torch.float64`` for exact logits.
        device: where a PyTorch victim runs (``None``: CUDA when present).
        batch_size: the victim is called on chunks of at most this many samples.
        value_range: the declared range of input values (e.g. the checkpoint's); a query
            outside it is refused, never answered. ``None``: any finite value.
        features: a tabular API's record fields (:class:`~mextract.data.tabular.TabularSchema`,
            e.g. a split's ``meta["schema"]``); published in the API's description, and a
            query that is not a valid record (a categorical block not one-hot) is refused.
        missing: incomplete queries, for decision-tree victims (a fitted scikit-learn
            ``DecisionTreeClassifier``, directly or from a ``.skops`` file): ``None`` refuses
            a NaN; ``"stop"`` reads a NaN as a missing feature and ends the record's path at
            the first node that tests one, as BigML does (a categorical feature is missing
            when its whole one-hot block is NaN). Published in the API's description.

    Mode ``leaf`` (decision trees only) answers rows of ``num_classes + 1`` values: the
    class distribution of the node where the path ends, then that node's identifier (see
    :mod:`mextract.oracle.modes`); on complete records, ``tree.predict_proba`` and
    ``tree.apply``.

    Example:
        >>> oracle = VictimOracle(model, input_shape=(1, 28, 28), num_classes=10,
        ...                       mode="probs", budget=1000)
        >>> answers = oracle.query(x)        # (N, 10), and oracle.ledger.count == N
    """

    def __init__(
        self,
        victim: nn.Module | Any,
        *,
        input_shape: Sequence[int] | None = None,
        num_classes: int | None = None,
        mode: AnswerMode | str = AnswerMode.PROBS,
        k: int | None = None,
        decimals: int | None = None,
        budget: int | None = None,
        log: bool = False,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
        batch_size: int = 1024,
        value_range: ValueRange | None = None,
        features: TabularSchema | None = None,
        missing: str | None = None,
    ) -> None:
        self.mode = AnswerMode.parse(mode)
        self.missing = check_missing(missing)
        self.value_range = value_range
        self.features = features
        if self.mode is AnswerMode.TOPK and (not isinstance(k, int) or k < 1):
            raise InputError(f"answer mode 'topk' needs an integer k >= 1, got {k!r}")
        if self.mode is AnswerMode.ROUNDED and (not isinstance(decimals, int) or decimals < 0):
            raise InputError(f"answer mode 'rounded' needs integer decimals >= 0, got {decimals!r}")
        if dtype not in (torch.float32, torch.float64):
            raise InputError(f"dtype: expected torch.float32 or torch.float64, got {dtype}")
        if batch_size < 1:
            raise InputError(f"batch_size: expected a positive integer, got {batch_size}")
        self.k, self.decimals, self.dtype, self.batch_size = k, decimals, dtype, batch_size
        self._ledger = Ledger(budget, log=log)
        self._answers_probs = False  # the victim's scores are probabilities, not logits
        self._tree: TreeWalker | None = None  # walked node by node (mode leaf, incomplete queries)
        if self.mode is AnswerMode.LEAF or self.missing is not None:
            est = find_tree(victim)
            if est is None:
                what = "answer mode 'leaf'" if self.mode is AnswerMode.LEAF else f"missing={self.missing!r}"
                raise InputError(
                    f"{what} needs a decision-tree victim (a fitted scikit-learn DecisionTreeClassifier, "
                    f"directly or from a .skops file), got {type(victim).__name__}"
                )
            self._tree = TreeWalker.of(est)

        if isinstance(victim, ExternalModel):
            name = victim.path.name
            if input_shape is not None and tuple(int(s) for s in input_shape) != victim.input_shape:
                raise InputError(f"input_shape: {name} takes {victim.input_shape}, got {input_shape}")
            if num_classes is not None and num_classes != victim.num_classes:
                raise InputError(f"num_classes: {name} has {victim.num_classes}, got {num_classes}")
            input_shape, num_classes = victim.input_shape, victim.num_classes
            if value_range is None:
                self.value_range = victim.value_range
            self._scores = _callable_scores(victim)
            self._answers_probs = victim.output == "probs"
        elif isinstance(victim, nn.Module):
            self._scores = _torch_scores(victim, dtype, resolve_device(device))
        elif _is_sklearn_classifier(victim):
            self._scores = _sklearn_scores(victim)
            if input_shape is None and hasattr(victim, "n_features_in_"):
                input_shape = (int(victim.n_features_in_),)
            if num_classes is None:
                num_classes = len(victim.classes_)
        elif callable(victim):
            self._scores = _callable_scores(victim)
        else:
            raise InputError(
                "victim: expected an nn.Module, a fitted scikit-learn classifier or a callable, "
                f"got {type(victim).__name__}"
            )
        if input_shape is None or num_classes is None:
            raise InputError("input_shape and num_classes are required for this victim")
        if num_classes < 2:
            raise InputError(f"num_classes: expected at least 2, got {num_classes}")
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes = int(num_classes)
        if features is not None and features.width != int(np.prod(self.input_shape)):
            raise InputError(
                f"features: the schema has {features.width} columns, the victim takes {self.input_shape}"
            )

    @property
    def ledger(self) -> Ledger:
        return self._ledger

    def fork(self, *, budget: int | None = None, log: bool = False) -> VictimOracle:
        """The same victim behind a new ledger (one client's view of a shared model).

        The twin shares the model, answer mode and value range — nothing is copied — and
        counts its own answered samples against its own ``budget``.
        """
        twin = copy.copy(self)
        twin._ledger = Ledger(budget, log=log)
        return twin

    def state_dict(self) -> dict[str, Any]:
        """The ledger's counts (the model and the answer mode are configuration)."""
        return {"ledger": self._ledger.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"ledger"}:
            raise InputError(f"VictimOracle: expected a state with a 'ledger', got keys {sorted(state)}")
        self._ledger.load_state_dict(dict(state["ledger"]))

    def _answer(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        self._ledger.charge(n)  # raises before the victim sees anything
        try:
            if self._tree is not None:
                return self._answer_tree(x, self._tree)
            logits = torch.cat([self._call(x[i : i + self.batch_size]) for i in range(0, n, self.batch_size)])
        except BaseException:
            self._ledger.refund(n)
            raise
        if self._answers_probs:
            answers = _restrict_probs(logits, self.mode, k=self.k, decimals=self.decimals)
        else:
            answers = restrict(logits, self.mode, k=self.k, decimals=self.decimals)
        self._ledger.record(x, answers)
        return answers

    def _answer_tree(self, x: torch.Tensor, tree: TreeWalker) -> torch.Tensor:
        rows = tree.answer(x.detach().cpu().numpy(), stop_missing=self.missing == "stop")
        full = torch.from_numpy(rows).to(self.dtype)
        if self.mode is AnswerMode.LEAF:
            answers = full
        else:  # another mode over the end node's distribution (incomplete queries)
            answers = _restrict_probs(full[:, :-1], self.mode, k=self.k, decimals=self.decimals)
        self._ledger.record(x, answers)
        return answers

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        out = self._scores(x)
        if not isinstance(out, torch.Tensor):  # pragma: no cover - adapters return tensors
            out = torch.as_tensor(out)
        if out.shape != (x.shape[0], self.num_classes):
            raise InputError(
                f"victim returned scores of shape {tuple(out.shape)}, "
                f"expected ({x.shape[0]}, {self.num_classes})"
            )
        return out.detach().to(device="cpu", dtype=self.dtype)

