"""Datasets, attacker pools and seeded splits."""

from mextract.data.base import IMAGE_RANGE, UNBOUNDED, Dataset, Splits, ValueRange, check_disjoint
from mextract.data.registry import DATASETS, DatasetInfo, dataset_info, load_file, load_splits

__all__ = [
    "DATASETS",
    "IMAGE_RANGE",
    "UNBOUNDED",
    "Dataset",
    "DatasetInfo",
    "Splits",
    "ValueRange",
    "check_disjoint",
    "dataset_info",
    "load_file",
    "load_splits",
]
