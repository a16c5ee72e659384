"""What a cell measures of a stolen copy, beyond fidelity: one registry, one entry per measure.

Each :class:`Measure` takes the finished cell (the substitute, the API stack the thief
faced, the victim and its data) and returns metrics for the record, or ``None`` where it
does not apply (DAWN's verification without DAWN in the stack). A measure that needs
something of the victim made once (a reference model, fingerprints) builds it in
``prepare``, during the victim's cell, and keeps it in the victim's folder; every cell
then loads it. Adding an ownership check or a metric is one :func:`register` call.

Verification is a p-value throughout (``<name>_p``; verified when below
:data:`VERIFIED_P`), so a report can treat every mark alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mextract.errors import UnknownNameError
from mextract.experiments.analysis import P_VERIFIED
from mextract.oracle import Oracle
from mextract.oracle.base import oracle_layers

if TYPE_CHECKING:
    from mextract.data import Splits
    from mextract.defences.detection import Prada
    from mextract.experiments.plan import CellSpec

#: p-value below which a mark counts as verified (DAWN's and the cosine watermark's α)
VERIFIED_P = P_VERIFIED


@dataclass
class VictimContext:
    """A victim as the cells of a run see it (loaded once per process)."""

    folder: Path
    model: nn.Module | None  # None for a prediction API: only its answers are known
    meta: dict[str, Any]
    splits: Splits
    digest: str
    device: str | None
    seed: int
    #: the victim as the owner's measurements query it: the model, or the labels of the API
    judge: nn.Module | Callable[[torch.Tensor], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if self.judge is None:
            self.judge = self.model

    def artifact(self, name: str) -> Path:
        return self.folder.parent / f"{self.folder.name}-{name}"


@dataclass
class CellContext:
    """A finished thief's cell: what the measures may look at."""

    spec: CellSpec
    victim: VictimContext
    api: Oracle
    substitute: nn.Module
    prada: Prada | None


@dataclass(frozen=True)
class Measure:
    name: str
    description: str
    measure: Callable[[CellContext], dict[str, Any] | None]
    prepare: Callable[[VictimContext], dict[str, Any]] | None = None


MEASURES: dict[str, Measure] = {}


def register(measure: Measure) -> Measure:
    MEASURES[measure.name] = measure
    return measure


def check_measures(names: tuple[str, ...] | list[str]) -> None:
    for n in names:
        if n not in MEASURES:
            raise UnknownNameError("measure", n, sorted(MEASURES))


def find_layer(oracle: Oracle, kind: type) -> Any:
    """The first layer of type ``kind`` in a defence stack, or ``None``."""
    return next((layer for layer in oracle_layers(oracle) if isinstance(layer, kind)), None)


# --------------------------------------------------------------------------- ownership marks


def _trigger(ctx: CellContext) -> dict[str, Any] | None:
    from mextract.defences.ownership import TriggerWatermark, binomial_verification

    target = ctx.spec.victim.trigger_target
    test = ctx.victim.splits.test
    if target is None or test.y is None:
        return None
    mark = TriggerWatermark(target=target)
    rate = mark.wsr(ctx.substitute, test.x, test.y)
    total = int((test.y != target).sum())
    # chance: a model that ignores the trigger calls a stamped image the target about 1/K of the time
    verdict = binomial_verification(round(rate * total), total, 1 / test.num_classes, VERIFIED_P)
    return {"trigger_wsr": rate, "trigger_p": verdict.p_value}


def _dawn(ctx: CellContext) -> dict[str, Any] | None:
    from mextract.defences.ownership import DawnWatermark

    dawn = find_layer(ctx.api, DawnWatermark)
    if dawn is None:
        return None
    v = dawn.verify(ctx.substitute)
    return {"dawn_marks": v.total, "dawn_wsr": v.wsr, "dawn_p": v.p_value}


