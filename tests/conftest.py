from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from mextract.data import load_splits
from mextract.models import create_model
from mextract.training import TrainConfig, VictimRecipe, train_victim


@pytest.fixture(autouse=True)
def _keep_torch_threads() -> Iterator[None]:
    """The command line sets torch's threads for its process; in-process CLI tests must not
    leave the rest of the suite on one thread."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEXTRACT_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.delenv("MEXTRACT_CIFAR10", raising=False)


@pytest.fixture(scope="session")
def digits_splits():  # type: ignore[no-untyped-def]
    return load_splits("digits", seed=0)


@pytest.fixture(scope="session")
def digits_victim(digits_splits) -> nn.Module:  # type: ignore[no-untyped-def]
    """A small CNN victim on scikit-learn's 8×8 digits (a few seconds on a CPU)."""
    torch.manual_seed(0)
    model = create_model("cnn", (1, 8, 8), 10)
    recipe = VictimRecipe(train=TrainConfig(epochs=12, batch_size=64, lr=0.05), augment="none")
    return train_victim(model, digits_splits.victim_train, recipe, seed=0, device="cpu")


class CountingVictim:
    """A callable victim (numpy in, logits out) that records every sample it evaluates."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight.double()
        self.evaluated = 0
        self.calls = 0

    def __call__(self, x):  # type: ignore[no-untyped-def]
        self.calls += 1
        self.evaluated += len(x)
        return (torch.as_tensor(x).double().reshape(len(x), -1) @ self.weight).numpy()


@pytest.fixture
def counting_victim() -> CountingVictim:
    g = torch.Generator().manual_seed(0)
    return CountingVictim(torch.randn(4, 3, generator=g))
