"""The dataset container and the victim / attacker-pool / test split."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mextract.errors import DataError, InputError

if TYPE_CHECKING:
    from mextract.data.tabular import TabularSchema


@dataclass(frozen=True)
class ValueRange:
    """The declared range of every input value, kept with a dataset and in a checkpoint's
    metadata, where later layers (an API's public description, attacks that make their own
    queries) read it.

    mextract's convention: images are floats in ``[0, 1]``; tabular features are
    standardised with the owner's statistics and declared unbounded (``None``), since a
    new record may lie outside every value the owner has seen.
    """

    low: float | None = None
    high: float | None = None

    def __post_init__(self) -> None:
        if self.low is not None and self.high is not None and not self.low < self.high:
            raise InputError(f"value range: expected low < high, got [{self.low}, {self.high}]")

    @classmethod
    def for_shape(cls, input_shape: Sequence[int]) -> ValueRange:
        """The convention for an input shape: ``[0, 1]`` for images ``(C, H, W)``, else unbounded."""
        return IMAGE_RANGE if len(input_shape) == 3 else UNBOUNDED

    @classmethod
    def from_json(cls, data: dict[str, Any] | None, input_shape: Sequence[int]) -> ValueRange:
        """Read ``{"low": .., "high": ..}`` (checkpoints older than the field: the convention)."""
        if data is None:
            return cls.for_shape(input_shape)
        return cls(low=data.get("low"), high=data.get("high"))

    def to_json(self) -> dict[str, float | None]:
        return {"low": self.low, "high": self.high}

    def __str__(self) -> str:
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        return f"[{lo}, {hi}]"

    def check(self, x: np.ndarray | torch.Tensor, where: str, *, hint: str = "") -> None:
        """Raise a :class:`DataError` naming ``where``, the range found and the range expected
        when ``x`` holds NaN, infinities or values outside the range (tolerance 1e-6)."""
        arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        if arr.size == 0:
            return
        if not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).sum())
            raise DataError(f"{where}: contains {bad} NaN or infinite value(s)")
        lo, hi = float(arr.min()), float(arr.max())
        below = self.low is not None and lo < self.low - 1e-6
        above = self.high is not None and hi > self.high + 1e-6
        if below or above:
            raise DataError(f"{where}: values lie in [{lo:g}, {hi:g}], expected {self}{hint}")


IMAGE_RANGE = ValueRange(0.0, 1.0)
UNBOUNDED = ValueRange(None, None)


def scale_hint(x: np.ndarray | torch.Tensor) -> str:
    """A suggestion for images that look like 0-255 pixel values stored as floats."""
    hi = float(x.max()) if len(x) else 0.0
    if 1.0 < hi <= 255.0 + 1e-6 and float(x.min()) >= 0:
        return "; these look like 0-255 pixel values: divide by 255 (on the command line: --scale 255)"
    return ""


@dataclass(frozen=True)
class Dataset:
    """Inputs ``x`` (float32, images ``(N, C, H, W)`` in [0, 1] or features ``(N, D)``),
    integer labels ``y`` (``None`` for an unlabeled attacker pool), class names and the
    declared :class:`ValueRange` of the inputs (by default the convention for their shape;
    :func:`~mextract.data.load_file` checks user files against it)."""

    x: torch.Tensor
    y: torch.Tensor | None
    classes: tuple[str, ...]
    name: str = "data"
    value_range: ValueRange | None = None

    def __post_init__(self) -> None:
        if self.value_range is None:
            object.__setattr__(self, "value_range", ValueRange.for_shape(tuple(self.x.shape[1:])))
        if self.x.dim() < 2:
            raise InputError(f"{self.name}: expected inputs (N, ...), got shape {tuple(self.x.shape)}")
        if self.y is not None:
            if self.y.shape != (self.x.shape[0],):
                raise InputError(
                    f"{self.name}: expected {self.x.shape[0]} labels, got shape {tuple(self.y.shape)}"
                )
            if len(self.y) and (int(self.y.min()) < 0 or int(self.y.max()) >= len(self.classes)):
                raise InputError(
                    f"{self.name}: labels must lie in 0..{len(self.classes) - 1}, "
                    f"got {int(self.y.min())}..{int(self.y.max())}"
                )

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.x.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def is_image(self) -> bool:
        return self.x.dim() == 4

    @property
    def declared_range(self) -> ValueRange:
        """The declared value range (never ``None`` after construction)."""
        assert self.value_range is not None  # set in __post_init__
        return self.value_range

    def subset(self, index: torch.Tensor, name: str | None = None) -> Dataset:
        return Dataset(
            self.x[index], None if self.y is None else self.y[index], self.classes, name or self.name,
            self.value_range,
        )  # fmt: skip

    def unlabeled(self) -> Dataset:
        return Dataset(self.x, None, self.classes, self.name, self.value_range)


@dataclass(frozen=True)
class Splits:
    """The three disjoint parts of an experiment, and how they were made."""

    victim_train: Dataset
    pool: Dataset
    test: Dataset
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def schema(self) -> TabularSchema | None:
        """A tabular split's record fields (``meta["schema"]``); ``None`` for images."""
        from mextract.data.tabular import TabularSchema

        data = self.meta.get("schema")
        return None if data is None else TabularSchema.from_json(data)

    def describe(self) -> dict[str, Any]:
        return {
            **self.meta,
            "victim_train": len(self.victim_train),
            "pool": len(self.pool),
            "test": len(self.test),
            "input_shape": list(self.test.input_shape),
            "num_classes": self.test.num_classes,
        }


def sample_keys(x: torch.Tensor, value_range: ValueRange) -> list[bytes]:
    """One content key per sample, to compare data sets by content rather than by name.

    Values are quantised before hashing, so that the same sample read through different
    paths (a uint8 image divided by 255 in float64 or in float32, say) gets the same key:
    values in [0, 1] (images) to 8-bit levels, others (standardised features) to 4 decimals.
    """
    if value_range.low == 0.0 and value_range.high == 1.0:
        q = torch.round(x.double() * 255).to(torch.int16)
    else:
        q = torch.round(x.double() * 1e4).to(torch.int64)
    rows = q.flatten(1).contiguous().numpy()
    return [hashlib.blake2b(r.tobytes(), digest_size=16).digest() for r in rows]


def check_disjoint(pool: Dataset, known: dict[str, Dataset]) -> None:
    """Refuse an attacker pool that shares samples, by content, with any data set in ``known``
    (the victim's training data, the test set): querying them would steal with the owner's
    own data, and score the thief on what it trained on."""
    keys = set(sample_keys(pool.x, pool.declared_range))
    for what, data in known.items():
        if data.input_shape != pool.input_shape:
            continue
        shared = sum(k in keys for k in set(sample_keys(data.x, data.declared_range)))
        if shared:
            raise DataError(
                f"{pool.name}: the attacker pool shares {shared} sample(s) with {what} (compared by "
                "content); an attacker's pool must not hold the victim's training data or the test set"
            )
