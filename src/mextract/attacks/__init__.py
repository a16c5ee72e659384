"""Attacks: each takes an oracle, a pool and a budget and returns an :class:`AttackResult`."""

from mextract.attacks.base import Attack, AttackContext, AttackResult, HistoryPoint
from mextract.attacks.baselines import HardLabel, KnockoffDistillation
from mextract.attacks.registry import ATTACKS, create_attack

__all__ = [
    "ATTACKS",
    "Attack",
    "AttackContext",
    "AttackResult",
    "HardLabel",
    "HistoryPoint",
    "KnockoffDistillation",
    "create_attack",
]
