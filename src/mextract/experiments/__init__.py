"""Experiments: runs that write records, and reports built from records."""

from mextract.experiments.matrix import (
    FULL_ATTACKS,
    FULL_DEFENCES,
    STAGE3_ATTACKS,
    STAGE3_DEFENCES,
    matrix_table,
    run_matrix,
)
from mextract.experiments.records import Record, load_records
from mextract.experiments.report import markdown_table, results_rows
from mextract.experiments.runner import attack_run, demo, served_api, train_victim_run

__all__ = [
    "FULL_ATTACKS",
    "FULL_DEFENCES",
    "STAGE3_ATTACKS",
    "STAGE3_DEFENCES",
    "Record",
    "attack_run",
    "demo",
    "load_records",
    "markdown_table",
    "matrix_table",
    "results_rows",
    "run_matrix",
    "served_api",
    "train_victim_run",
]
