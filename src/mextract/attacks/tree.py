"""Exact extraction of a decision tree by path-finding (Tramèr et al. 2016).

Tramèr, Zhang, Juels, Reiter & Ristenpart, "Stealing Machine Learning Models via
Prediction APIs", USENIX Security 2016, section 4.2. The API (answer mode ``leaf``, see
:mod:`mextract.oracle.modes`) answers the class distribution of the node where a record's
path ends and an identifier of that node. A tree cuts the input space into boxes, one per
leaf, so along any axis-parallel line the leaf identifier is constant on intervals, each
leaf's on one interval (a box meets a line in an interval).

**Path-finding (Algorithm 1).** From one random record, for each leaf not seen before and
for each feature, a *line search* along that feature (the other features fixed) finds
every point where the identifier changes; the interval holding the record is the leaf's
predicate on that feature, and every other interval holds a leaf to explore next.
Categorical features try every category. The result is every leaf with its box (an
interval per numeric feature, a set of categories per categorical one) and its class
distribution.

**Top-down with incomplete queries.** Where the API takes incomplete queries (BigML's
behaviour: a missing feature stops the path at the first node that tests it, and the
answer is that node's), the attack starts from the empty record (all features missing),
which answers the root, and reveals features one at a time: revealing the feature a node
tests moves the answer below it, revealing any other does not. Each node's split feature
is found, then a line search along it (the node's revealed features fixed, the rest
missing) finds its thresholds and its children, which are explored in turn.

Choices (and deviations from the paper):

* **Exact float32 boundaries.** scikit-learn casts records to float32 and tests
  ``x <= threshold``; between two adjacent float32 values the answer cannot change, so a
  bisection over the *ordered float32 values* of a feature's range (at most ~32 steps per
  boundary) finds each boundary exactly, and the extracted tree answers every float32
  record as the victim does. ``epsilon`` instead bisects over a grid of step ``epsilon``
  (Tramèr's precision ε; boundaries then known only to within ε). Ordinal features
  bisect over their integer levels.
* The search range of a feature is its declared range (the API's ``features``, else its
  ``value_range``); leaves outside that box are not looked for, and the extracted tree is
  exact within it.
* The line search reuses every answer it has: it queries the ends of the range and
  bisects only between points with different identifiers (a leaf's interval is convex);
  each interval's first answered point *is* the next record to explore (no re-query), a
  line already searched from a leaf is not searched again from the leaves it found, and
  no record is queried twice.
* Top-down, a node's split feature is found by group testing: one query with every
  missing feature revealed (answered by the same node iff it is a leaf), then a bisection
  of the candidate features (``1 + ⌈log₂ m⌉`` queries for ``m`` missing features, where the
  paper reveals them one by one). A node below may test a feature revealed higher up (a
  second split on it): nodes are therefore also line-searched along their revealed
  features, within the box of the node above, which finds such hidden splits exactly
  (path-finding restricted to the revealed features).
* Completeness is checked, not assumed: the leaves' boxes, counted in grid points, must
  tile the search box exactly; the extracted model is the tree of guillotine cuts that
  separates them. A budget too small for the whole tree raises
  :class:`TreeBudgetError` — an incomplete tree is never returned.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from mextract.attacks.base import Attack, AttackContext
from mextract.attacks.direct.common import AnswerModeError, DirectExtractionError
from mextract.data.tabular import Feature, TabularSchema
from mextract.errors import InputError
from mextract.oracle import AnswerMode, APIDescription

logger = logging.getLogger(__name__)

#: a leaf's predicate on one feature: ``(lower, upper]`` thresholds (``±inf`` open) for a
#: numeric or ordinal feature, the allowed category indices for a categorical one
Predicate = tuple[float, float] | frozenset[int]


class TreeBudgetError(DirectExtractionError):
    """The budget ran out before every leaf was found: the extracted tree would be incomplete."""


# --------------------------------------------------------------------------- float32 grid
def f32_key(v: float | np.floating) -> int:
    """The rank of a float32 value among all float32 values (monotone; ``-0.0`` is ``0``)."""
    b = int(np.asarray(v, dtype=np.float32).view(np.int32))
    return b if b >= 0 else -(b & 0x7FFFFFFF)


def key_f32(k: int) -> float:
    """The float32 value of rank ``k`` (inverse of :func:`f32_key`)."""
    bits = k if k >= 0 else (-k) | 0x80000000
    return float(np.asarray(bits, dtype=np.uint32).view(np.float32))


def _f32_at_least(v: float) -> float:
    f = np.float32(v)
    return float(f if float(f) >= v else np.nextafter(f, np.float32(np.inf)))


def _f32_at_most(v: float) -> float:
    f = np.float32(v)
    return float(f if float(f) <= v else np.nextafter(f, np.float32(-np.inf)))


@dataclass(frozen=True)
class _Domain:
    """One feature's searchable values, indexed by integer keys ``0 .. size - 1`` in order."""

    feature: Feature
    cols: slice
    size: int
    base: int = 0  # numeric, exact: float32 rank of key 0
    low: float = 0.0  # numeric, epsilon grid: value of key 0
    step: float | None = None  # numeric: the epsilon grid's step (None: every float32 value)

    @property
    def categorical(self) -> bool:
        return self.feature.kind == "categorical"

    def value(self, k: int) -> float:
        if self.feature.kind != "numeric":
            return float(k)
        if self.step is None:
            return key_f32(self.base + k)
        return float(np.float32(self.low + k * self.step))

    def write(self, row: np.ndarray, k: int) -> None:
        if self.categorical:
            row[self.cols] = 0.0
            row[self.cols.start + k] = 1.0
        else:
            row[self.cols.start] = self.value(k)

    def predicate(self, lo: int, hi: int) -> tuple[float, float]:
        """Keys ``lo..hi`` as thresholds ``(lower, upper]`` (midpoints between grid values)."""
        lower = -math.inf if lo == 0 else (self.value(lo - 1) + self.value(lo)) / 2
        upper = math.inf if hi == self.size - 1 else (self.value(hi) + self.value(hi + 1)) / 2
        return lower, upper


