"""The dataset container and the victim / attacker-pool / test split."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from mextract.errors import InputError


@dataclass(frozen=True)
class Dataset:
    """Inputs ``x`` (float32, images ``(N, C, H, W)`` in [0, 1] or features ``(N, D)``),
    integer labels ``y`` (``None`` for an unlabeled attacker pool) and class names."""

    x: torch.Tensor
    y: torch.Tensor | None
    classes: tuple[str, ...]
    name: str = "data"

    def __post_init__(self) -> None:
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

    def subset(self, index: torch.Tensor, name: str | None = None) -> Dataset:
        return Dataset(
            self.x[index], None if self.y is None else self.y[index], self.classes, name or self.name
        )

    def unlabeled(self) -> Dataset:
        return Dataset(self.x, None, self.classes, self.name)


@dataclass(frozen=True)
class Splits:
    """The three disjoint parts of an experiment, and how they were made."""

    victim_train: Dataset
    pool: Dataset
    test: Dataset
    meta: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {
            **self.meta,
            "victim_train": len(self.victim_train),
            "pool": len(self.pool),
            "test": len(self.test),
            "input_shape": list(self.test.input_shape),
            "num_classes": self.test.num_classes,
        }
