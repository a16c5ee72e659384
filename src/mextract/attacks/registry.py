"""Attacks by name, so that the command line and experiment configs fail fast on a typo."""

from __future__ import annotations

from dataclasses import fields, is_dataclass, replace
from typing import Any

from mextract._utils import parse_spec
from mextract.attacks.active import ActiveExtraction, ActiveHard, Marich
from mextract.attacks.base import Attack
from mextract.attacks.baselines import HardLabel, KnockoffDistillation
from mextract.attacks.datafree import DataFreeExtraction
from mextract.attacks.datafree_hard import DataFreeHardLabel
from mextract.attacks.direct import EquationSolving, ReLU2Cryptanalysis, ReLUCryptanalysis
from mextract.attacks.hard import HardAugment, HardBoundary, HardMixup
from mextract.attacks.knockoff import KnockoffNets
from mextract.attacks.maze import MAZE
from mextract.attacks.semi import SemiSupervised
from mextract.attacks.soft import ErasingDistillation
from mextract.attacks.spsg import SPSG
from mextract.attacks.tabular import TabularExtraction
from mextract.attacks.tree import TreePathFinding
from mextract.errors import InputError, MextractError, UnknownNameError
from mextract.oracle import APIDescription

ATTACKS: dict[str, type[Attack]] = {
    KnockoffDistillation.name: KnockoffDistillation,
    HardLabel.name: HardLabel,
    HardAugment.name: HardAugment,
    HardBoundary.name: HardBoundary,
    HardMixup.name: HardMixup,
    ErasingDistillation.name: ErasingDistillation,
    SPSG.name: SPSG,
    TabularExtraction.name: TabularExtraction,
    ActiveExtraction.name: ActiveExtraction,
    Marich.name: Marich,
    ActiveHard.name: ActiveHard,
    KnockoffNets.name: KnockoffNets,
    DataFreeExtraction.name: DataFreeExtraction,
    DataFreeHardLabel.name: DataFreeHardLabel,
    MAZE.name: MAZE,
    EquationSolving.name: EquationSolving,
    ReLUCryptanalysis.name: ReLUCryptanalysis,
    ReLU2Cryptanalysis.name: ReLU2Cryptanalysis,
    TreePathFinding.name: TreePathFinding,
}


#: Optional nested settings, built from a dict of options with their own defaults (even where
#: an attack's default is set, e.g. ``active``'s automatic ``semi``: ``semi={}`` turns it on).
NESTED: dict[str, Any] = {"semi": SemiSupervised}


def parse_attack_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"name"`` or ``"name:{json options}"`` → ``(name, options)``."""
    return parse_spec(spec, "attack")


def check_attack_spec(spec: str, api: APIDescription | None = None, budget: int = 1) -> Attack:
    """Parse and build an attack spec (``"kd"``, ``'hard_augment:{"flip": false}'``) and, given
    the API's description, check its parameters against it, so that a bad name, option or
    value fails before any work; returns the attack."""
    name, options = parse_attack_spec(spec)
    try:
        attack = create_attack(name, **options)
        if api is not None:
            attack.check_api(api, None, budget)
        return attack
    except UnknownNameError:
        raise
    except MextractError as exc:
        raise InputError(f"attack spec {spec!r}: {exc}") from exc


def create_attack(name: str, **options: Any) -> Attack:
    """Build a registered attack, e.g. ``create_attack("kd", temperature=3.0)``.

    Nested settings may be given as dicts that override the defaults field by field,
    e.g. ``create_attack("kd", train={"epochs": 20})``; ``semi={}`` turns on
    semi-supervised training with its defaults.
    """
    if name not in ATTACKS:
        raise UnknownNameError("attack", name, sorted(ATTACKS))
    cls = ATTACKS[name]
    defaults: dict[str, Any] = {}
    if is_dataclass(cls):
        defaults = {f.name: f.default for f in fields(cls) if is_dataclass(f.default)}
    for key, value in options.items():
        if not isinstance(value, dict):
            continue
        try:
            if key in NESTED:  # e.g. semi={} turns the option on with its own defaults
                options[key] = NESTED[key](**value)
            elif key in defaults:  # e.g. train={"epochs": 20}: override the default field by field
                options[key] = replace(defaults[key], **value)
        except TypeError as exc:
            raise InputError(f"attack {name!r}: bad {key} options {sorted(value)}: {exc}") from exc
    try:
        return cls(**options)
    except TypeError as exc:
        raise InputError(f"attack {name!r}: bad options {sorted(options)}: {exc}") from exc
