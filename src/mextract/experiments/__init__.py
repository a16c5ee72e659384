"""Experiments: runs that write records, and reports built from records."""

from mextract.experiments.records import Record, load_records
from mextract.experiments.report import markdown_table, results_rows
from mextract.experiments.runner import attack_run, demo, train_victim_run

__all__ = [
    "Record",
    "attack_run",
    "demo",
    "load_records",
    "markdown_table",
    "results_rows",
    "train_victim_run",
]
