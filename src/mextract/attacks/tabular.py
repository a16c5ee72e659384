"""Learning-based extraction of tabular prediction APIs (Tramèr et al., USENIX Security 2016).

Tramèr et al. steal models that equation solving cannot (or that answer only labels) by
*retraining*: query the API on inputs the thief makes, and fit a model to the answers
(their Section 6.1). A tabular thief rarely holds the owner's data, so the inputs are
synthetic — valid rows made from the API's public description of its fields
(:class:`~mextract.data.tabular.TabularSchema`: numbers within the training ranges,
categories, ordinal levels), or from a small real sample when the thief has one.

Where the queries come from (``queries``):

* ``uniform``: each feature uniform over its declared range (categories and levels
  uniform) — Tramèr's "uniform queries";
* ``marginals``: each feature drawn independently from its column in the thief's small
  sample (the per-feature marginals; correlations between features are not kept);
* ``pool``: the sample's own rows (the small-sample setting, without synthesis beyond it);
* ``auto`` (default): ``marginals`` when the thief has a sample, else ``uniform``.

How the budget is spent (``strategy``), after Tramèr et al.'s three retraining attacks:

* ``uniform``: every query from the source above, one training at the end;
* ``adaptive`` (default): adaptive retraining — ``budget / rounds`` queries from the
  source, then each of ``rounds - 1`` rounds trains the substitute and queries the
  ``budget / rounds`` candidates (out of ``candidates`` × as many fresh ones) on which it
  is least certain (smallest margin between its two most likely classes), the
  active-learning selection Tramèr et al. take from Cohn et al.;
* ``line_search``: half of the budget from the source, the rest on line searches
  towards the victim's decision boundary (Lowd & Meek, KDD 2005, as used by Tramèr et
  al.): between two answered rows the victim labels differently, each bisection step
  queries the midpoint (made a valid row) and keeps the half whose ends still disagree;
  every probe, answered, is training data. If every answer is one class (no segment to
  search), the rest of the budget goes to the query source.

Inputs of any shape are rows of ``prod(input_shape)`` values to the synthesis (an image API's
pixels are numeric features within its value range); the MLP family is the run's substitute
architecture, so an image API gets its CNN.

The substitute (``model``): a small MLP (the run's substitute architecture, trained on
the answers' full distribution when the API answers one), a random forest, gradient
boosting, or logistic regression (these three fit the answers' top-1 labels) — or
``auto`` (default), the family whose k-fold agreement with the victim's answers on the
paid pairs is highest (chosen on the first batch for the rounds, and again on every pair
at the end; the result's metrics name it, ``substitute_<family>``, with its agreement,
``cv_agreement``). Tramèr et al. retrain the victim's own model class; a thief that does not
know it, picks by the data it paid for. A scikit-learn substitute is returned wrapped in
:class:`SklearnSubstitute` (log-probabilities as logits).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mextract.attacks.base import Attack, AttackContext
from mextract.attacks.substitute import hard_targets, query_pool, soft_targets, train_substitute
from mextract.data.tabular import Feature, TabularSchema
from mextract.errors import InputError, UnknownNameError
from mextract.oracle import APIDescription
from mextract.training import TrainConfig

QUERY_SOURCES = ("auto", "uniform", "marginals", "pool")
STRATEGIES = ("uniform", "adaptive", "line_search")
FAMILIES = ("auto", "mlp", "forest", "boosting", "logreg")

#: MLP training on a few hundred to a few thousand rows: Adam at 1e-3 (the usual default
#: for small tabular nets), enough epochs that a 100-row budget still takes ~200 steps.
TABULAR_TRAINING = TrainConfig(epochs=100, batch_size=32, lr=1e-3, optimizer="adam", weight_decay=0.0)


class SklearnSubstitute(nn.Module):
    """A fitted scikit-learn classifier as an ``nn.Module``: ``forward`` returns the log of
    its class probabilities over all ``num_classes`` of the API (a class it never saw gets
    log(1e-12)), so the lab scores it like any substitute. It has no parameters and runs on
    the CPU."""

    def __init__(self, estimator: Any, num_classes: int) -> None:
        super().__init__()
        self.estimator = estimator
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().cpu().double().reshape(len(x), -1).numpy()
        probs = np.full((len(arr), self.num_classes), 1e-12)
        probs[:, self.estimator.classes_.astype(int)] = np.maximum(self.estimator.predict_proba(arr), 1e-12)
        return torch.from_numpy(np.log(probs)).to(x.dtype if x.is_floating_point() else torch.float32)

    def save(self, path: str | Path) -> Path:
        """Write the estimator with skops (no pickle; the ``[sklearn-io]`` extra), readable
        as a victim by :func:`~mextract.models.load_external`."""
        try:
            import skops.io as sio
        except ImportError as exc:
            raise InputError(
                "saving a scikit-learn substitute needs skops: pip install 'mextract[sklearn-io]'"
            ) from exc
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        sio.dump(self.estimator, p)
        return p


def schema_for(api: APIDescription, sample: torch.Tensor | None) -> TabularSchema | None:
    """The fields synthetic queries are made from: the API's ``features``; else every column
    numeric within a bounded declared value range; else the sample's per-column range;
    ``None`` when none is known."""
    if api.features is not None:
        return api.features
    width = int(np.prod(api.input_shape))
    vr = api.value_range
    if vr.low is not None and vr.high is not None:
        return TabularSchema(tuple(Feature(f"x{i}", "numeric", vr.low, vr.high) for i in range(width)))
    if sample is not None and len(sample):
        return TabularSchema.numeric(sample.reshape(len(sample), -1).numpy())
    return None


@dataclass(kw_only=True)
class TabularExtraction(Attack):
    """Retraining extraction of a tabular API from synthetic or few real queries (Tramèr et
    al. 2016, Section 6.1); see the module docstring for the options."""

    name: ClassVar[str] = "tabular"
    needs_pool: ClassVar[bool] = False
    queries: Literal["auto", "uniform", "marginals", "pool"] = "auto"
    strategy: Literal["uniform", "adaptive", "line_search"] = "adaptive"
    #: adaptive retraining rounds (the first is the seed batch)
    rounds: int = 10
    #: fresh candidates per selected query in an adaptive round
    candidates: int = 20
    #: bisection steps per line search (the boundary to 2**-steps of the segment)
    line_steps: int = 8
    model: Literal["auto", "mlp", "forest", "boosting", "logreg"] = "auto"
    folds: int = 5
    train: TrainConfig = TABULAR_TRAINING

    def check_params(self, api: APIDescription, pool: torch.Tensor | None, budget: int) -> None:
        checks: tuple[tuple[str, str, tuple[str, ...]], ...] = (
            ("queries", self.queries, QUERY_SOURCES),
            ("strategy", self.strategy, STRATEGIES),
            ("model", self.model, FAMILIES),
        )
        for name, value, allowed in checks:
            if value not in allowed:
                raise UnknownNameError(f"tabular attack {name}", str(value), allowed)
        counts = (("rounds", self.rounds), ("candidates", self.candidates), ("line_steps", self.line_steps))
        for what, count in counts:
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise InputError(f"{what}: expected a positive integer, got {count!r}")
        if isinstance(self.folds, bool) or not isinstance(self.folds, int) or self.folds < 2:
            raise InputError(f"folds: expected an integer >= 2, got {self.folds!r}")
        has_sample = pool is not None and len(pool) > 0
        if self.queries in ("marginals", "pool") and not has_sample:
            raise InputError(f"queries={self.queries!r} needs the thief's sample (a pool)")
        source = self._source(has_sample)
        if source == "uniform" and schema_for(api, pool if has_sample else None) is None:
            raise InputError(
                "uniform synthetic queries need the API's feature ranges (its description's 'features') or "
                "a bounded value range; give the thief a sample (a pool) to draw from instead"
            )

    def max_queries(self, pool_size: int | None) -> int | None:
        return pool_size if self.queries == "pool" else None

    def _source(self, has_sample: bool) -> str:
        if self.queries == "auto":
            return "marginals" if has_sample else "uniform"
        return self.queries

    # ------------------------------------------------------------------ queries
    def _draw(
        self, ctx: AttackContext, schema: TabularSchema | None, n: int, asked: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``n`` fresh inputs from the query source, and for ``pool`` their indices in the
        sample (drawn among the rows not yet ``asked``)."""
        source = self._source(ctx.pool is not None and len(ctx.pool) > 0)
        if source == "pool":
            assert ctx.pool is not None
            left = torch.nonzero(~asked).flatten()
            pick = left[torch.randperm(len(left), generator=ctx.generator)[:n]]
            return ctx.pool[pick], pick
        assert schema is not None
        if source == "marginals":
            assert ctx.pool is not None
            rows = schema.sample_marginals(n, ctx.pool.reshape(len(ctx.pool), -1), ctx.generator)
        else:
            rows = schema.sample_uniform(n, ctx.generator)
        return rows.reshape(n, *ctx.api.input_shape), None

    def run(self, ctx: AttackContext) -> nn.Module:
        api = ctx.api.description
        schema = schema_for(api, ctx.pool)
        asked = torch.zeros(0 if ctx.pool is None else len(ctx.pool), dtype=torch.bool)
        budget = ctx.remaining
        soft = api.mode.is_soft
        first = {"uniform": budget, "line_search": budget // 2, "adaptive": budget // self.rounds}[
            self.strategy
        ]
        x, idx = self._draw(ctx, schema, max(1, first), asked)
        if idx is not None:
            asked[idx] = True
        y = query_pool(ctx, x)
        family: str = self.model
        if family == "auto" and self.strategy != "uniform":
            family = self._choose(ctx, x, y, soft)
        if self.strategy == "adaptive":
            per_round = max(1, budget // self.rounds)
            for r in range(1, self.rounds):
                n = min(per_round if r < self.rounds - 1 else ctx.remaining, ctx.remaining)
                if n <= 0:
                    break
                sub = self._fit(ctx, family, x, y, soft)
                ctx.report(sub, r)
                cand, idx = self._draw(ctx, schema, n * self.candidates, asked)
                if len(cand) == 0:
                    break  # the sample is spent
                pick = _least_certain(sub, cand, n)
                new = cand[pick]
                if idx is not None:
                    asked[idx[pick]] = True
                x, y = torch.cat([x, new]), torch.cat([y, query_pool(ctx, new)])
        elif self.strategy == "line_search":
            x, y = self._line_search(ctx, schema, x, y, asked)
        if self.model == "auto":
            family = self._choose(ctx, x, y, soft)
        ctx.metrics[f"substitute_{family}"] = 1.0
        model = self._fit(ctx, family, x, y, soft)
        ctx.report(model, self.rounds)
        return model

    def _line_search(
        self,
        ctx: AttackContext,
        schema: TabularSchema | None,
        x: torch.Tensor,
        y: torch.Tensor,
        asked: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [x], [y]
        labels = y.argmax(1)
        stalls = 0
        while ctx.remaining > 0 and stalls < 100:
            i, j = torch.randint(len(x), (2,), generator=ctx.generator).tolist()
            if labels[i] == labels[j]:
                stalls += 1
                continue
            stalls = 0
            a, b, la = x[i], x[j], labels[i]
            for _ in range(min(self.line_steps, ctx.remaining)):
                mid = (a + b) / 2
                if schema is not None:
                    mid = schema.project(mid.reshape(1, -1)).reshape(mid.shape)
                ans = ctx.api.query(mid[None])
                xs.append(mid[None])
                ys.append(ans)
                if ans.argmax(1)[0] == la:
                    a = mid
                else:
                    b = mid
            ctx.emit(stage="query", done=ctx.spent, total=ctx.budget)
        if ctx.remaining > 0:  # every answer so far is one class: no segment to search, so spend
            rest, _ = self._draw(ctx, schema, ctx.remaining, asked)  # the rest
            if len(rest):
                xs.append(rest)
                ys.append(query_pool(ctx, rest))
        return torch.cat(xs), torch.cat(ys)

    # ------------------------------------------------------------------ substitutes
    def _fit(
        self, ctx: AttackContext, family: str, x: torch.Tensor, y: torch.Tensor, soft: bool
    ) -> nn.Module:
        if family == "mlp":
            if soft:
                return train_substitute(ctx, x, soft_targets(y, ctx, 1.0), soft=True, config=self.train)
            return train_substitute(ctx, x, hard_targets(y), soft=False, config=self.train)
        return SklearnSubstitute(_sklearn_fit(family, x, y.argmax(1), ctx.seed), ctx.api.num_classes)

    def _choose(self, ctx: AttackContext, x: torch.Tensor, y: torch.Tensor, soft: bool) -> str:
        """The family whose k-fold agreement with the victim's top-1 answers is highest."""
        labels = y.argmax(1)
        if len(torch.unique(labels)) < 2:
            return "forest"  # one class seen: every family predicts it; the forest is the cheapest
        k = min(self.folds, len(x))
        order = torch.randperm(len(x), generator=ctx.generator)
        folds = [order[i::k] for i in range(k)]
        quiet = AttackContext(
            api=ctx.api, pool=None, budget=ctx.budget, make_substitute=ctx.make_substitute,
            generator=ctx.generator, seed=ctx.seed, device=ctx.device, callback=None,
        )  # fmt: skip
        scores: dict[str, float] = {}
        for family in FAMILIES[1:]:
            hits = 0
            for held in folds:
                train = torch.ones(len(x), dtype=torch.bool)
                train[held] = False
                if len(torch.unique(labels[train])) < 2:
                    hits += int((labels[held] == labels[train][0]).sum())
                    continue
                sub = self._fit(quiet, family, x[train], y[train], soft)
                with torch.no_grad():
                    hits += int((sub(x[held]).argmax(1) == labels[held]).sum())
            scores[family] = hits / len(x)
        best = max(scores, key=lambda f: scores[f])
        ctx.metrics["cv_agreement"] = scores[best]
        ctx.emit(stage="choose", scores=scores, chosen=best)
        return best


def _sklearn_fit(family: str, x: torch.Tensor, labels: torch.Tensor, seed: int) -> Any:
    from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    arr, lab = x.double().reshape(len(x), -1).numpy(), labels.numpy()
    if family == "forest":
        est: Any = RandomForestClassifier(n_estimators=100, random_state=seed, n_jobs=1)
    elif family == "boosting":
        est = HistGradientBoostingClassifier(random_state=seed)
    elif family == "logreg":
        est = make_pipeline(StandardScaler(), LogisticRegression(C=100.0, max_iter=2000))
    else:  # pragma: no cover - checked in check_params
        raise UnknownNameError("substitute family", family, FAMILIES)
    return est.fit(arr, lab)


def _least_certain(model: nn.Module, cand: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the ``n`` candidates with the smallest margin between the model's two most
    likely classes."""
    with torch.no_grad():
        probs = F.softmax(model(cand).float(), dim=1)
    top = probs.topk(2, dim=1).values
    return torch.argsort(top[:, 0] - top[:, 1])[:n]


__all__ = ["SklearnSubstitute", "TabularExtraction", "schema_for"]
