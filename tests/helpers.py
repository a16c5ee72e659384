"""Shared test helpers (imported by the test modules; pytest puts this folder on sys.path)."""

from __future__ import annotations

import torch


class Counting:
    """Wraps a torch victim as a numpy callable that counts (and keeps) every sample it evaluates,
    so that tests can compare the victim's own count with the oracle ledger's."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.evaluated, self.inputs = model.eval(), 0, []

    def __call__(self, x):  # type: ignore[no-untyped-def]
        self.evaluated += len(x)
        self.inputs.append(torch.as_tensor(x).clone())
        with torch.no_grad():
            return self.model(torch.as_tensor(x)).numpy()

    @property
    def queried(self) -> torch.Tensor:
        return torch.cat(self.inputs)
