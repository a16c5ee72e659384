"""The analysis of an audit, from records alone.

An audit runs thieves (attacks) at log-spaced budgets and several seeds against a model
owner's API, undefended (protection ``"none"``) and behind each protection. The runner
writes one :class:`~mextract.experiments.records.Record` per unit of work:

- ``victim``: the owner's model (``metrics.test_accuracy``, optionally ``trigger_wsr``);
- ``defence``: the honest-user cost of one protection (``honest_accuracy`` against the
  plain victim's ``undefended_accuracy``, the answers' ``answer_l1``/``answer_kl`` distance
  to the undefended answers, ``ece`` against ``undefended_ece``, PRADA on a benign stream);
- ``cell``: one thief against one protection at one budget and seed (``status`` ``"ok"`` or
  ``"n/a: <reason>"``, ``queries``, ``fidelity``, ``test_accuracy``, PRADA's stream,
  ownership verification, transfer of adversarial examples, and the learning curve);
- ``plan``: what the plan ran and what it ``left_out``.

Every function here is pure: records in, frozen dataclasses out (:func:`to_jsonable` turns
them into JSON). Thieves are named by their ``config.thief`` label (the attack spec when
there is none; the spec is appended when one label covers two attacks); protections by
``config.protection`` (derived from the defence spec and the victim variant when absent).
Not-applicable cells (a soft-label thief against a label-only API) never enter a mean.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from mextract.experiments.records import Record

#: the fidelity levels of the headline (the share of inputs on which the stolen copy agrees
#: with the victim)
LEVELS = (0.90, 0.95, 0.99)
#: the undefended API's protection label
NONE = "none"
#: an ownership test verifies the stolen copy when its p-value is below this
P_VERIFIED = 1e-3
_VARIANT_LABELS = {"trigger": "trigger watermark", "adversarial": "adversarial training"}
_EPS = 1e-12

Bound = Literal["", "≤", "≥", ">"]
SeedStatus = Literal["interpolated", "at_smallest", "not_reached"]


# --------------------------------------------------------------------------- the records


def _num(value: Any) -> float | None:
    """A finite number, or None (booleans are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    v = float(value)
    return v if math.isfinite(v) else None


def protection_of(record: Record) -> str:
    """The protection label of a cell or defence record."""
    label = record.config.get("protection")
    if isinstance(label, str) and label:
        return label
    spec = str(record.config.get("defence") or NONE)
    variant = str(record.config.get("variant") or "plain")
    if variant == "plain":
        return spec
    in_victim = _VARIANT_LABELS.get(variant, variant)
    return in_victim if spec == NONE else f"{in_victim} + {spec}"


@dataclass(frozen=True)
class Cell:
    """One cell record, read once: who attacked what, and how it went."""

    thief: str
    attack: str
    protection: str
    defence: str
    variant: str
    seed: int
    budget: int
    queries: float
    status: str
    fidelity: float | None
    test_accuracy: float | None
    metrics: dict[str, Any]
    history: tuple[dict[str, Any], ...]

    @property
    def ok(self) -> bool:
        return self.status == "ok" and self.fidelity is not None


def cells_of(records: Sequence[Record]) -> list[Cell]:
    """Every cell record, with its thief and protection labels resolved."""
    raw = [r for r in records if r.kind == "cell"]
    attacks_by_label: dict[str, set[str]] = defaultdict(set)
    for r in raw:
        attacks_by_label[_thief_label(r)].add(_attack_spec(r))
    out = []
    for r in raw:
        label, attack = _thief_label(r), _attack_spec(r)
        thief = label if len(attacks_by_label[label]) == 1 or label == attack else f"{label} ({attack})"
        m = r.metrics
        budget = _num(m.get("budget"))
        if budget is None:
            budget = _num(r.config.get("budget")) or 0.0
        queries = _num(m.get("queries"))
        status = str(m.get("status", "ok" if "fidelity" in m else "n/a: no result"))
        out.append(
            Cell(
                thief=thief,
                attack=attack,
                protection=protection_of(r),
                defence=str(r.config.get("defence") or NONE),
                variant=str(r.config.get("variant") or "plain"),
                seed=r.seed,
                budget=int(budget),
                queries=queries if queries is not None and queries > 0 else float(budget),
                status=status,
                fidelity=_num(m.get("fidelity")),
                test_accuracy=_num(m.get("test_accuracy")),
                metrics=dict(m),
                history=tuple(r.history),
            )
        )
    return out


def _thief_label(r: Record) -> str:
    label = r.config.get("thief")
    return label if isinstance(label, str) and label else _attack_spec(r)


def _attack_spec(r: Record) -> str:
    return str(r.config.get("attack") or r.name)


def _ordered(values: Iterable[str], first: Sequence[str] = ()) -> list[str]:
    """Distinct values in order of first appearance, ``first`` (when present) leading."""
    seen = dict.fromkeys(values)
    return [v for v in first if v in seen] + [v for v in seen if v not in first]


def thieves(records: Sequence[Record]) -> list[str]:
    return _ordered(c.thief for c in cells_of(records))


def protections(records: Sequence[Record]) -> list[str]:
    labels = [protection_of(r) for r in records if r.kind in ("cell", "defence")]
    return _ordered(labels, first=(NONE,))


def _mean(values: Iterable[float]) -> float | None:
    vs = list(values)
    return sum(vs) / len(vs) if vs else None


def _by_budget(cells: Iterable[Cell]) -> dict[int, list[Cell]]:
    out: dict[int, list[Cell]] = defaultdict(list)
    for c in cells:
        out[c.budget].append(c)
    return dict(sorted(out.items()))


# --------------------------------------------------------------------- queries to fidelity


@dataclass(frozen=True)
class SeedQueries:
    """One seed's fewest queries reaching a fidelity level.

    ``status``: ``interpolated`` (between two budgets), ``at_smallest`` (the smallest budget
    already reached it: ``queries`` is an upper bound) or ``not_reached`` (censored: more
    than the largest budget; ``queries`` is None).
    """

    seed: int
    queries: float | None
    status: SeedStatus
    largest_budget: int


@dataclass(frozen=True)
class QueriesToFidelity:
    """Queries one thief needs for one fidelity level, over seeds.

    ``estimate`` is the geometric mean over seeds (the mean of log queries), a seed that never
    reached the level counted at its largest budget; ``ci_low``/``ci_high`` the 95% confidence
    interval of Student's t on log queries (``method``), given when every seed reached the
    level and there are at least two. ``bound``: ``""`` an estimate, ``"≤"`` some seed reached
    the level at the smallest budget already, ``"≥"`` some seed never reached it, ``">"`` no
    seed reached it (``estimate`` is None: more than ``largest_budget``).
    """

    thief: str
    protection: str
    level: float
    estimate: float | None
    ci_low: float | None
    ci_high: float | None
    bound: Bound
    n_seeds: int
    n_reached: int
    smallest_budget: int
    largest_budget: int
    seeds: tuple[SeedQueries, ...]
    method: str = "geometric mean over seeds; 95% CI: Student t on log(queries)"

    @property
    def value_text(self) -> str:
        """``1,234``, ``≤ 100``, ``≥ 8,000`` or ``> 10,000``."""
        if self.estimate is None:
            return f"> {self.largest_budget:,}"
        return f"{self.bound} {self.estimate:,.0f}" if self.bound else f"{self.estimate:,.0f}"

    @property
    def qualifier(self) -> str:
        """``95% CI 1,000–1,500``, ``1/3 seeds not reached by 10,000`` or nothing."""
        if self.bound == "≥":
            missing = self.n_seeds - self.n_reached
            return f"{missing}/{self.n_seeds} seeds not reached by {self.largest_budget:,}"
        if self.ci_low is not None and self.ci_high is not None:
            return f"95% CI {self.ci_low:,.0f}–{self.ci_high:,.0f}"
        return ""

    @property
    def text(self) -> str:
        """``1,234 (95% CI 1,000–1,500)``, ``≤ 100``, ``> 10,000`` or
        ``≥ 8,000 (1/3 seeds not reached by 10,000)``."""
        return f"{self.value_text} ({self.qualifier})" if self.qualifier else self.value_text

    @property
    def sort_key(self) -> tuple[float, int]:
        """Fewer queries first; a censored ('>') result after every estimate."""
        if self.estimate is None:
            return (math.inf, -self.n_reached)
        return (self.estimate, -self.n_reached)


def seed_queries(points: Sequence[tuple[float, float]], level: float, seed: int = 0) -> SeedQueries:
    """Fewest queries reaching ``level`` from one seed's (queries, final fidelity) points.

    The points are taken in the order given (by budget). The first point at or above the
    level and the last one before it (below it) are interpolated linearly in log(queries);
    a level reached at the first point is ``at_smallest``; one never reached, ``not_reached``.
    """
    largest = int(max((q for q, _ in points), default=0))
    for i, (q, f) in enumerate(points):
        if f >= level - _EPS:
            if i == 0:
                return SeedQueries(seed, q, "at_smallest", largest)
            q0, f0 = points[i - 1]
            t = (level - f0) / (f - f0)
            logq = math.log(q0) + t * (math.log(q) - math.log(q0))
            return SeedQueries(seed, math.exp(logq), "interpolated", largest)
    return SeedQueries(seed, None, "not_reached", largest)


def _t_quantile(df: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.975, df))


