"""Architectures of the model zoo, in plain PyTorch, created by name.

Every constructor takes ``(input_shape, num_classes, **options)`` so that victims and
substitutes are interchangeable. Image models expect ``(N, C, H, W)`` inputs in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from math import prod

import torch
from torch import nn

from mextract.errors import InputError, UnknownNameError


def _image_shape(input_shape: Sequence[int], name: str) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise InputError(f"model {name!r} needs image inputs (C, H, W), got shape {tuple(input_shape)}")
    c, h, w = (int(s) for s in input_shape)
    return c, h, w


def logreg(input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Multinomial logistic regression: one linear layer on the flattened input (logits)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(prod(input_shape), num_classes))


def relu1(input_shape: Sequence[int], num_classes: int, *, hidden: int = 16) -> nn.Module:
    """One-hidden-layer ReLU network O(x) = A1·ReLU(A0·x + B0) + B1 (the direct-extraction target)."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(prod(input_shape), hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
    )


def relu2(input_shape: Sequence[int], num_classes: int, *, hidden1: int = 16, hidden2: int = 8) -> nn.Module:
    """Two-hidden-layer ReLU network (the deeper direct-extraction target)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(prod(input_shape), hidden1),
        nn.ReLU(),
        nn.Linear(hidden1, hidden2),
        nn.ReLU(),
        nn.Linear(hidden2, num_classes),
    )


def mlp(
    input_shape: Sequence[int], num_classes: int, *, hidden: Sequence[int] = (256, 128), dropout: float = 0.1
) -> nn.Module:
    """A multi-layer perceptron with ReLU and dropout."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = prod(input_shape)
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def cnn(input_shape: Sequence[int], num_classes: int, *, width: int = 16) -> nn.Module:
    """A small CNN for MNIST-sized images: two conv blocks (BN, ReLU, max-pool), two dense layers.

    Works on any input of at least 4×4 thanks to an adaptive pool before the dense part.
    """
    c, _, _ = _image_shape(input_shape, "cnn")

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        ]  # fmt: skip

    return nn.Sequential(
        *block(c, width),
        *block(width, 2 * width),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(2 * width * 16, 128),
        nn.ReLU(inplace=True),
        nn.Dropout(0.25),
        nn.Linear(128, num_classes),
    )


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def resnet18(input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """ResNet-18 (He et al. 2016) with the CIFAR stem: a 3×3 stride-1 first conv, no max-pool."""
    c, _, _ = _image_shape(input_shape, "resnet18")
    layers: list[nn.Module] = [
        nn.Conv2d(c, 64, 3, 1, 1, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
    ]
    cin = 64
    for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        layers += [_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


def vgg11(input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """VGG-11 with batch norm (Simonyan & Zisserman 2015, config "A"), CIFAR-style 512→K head."""
    c, h, w = _image_shape(input_shape, "vgg11")
    cfg: list[int | str] = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]
    layers: list[nn.Module] = []
    cin, size = c, min(h, w)
    for v in cfg:
        if v == "M":
            if size >= 2:  # small inputs (e.g. 28×28) skip pools that would empty the map
                layers.append(nn.MaxPool2d(2))
                size //= 2
        else:
            assert isinstance(v, int)
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            cin = v
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "logreg": logreg,
    "relu1": relu1,
    "relu2": relu2,
    "mlp": mlp,
    "cnn": cnn,
    "resnet18": resnet18,
    "vgg11": vgg11,
}


def check_model_name(name: str) -> str:
    if name not in MODELS:
        raise UnknownNameError("model", name, sorted(MODELS))
    return name


def create_model(name: str, input_shape: Sequence[int], num_classes: int, **options: object) -> nn.Module:
    """Build a zoo model by name, e.g. ``create_model("cnn", (1, 28, 28), 10)``."""
    fn = MODELS[check_model_name(name)]
    if num_classes < 2:
        raise InputError(f"num_classes: expected at least 2, got {num_classes}")
    try:
        return fn(tuple(int(s) for s in input_shape), int(num_classes), **options)
    except TypeError as exc:
        raise InputError(f"model {name!r}: bad options {sorted(options)}: {exc}") from exc


def default_model_for(input_shape: Sequence[int]) -> str:
    """The zoo's default for an input shape: ``cnn`` up to 28×28 images, ``vgg11`` above, else ``mlp``."""
    if len(input_shape) == 3:
        return "cnn" if max(input_shape[1:]) <= 28 else "vgg11"
    return "mlp"