def _domains(api: APIDescription, epsilon: float | None) -> list[_Domain]:
    """The features an attack may query, from the API's public description."""
    width = int(np.prod(api.input_shape))
    if api.features is not None:
        schema = api.features
    else:
        vr = api.value_range
        if vr.low is None or vr.high is None:
            raise InputError(
                "tree path-finding makes its own queries: the API must declare its features' ranges "
                "(features=TabularSchema) or a bounded value_range, got an unbounded value range"
            )
        schema = TabularSchema(tuple(Feature(f"x{i}", "numeric", vr.low, vr.high) for i in range(width)))
    out = []
    for i, f in enumerate(schema.features):
        cols = schema.columns(i)
        if f.kind in ("categorical", "ordinal"):
            out.append(_Domain(f, cols, len(f.levels)))
        else:
            if f.low is None or f.high is None:
                raise InputError(
                    f"feature {f.name!r} declares no range: tree path-finding searches each numeric "
                    "feature over its declared range"
                )
            lo, hi = _f32_at_least(f.low), _f32_at_most(f.high)
            if lo > hi:
                raise InputError(f"feature {f.name!r}: the range [{f.low}, {f.high}] holds no float32 value")
            if epsilon is None:
                base = f32_key(lo)
                out.append(_Domain(f, cols, f32_key(hi) - base + 1, base=base))
            else:
                n = math.floor((hi - lo) / epsilon) + 1
                out.append(_Domain(f, cols, n, low=lo, step=float(epsilon)))
    return out


# --------------------------------------------------------------------------- results
@dataclass(frozen=True)
class ExtractedLeaf:
    """One leaf: its identifier, its class distribution and its predicate on every feature."""

    id: int
    distribution: tuple[float, ...]
    box: tuple[Predicate, ...]