def _aggregate(
    thief: str, protection: str, level: float, seeds: list[SeedQueries], smallest: int
) -> QueriesToFidelity:
    n = len(seeds)
    reached = [s for s in seeds if s.queries is not None]
    largest = max(s.largest_budget for s in seeds)
    common: dict[str, Any] = {
        "thief": thief,
        "protection": protection,
        "level": level,
        "n_seeds": n,
        "n_reached": len(reached),
        "smallest_budget": smallest,
        "largest_budget": largest,
        "seeds": tuple(seeds),
    }
    if not reached:
        return QueriesToFidelity(estimate=None, ci_low=None, ci_high=None, bound=">", **common)
    logs = [math.log(s.queries if s.queries is not None else s.largest_budget) for s in seeds]
    centre = statistics.fmean(logs)
    estimate = math.exp(centre)
    if len(reached) < n:
        return QueriesToFidelity(estimate=estimate, ci_low=None, ci_high=None, bound="≥", **common)
    at_smallest = sum(s.status == "at_smallest" for s in seeds)
    bound: Bound = "≤" if at_smallest else ""
    lo = hi = None
    if n >= 2 and at_smallest < n:
        half = _t_quantile(n - 1) * statistics.stdev(logs) / math.sqrt(n)
        lo, hi = math.exp(centre - half), math.exp(centre + half)
    return QueriesToFidelity(estimate=estimate, ci_low=lo, ci_high=hi, bound=bound, **common)


