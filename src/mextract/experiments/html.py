"""The audit report, from records alone: one self-contained HTML file, the same in Markdown,
and the analysis as JSON.

``report.html`` needs nothing but itself: the plots are PNGs embedded as ``data:`` URIs, the
style is inline, and a few lines of inline script record, on load, how many images decoded
(``document.body.dataset.imagesOk = "N/M"``, read by ``scripts/check_report.py``).
``report.md`` holds the same blocks, its plots as PNG files beside it. ``report.json`` holds
:func:`mextract.experiments.analysis.analyze`'s results.

The plots are drawn with matplotlib's object API on the Agg canvas (no pyplot, no global
backend switch): fidelity vs queries per thief, honest-user cost vs protection with the
Pareto front, PRADA's detection timelines, and transfer rate vs fidelity.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mextract.experiments.analysis import (
    LEVELS,
    MARKS,
    NONE,
    STATISTIC_NAMES,
    Analysis,
    Cell,
    analyze,
    mark_verdict,
    protection_of,
    to_jsonable,
)
from mextract.experiments.records import Record

DEFAULT_TITLE = "Model-extraction audit"
_PALETTE = (
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
    "#bcbd22", "#7f7f7f",
)  # fmt: skip
#: the full cell table starts folded above this many rows
_OPEN_ROWS = 200


# ------------------------------------------------------------------------ formatting


def _pct(v: float | None, digits: int = 1) -> str:
    return "–" if v is None else f"{100 * v:.{digits}f}%"


def _pp(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:+.1f} pt"


def _num(v: float | None, fmt: str = ".3f") -> str:
    return "–" if v is None else format(v, fmt)


def _count(v: float | None) -> str:
    return "–" if v is None else f"{v:,.0f}"


def _p(v: Any) -> str:
    return f"{v:.1e}" if isinstance(v, int | float) and not isinstance(v, bool) else "–"


def _colours(names: Sequence[str]) -> dict[str, str]:
    return {n: _PALETTE[i % len(_PALETTE)] for i, n in enumerate(dict.fromkeys(names))}


# ------------------------------------------------------------- the document, as blocks


@dataclass
class _Heading:
    level: int
    text: str


@dataclass
class _Para:
    text: str
    cls: str = ""


@dataclass
class _Bullets:
    items: list[str]
    cls: str = ""


@dataclass
class _Table:
    header: list[str]
    rows: list[list[str]]
    numeric: set[int] = field(default_factory=set)  # right-aligned columns
    nowrap: set[int] = field(default_factory=set)


@dataclass
class _Plot:
    name: str  # file stem
    title: str
    caption: str
    png: bytes


@dataclass
class _Details:
    summary: str
    blocks: list[Any]
    open: bool


# ------------------------------------------------------------------------------ plots


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _plot_fidelity(a: Analysis, colours: dict[str, str]) -> tuple[bytes | None, str]:
    curves = [c for c in a.curves if c.protection == NONE and c.points]
    if not curves:
        return None, "No thief has an applicable cell against the undefended API (protection 'none')."
    fig = Figure(figsize=(9, 5.4))
    ax = fig.add_subplot()
    thin = False
    for c in curves:
        col = colours[c.thief]
        for lc in c.learning:
            if len(set(lc.queries)) >= 2:  # a curve over queries (all queries at once: a vertical line)
                ax.plot(lc.queries, lc.fidelity, color=col, lw=0.7, alpha=0.35)
                thin = True
        xs = [p.queries for p in c.points]
        ax.fill_between(
            xs, [p.fidelity_min for p in c.points], [p.fidelity_max for p in c.points], color=col, alpha=0.18
        )
        ax.plot(xs, [p.fidelity_mean for p in c.points], marker="o", color=col, lw=2, label=c.thief)
    for level in LEVELS:
        ax.axhline(level, color="0.45", ls=":", lw=0.9)
        ax.annotate(
            f"{level:.0%}",
            xy=(1.005, level),
            xycoords=("axes fraction", "data"),
            va="center",
            fontsize=8,
            color="0.35",
        )
    ax.set_xscale("log")
    ax.set_ylim(top=1.005)
    ax.set_title("Thief fidelity vs queries, undefended API")
    ax.set_xlabel("queries to the API (log scale)")
    ax.set_ylabel("fidelity (agreement with the victim)")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(loc="lower right", fontsize=8, title="thief", title_fontsize=8)
    seeds = max(p.n_seeds for c in curves for p in c.points)
    caption = (
        f"Each thief's final fidelity at each budget: mean over seeds (up to {seeds}) with the min–max "
        "band; dotted lines at the headline's fidelity levels."
    )
    if thin:
        caption += " Thin lines: learning curves within single runs."
    return _png(fig), caption


def _plot_pareto(a: Analysis) -> tuple[bytes | None, str]:
    pts = [p for p in a.pareto if p.accuracy_drop is not None and p.fidelity_reduction is not None]
    if not [p for p in pts if p.protection != NONE]:
        return None, (
            "No protection besides 'none' has both a defence record (its honest-user cost) and "
            "applicable cells (its protection)."
        )
    fig = Figure(figsize=(9, 5.4))
    ax = fig.add_subplot()
    front = sorted((p for p in pts if p.pareto), key=lambda p: p.accuracy_drop or 0.0)
    others = [p for p in pts if not p.pareto]
    ax.scatter(
        [100 * (p.accuracy_drop or 0) for p in others],
        [100 * (p.fidelity_reduction or 0) for p in others],
        s=40,
        color="0.55",
        label="dominated",
        zorder=3,
    )
    ax.plot(
        [100 * (p.accuracy_drop or 0) for p in front],
        [100 * (p.fidelity_reduction or 0) for p in front],
        color="#d62728",
        marker="o",
        ms=8,
        lw=2,
        drawstyle="steps-post",
        label="Pareto front",
        zorder=4,
    )
    for p in pts:
        ax.annotate(
            p.protection,
            (100 * (p.accuracy_drop or 0), 100 * (p.fidelity_reduction or 0)),
            textcoords="offset points",
            xytext=(5, 5),
            fontsize=8,
            color="#a01010" if p.pareto else "0.3",
        )
    ax.axhline(0, color="0.6", lw=0.8)
    ax.axvline(0, color="0.6", lw=0.8)
    ax.set_title("Honest-user cost vs protection, per protection")
    ax.set_xlabel("honest-user accuracy drop (percentage points; lower is better)")
    ax.set_ylabel("thief fidelity reduction at the largest budget (pt; higher is better)")
    ax.grid(True, alpha=0.25)
    ax.legend(loc="best", fontsize=8)
    missing = [p.protection for p in a.pareto if p not in pts]
    caption = (
        "Cost: the plain victim's test accuracy minus honest users' accuracy through the protection. "
        "Protection: the thieves' fidelity against 'none' minus against the protection, at the largest "
        "budget, averaged over seeds and applicable thieves. Red: non-dominated protections."
    )
    if missing:
        caption += " Not plotted (no cost or no applicable cell): " + ", ".join(missing) + "."
    return _png(fig), caption


def _prada_cells(a: Analysis) -> dict[str, list[Cell]]:
    """Per thief, the longest PRADA stream of each (protection, seed)."""
    longest: dict[tuple[str, str, int], Cell] = {}
    for c in a.cells:
        if c.ok and c.metrics.get("prada_w"):
            key = (c.thief, c.protection, c.seed)
            if key not in longest or c.budget > longest[key].budget:
                longest[key] = c
    out: dict[str, list[Cell]] = {}
    for (thief, _, _), c in longest.items():
        out.setdefault(thief, []).append(c)
    return out


def _benign_streams(records: Sequence[Record]) -> dict[str, list[list[tuple[float, float]]]]:
    """Per protection, PRADA's W over honest users' streams (defence records' prada_benign_w)."""
    out: dict[str, list[list[tuple[float, float]]]] = {}
    for r in records:
        w = r.metrics.get("prada_benign_w") if r.kind == "defence" else None
        if w:
            out.setdefault(protection_of(r), []).append([(float(i) + 1, float(v)) for i, v in w])
    return out


def _plot_detection(a: Analysis, records: Sequence[Record]) -> tuple[bytes | None, str]:
    by_thief = _prada_cells(a)
    if not by_thief:
        return None, "No cell recorded PRADA's statistic over its query stream (prada_w)."
    n = len(by_thief)
    ncols = 1 if n == 1 else 2
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(6.2 * ncols, 3.7 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    prot_colours = _colours([c.protection for cells in by_thief.values() for c in cells])
    benign = _benign_streams(records)
    for k, (thief, cells) in enumerate(by_thief.items()):
        ax: Axes = axes[k // ncols][k % ncols]
        labelled: set[str] = set()
        thresholds = set()
        order = list(prot_colours)
        seeds = sorted({c.seed for c in cells})
        for c in sorted(cells, key=lambda c: (order.index(c.protection), c.seed)):
            w = [(float(i) + 1, float(v)) for i, v in c.metrics["prada_w"]]
            xs, ys = [x for x, _ in w], [y for _, y in w]
            col = prot_colours[c.protection]
            label = None if c.protection in labelled else c.protection
            labelled.add(c.protection)
            style = ("-", (0, (5, 2)), ":", "-.")[seeds.index(c.seed) % 4]
            ax.plot(xs, ys, color=col, ls=style, lw=1.3, alpha=0.85, label=label)
            alarm = c.metrics.get("prada_first_alarm")
            if c.metrics.get("prada_flagged") and isinstance(alarm, int):
                x = alarm + 1
                y = min(w, key=lambda p: abs(p[0] - x))[1]
                ax.plot([x], [y], marker="X", ms=10, color=col, mec="black", mew=0.8, ls="none")
            if isinstance(c.metrics.get("prada_threshold"), int | float):
                thresholds.add(float(c.metrics["prada_threshold"]))
        shown = [p for p in order if any(c.protection == p for c in cells)]
        streams = [w for p in shown for w in benign.get(p, [])]
        for j, w in enumerate(streams):
            ax.plot([x for x, _ in w], [y for _, y in w], color="0.55", lw=0.8, ls=":",
                    label="honest users (benign streams)" if j == 0 else None)  # fmt: skip
        for t in sorted(thresholds):
            ax.axhline(t, color="black", ls="--", lw=1, label=f"threshold δ = {t:g}")
        ax.plot([], [], marker="X", ms=8, color="0.5", mec="black", ls="none", label="first alarm")
        ax.set_xscale("log")
        ax.set_title(thief, fontsize=10)
        ax.set_xlabel("queries (log scale)")
        ax.set_ylabel("Shapiro–Wilk W")
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=7, loc="lower left")
    for k in range(n, nrows * ncols):
        axes[k // ncols][k % ncols].set_visible(False)
    fig.suptitle("PRADA detection timelines: W over each thief's query stream (alarm when W < δ)")
    fig.tight_layout()
    caption = (
        "One line per protection and seed (the cell at that seed's largest budget); a cross marks "
        "PRADA's first alarm, the dashed line its threshold."
    )
    if benign:
        caption += " Dotted grey: honest users' streams through the same protections (false alarms if below)."
    return _png(fig), caption


def _plot_transfer(a: Analysis, colours: dict[str, str]) -> tuple[bytes | None, str]:
    t = a.transfer
    if not t.cells:
        return None, "No cell measured the transfer of adversarial examples (transfer_rate)."
    fig = Figure(figsize=(9, 5.4))
    ax = fig.add_subplot()
    for thief in dict.fromkeys(c.thief for c in t.cells):
        mine = [c for c in t.cells if c.thief == thief]
        ax.scatter(
            [c.fidelity for c in mine],
            [c.transfer_rate for c in mine],
            s=45,
            color=colours[thief],
            alpha=0.85,
            label=thief,
            zorder=3,
        )
    refs = [c.reference_rate for c in t.cells if c.reference_rate is not None]
    if refs and t.reference_rate is not None:
        if max(refs) > min(refs):
            ax.axhspan(min(refs), max(refs), color="0.5", alpha=0.12, label="references: min–max")
        ax.axhline(
            t.reference_rate,
            color="0.25",
            ls="--",
            lw=1.4,
            label=f"independent reference (mean {_pct(t.reference_rate)})",
        )
    if t.best is not None:
        ax.scatter(
            [t.best.fidelity],
            [t.best.transfer_rate],
            s=260,
            facecolors="none",
            edgecolors="black",
            lw=1.5,
            label="best substitute",
            zorder=4,
        )
    ax.set_title("Model deception: adversarial examples crafted on stolen copies")
    ax.set_xlabel("substitute fidelity (agreement with the victim)")
    ax.set_ylabel("transfer rate (fooled the victim)")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.25)
    ax.legend(fontsize=8, loc="best")
    configs = sorted({c.config for c in t.cells if c.config})
    caption = "One point per cell (thief, protection, budget, seed)."
    if configs:
        caption += " Attack: " + "; ".join(configs) + "."
    return _png(fig), caption


# ----------------------------------------------------------------------------- tables


def _queries_table(a: Analysis) -> list[Any]:
    if not a.queries:
        return [_Para("No applicable cell against the undefended API.")]
    thieves = list(dict.fromkeys(q.thief for q in a.queries))
    levels = list(dict.fromkeys(q.level for q in a.queries))
    by = {(q.thief, q.level): q for q in a.queries}
    rows = []
    for thief in thieves:
        first = by[(thief, levels[0])]
        rows.append(
            [thief, str(first.n_seeds), f"{first.smallest_budget:,}–{first.largest_budget:,}"]
            + [by[(thief, level)].text for level in levels]
        )
    return [
        _Table(
            ["thief", "seeds", "budgets", *(f"queries to {level:.0%}" for level in levels)],
            rows,
            numeric=set(range(1, 3 + len(levels))),
        ),
        _Para(
            "Against the undefended API. Per seed, the fewest queries reaching the level, interpolated "
            "in log(queries) between the last budget below it and the first at or above it; over seeds, "
            "the geometric mean and a 95% confidence interval (Student t on log queries). '≤': some seed "
            "already reached the level at the smallest budget; '≥': some seed never reached it (counted at "
            "the largest budget); '>': no seed reached it.",
            cls="note",
        ),
    ]


def _protection_table(a: Analysis) -> list[Any]:
    if not a.pareto:
        return [_Para("No defence record and no cell.")]
    rows = [
        [
            p.protection + (" ★" if p.pareto else ""),
            p.defence,
            p.variant,
            _pct(p.honest_accuracy, 2),
            _pp(p.accuracy_drop),
            _num(p.answer_l1),
            _num(p.answer_kl),
            _pp(p.ece_delta),
            _pct(p.fidelity_protected),
            _pp(p.fidelity_reduction),
            f"{p.thieves_applicable} / {p.thieves_not_applicable}",
        ]
        for p in a.pareto
    ]
    header = [
        "protection",
        "defence",
        "victim",
        "honest acc",
        "acc drop",
        "answer L1",
        "answer KL",
        "ECE Δ",
        "thief fidelity",
        "fidelity reduction",
        "thieves ok / n/a",
    ]
    return [
        _Table(header, rows, numeric=set(range(3, 11))),
        _Para(
            "★: on the Pareto front (no other protection costs honest users as little and protects as "
            "much, one of them strictly). Cost columns: accuracy drop against the plain victim, mean L1 "
            "and KL(undefended‖defended) between the answers, change in expected calibration error (15 "
            "bins). Thief fidelity at the largest budget, mean over seeds and applicable thieves; its "
            "reduction against 'none'. n/a: thieves that cannot run against the protection.",
            cls="note",
        ),
    ]


def _detection_tables(a: Analysis) -> list[Any]:
    det = a.detection
    blocks: list[Any] = []
    if det.rows:
        rows = [
            [
                r.thief,
                r.protection,
                f"{r.seeds_flagged}/{r.seeds} ({_pct(r.share_flagged, 0)})",
                _count(r.median_first_alarm),
                ", ".join(f"{x:,}" for x in r.first_alarms) or "–",
                f"{r.budget:,}",
                f"{r.cells_flagged}/{r.cells}",
            ]
            for r in det.rows
        ]
        blocks.append(
            _Table(
                [
                    "thief",
                    "protection",
                    "seeds flagged",
                    "median first alarm (queries)",
                    "first alarms",
                    "largest budget",
                    "cells flagged",
                ],
                rows,
                numeric={2, 3, 5, 6},
            )
        )
        blocks.append(
            _Para(
                "Per seed, the cell at its largest budget (the longest stream) decides; first alarm: the "
                "queries answered up to and including the alarm.",
                cls="note",
            )
        )
    else:
        blocks.append(_Para("No cell ran with PRADA in front of the API."))
    if det.benign:
        rows = [
            [
                b.protection,
                str(b.seed),
                "yes" if b.flagged else "no",
                _count(b.first_alarm if b.flagged else None),
            ]
            for b in det.benign
        ]
        blocks.append(_Para("False alarms on an honest user's stream (the test set in a random order):"))
        header = ["protection", "seed", "benign stream flagged", "first alarm (queries)"]
        blocks.append(_Table(header, rows, {1, 3}))
    return blocks


def _statistic(name: str, value: float | None) -> str:
    if value is None:
        return "–"
    return f"{_pct(value)} ({name})" if name in ("WSR", "retention") else f"{value:.3g} ({name})"


def _verification_table(a: Analysis) -> list[Any]:
    if not a.verification:
        return [_Para("No cell measured an ownership mark on its stolen copy.")]
    rows = [
        [
            v.mark,
            v.thief,
            f"{v.verified}/{v.cells}",
            _pct(v.share, 0),
            _p(v.median_p),
            _statistic(v.statistic_name, v.statistic),
            "; ".join(v.rules),
            ", ".join(v.protections),
        ]
        for v in a.verification
    ]
    header = ["mark", "thief", "verified / cells", "share", "median p", "mean statistic", "verified when",
              "protections"]  # fmt: skip
    return [
        _Table(header, rows, numeric={2, 3, 4, 5}),
        _Para(
            "Share of the thief's cells (those that measured the mark, any protection and budget) whose "
            "stolen copy the owner verifies.",
            cls="note",
        ),
    ]


def _transfer_table(a: Analysis) -> list[Any]:
    t = a.transfer
    if not t.rows:
        return [_Para("No cell measured the transfer of adversarial examples.")]
    rows = [
        [
            r.thief,
            r.protection,
            str(r.cells),
            _pct(r.fidelity),
            _pct(r.transfer_rate),
            _pct(r.reference_rate),
            f"{r.best.budget:,} q, seed {r.best.seed}: fidelity {_pct(r.best.fidelity)}, "
            f"transfer {_pct(r.best.transfer_rate)}",
        ]
        for r in t.rows
    ]
    return [
        _Table(
            [
                "thief",
                "protection",
                "cells",
                "fidelity",
                "transfer rate",
                "reference rate",
                "best substitute",
            ],
            rows,
            numeric={2, 3, 4, 5},
        )
    ]


def _cell_marks(m: dict[str, Any]) -> str:
    parts = []
    for name, p_key, stat_keys in MARKS:
        verdict = mark_verdict(name, m)
        if verdict is None:
            continue
        text = name
        stat_key = next((k for k in stat_keys if isinstance(m.get(k), int | float)), None)
        if stat_key is not None:
            stat_name = STATISTIC_NAMES[stat_key]
            value = m[stat_key]
            text += f" {stat_name} " + (
                _pct(value, 0) if stat_name in ("WSR", "retention") else f"{value:.3g}"
            )
        if isinstance(m.get(p_key), int | float):
            text += f" p={_p(m[p_key])}"
        parts.append(text + (" ✓" if verdict[0] else ""))
    return "; ".join(parts) or "–"


def _cell_table(a: Analysis) -> list[Any]:
    if not a.cells:
        return [_Para("No cell records.")]
    # protections in the report's order (none first), thieves in order of appearance
    p_rank = {p.protection: i for i, p in enumerate(a.pareto)}
    t_rank = {t: i for i, t in enumerate(dict.fromkeys(c.thief for c in a.cells))}
    cells = sorted(a.cells, key=lambda c: (p_rank.get(c.protection, -1), t_rank[c.thief], c.budget, c.seed))
    rows = []
    for c in cells:
        m = c.metrics
        alarm = "–"
        if "prada_flagged" in m:
            first = m.get("prada_first_alarm")
            alarm = f"at {first + 1:,}" if m["prada_flagged"] and isinstance(first, int) else "no alarm"
        transfer = "–"
        if isinstance(m.get("transfer_rate"), int | float):
            ref = m.get("transfer_rate_reference")
            transfer = _pct(m["transfer_rate"]) + (
                f" (ref {_pct(ref)})" if isinstance(ref, int | float) else ""
            )
        time = m.get("wall_time_s")
        rows.append(
            [
                c.thief,
                c.attack,
                c.protection,
                f"{c.budget:,}",
                str(c.seed),
                c.status,
                _count(c.queries) if c.ok else "–",
                _pct(c.fidelity, 2),
                _pct(c.test_accuracy, 2),
                alarm,
                _cell_marks(m),
                transfer,
                f"{time:.1f} s" if isinstance(time, int | float) else "–",
            ]
        )
    header = [
        "thief",
        "attack",
        "protection",
        "budget",
        "seed",
        "status",
        "queries",
        "fidelity",
        "test acc",
        "PRADA",
        "ownership",
        "transfer",
        "time",
    ]
    table = _Table(header, rows, numeric={3, 4, 6, 7, 8, 12}, nowrap={9, 10})
    return [_Details(f"All {len(rows)} cells", [table], open=len(rows) <= _OPEN_ROWS)]


def _victim_table(a: Analysis) -> list[Any]:
    rows = [
        [v.architecture, v.dataset, v.variant, str(v.seed), _pct(v.test_accuracy, 2), _pct(v.trigger_wsr)]
        for v in a.victims
    ]
    return [
        _Table(["architecture", "dataset", "variant", "seed", "test acc", "trigger WSR"], rows, {3, 4, 5})
    ]


# --------------------------------------------------------------------------- document


def _document(
    records: Sequence[Record], a: Analysis, title: str
) -> tuple[list[Any], dict[str, str | None], dict[str, str]]:
    """The report's blocks; which plots were drawn (name → file) or skipped (name → None)."""
    counts = {k: sum(r.kind == k for r in records) for k in ("victim", "defence", "cell", "plan")}
    versions = sorted({r.versions.get("mextract", "") for r in records} - {""})
    meta = (
        f"Built from {len(records)} records ({counts['victim']} victim, {counts['defence']} defence, "
        f"{counts['cell']} cell records) on {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}"
        + (f"; mextract {', '.join(versions)}" if versions else "")
        + "."
    )
    blocks: list[Any] = [_Heading(1, title), _Para(meta, cls="meta"), _Heading(2, "Headline")]
    blocks.append(_Bullets(a.headline, cls="headline"))
    colours = _colours([c.thief for c in a.cells])
    plots = [
        ("fidelity", "Fidelity vs queries", _plot_fidelity(a, colours)),
        ("pareto", "Honest-user cost vs protection", _plot_pareto(a)),
        ("detection", "Detection timelines (PRADA)", _plot_detection(a, records)),
        ("transfer", "Transfer rate vs fidelity", _plot_transfer(a, colours)),
    ]
    blocks.append(_Heading(2, "Plots"))
    drawn: dict[str, str | None] = {}
    skipped: dict[str, str] = {}
    for name, heading, (png, text) in plots:
        blocks.append(_Heading(3, heading))
        if png is None:
            blocks.append(_Para(f"Not drawn: {text}", cls="skip"))
            drawn[name], skipped[name] = None, text
        else:
            blocks.append(_Plot(name, heading, text, png))
            drawn[name] = f"{name}.png"
    blocks += [_Heading(2, "Tables"), _Heading(3, "Headline")]
    blocks.append(_Table(["#", "finding"], [[str(i + 1), line] for i, line in enumerate(a.headline)], {0}))
    blocks += [_Heading(3, "Queries to fidelity"), *_queries_table(a)]
    blocks += [_Heading(3, "Protections: honest-user cost and protection"), *_protection_table(a)]
    blocks += [_Heading(3, "Detection (PRADA)"), *_detection_tables(a)]
    blocks += [_Heading(3, "Ownership verification"), *_verification_table(a)]
    blocks += [_Heading(3, "Model deception (transfer)"), *_transfer_table(a)]
    if a.victims:
        blocks += [_Heading(3, "Victims"), *_victim_table(a)]
    if a.plan_left_out:
        blocks += [_Heading(3, "Left out by the plan"), _Bullets(a.plan_left_out)]
    blocks += [_Heading(3, "All cells"), *_cell_table(a)]
    return blocks, drawn, skipped


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0 auto;
max-width:1240px;padding:16px 24px 48px;color:#1b1b1b;background:#fff;line-height:1.45}
h1{font-size:1.7em;margin:.3em 0 .1em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
h3{margin:1.3em 0 .4em}.meta{color:#555;font-size:.9em}
ul.headline{background:#f3f6fb;border-left:4px solid #1f77b4;padding:.6em 1em .6em 2em}
ul.headline li{margin:.25em 0}
figure{margin:.4em 0 1em}figure img{max-width:100%;height:auto;border:1px solid #e2e2e2}
figcaption,.note{color:#444;font-size:.88em;margin-top:.3em}.skip{color:#8a5a00;font-style:italic}
table{border-collapse:collapse;font-size:.86em;margin:.3em 0 .6em}
th,td{border:1px solid #d6d6d6;padding:3px 7px;vertical-align:top}
th{background:#f0f0f0;text-align:left}td.n{text-align:right;white-space:nowrap}
td.w{white-space:nowrap}
tbody tr:nth-child(even){background:#fafafa}details summary{cursor:pointer;font-weight:600}
"""

_SCRIPT = """
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.dataset.imagesOk = ok + "/" + imgs.length;
  document.body.dataset.pageHeight = String(document.documentElement.scrollHeight);
});
"""


def _html_blocks(blocks: list[Any]) -> list[str]:
    e = html.escape
    out = []
    for b in blocks:
        if isinstance(b, _Heading):
            out.append(f"<h{b.level}>{e(b.text)}</h{b.level}>")
        elif isinstance(b, _Para):
            cls = f' class="{b.cls}"' if b.cls else ""
            out.append(f"<p{cls}>{e(b.text)}</p>")
        elif isinstance(b, _Bullets):
            cls = f' class="{b.cls}"' if b.cls else ""
            out.append(f"<ul{cls}>" + "".join(f"<li>{e(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, _Table):
            head = "".join(f"<th>{e(h)}</th>" for h in b.header)
            classes = {i: "n" for i in b.numeric} | {i: "w" for i in b.nowrap - b.numeric}
            body = "".join(
                "<tr>"
                + "".join(
                    f'<td class="{classes[i]}">{e(v)}</td>' if i in classes else f"<td>{e(v)}</td>"
                    for i, v in enumerate(row)
                )
                + "</tr>"
                for row in b.rows
            )
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif isinstance(b, _Plot):
            data = base64.b64encode(b.png).decode("ascii")
            out.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{e(b.title)}">'
                f"<figcaption>{e(b.caption)}</figcaption></figure>"
            )
        elif isinstance(b, _Details):
            attr = " open" if b.open else ""
            out.append(f"<details{attr}><summary>{e(b.summary)}</summary>" + "".join(_html_blocks(b.blocks)))
            out.append("</details>")
    return out


def _html(blocks: list[Any], title: str) -> str:
    body = "\n".join(_html_blocks(blocks))
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n{body}\n"
        f"<script>{_SCRIPT}</script>\n</body>\n</html>\n"
    )


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_blocks(blocks: list[Any]) -> list[str]:
    out = []
    for b in blocks:
        if isinstance(b, _Heading):
            out.append("#" * b.level + " " + b.text)
        elif isinstance(b, _Para):
            out.append(f"*{b.text}*" if b.cls in ("note", "skip", "meta") else b.text)
        elif isinstance(b, _Bullets):
            out.append("\n".join(f"- {i}" for i in b.items))
        elif isinstance(b, _Table):
            align = ["---:" if i in b.numeric else "---" for i in range(len(b.header))]
            lines = ["| " + " | ".join(_md_cell(h) for h in b.header) + " |", "|" + "|".join(align) + "|"]
            lines += ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in b.rows]
            out.append("\n".join(lines))
        elif isinstance(b, _Plot):
            out.append(f"![{b.title}]({b.name}.png)\n\n*{b.caption}*")
        elif isinstance(b, _Details):
            out.append(f"**{b.summary}**")
            out += _md_blocks(b.blocks)
    return out


def _cells_json(cells: list[Cell]) -> list[dict[str, Any]]:
    keep = (
        "thief",
        "attack",
        "protection",
        "defence",
        "variant",
        "seed",
        "budget",
        "queries",
        "status",
        "fidelity",
        "test_accuracy",
    )
    return [{k: to_jsonable(getattr(c, k)) for k in keep} for c in cells]


def write_report(
    records: Sequence[Record], out_dir: str | Path, *, title: str = DEFAULT_TITLE
) -> dict[str, Path]:
    """Write ``report.html`` (self-contained), ``report.md`` (with its plots as PNG files beside
    it) and ``report.json`` (the analysis) into ``out_dir``.

    Returns the paths written: ``html``, ``md``, ``json`` and one per plot drawn (``fidelity``,
    ``pareto``, ``detection``, ``transfer``); a plot whose records are absent is skipped, and
    the report says why.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    a = analyze(records)
    blocks, drawn, skipped = _document(records, a, title)
    paths: dict[str, Path] = {}
    for b in blocks:
        if isinstance(b, _Plot):
            paths[b.name] = out / f"{b.name}.png"
            paths[b.name].write_bytes(b.png)
    paths["html"] = out / "report.html"
    paths["html"].write_text(_html(blocks, title), encoding="utf-8")
    paths["md"] = out / "report.md"
    paths["md"].write_text("\n\n".join(_md_blocks(blocks)) + "\n", encoding="utf-8")
    analysis = to_jsonable(a)
    analysis["cells"] = _cells_json(a.cells)
    payload = {
        "title": title,
        "records": {k: sum(r.kind == k for r in records) for k in ("victim", "defence", "cell", "plan")},
        "figures": drawn,
        "figures_skipped": skipped,
        **analysis,
    }
    paths["json"] = out / "report.json"
    paths["json"].write_text(json.dumps(payload, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    return paths
