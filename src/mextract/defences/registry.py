"""Defences by name, so that the command line and the attack × defence matrix can build
them from a short spec: ``name`` or ``name:{json options}`` (e.g. ``honey:{"threshold": 1.5}``).

Some defences need the owner's side: prediction poisoning a surrogate model (the paper:
a randomly initialised network of a plausible attacker architecture), adaptive
misinformation a misinformation model trained on the owner's data. :class:`Owner`
carries what the owner has — the victim, its training data — and builds those.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mextract._utils import parse_spec, seeded
from mextract.data.base import Dataset
from mextract.defences.perturb import (
    AdaptiveMisinformation,
    HoneyLabels,
    LabelOnly,
    NoisyProbabilities,
    PredictionPoisoning,
    ReverseSigmoid,
    Rounding,
    TopK,
    misinformation_loss,
)
from mextract.errors import InputError, UnknownNameError
from mextract.oracle import AnswerMode, Oracle
from mextract.training import TrainConfig, fit


@dataclass
class Owner:
    """What the model owner has when deploying a defence."""

    victim: nn.Module
    train: Dataset
    architecture: str
    seed: int = 0
    device: str | None = None
    #: ``False`` for a stand-in owner (:meth:`stand_in`): models the defences need are built
    #: but never trained, so that a defence spec can be checked in milliseconds.
    fit_models: bool = True
    _misinformation: dict[int, nn.Module] = field(default_factory=dict, repr=False)

    @classmethod
    def stand_in(
        cls, input_shape: tuple[int, ...], num_classes: int, architecture: str, seed: int = 0
    ) -> Owner:
        """An owner with an untrained victim and a few random inputs of the right shape, to
        check defence specs (names, options, values) before any real work is done."""
        from mextract.models import create_model

        gen = torch.Generator().manual_seed(seed)
        n = 2 * num_classes
        x = torch.rand(n, *input_shape, generator=gen)
        y = torch.arange(n) % num_classes
        train = Dataset(x, y, tuple(str(i) for i in range(num_classes)), "stand-in")
        with seeded(seed):
            victim = create_model(architecture, input_shape, num_classes).eval()
        return cls(victim=victim, train=train, architecture=architecture, seed=seed, fit_models=False)

    def surrogate(self) -> nn.Module:
        from mextract.models import create_model

        with seeded(self.seed + 7):
            return create_model(self.architecture, self.train.input_shape, self.train.num_classes).eval()

    def misinformation_model(self, epochs: int = 10) -> nn.Module:
        """A model of the victim's architecture trained to avoid the correct class (trained
        once per ``epochs`` and reused, since every defended API of a run shares it)."""
        if epochs in self._misinformation:
            return self._misinformation[epochs]
        from mextract.models import create_model

        if self.train.y is None:
            raise InputError("adaptive misinformation needs the owner's labelled training data")
        with seeded(self.seed + 11):
            model = create_model(self.architecture, self.train.input_shape, self.train.num_classes)
        config = TrainConfig(epochs=epochs, batch_size=64, lr=0.05)
        if not self.fit_models:
            return model.eval()
        model = fit(
            model, self.train.x, self.train.y, misinformation_loss, config, seed=self.seed, device="cpu"
        )
        self._misinformation[epochs] = model
        return model


#: a defence's builder: the oracle to wrap, the owner's side (``None`` where the caller has
#: none: defences that need it say so), the spec's options
Builder = Callable[[Oracle, "Owner | None", dict[str, Any]], Oracle]


def _simple(cls: Callable[..., Oracle]) -> Builder:
    return lambda inner, owner, opts: cls(inner, **opts)


def _needs(owner: Owner | None, name: str, what: str) -> Owner:
    if owner is None:
        raise InputError(f"defence {name!r} needs the owner's side ({what}): give an Owner")
    return owner


def _mad(inner: Oracle, owner: Owner | None, opts: dict[str, Any]) -> Oracle:
    surrogate = _needs(owner, "mad", "the victim's architecture, for the surrogate").surrogate()
    return PredictionPoisoning(inner, surrogate=surrogate, **opts)


def _owner_key(opts: dict[str, Any], mark: str, owner: Owner | None) -> bytes | int:
    """A watermark's key from the spec's options (a JSON string or int), else per mark and seed."""
    key = opts.pop("key", f"mextract-{mark}-{0 if owner is None else owner.seed}")
    return key.encode() if isinstance(key, str) else key


def _dawn(inner: Oracle, owner: Owner | None, opts: dict[str, Any]) -> Oracle:
    """DAWN ties its watermark decisions to the client the stack serves (the paper's DAWN; the
    served API passes each account's name; a local oracle serves one client).
    ``dawn:{"per_client": false}`` marks every client's queries with one key alike (the lab's
    earlier behaviour)."""
    from mextract.defences.ownership import DawnWatermark

    client = opts.pop(_CLIENT, None)
    per_client = opts.pop("per_client", True)
    if not isinstance(per_client, bool):
        raise InputError(f"dawn: per_client: expected true or false, got {per_client!r}")
    if per_client and "client" not in opts:
        opts["client"] = client
    return DawnWatermark(inner, _owner_key(opts, "dawn", owner), **opts)


#: defences whose decisions may be tied to the client (DAWN's per-client watermark keys): the
#: stack's client reaches their builders under this option name
PER_CLIENT = frozenset({"dawn"})
_CLIENT = "__client__"


def _cosine(inner: Oracle, owner: Owner | None, opts: dict[str, Any]) -> Oracle:
    from mextract.defences.cosine import CosineWatermark

    reference = _needs(owner, "cosine", "its own inputs, to standardise on").train.x
    return CosineWatermark(inner, _owner_key(opts, "cosine", owner), reference=reference, **opts)


def _misinformation(inner: Oracle, owner: Owner | None, opts: dict[str, Any]) -> Oracle:
    epochs = opts.pop("epochs", 10)
    model = _needs(owner, "adaptive_misinformation", "labelled training data").misinformation_model(epochs)
    return AdaptiveMisinformation(inner, misinformation=model, **opts)


DEFENCES: dict[str, Builder] = {
    "none": lambda inner, owner, opts: inner,
    "honey": _simple(HoneyLabels),
    "topk": _simple(TopK),
    "rounding": _simple(Rounding),
    "label_only": _simple(LabelOnly),
    "reverse_sigmoid": _simple(ReverseSigmoid),
    "dp_noise": _simple(NoisyProbabilities),
    "mad": _mad,
    "adaptive_misinformation": _misinformation,
    "dawn": _dawn,
    "cosine": _cosine,
}


def parse_defence_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"name"`` or ``"name:{json}"`` → ``(name, options)``."""
    return parse_spec(spec, "defence")