def _cosine(ctx: CellContext) -> dict[str, Any] | None:
    from mextract.defences.cosine import CosineWatermark

    cosine = find_layer(ctx.api, CosineWatermark)
    if cosine is None or ctx.victim.model is None:
        return None
    # against the unmarked victim: on the thief's logged queries, and on the owner's own inputs
    check = cosine.verify(ctx.substitute, baseline=ctx.victim.model)
    splits = ctx.victim.splits
    owner = cosine.verify(
        ctx.substitute, torch.cat([splits.victim_train.x, splits.test.x]), baseline=ctx.victim.model
    )
    return {
        "cosine_stat": check.statistic,
        "cosine_z": check.z,
        "cosine_p": check.p_value,
        "cosine_owner_z": owner.z,
        "cosine_owner_p": owner.p_value,
    }


# --------------------------------------------------------------------------- fingerprints


@dataclass(frozen=True)
class FingerprintSettings:
    """Lukas et al.'s fingerprints at the setting that separated distilled thieves best in
    ``benchmarks/fingerprint.py`` (soft surrogates, a small ball), with fewer models to fit
    an audit: 4 surrogates and 4 references make them, 2 more references set the threshold."""

    surrogates: int = 4
    references: int = 4
    calibration: int = 2
    n: int = 50
    seeds: int = 200
    eps: float = 0.1
    pgd_steps: int = 20


FINGERPRINTS = FingerprintSettings()


def _prepare_fingerprints(v: VictimContext) -> dict[str, Any]:
    from mextract.defences.ownership import (
        Fingerprints,
        generate_fingerprints,
        train_references,
        train_surrogates,
    )

    path = v.artifact("fingerprints.pt")
    if v.model is None:
        return {}  # a prediction API: the owner makes fingerprints from the model itself
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        return {"fingerprint_threshold": float(saved["threshold"]), "fingerprints": len(saved["x"])}
    cfg, owner, arch = FINGERPRINTS, v.splits.victim_train, v.meta["architecture"]
    surrogates = train_surrogates(
        v.model, owner.x, cfg.surrogates, seed=v.seed + 100, model=arch, labels="soft"
    )
    references = train_references(owner, cfg.references, seed=v.seed + 200, model=arch, recipe="fast")
    calibration = train_references(owner, cfg.calibration, seed=v.seed + 300, model=arch, recipe="fast")
    seeds = owner.x[torch.randperm(len(owner), generator=torch.Generator().manual_seed(v.seed))[: cfg.seeds]]
    fp: Fingerprints = generate_fingerprints(
        v.model, surrogates, references, seeds, n=cfg.n, eps=cfg.eps, pgd_steps=cfg.pgd_steps
    )
    threshold = max(fp.retention(m) for m in calibration)
    torch.save(
        {
            "x": fp.x,
            "labels": fp.labels,
            "scores": fp.scores,
            "origin": fp.origin,
            "threshold": torch.tensor(threshold),
        },
        path,
    )
    return {"fingerprint_threshold": threshold, "fingerprints": len(fp)}


def _fingerprints(ctx: CellContext) -> dict[str, Any] | None:
    from mextract.defences.ownership import Fingerprints, binomial_verification

    path = ctx.victim.artifact("fingerprints.pt")
    if not path.is_file():  # a prediction API: fingerprints are made from the model
        return None
    saved = torch.load(path, weights_only=True)
    fp = Fingerprints(saved["x"], saved["labels"], saved["scores"], saved["origin"])
    threshold = float(saved["threshold"])
    retention = fp.retention(ctx.substitute)
    # an independent model keeps at most the calibration references' share, by the threshold's definition
    verdict = binomial_verification(
        round(retention * len(fp)), len(fp), min(max(threshold, 1e-6), 1 - 1e-6), VERIFIED_P
    )
    return {
        "fingerprint_retention": retention,
        "fingerprint_threshold": threshold,
        "fingerprint_p": verdict.p_value,
    }


# --------------------------------------------------------------------------- model deception

