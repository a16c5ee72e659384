"""Datasets, attacker pools and seeded splits."""

from mextract.data.base import Dataset, Splits
from mextract.data.registry import DATASETS, load_file, load_splits

__all__ = ["DATASETS", "Dataset", "Splits", "load_file", "load_splits"]