@dataclass
class ExtractedTree:
    """Every leaf found, the features' schema, and the query counts."""

    leaves: list[ExtractedLeaf]
    schema: TabularSchema
    nodes: int = 0  # nodes seen (inner nodes only top-down)
    queries: int = 0
    complete: bool = False
    keys: list[dict[int, Any]] = field(default_factory=list, repr=False)  # leaf boxes in grid keys

    def to_json(self) -> dict[str, Any]:
        """The leaves as JSON (a numeric predicate as ``[lower, upper]``, ``null`` for ``∓inf``;
        a categorical one as the sorted category indices) with the schema and counts."""

        def pred(p: Predicate) -> Any:
            if isinstance(p, frozenset):
                return sorted(p)
            return [None if math.isinf(p[0]) else p[0], None if math.isinf(p[1]) else p[1]]

        return {
            "schema": self.schema.to_json(),
            "nodes": self.nodes,
            "queries": self.queries,
            "complete": self.complete,
            "leaves": [
                {"id": leaf.id, "distribution": list(leaf.distribution), "box": [pred(p) for p in leaf.box]}
                for leaf in self.leaves
            ],
        }


# --------------------------------------------------------------------------- the model
class ExtractedTreeModel(nn.Module):
    """The extracted tree as a module: ``(N, *input_shape)`` → logits ``log p`` of the leaf's
    class distribution (float32; an absent class gets ``log`` of float32's smallest normal).

    It compares float32 values with float64 thresholds, as scikit-learn does; categorical
    blocks are read as the index of their largest column. ``tree`` holds the leaves."""

    feature: torch.Tensor
    threshold: torch.Tensor
    mask: torch.Tensor
    left: torch.Tensor
    right: torch.Tensor
    distribution: torch.Tensor
    categorical: torch.Tensor

    def __init__(self, tree: ExtractedTree, nodes: list[dict[str, Any]], num_classes: int) -> None:
        super().__init__()
        self.tree = tree
        schema = tree.schema
        m = len(nodes)
        levels = max([len(f.levels) for f in schema.features if f.kind == "categorical"] + [1])
        feature = torch.zeros(m, dtype=torch.long)
        threshold = torch.zeros(m, dtype=torch.float64)
        mask = torch.zeros(m, levels, dtype=torch.bool)
        left = torch.full((m,), -1, dtype=torch.long)
        right = torch.full((m,), -1, dtype=torch.long)
        dist = torch.zeros(m, num_classes, dtype=torch.float64)
        for i, nd in enumerate(nodes):
            if "leaf" in nd:
                dist[i] = torch.tensor(nd["leaf"].distribution, dtype=torch.float64)
                continue
            feature[i], left[i], right[i] = nd["feature"], nd["left"], nd["right"]
            if "threshold" in nd:
                threshold[i] = nd["threshold"]
            else:
                mask[i, list(nd["levels"])] = True
        self.register_buffer("feature", feature)
        self.register_buffer("threshold", threshold)
        self.register_buffer("mask", mask)
        self.register_buffer("left", left)
        self.register_buffer("right", right)
        self.register_buffer("distribution", dist)
        self.register_buffer(
            "categorical", torch.tensor([f.kind == "categorical" for f in schema.features], dtype=torch.bool)
        )
        self._starts = [schema.columns(i).start for i in range(len(schema.features))]
        self._widths = [f.width for f in schema.features]

    def _codes(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(len(x), -1).to(torch.float32).to(torch.float64)
        cols = []
        for s, w, cat in zip(self._starts, self._widths, self.categorical.tolist(), strict=True):
            cols.append(flat[:, s : s + w].argmax(1).to(torch.float64) if cat else flat[:, s])
        return torch.stack(cols, 1)

    def leaf_index(self, x: torch.Tensor) -> torch.Tensor:
        """The index (into this module's nodes) of the leaf each row falls in."""
        codes = self._codes(x)
        node = torch.zeros(len(x), dtype=torch.long, device=codes.device)
        active = torch.nonzero(self.left[node] >= 0).flatten()
        while active.numel():
            n = node[active]
            v = codes[active, self.feature[n]]
            cat = self.categorical[self.feature[n]]
            level = v.clamp(0, self.mask.shape[1] - 1).long()
            go_left = torch.where(cat, self.mask[n, level], v <= self.threshold[n])
            node[active] = torch.where(go_left, self.left[n], self.right[n])
            active = active[self.left[node[active]] >= 0]
        return node

    def leaf_distribution(self, x: torch.Tensor) -> torch.Tensor:
        return self.distribution[self.leaf_index(x)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.leaf_distribution(x).to(torch.float32)
        return torch.log(p.clamp_min(torch.finfo(torch.float32).tiny))


def _guillotine(tree: ExtractedTree, domains: list[_Domain], num_classes: int) -> ExtractedTreeModel:
    """A binary tree of cuts separating the leaves' boxes (one exists for a tree's partition)."""
    nodes: list[dict[str, Any]] = []
    boxes = tree.keys

    def cut(idx: list[int]) -> dict[str, Any] | None:
        for f, dom in enumerate(domains):
            if dom.categorical:
                sets = [boxes[i][f] for i in idx]
                comp = set(sets[0])
                grown = True
                while grown:
                    grown = False
                    for s in sets:
                        if comp & s and not s <= comp:
                            comp |= s
                            grown = True
                if any(not s <= comp for s in sets):
                    return {
                        "feature": f,
                        "levels": frozenset(comp),
                        "left": [i for i in idx if boxes[i][f] <= comp],
                    }
            else:
                order = sorted(idx, key=lambda i: boxes[i][f][0])
                reach = boxes[order[0]][f][1]
                for i in order[1:]:
                    lo, hi = boxes[i][f]
                    if lo > reach:
                        left = [j for j in idx if boxes[j][f][1] <= reach]
                        thr = (dom.value(reach) + dom.value(reach + 1)) / 2
                        return {"feature": f, "threshold": thr, "left": left}
                    reach = max(reach, hi)
        return None

    def build(idx: list[int]) -> int:
        me = len(nodes)
        nodes.append({})
        if len(idx) == 1:
            nodes[me] = {"leaf": tree.leaves[idx[0]]}
            return me
        c = cut(idx)
        if c is None:
            raise DirectExtractionError(
                f"the {len(idx)} leaves found in one region overlap (no cut separates them): the "
                "answers are not those of a decision tree"
            )
        left = set(c.pop("left"))
        c["left"] = build([i for i in idx if i in left])
        c["right"] = build([i for i in idx if i not in left])
        nodes[me] = c
        return me

    build(list(range(len(tree.leaves))))
    return ExtractedTreeModel(tree, nodes, num_classes)


# --------------------------------------------------------------------------- the attack
@dataclass
class _Item:
    id: int
    row: np.ndarray
    revealed: frozenset[int]
    at: dict[int, int]  # the grid key (category) of each revealed feature in ``row``
    context: dict[int, Any]  # feature -> (lo, hi) keys or frozenset of levels: a box holding the node
    exact: dict[int, Any]  # features whose interval was found exactly when the node was discovered


class _Explorer:
    """Queries through the client, each distinct record once, within the budget."""

    def __init__(self, ctx: AttackContext, domains: list[_Domain], num_classes: int) -> None:
        self.ctx, self.domains, self.k = ctx, domains, num_classes
        self.shape = tuple(ctx.api.input_shape)
        self.cache: dict[bytes, int] = {}
        self.dist: dict[int, tuple[float, ...]] = {}
        self.pending = 0  # nodes waiting, for the budget error
        self.leaves = 0

    def ask(self, rows: Sequence[np.ndarray]) -> list[int]:
        keys = [r.astype(np.float32).tobytes() for r in rows]
        need: dict[bytes, np.ndarray] = {}
        for key, r in zip(keys, rows, strict=True):
            if key not in self.cache and key not in need:
                need[key] = r
        if need:
            left = self.ctx.remaining
            if len(need) > left:
                raise TreeBudgetError(
                    f"query budget exhausted: {self.ctx.spent:,} queries spent, {len(need)} more needed "
                    f"now with {left} left; {self.leaves} leaves extracted and {self.pending} nodes still "
                    "to explore — the tree is incomplete; give a larger budget"
                )
            batch = torch.from_numpy(np.stack(list(need.values())).astype(np.float32))
            answers = self.ctx.api.query(batch.reshape(len(batch), *self.shape)).to(torch.float64).numpy()
            for key, a in zip(need, answers, strict=True):
                node = round(float(a[-1]))
                self.cache[key] = node
                self.dist.setdefault(node, tuple(float(v) for v in a[:-1]))
        return [self.cache[k] for k in keys]

    def line_search(
        self, row: np.ndarray, searches: list[tuple[int, Any]], own: dict[int, int], own_id: int
    ) -> dict[int, list[tuple[Any, int, int, np.ndarray]]]:
        """For each ``(feature, range)`` the runs along that feature through ``row``:
        ``(keys lo..hi or set of levels, node id, the key and the record answered for it)``.
        ``own`` holds the keys of ``row``'s revealed features (answered ``own_id``). All
        features' bisections advance together, one batch of queries per step."""
        known: dict[int, dict[int, int]] = {f: ({own[f]: own_id} if f in own else {}) for f, _ in searches}

        def at(f: int, k: int) -> np.ndarray:
            r = row.copy()
            self.domains[f].write(r, k)
            return r

        # first the ends of every range (every level of a categorical feature)
        todo: list[tuple[int, int]] = []
        for f, rng in searches:
            ends = sorted(rng) if self.domains[f].categorical else [rng[0], rng[1]]
            todo += [(f, k) for k in dict.fromkeys(ends) if k not in known[f]]
        while todo:
            ids = self.ask([at(f, k) for f, k in todo])
            for (f, k), i in zip(todo, ids, strict=True):
                known[f][k] = i
            todo = []
            for f, _ in searches:
                if self.domains[f].categorical:
                    continue
                ks = sorted(known[f])
                for a, b in itertools.pairwise(ks):
                    if known[f][a] != known[f][b] and b - a > 1:
                        todo.append((f, (a + b) // 2))
        out: dict[int, list[tuple[Any, int, int, np.ndarray]]] = {}
        for f, _ in searches:
            runs: list[tuple[Any, int, int, np.ndarray]] = []
            if self.domains[f].categorical:
                groups: dict[int, list[int]] = {}
                for level, i in known[f].items():
                    groups.setdefault(i, []).append(level)
                runs = [(frozenset(lv), i, min(lv), at(f, min(lv))) for i, lv in groups.items()]
            else:
                ks = sorted(known[f])
                start = ks[0]
                for j, a in enumerate(ks):
                    last = j == len(ks) - 1
                    if last or known[f][a] != known[f][ks[j + 1]]:
                        runs.append(((start, a), known[f][a], start, at(f, start)))
                        if not last:
                            start = ks[j + 1]
            out[f] = runs
        return out


def _full(dom: _Domain) -> Any:
    return frozenset(range(dom.size)) if dom.categorical else (0, dom.size - 1)


def _count(dom: _Domain, rng: Any) -> int:
    return len(rng) if dom.categorical else rng[1] - rng[0] + 1


@dataclass(kw_only=True)
class TreePathFinding(Attack):
    """Extract a decision tree exactly from an API that answers leaves (Tramèr et al. 2016).

    The API must answer in mode ``leaf`` (a node's class distribution and identifier) and
    declare its features' ranges (``features``) or a bounded ``value_range``; the attack
    makes its own queries (no pool).

    Args:
        incomplete: use incomplete queries (the top-down variant); ``None``: when the API
            takes them (``missing="stop"`` in its description).
        epsilon: ``None`` (default) finds every boundary exactly, bisecting over the float32
            values that scikit-learn compares; a number bisects over a grid of that step
            (Tramèr's precision ε: fewer queries, boundaries known to within ε).

    The result's model answers like the extracted tree (``logits = log p`` of the leaf's
    distribution; the leaves are ``model.tree``); metrics: ``leaves``, ``nodes`` (nodes
    seen; inner ones only top-down), ``queries``, ``incomplete_queries`` (1 top-down) and
    ``complete`` (1: the leaves tile the search box; otherwise the attack raises).

    The random first record (path-finding) and the values revealed top-down are drawn
    with the run's ``seed``.

    Example:
        >>> schema = TabularSchema.from_json(load_splits("iris").meta["schema"])
        >>> oracle = VictimOracle(tree, mode="leaf", features=schema, missing="stop")
        >>> result = TreePathFinding()(oracle, None, budget=100_000, seed=0)
        >>> result.model.tree.leaves[0].box        # one predicate per feature
        >>> compare_leaves(result.model, tree)     # node by node against the true tree
    """

    name: ClassVar[str] = "path_finding"
    leaf_answers: ClassVar[bool] = True
    needs_pool: ClassVar[bool] = False

    incomplete: bool | None = None
    epsilon: float | None = None

    def check_params(self, api: APIDescription, pool: torch.Tensor | None, budget: int) -> None:
        if api.mode is not AnswerMode.LEAF:
            raise AnswerModeError(
                f"oracle answer mode: expected 'leaf' (a tree node's distribution and identifier) for "
                f"path-finding, got {api.mode.value!r}"
            )
        if self.incomplete is not None and not isinstance(self.incomplete, bool):
            raise InputError(f"incomplete: expected True, False or None, got {self.incomplete!r}")
        if self.incomplete and api.missing != "stop":
            raise InputError(
                "incomplete=True needs an API that takes incomplete queries (missing='stop' in its "
                f"description), got missing={api.missing!r}"
            )
        if self.epsilon is not None and (
            isinstance(self.epsilon, bool)
            or not isinstance(self.epsilon, int | float)
            or not self.epsilon > 0
        ):
            raise InputError(f"epsilon: expected None or a positive number, got {self.epsilon!r}")
        _domains(api, None if self.epsilon is None else float(self.epsilon))

    def run(self, ctx: AttackContext) -> nn.Module:
        api = ctx.api.description
        domains = _domains(api, None if self.epsilon is None else float(self.epsilon))
        top_down = api.missing == "stop" if self.incomplete is None else self.incomplete
        ex = _Explorer(ctx, domains, api.num_classes)
        rng = np.random.default_rng(ctx.seed)
        width = int(np.prod(api.input_shape))
        # the random first record (path-finding) and the values revealed top-down
        base = np.zeros(width, dtype=np.float32)
        base_keys = {f: int(rng.integers(d.size)) for f, d in enumerate(domains)}
        for f, dom in enumerate(domains):
            dom.write(base, base_keys[f])
        all_features = frozenset(range(len(domains)))
        if top_down:
            start = np.full(width, np.nan, dtype=np.float32)
            first = _Item(ex.ask([start])[0], start, frozenset(), {}, {}, {})
        else:
            full = {f: _full(d) for f, d in enumerate(domains)}
            first = _Item(ex.ask([base])[0], base.copy(), all_features, dict(base_keys), full, {})
        queue = deque([first])
        seen = {first.id}
        leaves: list[ExtractedLeaf] = []
        keys: list[dict[int, Any]] = []
        while queue:
            item = queue.popleft()
            ex.pending = len(queue) + 1
            box = dict(item.exact)
            search = [(f, item.context[f]) for f in sorted(item.revealed) if f not in item.exact]
            for f, runs in ex.line_search(item.row, search, item.at, item.id).items():
                mine = item.at[f]
                for rng_f, node, key, rec in runs:
                    inside = mine in rng_f if domains[f].categorical else rng_f[0] <= mine <= rng_f[1]
                    if inside:
                        if node != item.id:
                            raise DirectExtractionError(
                                f"the API answered node {node} for a record it answered {item.id} before"
                            )
                        box[f] = rng_f
                    elif node not in seen:
                        seen.add(node)
                        at = {**item.at, f: key}
                        queue.append(_Item(node, rec, item.revealed, at, item.context, {f: rng_f}))
            hidden = sorted(all_features - item.revealed)
            split = self._split_feature(ex, item, hidden, base) if hidden else None
            if split is None:  # a leaf: its box over every feature
                full = {f: box.get(f, _full(d)) for f, d in enumerate(domains)}
                keys.append(full)
                leaves.append(
                    ExtractedLeaf(
                        item.id,
                        ex.dist[item.id],
                        tuple(
                            frozenset(full[f]) if d.categorical else d.predicate(*full[f])
                            for f, d in enumerate(domains)
                        ),
                    )
                )
                ex.leaves = len(leaves)
                continue
            context = {**box, split: _full(domains[split])}
            runs = ex.line_search(item.row, [(split, _full(domains[split]))], {}, item.id)[split]
            for rng_f, node, key, rec in runs:
                if node == item.id:
                    raise DirectExtractionError(
                        f"revealing feature {split} did not move the path below node {node}"
                    )
                if node not in seen:
                    seen.add(node)
                    at = {**item.at, split: key}
                    queue.append(_Item(node, rec, item.revealed | {split}, at, context, {split: rng_f}))
        tree = ExtractedTree(
            leaves, _schema(domains), nodes=len(seen), queries=ctx.spent, complete=False, keys=keys
        )
        total = math.prod(d.size for d in domains)
        covered = sum(math.prod(_count(d, k[f]) for f, d in enumerate(domains)) for k in keys)
        if covered != total:
            raise DirectExtractionError(
                f"the {len(leaves)} leaves found cover {covered} of the {total} grid points of the search "
                "box: the answers are not those of a decision tree, or the tree was not fully explored"
            )
        tree.complete = True
        model = _guillotine(tree, domains, api.num_classes)
        ctx.metrics.update(
            leaves=float(len(leaves)),
            nodes=float(len(seen)),
            incomplete_queries=float(top_down),
            complete=1.0,
        )
        logger.info("path-finding: %d leaves, %d queries", len(leaves), ctx.spent)
        return model

    @staticmethod
    def _split_feature(ex: _Explorer, item: _Item, hidden: list[int], base: np.ndarray) -> int | None:
        """The missing feature the node tests, or ``None`` for a leaf (group testing)."""

        def reveal(features: list[int]) -> int:
            r = item.row.copy()
            for f in features:
                cols = ex.domains[f].cols
                r[cols] = base[cols]
            return ex.ask([r])[0]

        if reveal(hidden) == item.id:
            return None
        cand = hidden
        while len(cand) > 1:
            half = cand[: len(cand) // 2]
            cand = half if reveal(half) != item.id else cand[len(cand) // 2 :]
        return cand[0]


def _schema(domains: list[_Domain]) -> TabularSchema:
    return TabularSchema(tuple(d.feature for d in domains))


# --------------------------------------------------------------------------- comparisons
def _canonical(dom: _Domain, pred: Predicate) -> Any:
    """A predicate as the set of in-range values it admits, comparable exactly: float32 ranks
    (numeric), integer levels (ordinal), categories (categorical); ``None`` when empty."""
    if dom.categorical:
        assert isinstance(pred, frozenset)
        return pred or None
    assert isinstance(pred, tuple)
    lower, upper = pred
    if dom.feature.kind == "ordinal":
        lo = 0 if lower == -math.inf else max(math.floor(lower) + 1, 0)
        hi = dom.size - 1 if upper == math.inf else min(math.floor(upper), dom.size - 1)
    else:
        f = dom.feature
        assert f.low is not None and f.high is not None
        lo32, hi32 = _f32_at_least(f.low), _f32_at_most(f.high)
        lo = f32_key(max(lo32, _next_f32(lower)))
        hi = f32_key(min(hi32, _f32_at_most(upper)))
    return (lo, hi) if lo <= hi else None


def _next_f32(v: float) -> float:
    """The smallest float32 value strictly above ``v``."""
    f = np.float32(v)
    return float(f if float(f) > v else np.nextafter(f, np.float32(np.inf)))


def true_leaves(est: Any, schema: TabularSchema) -> list[tuple[int, tuple[Predicate, ...], np.ndarray]]:
    """A scikit-learn tree's leaves as ``(node id, predicate per feature, distribution)``,
    the predicates read from the path's tests on each feature's column(s)."""
    from mextract.oracle.trees import TreeWalker

    walker = TreeWalker.of(est)
    col_feature: dict[int, int] = {}
    for i in range(len(schema.features)):
        for c in range(schema.columns(i).start, schema.columns(i).stop):
            col_feature[c] = i
    out = []

    def visit(node: int, box: list[Any]) -> None:
        if walker.left[node] == -1:
            out.append((node, tuple(box), walker.distribution[node]))
            return
        c, t = int(walker.feature[node]), float(walker.threshold[node])
        f = col_feature[c]
        feat = schema.features[f]
        for child, goes_left in ((int(walker.left[node]), True), (int(walker.right[node]), False)):
            nb = list(box)
            if feat.kind == "categorical":
                level = c - schema.columns(f).start
                keep = {lv for lv in nb[f] if ((1.0 if lv == level else 0.0) <= t) == goes_left}
                nb[f] = frozenset(keep)
            else:
                lower, upper = nb[f]
                nb[f] = (lower, min(upper, t)) if goes_left else (max(lower, t), upper)
            visit(child, nb)

    start: list[Any] = [
        frozenset(range(len(f.levels))) if f.kind == "categorical" else (-math.inf, math.inf)
        for f in schema.features
    ]
    visit(0, start)
    return out


def _extracted(model: nn.Module) -> ExtractedTreeModel:
    if not isinstance(model, ExtractedTreeModel):
        raise InputError(
            f"model: expected the ExtractedTreeModel path-finding returns, got {type(model).__name__}"
        )
    return model


def compare_leaves(model: nn.Module, est: Any) -> dict[str, int]:
    """Node-by-node comparison of the extracted leaves with a scikit-learn tree's: each true
    leaf's box, intersected with the search box, must be an extracted leaf's box, with the
    same class distribution (to 1e-6, the answers' float32) and the same identifier.

    Returns ``true_leaves`` (leaves with a non-empty box in range), ``extracted_leaves``,
    ``matched`` (same box and distribution), ``same_id`` and ``unmatched``."""
    tree = _extracted(model).tree
    domains = _domains_of(tree.schema)
    found: dict[tuple[Any, ...], ExtractedLeaf] = {}
    for leaf in tree.leaves:
        found[tuple(_canonical(d, p) for d, p in zip(domains, leaf.box, strict=True))] = leaf
    true_n = matched = same_id = 0
    for node, box, dist in true_leaves(est, tree.schema):
        canon = tuple(_canonical(d, p) for d, p in zip(domains, box, strict=True))
        if any(c is None for c in canon):
            continue  # outside the search box
        true_n += 1
        hit = found.get(canon)
        if hit is not None and np.allclose(hit.distribution, dist, atol=1e-6, rtol=0):
            matched += 1
            same_id += int(hit.id == node)
    return {
        "true_leaves": true_n,
        "extracted_leaves": len(tree.leaves),
        "matched": matched,
        "same_id": same_id,
        "unmatched": true_n - matched,
    }


def _domains_of(schema: TabularSchema) -> list[_Domain]:
    out = []
    for i, f in enumerate(schema.features):
        if f.kind == "numeric":
            assert f.low is not None and f.high is not None
            lo, hi = _f32_at_least(f.low), _f32_at_most(f.high)
            out.append(_Domain(f, schema.columns(i), f32_key(hi) - f32_key(lo) + 1, base=f32_key(lo)))
        else:
            out.append(_Domain(f, schema.columns(i), len(f.levels)))
    return out


def fresh_agreement(
    model: nn.Module, est: Any, n: int, *, seed: int = 0, batch: int = 20_000
) -> dict[str, float]:
    """Agreement of the extracted tree with a scikit-learn tree on ``n`` fresh records drawn
    uniformly within the features' ranges (:meth:`TabularSchema.sample_uniform`):
    ``label_agreement`` (same top class) and ``distribution_agreement`` (same leaf
    distribution, to 1e-6)."""
    model = _extracted(model)
    g = torch.Generator().manual_seed(seed)
    same_label = same_dist = 0
    for start in range(0, n, batch):
        x = model.tree.schema.sample_uniform(min(batch, n - start), g)
        with torch.no_grad():
            mine = model.leaf_distribution(x).numpy()
        theirs = est.predict_proba(x.numpy())
        same_label += int((mine.argmax(1) == theirs.argmax(1)).sum())
        same_dist += int(np.isclose(mine, theirs, atol=1e-6, rtol=0).all(1).sum())
    return {"label_agreement": same_label / n, "distribution_agreement": same_dist / n}


__all__ = [
    "ExtractedLeaf",
    "ExtractedTree",
    "ExtractedTreeModel",
    "TreeBudgetError",
    "TreePathFinding",
    "compare_leaves",
    "f32_key",
    "fresh_agreement",
    "key_f32",
    "true_leaves",
]
