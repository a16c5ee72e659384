"""Experiments: plans of cells, one runner, records, and reports built from records alone."""

from mextract.experiments.audit import PROTECTIONS, THIEVES, audit_plan, estimate_seconds
from mextract.experiments.backends import PlanResult, run_plan
from mextract.experiments.cells import run_cell
from mextract.experiments.matrix import (
    FULL_ATTACKS,
    FULL_DEFENCES,
    STAGE3_ATTACKS,
    STAGE3_DEFENCES,
    matrix_plan,
    matrix_table,
    run_matrix,
)
from mextract.experiments.measures import MEASURES, Measure, register
from mextract.experiments.plan import CellSpec, Plan, VictimSpec, log_budgets
from mextract.experiments.records import Record, load_records
from mextract.experiments.report import markdown_table, results_rows
from mextract.experiments.runner import attack_run, demo, served_api, train_victim_run

__all__ = [
    "FULL_ATTACKS",
    "FULL_DEFENCES",
    "MEASURES",
    "PROTECTIONS",
    "STAGE3_ATTACKS",
    "STAGE3_DEFENCES",
    "THIEVES",
    "CellSpec",
    "Measure",
    "Plan",
    "PlanResult",
    "Record",
    "VictimSpec",
    "attack_run",
    "audit_plan",
    "demo",
    "estimate_seconds",
    "load_records",
    "log_budgets",
    "markdown_table",
    "matrix_plan",
    "matrix_table",
    "register",
    "results_rows",
    "run_cell",
    "run_matrix",
    "run_plan",
    "served_api",
    "train_victim_run",
]
