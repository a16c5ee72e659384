"""Tables built from records alone (MISSION.md's shape: strategy, queries, accuracy, fidelity)."""

from __future__ import annotations

from collections.abc import Sequence

from mextract.experiments.records import Record

COLUMNS = ("strategy", "answers", "budget", "queries", "test acc", "fidelity", "time")


def _pct(v: object) -> str:
    return "–" if not isinstance(v, float) else f"{100 * v:.2f}%"


def _count(v: object) -> str:
    return f"{v:,}" if isinstance(v, int) else "–"


def results_rows(records: Sequence[Record]) -> tuple[list[str], list[list[str]]]:
    """Header lines (the victim; the threads behind the timings) and one row per attack record."""
    header = []
    for r in records:
        if r.kind == "victim":
            header.append(
                f"victim: {r.name} on {r.config.get('dataset')} "
                f"({r.config.get('split', {}).get('victim_train', '?')} training examples), "
                f"test accuracy {_pct(r.metrics.get('test_accuracy'))}"
            )
    rows = [
        [
            r.name,
            str(r.config.get("mode", "")),
            _count(r.metrics.get("budget", r.config.get("budget"))),
            _count(r.metrics.get("queries")),
            _pct(r.metrics.get("test_accuracy")),
            _pct(r.metrics.get("fidelity")),
            f"{r.metrics.get('wall_time_s', float('nan')):.1f} s",
        ]
        for r in records
        if r.kind == "attack"
    ]
    threads = sorted({r.versions["torch_threads"] for r in records if r.kind == "attack" and
                      "torch_threads" in r.versions})  # fmt: skip
    if threads:
        header.append(f"times with {' or '.join(threads)} torch CPU thread(s)")
    return header, rows


def markdown_table(records: Sequence[Record]) -> str:
    header, rows = results_rows(records)
    lines = [*header, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