def queries_to_fidelity(
    records: Sequence[Record], levels: Sequence[float] = LEVELS, *, protection: str = NONE
) -> list[QueriesToFidelity]:
    """Per thief (against ``protection``) and level, the fewest queries reaching that fidelity.

    For each seed, the applicable cells at the different budgets give (queries, final
    fidelity) points; the fewest queries reaching the level are interpolated in log(queries)
    between the last budget below the level and the first at or above it (:func:`seed_queries`),
    or censored: ``> largest budget`` when never reached. Over seeds: the geometric mean, and a
    95% confidence interval from Student's t on log queries (none with one seed, or when a seed
    is censored). Returned thief by thief, levels in the order given.
    """
    cells = [c for c in cells_of(records) if c.ok and c.protection == protection and c.queries > 0]
    out = []
    for thief in _ordered(c.thief for c in cells):
        mine = [c for c in cells if c.thief == thief]
        smallest = min(c.budget for c in mine)
        per_seed: dict[int, list[tuple[float, float]]] = {}
        for seed in sorted({c.seed for c in mine}):
            groups = _by_budget(c for c in mine if c.seed == seed)
            per_seed[seed] = [
                (statistics.fmean(c.queries for c in g), statistics.fmean(c.fidelity or 0.0 for c in g))
                for g in groups.values()
            ]
        for level in levels:
            seeds = [seed_queries(points, level, seed) for seed, points in per_seed.items()]
            out.append(_aggregate(thief, protection, level, seeds, smallest))
    return out


# ------------------------------------------------------------------------ fidelity curves


@dataclass(frozen=True)
class CurvePoint:
    """Fidelity at one budget, over seeds: the mean and the band (min and max over seeds)."""

    budget: int
    queries: float
    fidelity_mean: float
    fidelity_min: float
    fidelity_max: float
    test_accuracy_mean: float | None
    n_seeds: int


@dataclass(frozen=True)
class LearningCurve:
    """One run's history: fidelity as the run spent its queries (epoch by epoch)."""

    seed: int
    budget: int
    queries: tuple[float, ...]
    fidelity: tuple[float, ...]


@dataclass(frozen=True)
class FidelityCurve:
    """One thief against one protection: fidelity vs budget (``points``, empty when every
    cell was not applicable; then ``not_applicable`` counts them and ``reason`` says why)."""

    thief: str
    protection: str
    points: tuple[CurvePoint, ...]
    learning: tuple[LearningCurve, ...]
    not_applicable: int
    reason: str


