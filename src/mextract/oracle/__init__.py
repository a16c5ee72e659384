"""The oracle: the black box, its answer modes and its query ledger.

Nothing else in mextract calls a victim. Attacks receive an :class:`Oracle`; defences
are :class:`OracleWrapper` subclasses; a remote API is one more :class:`Oracle`.
"""

from mextract.oracle.base import Oracle, OracleWrapper
from mextract.oracle.ledger import Ledger
from mextract.oracle.local import VictimOracle, stand_in_oracle
from mextract.oracle.modes import AnswerMode, answers_to_probs, restrict

__all__ = [
    "AnswerMode",
    "Ledger",
    "Oracle",
    "OracleWrapper",
    "VictimOracle",
    "answers_to_probs",
    "restrict",
    "stand_in_oracle",
]