def _split_stack(spec: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(spec):
        depth += ch == "{"
        depth -= ch == "}"
        if ch == "+" and depth == 0:
            parts.append(spec[start:i])
            start = i + 1
    return [*parts, spec[start:]]


def build_defence(
    spec: str, inner: Oracle, owner: Owner | None = None, *, client: str | int | None = None
) -> Oracle:
    """Wrap ``inner`` in the defence named by ``spec``; stack several with ``+``
    (``"reverse_sigmoid+topk:{\\"k\\": 3}"``, applied left to right). ``owner`` is needed
    by defences that use the owner's models or data (mad, adaptive_misinformation, cosine).
    ``client``: the client the stack serves, for the defences whose decisions may be per client
    (:data:`PER_CLIENT`: ``dawn:{"per_client": true}``)."""
    oracle = inner
    if inner.mode is AnswerMode.LEAF and spec.strip() not in ("", "none"):
        raise InputError(
            f"defence {spec!r}: the API answers in mode 'leaf' (a tree node's distribution and identifier); "
            "the output defences work on class scores"
        )
    for part in _split_stack(spec):
        name, options = parse_defence_spec(part.strip())
        if name not in DEFENCES:
            raise UnknownNameError("defence", name, sorted(DEFENCES))
        if client is not None and name in PER_CLIENT:
            options = {**options, _CLIENT: client}
        try:
            oracle = DEFENCES[name](oracle, owner, dict(options))
        except TypeError as exc:
            shown = sorted(k for k in options if k != _CLIENT)
            raise InputError(f"defence {name!r}: bad options {shown}: {exc}") from exc
    return oracle


def check_defence_spec(
    spec: str, input_shape: tuple[int, ...], num_classes: int, architecture: str, seed: int = 0
) -> None:
    """Build the defence stack of ``spec`` around a stand-in API of the given shape: unknown
    names, bad options and bad values fail here, before a victim is trained or a query sent."""
    from mextract.oracle import VictimOracle

    owner = Owner.stand_in(input_shape, num_classes, architecture, seed)
    base = VictimOracle(
        owner.victim, input_shape=input_shape, num_classes=num_classes, mode="logits", device="cpu"
    )
    build_defence(spec, base, owner)


@torch.no_grad()
def honest_accuracy(oracle: Oracle, test: Dataset) -> float:
    """Utility for honest users: accuracy of the (defended) answers' top-1 on the test set."""
    if test.y is None:
        raise InputError(f"{test.name}: utility needs labels")
    return float((oracle.query(test.x).argmax(1) == test.y).float().mean())