def fidelity_curves(records: Sequence[Record]) -> list[FidelityCurve]:
    """Per (thief, protection): the final fidelity vs budget, mean and min–max band over seeds,
    with the learning curves of the runs that recorded a history."""
    cells = cells_of(records)
    prots = _ordered((c.protection for c in cells), first=(NONE,))
    out = []
    for thief in _ordered(c.thief for c in cells):
        for prot in prots:
            mine = [c for c in cells if c.thief == thief and c.protection == prot]
            if not mine:
                continue
            ok = [c for c in mine if c.ok]
            points = []
            for budget, group in _by_budget(ok).items():
                fids = [c.fidelity for c in group if c.fidelity is not None]
                accs = [c.test_accuracy for c in group if c.test_accuracy is not None]
                points.append(
                    CurvePoint(
                        budget=budget,
                        queries=statistics.fmean(c.queries for c in group),
                        fidelity_mean=statistics.fmean(fids),
                        fidelity_min=min(fids),
                        fidelity_max=max(fids),
                        test_accuracy_mean=_mean(accs),
                        n_seeds=len({c.seed for c in group}),
                    )
                )
            learning = []
            for c in ok:
                hist = [
                    (q, f)
                    for h in c.history
                    if (q := _num(h.get("queries"))) is not None
                    and (f := _num(h.get("fidelity"))) is not None
                ]
                if hist:
                    learning.append(
                        LearningCurve(c.seed, c.budget, tuple(q for q, _ in hist), tuple(f for _, f in hist))
                    )
            na = [c for c in mine if not c.ok]
            reason = na[0].status.removeprefix("n/a:").strip() if na else ""
            out.append(FidelityCurve(thief, prot, tuple(points), tuple(learning), len(na), reason))
    return out


# -------------------------------------------------------------------------- Pareto front


@dataclass(frozen=True)
class ProtectionPoint:
    """One protection: its honest-user cost and the protection it gives.

    Cost: ``accuracy_drop`` = ``undefended_accuracy − honest_accuracy`` (the plain victim's
    test accuracy minus honest users' accuracy through the protected API, which includes a
    protection in the victim itself, e.g. adversarial training); ``answer_l1``/``answer_kl``
    the answers' distance to the undefended ones; ``ece_delta`` the change in expected
    calibration error. Protection: ``fidelity_reduction``, the thieves' fidelity at the
    largest budget against ``none`` minus against this protection, each thief's mean over
    seeds at the largest budget run against both, averaged over the applicable thieves.
    ``pareto``: no other protection has lower or equal cost and higher or equal protection
    (one of them strictly).
    """

    protection: str
    defence: str
    variant: str
    honest_accuracy: float | None
    undefended_accuracy: float | None
    accuracy_drop: float | None
    answer_l1: float | None
    answer_kl: float | None
    ece_delta: float | None
    fidelity_undefended: float | None
    fidelity_protected: float | None
    fidelity_reduction: float | None
    thieves_applicable: int
    thieves_not_applicable: int
    pareto: bool


def pareto_front(records: Sequence[Record]) -> list[ProtectionPoint]:
    """Per protection (``none`` first): honest-user cost against protection, and which
    protections are non-dominated (lower cost and higher protection). A protection without a
    defence record (no cost) or without an applicable cell (no protection) is never on it."""
    cells = [c for c in cells_of(records) if c.ok]
    defences: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        if r.kind == "defence":
            defences[protection_of(r)].append(r)
    all_cells = cells_of(records)
    # older records lack undefended_accuracy: honest users' accuracy through the plain API, or
    # the plain victim's test accuracy, is the same number
    fallback = _mean(
        v for r in defences.get(NONE, []) if (v := _num(r.metrics.get("honest_accuracy"))) is not None
    )
    if fallback is None:
        fallback = _mean(
            v
            for r in records
            if r.kind == "victim"
            and (r.config.get("variant") or "plain") == "plain"
            and (v := _num(r.metrics.get("test_accuracy"))) is not None
        )
    plain_ece = _mean(
        v for r in defences.get(NONE, []) if (v := _num(r.metrics.get("undefended_ece"))) is not None
    )
    points = []
    for prot in protections(records):
        recs = defences.get(prot, [])

        def metric(key: str, recs: list[Record] = recs) -> float | None:
            return _mean(v for r in recs if (v := _num(r.metrics.get(key))) is not None)

        honest, undefended = metric("honest_accuracy"), metric("undefended_accuracy")
        ece, ece0 = metric("ece"), metric("undefended_ece")
        variant_of = str(recs[0].config.get("variant") or "plain") if recs else "plain"
        if variant_of != "plain":  # a protection in the victim itself: its cost is against the plain victim
            undefended, ece0 = fallback, plain_ece
        if undefended is None and honest is not None:
            undefended = honest if prot == NONE else fallback
        drop = None if honest is None or undefended is None else undefended - honest
        l1, kl = metric("answer_l1"), metric("answer_kl")
        if prot == NONE:
            l1, kl = (0.0 if l1 is None else l1), (0.0 if kl is None else kl)
        base_fids, prot_fids, applicable, not_applicable = [], [], 0, 0
        for thief in _ordered(c.thief for c in all_cells if c.protection == prot):
            mine = _by_budget(c for c in cells if c.thief == thief and c.protection == prot)
            base = _by_budget(c for c in cells if c.thief == thief and c.protection == NONE)
            common = sorted(set(mine) & set(base))
            if not common:
                not_applicable += 1
                continue
            applicable += 1
            b = common[-1]
            base_fids.append(statistics.fmean(c.fidelity or 0.0 for c in base[b]))
            prot_fids.append(statistics.fmean(c.fidelity or 0.0 for c in mine[b]))
        fb, fp = _mean(base_fids), _mean(prot_fids)
        if recs:
            defence = str(recs[0].config.get("defence") or NONE)
            variant = str(recs[0].config.get("variant") or "plain")
        else:
            cell = next((c for c in all_cells if c.protection == prot), None)
            defence, variant = (cell.defence, cell.variant) if cell else (NONE, "plain")
        points.append(
            ProtectionPoint(
                protection=prot,
                defence=defence,
                variant=variant,
                honest_accuracy=honest,
                undefended_accuracy=undefended,
                accuracy_drop=drop,
                answer_l1=l1,
                answer_kl=kl,
                ece_delta=None if ece is None or ece0 is None else ece - ece0,
                fidelity_undefended=fb,
                fidelity_protected=fp,
                fidelity_reduction=None if fb is None or fp is None else fb - fp,
                thieves_applicable=applicable,
                thieves_not_applicable=not_applicable,
                pareto=False,
            )
        )
    front = non_dominated([(p.accuracy_drop, p.fidelity_reduction) for p in points])
    return [dataclasses.replace(p, pareto=i in front) for i, p in enumerate(points)]