#: test images the transfer attacks are run on per cell (PGD costs ``steps`` forward-backward passes each)
TRANSFER_SAMPLES = 300


def _transfer_data(v: VictimContext) -> tuple[torch.Tensor, torch.Tensor]:
    test = v.splits.test
    assert test.y is not None
    idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(v.seed))[:TRANSFER_SAMPLES]
    return test.x[idx], test.y[idx]


def _transfer_rates(source: nn.Module, v: VictimContext, seed: int) -> dict[str, Any]:
    """Targeted L∞ PGD at the papers' radius (:func:`mextract.deception.default_config`),
    crafted on ``source``, tried on the victim.

    Targeted, as Juuti et al. (PRADA, EuroS&P 2019) measure the transferability of examples
    crafted on stolen copies: untargeted examples at the papers' radius transfer from almost
    any model of the task (measured on mnist: 99.0–99.4% from an independent reference, 99–100%
    from every substitute), so they cannot tell copies apart. ``mextract deceive`` runs the
    other settings.
    """
    from dataclasses import replace

    from mextract.deception import default_config, transfer_rate

    x, y = _transfer_data(v)
    judge = v.judge
    assert judge is not None
    rng = v.splits.test.declared_range
    config = replace(default_config(v.splits.test.input_shape, rng), targeted=True)
    gen = torch.Generator().manual_seed(seed)
    t = transfer_rate(source, judge, x, y, config, value_range=rng, generator=gen)
    return {"rate": t.rate, "white_box": t.white_box_rate, "config": config.summary()}


def _prepare_transfer(v: VictimContext) -> dict[str, Any]:
    """The baseline of model deception: an independent model of the victim's architecture,
    trained with the victim's recipe on the attacker's pool with its true labels (what a
    thief with labelled data of the task has without stealing), and its transfer rates."""
    from mextract._utils import seeded
    from mextract.models import create_model, read_meta, save_checkpoint
    from mextract.training import train_victim, victim_recipe

    folder = v.artifact("reference")
    keys = ("transfer_rate_reference", "transfer_config")
    if (folder / "model.json").is_file():
        meta = read_meta(folder)
        return {k: meta[k] for k in keys}
    pool, arch = v.splits.pool, v.meta["architecture"]
    with seeded(v.seed + 500):
        ref = create_model(arch, pool.input_shape, pool.num_classes)
    train_victim(ref, pool, victim_recipe(v.meta.get("preset", "fast")), seed=v.seed + 500, device=v.device)
    rates = _transfer_rates(ref.eval(), v, v.seed)
    metrics = dict(zip(keys, (rates["rate"], rates["config"]), strict=True))
    meta = {
        "architecture": arch,
        "input_shape": list(pool.input_shape),
        "num_classes": pool.num_classes,
        **metrics,
    }
    save_checkpoint(folder, ref, meta)
    return metrics


def _transfer(ctx: CellContext) -> dict[str, Any] | None:
    from mextract.models import read_meta

    v = ctx.victim
    if v.splits.test.y is None:
        return None
    rates = _transfer_rates(ctx.substitute, v, ctx.spec.seed)
    ref = read_meta(v.artifact("reference"))
    return {
        "transfer_rate": rates["rate"],
        "transfer_white_box": rates["white_box"],
        "transfer_rate_reference": ref["transfer_rate_reference"],
        "transfer_config": rates["config"],
    }


register(Measure("trigger", "the trigger watermark's success rate on the copy (a trigger victim)", _trigger))
register(Measure("dawn", "DAWN's verification of the copy (a dawn defence)", _dawn))
register(Measure("cosine", "the cosine watermark's verification of the copy (a cosine defence)", _cosine))
register(
    Measure(
        "fingerprints",
        "conferrable-example fingerprints retained by the copy",
        _fingerprints,
        _prepare_fingerprints,
    )
)
register(
    Measure(
        "transfer",
        "PGD examples crafted on the copy that fool the victim, and the baseline's rate",
        _transfer,
        _prepare_transfer,
    )
)
