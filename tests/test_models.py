from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mextract.errors import DataError, InputError, UnknownNameError
from mextract.models import (
    MODELS,
    create_model,
    default_model_for,
    load_checkpoint,
    save_checkpoint,
)


@pytest.mark.parametrize(
    ("name", "shape"),
    [("logreg", (30,)), ("relu1", (20,)), ("mlp", (1, 8, 8)), ("cnn", (1, 28, 28)), ("cnn", (1, 8, 8)),
     ("resnet18", (3, 32, 32)), ("vgg11", (3, 32, 32)), ("vgg11", (1, 28, 28))],
)  # fmt: skip
def test_every_model_maps_a_batch_to_logits(name: str, shape: tuple[int, ...]) -> None:
    model = create_model(name, shape, 7).eval()
    assert model(torch.rand(2, *shape)).shape == (2, 7)


def test_zoo_structure_follows_the_papers() -> None:
    resnet = create_model("resnet18", (3, 32, 32), 10)
    first = next(m for m in resnet.modules() if isinstance(m, torch.nn.Conv2d))
    assert first.kernel_size == (3, 3) and first.stride == (1, 1)  # the CIFAR stem
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in resnet.modules())
    vgg = create_model("vgg11", (3, 32, 32), 10)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in vgg.modules()) == 8
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in vgg.modules()) == 8
    relu1 = create_model("relu1", (20,), 3, hidden=8)
    assert [type(m).__name__ for m in relu1] == ["Flatten", "Linear", "ReLU", "Linear"]


def test_bad_model_requests() -> None:
    with pytest.raises(UnknownNameError, match="unknown model 'resnet50'"):
        create_model("resnet50", (3, 32, 32), 10)
    with pytest.raises(InputError, match=r"needs image inputs \(C, H, W\)"):
        create_model("cnn", (30,), 2)
    with pytest.raises(InputError, match="bad options"):
        create_model("mlp", (4,), 3, depth=3)
    assert set(MODELS) >= {"logreg", "relu1", "mlp", "cnn", "resnet18", "vgg11"}
    assert default_model_for((1, 28, 28)) == "cnn" and default_model_for((30,)) == "mlp"


def test_checkpoint_round_trip_without_pickle(tmp_path: Path) -> None:
    model = create_model("cnn", (1, 8, 8), 10).eval()
    meta = {"architecture": "cnn", "input_shape": [1, 8, 8], "num_classes": 10, "seed": 3}
    save_checkpoint(tmp_path / "ck", model, meta)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["model.json", "model.safetensors"]
    loaded, got = load_checkpoint(tmp_path / "ck")
    x = torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(loaded(x), model(x))
    assert got["seed"] == 3
    with pytest.raises(DataError, match="expected a checkpoint folder"):
        load_checkpoint(tmp_path / "missing")
    with pytest.raises(DataError, match="missing"):
        save_checkpoint(tmp_path / "bad", model, {"architecture": "cnn"})