def non_dominated(points: Sequence[tuple[float | None, float | None]]) -> set[int]:
    """Indices of the (cost, protection) points no other point dominates: none has cost ≤ and
    protection ≥, one of them strictly. Points with a missing coordinate take no part."""
    full = [(i, c, p) for i, (c, p) in enumerate(points) if c is not None and p is not None]
    front = set()
    for i, c, p in full:
        dominated = any(
            c2 <= c + _EPS and p2 >= p - _EPS and (c2 < c - _EPS or p2 > p + _EPS)
            for j, c2, p2 in full
            if j != i
        )
        if not dominated:
            front.add(i)
    return front


# ----------------------------------------------------------------------------- detection


@dataclass(frozen=True)
class DetectionRow:
    """PRADA against one thief behind one protection.

    Per seed, the cell at its largest budget (the longest query stream) decides whether the
    seed was flagged, and when: ``first_alarm`` counts the queries answered up to and
    including the alarm (the records' 0-based index + 1). ``cells_flagged`` counts every
    budget's cell.
    """

    thief: str
    protection: str
    seeds: int
    seeds_flagged: int
    share_flagged: float
    median_first_alarm: float | None
    first_alarms: tuple[int, ...]
    budget: int
    cells: int
    cells_flagged: int


@dataclass(frozen=True)
class BenignAlarm:
    """PRADA on an honest user's stream through one protection (a false alarm if flagged)."""

    protection: str
    seed: int
    flagged: bool
    first_alarm: int | None


@dataclass(frozen=True)
class DetectionSummary:
    rows: tuple[DetectionRow, ...]
    benign: tuple[BenignAlarm, ...]


def _alarm_queries(value: Any) -> int | None:
    v = _num(value)
    return None if v is None else int(v) + 1


