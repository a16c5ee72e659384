"""Learning curves of the thieves: fidelity against queries, per data setting and answer type.

    OMP_NUM_THREADS=1 python benchmarks/learning_curves.py --dataset mnist --jobs 2
    OMP_NUM_THREADS=1 python benchmarks/learning_curves.py --dataset digits --seeds 3
    python benchmarks/learning_curves.py --dataset mnist --only in-domain   # a subset of thieves

One command regenerates one dataset's curves. The thieves are cells of the lab's runner
(:mod:`mextract.experiments`): each (thief, budget, seed) is a record in ``--out``, written
the moment it finishes, so an interrupted run resumes where it stopped and a rerun only
redraws. The victim is the dataset's lab victim (``fast`` preset, split seed 0); every
attack runs at its defaults. Thieves (:data:`THIEVES`):

* in-domain pool (the lab's attacker split, disjoint from the victim's data and the test
  set): ``kd`` and ``marich`` with probabilities; ``hard`` (random queries) and
  ``active_hard`` with labels only;
* out-of-domain pool ``font_glyphs`` (letters and symbols rendered from matplotlib's fonts,
  no digit): Knockoff Nets' random policy, probabilities and labels;
* no data: ``dfme`` (probabilities) and ``dfme_hard`` (labels), whose first iteration alone
  costs over 2,000 queries, so they get their own, larger budgets.

Prints one table row per (thief, budget) — mean, min and max fidelity over seeds, queries
and mean wall time — with torch's thread count, and writes the figure
``docs/img/learning-curves-<dataset>.png`` (``--figure`` to change).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from mextract.data import load_splits
from mextract.experiments import run_plan
from mextract.experiments.analysis import cells_of, fidelity_curves
from mextract.experiments.plan import Answers, CellSpec, DataKind, Plan, VictimSpec

OOD_POOL = "font_glyphs"


@dataclass(frozen=True)
class Thief:
    label: str
    attack: str
    data: DataKind
    answers: Answers
    budgets: tuple[int, ...]
    pool: str | None = None


IN_DOMAIN = (100, 250, 500, 1000, 2000)
OUT_OF_DOMAIN = (100, 300, 1000, 3000, 10000)
DATA_FREE = (3000, 10000, 20000)

THIEVES: tuple[Thief, ...] = (
    Thief("in-domain, soft: kd", "kd", "in-domain", "soft", IN_DOMAIN),
    Thief("in-domain, soft: marich", "marich", "in-domain", "soft", IN_DOMAIN),
    Thief("in-domain, label: hard (random)", "hard", "in-domain", "label", IN_DOMAIN),
    Thief("in-domain, label: active_hard", "active_hard", "in-domain", "label", IN_DOMAIN),
    Thief("out-of-domain, soft: knockoff", "knockoff", "out-of-domain", "soft", OUT_OF_DOMAIN, OOD_POOL),
    Thief("out-of-domain, label: knockoff", "knockoff", "out-of-domain", "label", OUT_OF_DOMAIN, OOD_POOL),
    Thief("data-free, soft: dfme", "dfme", "none", "soft", DATA_FREE),
    Thief("data-free, label: dfme_hard", "dfme_hard", "none", "label", DATA_FREE),
)

COLOURS = {"in-domain": "tab:blue", "out-of-domain": "tab:orange", "none": "tab:green"}


def curves_plan(dataset: str, seeds: int, only: list[str] | None) -> Plan:
    """The cells; an in-domain thief's budgets stop at the pool's size (it queries each point once)."""
    victim = VictimSpec(dataset=dataset)
    pool = len(load_splits(dataset, seed=victim.split_seed).pool)
    cells = []
    for t in THIEVES:
        if only and not any(o in t.label for o in only):
            continue
        budgets = sorted({min(b, pool) for b in t.budgets}) if t.data == "in-domain" else t.budgets
        for b in budgets:
            for s in range(seeds):
                cells.append(CellSpec(kind="cell", victim=victim, attack=t.attack, thief=t.label, data=t.data,
                                      pool=t.pool, answers=t.answers, budget=b, seed=s))  # fmt: skip
    return Plan(f"curves-{dataset}", cells)


def draw(curves: list, thieves: dict[str, Thief], dataset: str, path: Path) -> None:
    fig = Figure(figsize=(12, 4.8))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    styles = ["-", "--", "-.", ":"]
    for ax, answers in zip(axes, ("soft", "label"), strict=True):
        used: dict[str, int] = {}
        for c in curves:
            t = thieves.get(c.thief)
            if t is None or t.answers != answers or not c.points:
                continue
            ls = styles[used.setdefault(t.data, 0) % len(styles)]
            used[t.data] += 1
            xs = [p.queries for p in c.points]
            col = COLOURS[t.data]
            ax.fill_between(xs, [p.fidelity_min for p in c.points], [p.fidelity_max for p in c.points],
                            color=col, alpha=0.15)  # fmt: skip
            ax.plot(xs, [p.fidelity_mean for p in c.points], ls, marker="o", color=col, label=t.label)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.set_ylim(0, 1.005)
        ax.set_title(f"{dataset}: {'probabilities' if answers == 'soft' else 'top-1 labels only'}")
        ax.set_xlabel("queries to the API (log scale)")
        ax.grid(True, which="both", alpha=0.25)
        if used:
            ax.legend(loc="lower right", fontsize=8)
    axes[0].set_ylabel("fidelity (agreement with the victim, test set)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist", choices=["mnist", "digits"])
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads per cell")
    p.add_argument("--only", nargs="*", default=None, help="thieves whose label contains one of these")
    p.add_argument("--out", type=Path, default=None, help="records (default runs/curves-<dataset>)")
    p.add_argument("--figure", type=Path, default=None)
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds: start no cell likely to end after it (0.001: redraw only)")  # fmt: skip
    args = p.parse_args()
    out = args.out or Path(f"runs/curves-{args.dataset}")
    figure = args.figure or Path(f"docs/img/learning-curves-{args.dataset}.png")
    plan = curves_plan(args.dataset, args.seeds, args.only)
    print(f"{len(plan.cells)} cells, {args.jobs} job(s), {args.threads} torch thread(s) each", flush=True)
    t0 = time.perf_counter()
    result = run_plan(plan, out, jobs=args.jobs, threads=args.threads, time_limit=args.time_limit)
    print(f"wall time {time.perf_counter() - t0:.0f} s; cells not started: {len(result.left)}", flush=True)
    thieves = {t.label: t for t in THIEVES}
    curves = [c for c in fidelity_curves(result.records) if c.protection == "none"]
    walls: dict[tuple[str, int], list[float]] = {}
    for c in cells_of(result.records):
        if isinstance(w := c.metrics.get("wall_time_s"), int | float):
            walls.setdefault((c.thief, c.budget), []).append(float(w))
    print(f"\n{args.dataset}; torch threads per cell {args.threads}; fidelity % over seeds")
    print("| thief | budget | queries | fidelity mean (min–max) | seeds | time s |")
    print("|---|---:|---:|---|---:|---:|")
    for c in curves:
        for pt in c.points:
            w = walls.get((c.thief, pt.budget), [])
            print(f"| {c.thief} | {pt.budget:,} | {pt.queries:,.0f} | {100 * pt.fidelity_mean:.2f} "
                  f"({100 * pt.fidelity_min:.2f}–{100 * pt.fidelity_max:.2f}) | {pt.n_seeds} | "
                  f"{statistics.fmean(w) if w else float('nan'):.0f} |")  # fmt: skip
    draw(curves, thieves, args.dataset, figure)
    print(f"figure: {figure}")


if __name__ == "__main__":
    main()
