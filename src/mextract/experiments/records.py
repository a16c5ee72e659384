"""Result records: every run writes JSON records, and every report is built from them alone."""

from __future__ import annotations

import json
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, Field

from mextract.errors import DataError


def versions() -> dict[str, str]:
    from mextract import __version__

    return {
        "mextract": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cuda": torch.version.cuda or "none",
        "torch_threads": str(torch.get_num_threads()),
    }


class Record(BaseModel):
    """One finished unit of work (a victim, an attack, ...) and how to reproduce it."""

    kind: str
    name: str
    seed: int
    config: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    history: list[dict[str, Any]] = Field(default_factory=list)
    #: the digest of the cell that wrote it (:meth:`~mextract.experiments.plan.CellSpec.key`);
    #: empty for records of single runs (``train-victim``, ``attack``, ``demo``)
    key: str = ""
    versions: dict[str, str] = Field(default_factory=versions)
    created: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="microseconds"))

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(p.suffix + ".tmp")
        tmp.write_text(self.model_dump_json(indent=2))
        tmp.replace(p)  # never leave a half-written record behind
        return p

    @classmethod
    def load(cls, path: str | Path) -> Record:
        p = Path(path)
        try:
            return cls.model_validate_json(p.read_text())
        except FileNotFoundError:
            raise DataError(f"{p}: no such record") from None
        except ValueError as exc:
            raise DataError(f"{p}: not a mextract record ({exc})") from exc


def load_records(directory: str | Path) -> list[Record]:
    """Every record (``*.json`` written by :meth:`Record.save`) in a run folder and its
    ``records/`` (a plan's cells), oldest first."""
    d = Path(directory)
    if not d.is_dir():
        raise DataError(f"{d}: no such run folder")
    out = []
    for p in sorted([*d.glob("*.json"), *d.glob("records/*.json")]):
        try:
            out.append(Record.load(p))
        except DataError:
            continue  # other JSON files (e.g. configs) may live beside records
    return sorted(out, key=lambda r: r.created)


def same_config(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Compare configurations as JSON would store them (tuples and lists alike)."""
    return json.loads(json.dumps(a, default=str)) == json.loads(json.dumps(b, default=str))