def detection_summary(records: Sequence[Record]) -> DetectionSummary:
    """Per (thief, protection) with PRADA in front: the share of seeds flagged and the median
    first alarm (queries); and PRADA's false alarms on benign streams, from defence records."""
    cells = [c for c in cells_of(records) if c.ok and "prada_flagged" in c.metrics]
    rows = []
    for thief in _ordered(c.thief for c in cells):
        for prot in _ordered((c.protection for c in cells if c.thief == thief), first=(NONE,)):
            mine = [c for c in cells if c.thief == thief and c.protection == prot]
            longest: dict[int, Cell] = {}
            for c in mine:
                if c.seed not in longest or c.budget > longest[c.seed].budget:
                    longest[c.seed] = c
            alarms = [
                a
                for c in longest.values()
                if bool(c.metrics.get("prada_flagged"))
                and (a := _alarm_queries(c.metrics.get("prada_first_alarm"))) is not None
            ]
            flagged = sum(bool(c.metrics.get("prada_flagged")) for c in longest.values())
            rows.append(
                DetectionRow(
                    thief=thief,
                    protection=prot,
                    seeds=len(longest),
                    seeds_flagged=flagged,
                    share_flagged=flagged / len(longest),
                    median_first_alarm=float(statistics.median(alarms)) if alarms else None,
                    first_alarms=tuple(sorted(alarms)),
                    budget=max(c.budget for c in mine),
                    cells=len(mine),
                    cells_flagged=sum(bool(c.metrics.get("prada_flagged")) for c in mine),
                )
            )
    benign = [
        BenignAlarm(
            protection=protection_of(r),
            seed=r.seed,
            flagged=bool(r.metrics["prada_benign_flagged"]),
            first_alarm=_alarm_queries(r.metrics.get("prada_benign_first_alarm")),
        )
        for r in records
        if r.kind == "defence" and "prada_benign_flagged" in r.metrics
    ]
    return DetectionSummary(tuple(rows), tuple(benign))


# -------------------------------------------------------------------------- verification

#: the ownership marks: name, the metric with its p-value, the metrics with its statistic (the
#: first one recorded is shown)
MARKS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("trigger", "trigger_p", ("trigger_wsr",)),
    ("DAWN", "dawn_p", ("dawn_wsr",)),
    ("cosine", "cosine_p", ("cosine_z",)),
    ("fingerprint", "fingerprint_p", ("fingerprint_auc", "fingerprint_retention")),
)
STATISTIC_NAMES = {
    "trigger_wsr": "WSR",
    "dawn_wsr": "WSR",
    "cosine_z": "z",
    "fingerprint_auc": "AUC",
    "fingerprint_retention": "retention",
}


@dataclass(frozen=True)
class VerificationRow:
    """One ownership mark against one thief: the share of that thief's cells (those that
    measured the mark) whose stolen copy the owner verifies, by ``rules`` (``p < 0.001``; for
    the trigger, ``WSR ≥ threshold`` where the record states ``trigger_threshold``); the median
    p-value, and the mean of the mark's statistic (``statistic_name``: WSR, z, AUC, retention)."""

    mark: str
    thief: str
    cells: int
    verified: int
    share: float
    median_p: float | None
    statistic_name: str
    statistic: float | None
    rules: tuple[str, ...]
    protections: tuple[str, ...]


def mark_verdict(mark: str, metrics: dict[str, Any]) -> tuple[bool, str] | None:
    """Whether a cell's stolen copy is verified by ``mark`` (and by which rule); None when the
    cell did not measure it."""
    if mark == "trigger":
        wsr, threshold = _num(metrics.get("trigger_wsr")), _num(metrics.get("trigger_threshold"))
        if wsr is not None and threshold is not None:
            return wsr >= threshold, f"WSR ≥ {threshold:g}"
    p_key = next(k for name, k, _ in MARKS if name == mark)
    p = _num(metrics.get(p_key))
    return None if p is None else (p < P_VERIFIED, f"p < {P_VERIFIED:g}")


def verification_summary(records: Sequence[Record]) -> list[VerificationRow]:
    """Per mark (trigger, DAWN, cosine, fingerprints) per thief: the share of that thief's
    cells where the stolen copy is verified (:func:`mark_verdict`)."""
    cells = [c for c in cells_of(records) if c.ok]
    rows = []
    for mark, p_key, stat_keys in MARKS:
        for thief in _ordered(c.thief for c in cells):
            decided = [
                (c, v) for c in cells if c.thief == thief and (v := mark_verdict(mark, c.metrics)) is not None
            ]
            if not decided:
                continue
            ps = [p for c, _ in decided if (p := _num(c.metrics.get(p_key))) is not None]
            stat_key = next((k for k in stat_keys if any(k in c.metrics for c, _ in decided)), stat_keys[0])
            stats = [x for c, _ in decided if (x := _num(c.metrics.get(stat_key))) is not None]
            verified = sum(ok for _, (ok, _) in decided)
            rows.append(
                VerificationRow(
                    mark=mark,
                    thief=thief,
                    cells=len(decided),
                    verified=verified,
                    share=verified / len(decided),
                    median_p=float(statistics.median(ps)) if ps else None,
                    statistic_name=STATISTIC_NAMES[stat_key],
                    statistic=_mean(stats),
                    rules=tuple(_ordered(rule for _, (_, rule) in decided)),
                    protections=tuple(_ordered(c.protection for c, _ in decided)),
                )
            )
    return rows


# ------------------------------------------------------------------------------- transfer


