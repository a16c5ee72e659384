"""The oracle: the black box, its answer modes and its query ledger.

Nothing else in mextract calls a victim. Attacks receive a :class:`Client` — what a
remote client of the API would have: ``query``, the public :class:`APIDescription`,
``spent`` and ``remaining`` — over an :class:`Oracle`; defences are :class:`OracleWrapper`
subclasses; a remote API is one more :class:`Oracle`.
"""

from mextract.oracle.base import Oracle, OracleWrapper, load_stack_state_dict, stack_state_dict
from mextract.oracle.client import APIDescription, Client
from mextract.oracle.ledger import Ledger
from mextract.oracle.local import VictimOracle
from mextract.oracle.modes import AnswerMode, answers_to_probs, restrict
from mextract.oracle.remote import RemoteAPIError, RemoteOracle

__all__ = [
    "APIDescription",
    "AnswerMode",
    "Client",
    "Ledger",
    "Oracle",
    "OracleWrapper",
    "RemoteAPIError",
    "RemoteOracle",
    "VictimOracle",
    "answers_to_probs",
    "load_stack_state_dict",
    "restrict",
    "stack_state_dict",
]