@dataclass(frozen=True)
class TransferCell:
    """One substitute's adversarial examples against the victim, and the reference's."""

    thief: str
    protection: str
    seed: int
    budget: int
    fidelity: float
    transfer_rate: float
    reference_rate: float | None
    config: str


@dataclass(frozen=True)
class TransferRow:
    """One thief behind one protection: mean transfer rate of its substitutes, of the
    independent references, mean fidelity; ``best``: its substitute with the highest rate."""

    thief: str
    protection: str
    cells: int
    fidelity: float
    transfer_rate: float
    reference_rate: float | None
    best: TransferCell


@dataclass(frozen=True)
class TransferSummary:
    """``best``: the substitute with the highest transfer rate of all (ties: higher fidelity)."""

    rows: tuple[TransferRow, ...]
    cells: tuple[TransferCell, ...]
    best: TransferCell | None
    reference_rate: float | None


def transfer_summary(records: Sequence[Record]) -> TransferSummary:
    """Per thief (and protection): the transfer rate of PGD examples crafted on the stolen
    copy, against the rate of the same attack crafted on an independent model of the same
    architecture (the reference), with the stolen copy's fidelity; and the best substitute."""
    tcells = [
        TransferCell(
            thief=c.thief,
            protection=c.protection,
            seed=c.seed,
            budget=c.budget,
            fidelity=c.fidelity or 0.0,
            transfer_rate=rate,
            reference_rate=_num(c.metrics.get("transfer_rate_reference")),
            config=str(c.metrics.get("transfer_config", "")),
        )
        for c in cells_of(records)
        if c.ok and (rate := _num(c.metrics.get("transfer_rate"))) is not None
    ]

    def rank(t: TransferCell) -> tuple[float, float]:
        return (t.transfer_rate, t.fidelity)

    rows = []
    for thief in _ordered(t.thief for t in tcells):
        for prot in _ordered((t.protection for t in tcells if t.thief == thief), first=(NONE,)):
            mine = [t for t in tcells if t.thief == thief and t.protection == prot]
            rows.append(
                TransferRow(
                    thief=thief,
                    protection=prot,
                    cells=len(mine),
                    fidelity=statistics.fmean(t.fidelity for t in mine),
                    transfer_rate=statistics.fmean(t.transfer_rate for t in mine),
                    reference_rate=_mean(t.reference_rate for t in mine if t.reference_rate is not None),
                    best=max(mine, key=rank),
                )
            )
    return TransferSummary(
        rows=tuple(rows),
        cells=tuple(tcells),
        best=max(tcells, key=rank) if tcells else None,
        reference_rate=_mean(t.reference_rate for t in tcells if t.reference_rate is not None),
    )


# ------------------------------------------------------------------------------ headline


def _pct(v: float | None, digits: int = 1) -> str:
    return "–" if v is None else f"{100 * v:.{digits}f}%"


def _pp(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:+.1f} pt"


def _queries_line(q2f: Sequence[QueriesToFidelity], levels: Sequence[float]) -> str:
    parts = []
    for level in levels:
        rows = [q for q in q2f if q.level == level]
        if not rows:
            continue
        best = min(rows, key=lambda q: q.sort_key)
        if best.estimate is None:
            largest = max(q.largest_budget for q in rows)
            parts.append(f"{level:.0%}: not reached by any thief within {largest:,} queries")
        else:
            seeds = f"{best.n_seeds} seed{'s' if best.n_seeds != 1 else ''}"
            notes = "; ".join(x for x in (best.thief, best.qualifier, seeds) if x)
            parts.append(f"{level:.0%}: {best.value_text} queries ({notes})")
    return "; ".join(parts)


def _alarm_text(r: DetectionRow) -> str:
    text = f"{r.protection}: {r.seeds_flagged}/{r.seeds} seeds"
    if r.median_first_alarm is not None:
        text += f", median first alarm at {r.median_first_alarm:,.0f} queries"
    return text


def headline(records: Sequence[Record]) -> list[str]:
    """The report's first lines: what the cheapest thief needs for 90/95/99% fidelity against
    the undefended API, the Pareto-front protections, PRADA, ownership verification, transfer."""
    lines = []
    q2f = queries_to_fidelity(records)
    levels = "/".join(f"{level:.0%}" for level in LEVELS)
    if q2f:
        lines.append(
            f"Queries to steal a copy with {levels} fidelity (undefended API, cheapest thief; "
            f"geometric mean over seeds, 95% CI): {_queries_line(q2f, LEVELS)}."
        )
    else:
        lines.append(f"Queries for {levels} fidelity: no applicable cell against the undefended API.")
    front = [p for p in pareto_front(records) if p.pareto and p.protection != NONE]
    if front:
        items = [
            f"{p.protection} (accuracy drop {_pp(p.accuracy_drop)}, thief fidelity "
            f"{_pp(None if p.fidelity_reduction is None else -p.fidelity_reduction)})"
            for p in sorted(front, key=lambda p: p.accuracy_drop or 0.0)
        ]
        lines.append("Pareto-front protections (honest-user cost vs protection): " + "; ".join(items) + ".")
    elif any(r.kind == "defence" for r in records):
        lines.append("Pareto front: no protection both costs honest users less and protects more than none.")
    det = detection_summary(records)
    if det.rows:
        caught = []
        for thief in _ordered(r.thief for r in det.rows if r.seeds_flagged):
            mine = [r for r in det.rows if r.thief == thief and r.seeds_flagged]
            caught.append(f"{thief} (against " + "; ".join(_alarm_text(r) for r in mine) + ")")
        flagged = {r.thief for r in det.rows if r.seeds_flagged}
        missed = [t for t in _ordered(r.thief for r in det.rows) if t not in flagged]
        text = "PRADA flags " + (", ".join(caught) if caught else "no thief")
        if missed:
            text += "; never flags " + ", ".join(missed)
        if det.benign:
            false_alarms = sum(b.flagged for b in det.benign)
            text += f"; false alarms on benign streams: {false_alarms}/{len(det.benign)} protections"
        lines.append(text + ".")
    ver = verification_summary(records)
    if ver:
        marks = []
        for mark in _ordered(v.mark for v in ver):
            parts = [f"{v.thief} {v.verified}/{v.cells}" for v in ver if v.mark == mark]
            marks.append(f"{mark}: " + ", ".join(parts))
        lines.append("Ownership verified (stolen copies verified / cells): " + "; ".join(marks) + ".")
    tr = transfer_summary(records)
    if tr.best is not None:
        b = tr.best
        ref = "" if b.reference_rate is None else f" vs {_pct(b.reference_rate)} for an independent reference"
        mean_ref = "" if tr.reference_rate is None else f" (references: {_pct(tr.reference_rate)} on average)"
        lines.append(
            f"Model deception: the best substitute ({b.thief} vs {b.protection}, {b.budget:,} queries, "
            f"fidelity {_pct(b.fidelity)}) transfers {_pct(b.transfer_rate)} of its adversarial "
            f"examples to the victim{ref}{mean_ref}."
        )
    return lines


# --------------------------------------------------------------------- victims, plan, all


@dataclass(frozen=True)
class VictimRow:
    architecture: str
    dataset: str
    variant: str
    seed: int
    test_accuracy: float | None
    trigger_wsr: float | None


def victims(records: Sequence[Record]) -> list[VictimRow]:
    return [
        VictimRow(
            architecture=r.name,
            dataset=str(r.config.get("dataset", "")),
            variant=str(r.config.get("variant") or "plain"),
            seed=r.seed,
            test_accuracy=_num(r.metrics.get("test_accuracy")),
            trigger_wsr=_num(r.metrics.get("trigger_wsr")),
        )
        for r in records
        if r.kind == "victim"
    ]


def plan_left_out(records: Sequence[Record]) -> list[str]:
    """What the plan records say was left out (in order, without repeats)."""
    out: list[str] = []
    for r in records:
        if r.kind == "plan":
            out.extend(str(x) for x in r.metrics.get("left_out") or [])
    return list(dict.fromkeys(out))


@dataclass(frozen=True)
class Analysis:
    """Everything the report shows, computed once."""

    headline: list[str]
    queries: list[QueriesToFidelity]
    curves: list[FidelityCurve]
    pareto: list[ProtectionPoint]
    detection: DetectionSummary
    verification: list[VerificationRow]
    transfer: TransferSummary
    victims: list[VictimRow]
    cells: list[Cell]
    plan_left_out: list[str]


def analyze(records: Sequence[Record]) -> Analysis:
    return Analysis(
        headline=headline(records),
        queries=queries_to_fidelity(records),
        curves=fidelity_curves(records),
        pareto=pareto_front(records),
        detection=detection_summary(records),
        verification=verification_summary(records),
        transfer=transfer_summary(records),
        victims=victims(records),
        cells=cells_of(records),
        plan_left_out=plan_left_out(records),
    )


def to_jsonable(value: Any) -> Any:
    """Dataclasses, tuples and numbers as JSON values (non-finite floats become null); a
    :class:`QueriesToFidelity` also carries its ``text``."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, QueriesToFidelity):
            out["text"] = value.text
        return out
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
