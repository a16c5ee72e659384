"""Calibrated proof of work: make every answer cost compute, and extraction far more of it.

Dziedzic, Kaleem, Lu & Papernot, "Increasing the Cost of Model Extraction with Calibrated
Proof of Work", ICLR 2022. Before the API answers a request, the client must solve a
HashCash puzzle; its difficulty is calibrated to how much the account's queries reveal,
measured as the privacy cost (ε of differential privacy) of answering them with PATE.
Natural, in-distribution queries (a benign user's) are cheap to answer privately, since
the teachers agree on them; the queries extraction attacks make (out of distribution,
synthetic, near the decision boundary, actively chosen to be informative) are expensive.
A benign user pays a small overhead; an account whose privacy cost grows faster than a
benign user's pays exponentially more. This module is the paper's method, server-agnostic:

**Puzzles** (as in the paper, HashCash with *binary* leading zeros, so that difficulty
moves in factors of two rather than the 16 of hex digits). A puzzle is a random
``challenge`` and a difficulty ``bits``; a solution is a ``nonce`` such that
``SHA-256(challenge ‖ ":" ‖ nonce)`` starts with ``bits`` zero bits, which takes
``2**bits`` hash evaluations on average (:func:`expected_hashes`) and one to check.
The server stays stateless: :func:`issue_puzzle` signs the puzzle's fields with an HMAC
under the server's secret (bound to the account, an expiry time and, optionally, a digest
of the request it prices), and :func:`check_solution` verifies everything from the header
the client sends back. Statelessness has one exception, which the server must keep:
a solved puzzle could be presented again. :class:`SeenChallenges` remembers solved
challenges until they expire (bounded memory, thread-safe); pass it to
:func:`check_solution`. Reference code: the authors' ``pow/hashcash.py`` is David Mertz's
HashCash (SHA-1, with a date in the stamp); this is a new implementation with SHA-256.

**Privacy cost** (the paper's calibration signal, from PATE: Papernot et al., "Scalable
Private Learning with PATE", ICLR 2018). :class:`PateCost` holds ``T`` teachers trained on
disjoint parts of the owner's training data; for a query, their votes form a histogram
``n`` over the ``K`` classes. Answering it with the Gaussian noisy-max mechanism
(GNMax: ``argmax_i n_i + N(0, σ²)``) costs, in Rényi DP at order ``λ``:

* data-independent: ``λ / σ²`` (:func:`gnmax_rdp_data_independent`);
* data-dependent (PATE 2018, Theorem 6 with the higher orders of its Proposition 10),
  from ``q``, a bound on the probability that the noisy answer is not the plurality
  class ``i*``. :func:`gnmax_log_q` computes Proposition 7's bound
  ``q ≤ Σ_{i≠i*} P[N(0, 2σ²) ≥ n_{i*} − n_i]`` (a union bound), also capped at
  ``1 − 1/K`` (the plurality is the likeliest outcome). With ``μ₂ = σ·sqrt(log 1/q)``,
  ``μ₁ = μ₂ + 1``, ``εᵢ = μᵢ / σ²``: where ``μ₂ > 1``, ``q·e^{ε₂} < 1`` and
  ``q ≤ e^{(μ₂−1)ε₂} / (μ₁/(μ₁−1) · μ₂/(μ₂−1))^{μ₂}``, for every order ``λ ≤ μ₁``::

      RDP(λ) ≤ 1/(λ−1) · log((1−q)·A^{λ−1} + q·B^{λ−1}),
      A = (1−q) / (1 − (q·e^{ε₂})^{(μ₂−1)/μ₂}),   B = e^{ε₁} / q^{1/(μ₁−1)},

  and the smaller of this and ``λ/σ²`` is taken; at orders (or votes) where the
  conditions fail, the data-independent ``λ/σ²`` is used (:func:`gnmax_rdp`). Unanimous
  teachers make ``q`` tiny and the cost nearly 0; split votes cost the full ``λ/σ²``.

RDP composes by addition: :class:`PrivacyLedger` sums each account's per-order RDP and
converts it to ``(ε, δ)``-DP with ``ε = min_λ RDP(λ) + log(1/δ)/(λ−1)`` (PATE 2018,
Theorem 5; Mironov 2017). Orders: :data:`DEFAULT_ORDERS` (1.25 to 1,000, 99 of them,
like the reference code's grid of 2 to 1,000). ``δ = 1e-5``, the reference code's MNIST
value (:data:`DEFAULT_DELTA`). The data-dependent ε is used only as a *cost signal*, as
in the paper: it is never released, so it needs no smooth-sensitivity step.

**Calibration.** The paper runs a legitimate user's stream,
records the privacy cost as a function of the number of queries, fits the expected cost
``ε_b(n)`` of a benign user after ``n`` queries (the reference code: a linear regression
of cost on queries), and charges, per batch, a proof-of-work time ``base^{|ε − ε_b(n)|}``
(reference code: ``base = 1.0075`` per unit of its ε, clipped to a minimum and maximum
time), converted to leading-zero bits through a measured table of solve times per bit.
:class:`Calibrator` does the same in hash evaluations instead of seconds:

* ``ε_b(n)`` is the exact ε of ``n`` queries that each cost the *mean* per-query RDP of
  the owner's benign calibration queries, ``r̄(λ)``: ``ε_b(n) = min_λ n·r̄(λ) +
  log(1/δ)/(λ−1)``. Deviation: the reference code fits a line to ε against queries;
  ε of composed RDP is concave in ``n`` (about ``√n`` while the δ-term dominates), so a
  line is too high early and too low late, and extrapolates badly beyond the benign run.
* ``τ`` (``tolerance``) and ``s`` (``scale``), measured on benign streams rather than
  chosen: ``streams`` bootstrap benign streams (queries drawn with replacement from the
  calibration queries, ``horizon`` queries each; 20 and the calibration set's size by
  default). ``τ`` is the largest excess ``ε − ε_b(n)`` any of them reaches, at any
  length: how far a benign user strays above the curve. ``s`` is the standard deviation
  of their excess at the horizon: the size of a benign user's fluctuation. (The excess
  of ε does not grow with ``n`` for a benign user — ε is roughly the square root of the
  summed RDP, whose relative noise shrinks as ``1/√n`` — while an attacker's grows as
  ``√n``.) The reference code's ``base`` of 1.0075 per unit of ε was set by hand.
* Per-query work, in hash evaluations, for an account that has made ``n`` queries (this
  one included) and spent ``ε``::

      work(n, ε) = w₀ · 2^{clip((ε − ε_b(n) − τ) / s, 0, max_doublings)}

  A user within ``τ`` of the benign curve pays ``w₀``; beyond it, each further benign
  standard deviation ``s`` of excess doubles the price per query: exponential in the
  excess, as the paper's ``base^{diff}``. Deviations: the paper takes ``|ε − ε_b(n)|``,
  so a user *below* the benign curve pays more as well; a user who reveals less than a
  benign one is not a threat, so the excess here is one-sided. And the paper has no
  margin: a benign user on its fitted line pays ``base^0``, but half of the benign users
  lie above the line. ``max_doublings`` (20) caps the price of a query at about a
  million times ``w₀``; it is a policy, not a measurement (the reference code's times
  per batch range from 0.1 s to 2,948 s, a factor of about 30,000). This form was
  chosen after seeing that a first one, with ``τ`` as the unit too (no ``s``), priced
  boundary and active-learning streams far lower on the bundled mnist
  (``benchmarks/pow.py`` prints both; ``docs/proof-of-work.md``).
* ``w₀ = overhead · baseline / √2``, where ``baseline`` is what answering one query
  costs the server, in hash-equivalents (the machine's SHA-256 rate times the time to
  answer a query), and ``overhead`` the fraction of it a benign user should pay in
  proof of work (1.0: the paper's target, a benign user's total cost at most 2×). The
  ``1/√2``: a request's work is rounded to a power of two (integer bits), which can
  multiply it by up to √2; this keeps a benign request within its allowance.
* A request of ``n`` queries pays one puzzle for all of them (the paper: one puzzle per
  batch; batches of 64 queries in the reference code): its work is the sum of its queries' works,
  each priced at the account's ``(n, ε)`` after that query (the server sees a request's
  queries before it sets the puzzle, as in the paper's Figure 1), and its difficulty is
  ``bits = round(log2(total work))`` (:func:`bits_for_work`), at most ``max_bits``
  (32, the largest difficulty in the reference code's table of solve times).

**What a server does** (:class:`PowGate` does all of it): on a request with queries
``x`` from ``account``, :meth:`PowGate.challenge` prices it (teachers' votes, RDP, bits)
and issues a puzzle bound to the account and to ``x``'s digest; the client solves it
(:func:`solve`) and sends the request again with the puzzle and the nonce;
:meth:`PowGate.redeem` checks the solution (signature, account, request, expiry, zero
bits, replay) and only then charges the account's ledger; the server answers.

Deviations from the paper, in one place:

* Teachers: the reference code's MNIST setting is a PATE ensemble of 250 teachers with
  ``σ = 10`` (the victim itself, in its PATE experiments) or, for ordinary victims,
  private kNN (Zhu et al. 2020): the 300 training points nearest to the query in the
  victim's log-softmax space vote with their labels, ``σ = 28``. Here the teachers are an
  ensemble, as PATE's, but small enough for a CPU and for the lab's owner data (2,000
  mnist images): 20 small CNNs (the model zoo's ``cnn``, 15 epochs with TrivialAugment)
  by default, or any scikit-learn classifier. ``σ = 2.0`` keeps the reference kNN's
  noise-to-voters ratio (28/300 ≈ 0.09 → 0.09 × 20 ≈ 2). Fewer, weaker teachers agree
  less on natural data than 250 would, so a benign user's cost is higher and the gap to
  an attacker's smaller than in the paper.
* Costs in hash evaluations, not seconds; the benign curve, the measured margin and
  scale, and the one-sided excess, as above.

Faithfulness: ``docs/faithfulness.md#pow``.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import json
import math
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mextract._utils import as_tensor, resolve_device, seeded
from mextract.data.augment import trivial_augment_wide
from mextract.data.base import Dataset
from mextract.errors import InputError, MextractError
from mextract.oracle.state import StateLock, check_state_keys, state_int, state_tensor
from mextract.training import TrainConfig, fit

# ---------------------------------------------------------------------------- constants

#: Header format version.
POW_VERSION = "v1"
#: Random bytes in a challenge (hex-encoded: 32 characters).
CHALLENGE_BYTES = 16
#: The largest difficulty a header may carry (SHA-256 has 256 bits).
HEADER_MAX_BITS = 256
#: Longest nonce accepted by :func:`check_solution` (characters of printable ASCII).
MAX_NONCE_LENGTH = 64
#: The reference code's δ for MNIST.
DEFAULT_DELTA = 1e-5
#: Rényi orders at which costs are tracked (> 1).
DEFAULT_ORDERS = torch.cat(
    [
        torch.arange(1.25, 2.0, 0.25, dtype=torch.float64),
        torch.arange(2.0, 20.0, 0.5, dtype=torch.float64),
        torch.arange(20.0, 100.0, 2.0, dtype=torch.float64),
        torch.logspace(2.0, 3.0, 20, dtype=torch.float64),
    ]
)
#: Teachers of :meth:`PateCost.fit` (the paper's MNIST PATE ensemble: 250; see the module docstring).
PATE_TEACHERS = 20
#: GNMax noise for :data:`PATE_TEACHERS` teachers (the reference private kNN's σ/voters ≈ 0.09).
PATE_SIGMA = 2.0
#: How each zoo-model teacher trains (small data: small batches, TrivialAugment for images).
TEACHER_TRAINING = TrainConfig(epochs=15, batch_size=16, lr=0.05)
#: The largest puzzle a :class:`Calibrator` sets (the reference code's table of solve times ends at 32 bits).
CALIBRATOR_MAX_BITS = 32


class PowError(MextractError):
    """A proof-of-work solution (or puzzle header) was refused; ``kind`` says why:
    ``malformed``, ``forged``, ``wrong_account``, ``wrong_request``, ``expired``,
    ``insufficient`` (too few zero bits), ``replayed``, ``capacity`` (the replay memory is
    full), or ``unsolved`` (:func:`solve` gave up)."""

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        super().__init__(message)


# ---------------------------------------------------------------------------- puzzles


def _tag(domain: str, value: str) -> str:
    """A short public digest of ``value`` (which account / request a puzzle is for)."""
    return hashlib.sha256(f"mextract-pow-{domain}\0{value}".encode()).hexdigest()[:16]


def _mac(secret: bytes, account: str, challenge: str, bits: int, expires: float, request: str) -> str:
    # JSON of a list: an unambiguous encoding of the fields, whatever the account id holds
    message = json.dumps([POW_VERSION, account, challenge, bits, repr(expires), request])
    return hmac.new(secret, message.encode(), hashlib.sha256).hexdigest()


def _is_hex(s: str, length: int) -> bool:
    return len(s) == length and all(c in "0123456789abcdef" for c in s)


@dataclass(frozen=True)
class Puzzle:
    """A HashCash puzzle as the server issues it: find ``nonce`` such that
    ``SHA-256(challenge ‖ ":" ‖ nonce)`` has at least ``bits`` leading zero bits.

    Attributes:
        challenge: 32 lowercase hex characters (16 random bytes).
        bits: the difficulty; expected work ``2**bits`` hash evaluations.
        expires: Unix time (seconds) after which a solution is refused.
        account: public tag of the account the puzzle was issued to.
        request: public tag of the request it prices (``"-"``: not bound to one).
        mac: HMAC-SHA256 over the version, account id, challenge, bits, expiry and request
            digest, under the server's secret (64 hex characters).

    One header value (:meth:`to_header`)::

        v1;<challenge>;<bits>;<expires>;<account tag>;<request tag>;<mac>
    """

    challenge: str
    bits: int
    expires: float
    account: str
    request: str
    mac: str

    def to_header(self) -> str:
        return ";".join(
            [
                POW_VERSION,
                self.challenge,
                str(self.bits),
                repr(self.expires),
                self.account,
                self.request,
                self.mac,
            ]
        )

    @classmethod
    def from_header(cls, header: str) -> Puzzle:
        """Parse :meth:`to_header`'s form; a :class:`PowError` (``malformed``) names the fault."""
        if not isinstance(header, str) or len(header) > 512:
            raise PowError(
                "malformed", "malformed puzzle header: expected a string of at most 512 characters"
            )
        parts = header.strip().split(";")
        if len(parts) != 7:
            raise PowError(
                "malformed", f"malformed puzzle header: expected 7 ';'-separated fields, got {len(parts)}"
            )
        version, challenge, bits_s, expires_s, account, request, mac = parts
        if version != POW_VERSION:
            raise PowError(
                "malformed", f"malformed puzzle header: version {version!r}, expected {POW_VERSION!r}"
            )
        if not _is_hex(challenge, 2 * CHALLENGE_BYTES):
            raise PowError(
                "malformed", "malformed puzzle header: the challenge must be 32 lowercase hex digits"
            )
        if not (bits_s.isascii() and bits_s.isdigit()) or len(bits_s) > 3 or int(bits_s) > HEADER_MAX_BITS:
            raise PowError(
                "malformed", f"malformed puzzle header: bits must be 0..{HEADER_MAX_BITS}, got {bits_s!r}"
            )
        try:
            expires = float(expires_s)
        except ValueError:
            expires = math.nan
        if not math.isfinite(expires):
            raise PowError(
                "malformed", f"malformed puzzle header: expiry {expires_s!r} is not a finite number"
            )
        if not _is_hex(account, 16) or not (request == "-" or _is_hex(request, 16)):
            raise PowError("malformed", "malformed puzzle header: bad account or request tag")
        if not _is_hex(mac, 64):
            raise PowError("malformed", "malformed puzzle header: the MAC must be 64 lowercase hex digits")
        return cls(challenge, int(bits_s), expires, account, request, mac)

    @property
    def expected_hashes(self) -> int:
        return expected_hashes(self.bits)


def expected_hashes(bits: int) -> int:
    """Mean hash evaluations to solve a ``bits`` puzzle: ``2**bits`` (geometric trials)."""
    return 1 << bits


def bits_for_work(work: float, *, max_bits: int = CALIBRATOR_MAX_BITS) -> int:
    """The difficulty whose expected work is closest to ``work`` hash evaluations on a log
    scale: ``round(log2(work))``, clipped to ``[0, max_bits]``."""
    if not work > 1:
        return 0
    return int(min(max_bits, max(0, round(math.log2(work)))))


def request_digest(x: torch.Tensor | bytes) -> str:
    """SHA-256 (hex) of a request's queries (dtype, shape and values) or raw body, to bind
    a puzzle to the request it prices (``issue_puzzle(..., request=...)``)."""
    h = hashlib.sha256()
    if isinstance(x, bytes):
        h.update(b"bytes\0" + x)
    else:
        t = x.detach().to("cpu").contiguous()
        h.update(f"{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def issue_puzzle(
    secret: bytes, account: str, bits: int, ttl: float, *, request: str = "", now: float | None = None
) -> Puzzle:
    """A fresh signed puzzle for ``account`` of difficulty ``bits``, valid for ``ttl`` seconds.

    Args:
        secret: the server's HMAC key (keep it secret; 32 random bytes, e.g.
            ``secrets.token_bytes(32)``). Puzzles signed under another key are forged.
        account: the account (client id) the puzzle is for.
        bits: leading zero bits asked for (0: any nonce solves it).
        ttl: seconds until it expires.
        request: optional digest of the request it prices (:func:`request_digest`): a
            solution then redeems only that request.
        now: the current Unix time (default: ``time.time()``).
    """
    if not isinstance(secret, bytes) or len(secret) < 16:
        raise InputError("secret: expected at least 16 bytes")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 0 <= bits <= HEADER_MAX_BITS:
        raise InputError(f"bits: expected an integer in 0..{HEADER_MAX_BITS}, got {bits!r}")
    if not (isinstance(ttl, int | float) and math.isfinite(ttl) and ttl > 0):
        raise InputError(f"ttl: expected a positive number of seconds, got {ttl!r}")
    if not isinstance(account, str):
        raise InputError(f"account: expected a string, got {type(account).__name__}")
    now = time.time() if now is None else now
    expires = float(now + ttl)
    challenge = secrets.token_hex(CHALLENGE_BYTES)
    mac = _mac(secret, account, challenge, bits, expires, request)
    req_tag = _tag("request", request) if request else "-"
    return Puzzle(challenge, bits, expires, _tag("account", account), req_tag, mac)


def leading_zero_bits(challenge: str, nonce: str) -> int:
    """Leading zero bits of ``SHA-256(challenge ‖ ":" ‖ nonce)``."""
    digest = hashlib.sha256(f"{challenge}:{nonce}".encode()).digest()
    return 256 - int.from_bytes(digest, "big").bit_length()


def solve(puzzle: Puzzle | str, *, max_hashes: int | None = None, start: int = 0) -> tuple[str, int]:
    """Brute-force a puzzle (or its header): try nonces ``start, start + 1, ...`` (as
    lowercase hex) until the hash has ``bits`` leading zeros.

    Returns:
        ``(nonce, hashes)``: the solution and the hash evaluations spent (the successful
        one included); on average ``2**bits``. Raises :class:`PowError` (``unsolved``)
        after ``max_hashes`` evaluations without a solution.

    Pure Python with ``hashlib`` (the prefix ``challenge:`` is hashed once and copied):
    1.5–2.5 million hashes per second on one core of the lab's 2-core AMD EPYC test
    machine, so 20 bits take about half a second. A native solver (or a GPU) is orders of
    magnitude faster: difficulty buys *relative* cost, which is why the calibration is in
    hash evaluations.
    """
    if isinstance(puzzle, str):
        puzzle = Puzzle.from_header(puzzle)
    prefix = hashlib.sha256(f"{puzzle.challenge}:".encode())
    limit = 1 << (256 - puzzle.bits)  # zero leading bits <=> digest < 2**(256 - bits)
    from_bytes = int.from_bytes
    i = start
    stop = None if max_hashes is None else start + max_hashes
    while stop is None or i < stop:
        h = prefix.copy()
        h.update(b"%x" % i)
        if from_bytes(h.digest(), "big") < limit:
            return f"{i:x}", i - start + 1
        i += 1
    raise PowError("unsolved", f"no solution of {puzzle.bits} bits within {max_hashes} hash evaluations")


def hash_rate(seconds: float = 1.0) -> float:
    """Hash evaluations per second of :func:`solve` on this machine (one thread), measured
    for about ``seconds`` on a puzzle too hard to finish: with the time a query takes to
    answer, it converts the server's cost of a query into hash-equivalents, the
    ``baseline_work`` of :meth:`Calibrator.fit`."""
    puzzle = Puzzle("0" * 2 * CHALLENGE_BYTES, HEADER_MAX_BITS, 0.0, "0" * 16, "-", "0" * 64)
    step, spent, t0 = 1 << 14, 0, time.perf_counter()
    while True:
        try:
            solve(puzzle, max_hashes=step, start=spent)
        except PowError:
            spent += step
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return spent / elapsed


class SeenChallenges:
    """The challenges already redeemed, kept until they expire, so that one solution
    cannot be spent twice (:func:`check_solution` with ``seen=``).

    Memory is bounded: entries leave once their puzzle has expired (a late replay is
    refused as expired anyway), and at ``max_entries`` live entries a new one is refused
    (``PowError`` ``capacity``: the server should ask the client to retry later) rather
    than forgetting a live one, which would reopen it to replay. Size it as at least the
    puzzles redeemed per second times the puzzles' ``ttl``. Thread-safe.

    A server that restarts with the same secret should persist it (:meth:`state_dict`)
    or wait ``ttl`` before accepting solutions; one that changes the secret need not.
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise InputError(f"max_entries: expected a positive integer, got {max_entries!r}")
        self.max_entries = max_entries
        self._expiry: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # copies and pickles get their own lock
        with self._lock:
            return {"max_entries": self.max_entries, "expiry": dict(self._expiry), "heap": list(self._heap)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.max_entries, self._expiry, self._heap = state["max_entries"], state["expiry"], state["heap"]
        self._lock = threading.Lock()

    def _purge(self, now: float) -> None:
        while self._heap and self._heap[0][0] < now:
            _, challenge = heapq.heappop(self._heap)
            self._expiry.pop(challenge, None)

    def add(self, challenge: str, expires: float, now: float | None = None) -> bool:
        """Record ``challenge`` (valid until ``expires``); ``False`` if it was already there."""
        now = time.time() if now is None else now
        with self._lock:
            self._purge(now)
            if challenge in self._expiry:
                return False
            if len(self._expiry) >= self.max_entries:
                raise PowError("capacity", f"too many live solved puzzles ({self.max_entries}); retry later")
            self._expiry[challenge] = expires
            heapq.heappush(self._heap, (expires, challenge))
            return True

    def __contains__(self, challenge: object) -> bool:
        with self._lock:
            return challenge in self._expiry

    def __len__(self) -> int:
        with self._lock:
            return len(self._expiry)

    def state_dict(self) -> dict[str, Any]:
        """``{"entries": [[challenge, expires], ...]}`` (plain values)."""
        with self._lock:
            return {"entries": [[c, e] for c, e in self._expiry.items()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = check_state_keys("SeenChallenges", state, ("entries",))
        entries = state["entries"]
        if not isinstance(entries, list) or not all(
            isinstance(e, list | tuple) and len(e) == 2 and isinstance(e[0], str)
            and isinstance(e[1], int | float) for e in entries
        ):  # fmt: skip
            raise InputError("SeenChallenges: state 'entries': expected a list of [challenge, expires] pairs")
        with self._lock:
            self._expiry = {c: float(e) for c, e in entries}
            self._heap = [(e, c) for c, e in self._expiry.items()]
            heapq.heapify(self._heap)


def check_solution(
    secret: bytes,
    account: str,
    puzzle_header: str | Puzzle,
    nonce: str,
    now: float | None = None,
    *,
    request: str = "",
    seen: SeenChallenges | None = None,
) -> Puzzle:
    """Verify a solution statelessly; return the puzzle, or raise :class:`PowError`.

    Checks, in order: the header parses (``malformed``); its MAC matches its fields under
    ``secret`` for *this* account and request (``forged``; a valid puzzle of another
    account or request is reported as ``wrong_account`` / ``wrong_request``); it has not
    expired (``expired``); the nonce is at most :data:`MAX_NONCE_LENGTH` printable ASCII
    characters and the hash has at least ``bits`` leading zeros (``insufficient``); and,
    given ``seen``, the challenge was not redeemed before (``replayed``; it is recorded
    as redeemed when everything else passed). Without ``seen``, a solution can be
    replayed until it expires.
    """
    puzzle = puzzle_header if isinstance(puzzle_header, Puzzle) else Puzzle.from_header(puzzle_header)
    now = time.time() if now is None else now
    want = _mac(secret, account, puzzle.challenge, puzzle.bits, puzzle.expires, request)
    if not hmac.compare_digest(want, puzzle.mac):
        if puzzle.account != _tag("account", account):
            raise PowError("wrong_account", "the puzzle was issued to another account")
        if puzzle.request != (_tag("request", request) if request else "-"):
            raise PowError("wrong_request", "the puzzle was issued for another request")
        raise PowError("forged", "the puzzle's signature does not match its fields: forged or altered")
    if now > puzzle.expires:
        raise PowError("expired", f"the puzzle expired {now - puzzle.expires:.1f} s ago; ask for a new one")
    if (
        not isinstance(nonce, str) or not 0 < len(nonce) <= MAX_NONCE_LENGTH
        or not all(33 <= ord(c) < 127 for c in nonce)
    ):  # fmt: skip
        raise PowError(
            "malformed", f"the nonce must be 1..{MAX_NONCE_LENGTH} printable ASCII characters without spaces"
        )
    zeros = leading_zero_bits(puzzle.challenge, nonce)
    if zeros < puzzle.bits:
        raise PowError(
            "insufficient", f"too few zero bits: the hash has {zeros}, the puzzle needs {puzzle.bits}"
        )
    if seen is not None and not seen.add(puzzle.challenge, puzzle.expires, now):
        raise PowError("replayed", "this puzzle was already redeemed")
    return puzzle


# ---------------------------------------------------------------------------- GNMax privacy cost


def _orders(orders: torch.Tensor | Sequence[float] | None) -> torch.Tensor:
    o = DEFAULT_ORDERS if orders is None else torch.as_tensor(orders, dtype=torch.float64)
    if o.dim() != 1 or len(o) == 0 or not bool((o > 1).all()) or not bool(torch.isfinite(o).all()):
        raise InputError("orders: expected a non-empty 1-D list of finite Rényi orders > 1")
    return o


def _sigma(sigma: float) -> float:
    if (
        isinstance(sigma, bool)
        or not isinstance(sigma, int | float)
        or not (math.isfinite(sigma) and sigma > 0)
    ):
        raise InputError(f"sigma: expected a positive number, got {sigma!r}")
    return float(sigma)


def _votes(votes: object) -> torch.Tensor:
    v = torch.as_tensor(votes).to(torch.float64) if not isinstance(votes, torch.Tensor) else votes.double()
    if v.dim() != 2 or v.shape[1] < 2:
        raise InputError(
            f"votes: expected a histogram (N, K) with K >= 2 classes, got shape {tuple(v.shape)}"
        )
    if not bool(torch.isfinite(v).all()) or bool((v < 0).any()):
        raise InputError("votes: expected finite, non-negative counts")
    return v


def gnmax_log_q(votes: torch.Tensor | np.ndarray, sigma: float) -> torch.Tensor:
    """PATE 2018, Proposition 7: an upper bound on ``log P[GNMax(n) ≠ argmax n]`` per row
    of ``votes`` ``(N, K)`` (or one histogram ``(K,)``): the union bound
    ``log Σ_{i≠i*} Φ(−(n_{i*} − n_i) / (√2 σ))``, capped at ``log(1 − 1/K)``."""
    one = isinstance(votes, torch.Tensor | np.ndarray) and votes.ndim == 1
    v = _votes(votes[None] if one else votes)
    sigma = _sigma(sigma)
    top = v.argmax(dim=1, keepdim=True)
    gaps = v.gather(1, top) - v
    log_sf = torch.special.log_ndtr(-gaps / (math.sqrt(2.0) * sigma))
    log_sf.scatter_(1, top, -math.inf)  # the plurality class itself is not an error
    log_q = torch.logsumexp(log_sf, dim=1).clamp(max=math.log1p(-1.0 / v.shape[1]))
    return log_q[0:1].squeeze(0) if one else log_q


def gnmax_rdp_data_independent(
    sigma: float, orders: torch.Tensor | Sequence[float] | None = None
) -> torch.Tensor:
    """GNMax's data-independent RDP: ``λ / σ²`` at each order ``λ`` (sensitivity 2 of the
    histogram, noise ``N(0, σ²)`` per class)."""
    return _orders(orders) / _sigma(sigma) ** 2


def gnmax_rdp_from_log_q(
    log_q: torch.Tensor, sigma: float, orders: torch.Tensor | Sequence[float] | None = None
) -> torch.Tensor:
    """Data-dependent RDP of GNMax from ``log q`` (``(N,)`` → ``(N, L)``): PATE 2018's
    Theorem 6 at the orders ``μ₂ = σ·sqrt(log 1/q)``, ``μ₁ = μ₂ + 1`` (Proposition 10),
    where its conditions hold, else (and wherever it is larger) ``λ/σ²``."""
    sigma = _sigma(sigma)
    o = _orders(orders)
    lq = torch.as_tensor(log_q, dtype=torch.float64).reshape(-1, 1)
    if bool((lq > 0).any()) or bool(torch.isnan(lq).any()):
        raise InputError("log_q: expected log-probabilities (<= 0)")
    var = sigma**2
    independent = (o / var).expand(len(lq), -1)
    if not len(lq):
        return independent.clone()
    finite = torch.isfinite(lq)
    lq_f = torch.where(finite, lq, torch.full_like(lq, -1.0))  # placeholders for q = 0 rows
    mu2 = sigma * torch.sqrt(-lq_f)
    mu1 = mu2 + 1.0
    eps1, eps2 = mu1 / var, mu2 / var
    mu2_safe = torch.where(mu2 > 1, mu2, torch.full_like(mu2, 2.0))
    bound = (mu2_safe - 1) * eps2 - mu2_safe * (
        torch.log(mu1 / (mu1 - 1)) + torch.log(mu2_safe / (mu2_safe - 1))
    )
    applies = (mu2 > 1) & (-lq_f > eps2) & (lq_f <= bound) & finite
    log1mq = torch.log1p(-torch.exp(lq_f))
    inner = torch.where(applies, (lq_f + eps2) * (1 - 1 / mu2_safe), torch.full_like(lq_f, -1.0))
    log_a = log1mq - torch.log(-torch.expm1(inner))
    log_b = eps1 - lq_f / (mu1 - 1)
    lam = o.reshape(1, -1)
    log_s = torch.logaddexp(log1mq + (lam - 1) * log_a, lq_f + (lam - 1) * log_b)
    dependent = log_s / (lam - 1)
    use = applies & (lam <= mu1)
    out = torch.where(use, torch.minimum(dependent, independent), independent)
    # q = 0 (a deterministic answer): no cost at all
    return torch.where(finite, out, torch.zeros_like(out))


def gnmax_rdp(
    votes: torch.Tensor | np.ndarray, sigma: float, orders: torch.Tensor | Sequence[float] | None = None
) -> torch.Tensor:
    """The RDP cost of answering each vote histogram with GNMax: ``(N, K)`` → ``(N, L)``
    (a single ``(K,)`` histogram → ``(L,)``); data-dependent where PATE 2018's bound
    applies, data-independent ``λ/σ²`` otherwise (see the module docstring)."""
    log_q = gnmax_log_q(votes, sigma)
    out = gnmax_rdp_from_log_q(log_q.reshape(-1), sigma, orders)
    return out[0] if log_q.dim() == 0 else out


def rdp_to_epsilon(
    rdp: torch.Tensor, orders: torch.Tensor | Sequence[float] | None = None, delta: float = DEFAULT_DELTA
) -> torch.Tensor:
    """``(ε, δ)``-DP from RDP ``(..., L)``: ``min_λ RDP(λ) + log(1/δ)/(λ − 1)`` (PATE 2018,
    Theorem 5); returns shape ``(...)``."""
    o = _orders(orders)
    if not 0 < delta < 1:
        raise InputError(f"delta: expected a value in (0, 1), got {delta!r}")
    r = torch.as_tensor(rdp, dtype=torch.float64)
    if r.shape[-1:] != o.shape:
        raise InputError(f"rdp: expected {len(o)} orders on the last axis, got shape {tuple(r.shape)}")
    return (r + math.log(1 / delta) / (o - 1)).amin(dim=-1)


# ---------------------------------------------------------------------------- per-account ledger


class PrivacyLedger:
    """One account's accumulated RDP, per order, and its query count.

    RDP composes by addition (Mironov 2017), so :meth:`add` sums the per-query costs of
    :meth:`PateCost.query_rdp`; :meth:`epsilon` converts the total to ``(ε, δ)``-DP.
    State (:meth:`state_dict`): the orders, the count and the total, as a tensor and plain
    values that ``torch.save`` / ``torch.load(weights_only=True)`` round-trip. Thread-safe.
    """

    def __init__(self, orders: torch.Tensor | Sequence[float] | None = None) -> None:
        self.orders = _orders(orders).clone()
        self._rdp = torch.zeros_like(self.orders)
        self._queries = 0
        self._lock = StateLock()

    @property
    def queries(self) -> int:
        return self._queries

    @property
    def rdp(self) -> torch.Tensor:
        with self._lock:
            return self._rdp.clone()

    def _rows(self, rdp_rows: torch.Tensor) -> torch.Tensor:
        r = torch.as_tensor(rdp_rows, dtype=torch.float64)
        if r.dim() == 1:
            r = r[None]
        if r.dim() != 2 or r.shape[1] != len(self.orders):
            raise InputError(
                f"rdp_rows: expected (N, {len(self.orders)}) per-query costs, got shape {tuple(r.shape)}"
            )
        if not bool(torch.isfinite(r).all()) or bool((r < 0).any()):
            raise InputError("rdp_rows: expected finite, non-negative costs")
        return r

    def add(self, rdp_rows: torch.Tensor) -> None:
        """Charge the costs of answered queries, ``(N, L)`` (or one ``(L,)``)."""
        r = self._rows(rdp_rows)
        with self._lock:
            self._rdp += r.sum(dim=0)
            self._queries += len(r)

    def epsilon(self, delta: float = DEFAULT_DELTA) -> float:
        """ε at ``δ`` of everything charged so far."""
        with self._lock:
            return float(rdp_to_epsilon(self._rdp, self.orders, delta))

    def epsilons_after(self, rdp_rows: torch.Tensor, delta: float = DEFAULT_DELTA) -> torch.Tensor:
        """ε after each of the given queries in turn, ``(N,)``, without charging them."""
        r = self._rows(rdp_rows)
        with self._lock:
            totals = self._rdp + r.cumsum(dim=0)
        return rdp_to_epsilon(totals, self.orders, delta)

    def state_dict(self) -> dict[str, Any]:
        with self._lock:
            return {"orders": self.orders.clone(), "queries": self._queries, "rdp": self._rdp.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        owner = "PrivacyLedger"
        state = check_state_keys(owner, state, ("orders", "queries", "rdp"))
        orders = state_tensor(owner, "orders", state["orders"], dtype=torch.float64, shape=(None,))
        if orders.shape != self.orders.shape or not torch.equal(orders, self.orders):
            raise InputError(f"{owner}: state 'orders': the state was saved with other Rényi orders")
        rdp = state_tensor(owner, "rdp", state["rdp"], dtype=torch.float64, shape=(len(self.orders),))
        if not bool(torch.isfinite(rdp).all()) or bool((rdp < 0).any()):
            raise InputError(f"{owner}: state 'rdp': expected finite, non-negative costs")
        queries = state_int(owner, "queries", state["queries"])
        with self._lock:
            self._rdp, self._queries = rdp, queries


# ---------------------------------------------------------------------------- PATE teachers

#: A teacher: a batch of inputs ``(N, ...)`` → predicted classes ``(N,)``.
Teacher = Callable[[torch.Tensor], torch.Tensor]


def _as_teacher(obj: object, device: torch.device | None) -> Teacher:
    if isinstance(obj, nn.Module):
        module = obj.eval()
        dev = device or next((p.device for p in module.parameters()), torch.device("cpu"))

        def predict(x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return module(x.to(dev, torch.float32)).argmax(dim=1).cpu()

        return predict
    if hasattr(obj, "predict"):
        est: Any = obj

        def predict_sklearn(x: torch.Tensor) -> torch.Tensor:
            arr = x.detach().cpu().reshape(len(x), -1).numpy()
            return torch.as_tensor(np.asarray(est.predict(arr)), dtype=torch.int64)

        return predict_sklearn
    if callable(obj):
        fn: Callable[[torch.Tensor], Any] = obj

        def predict_fn(x: torch.Tensor) -> torch.Tensor:
            return torch.as_tensor(fn(x), dtype=torch.int64)

        return predict_fn
    raise InputError(
        f"teacher: expected an nn.Module, a fitted classifier or a callable, got {type(obj).__name__}"
    )


class PateCost:
    """The privacy cost of answering queries with PATE's GNMax: a teacher ensemble's votes
    turned into per-order RDP (see the module docstring).

    Args:
        teachers: ``nn.Module`` classifiers (logits), fitted scikit-learn classifiers
            (``predict`` on flattened inputs) or callables ``x -> labels``.
        num_classes: ``K``.
        sigma: GNMax's noise.
        orders: Rényi orders (default :data:`DEFAULT_ORDERS`).
        batch_size: teachers are run on chunks of at most this many queries.

    :meth:`fit` trains the ensemble on the owner's data. The teachers are configuration
    (built once, shared by every account); the per-account state is a :class:`PrivacyLedger`.
    Pricing a query costs ``T`` teacher predictions, about ``T`` times the victim's
    forward pass for teachers of the victim's size.
    """

    def __init__(
        self,
        teachers: Sequence[object],
        num_classes: int,
        *,
        sigma: float = PATE_SIGMA,
        orders: torch.Tensor | Sequence[float] | None = None,
        batch_size: int = 1024,
        device: str | torch.device | None = None,
    ) -> None:
        if not teachers:
            raise InputError("teachers: expected at least one teacher")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise InputError(f"num_classes: expected an integer >= 2, got {num_classes!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size: expected a positive integer, got {batch_size!r}")
        dev = None if device is None else resolve_device(device)
        self._teachers = [_as_teacher(t, dev) for t in teachers]
        self.num_classes = num_classes
        self.sigma = _sigma(sigma)
        self.orders = _orders(orders).clone()
        self.batch_size = batch_size

    @property
    def num_teachers(self) -> int:
        return len(self._teachers)

    @classmethod
    def fit(
        cls,
        owner_train: Dataset,
        *,
        teachers: int = PATE_TEACHERS,
        sigma: float = PATE_SIGMA,
        seed: int = 0,
        model: str | Callable[[], Any] = "cnn",
        config: TrainConfig = TEACHER_TRAINING,
        augment: bool | None = None,
        orders: torch.Tensor | Sequence[float] | None = None,
        device: str | torch.device | None = None,
    ) -> PateCost:
        """Train ``teachers`` teachers on disjoint parts of ``owner_train`` (a seeded random
        partition into parts of equal size, ±1).

        Args:
            model: a model-zoo name (trained with :func:`~mextract.training.fit`, cross
                entropy, ``config``; initialised under ``seed + i``) or a zero-argument
                factory of an unfitted scikit-learn-style classifier (``fit`` / ``predict``
                on flattened inputs).
            augment: TrivialAugmentWide for zoo teachers (``None``: for images only).
            device: where zoo teachers train and vote (``None``: CUDA when present).
        """
        if owner_train.y is None:
            raise InputError(f"{owner_train.name}: PATE teachers need labelled training data")
        if isinstance(teachers, bool) or not isinstance(teachers, int) or teachers < 1:
            raise InputError(f"teachers: expected a positive integer, got {teachers!r}")
        if len(owner_train) < 2 * teachers:
            raise InputError(
                f"teachers: {teachers} teachers need at least {2 * teachers} training samples, "
                f"got {len(owner_train)}"
            )
        order = torch.randperm(len(owner_train), generator=torch.Generator().manual_seed(seed))
        parts = [order[i::teachers] for i in range(teachers)]
        x, y = owner_train.x, owner_train.y
        built: list[object] = []
        if isinstance(model, str):
            from mextract.models import create_model

            dev = resolve_device(device)
            use_aug = owner_train.is_image if augment is None else augment
            transform = trivial_augment_wide if use_aug else None
            for i, idx in enumerate(parts):
                with seeded(seed + i):
                    net = create_model(model, owner_train.input_shape, owner_train.num_classes)
                built.append(fit(net, x[idx], y[idx], F.cross_entropy, config, seed=seed + i, device=dev,
                                 transform=transform))  # fmt: skip
            return cls(built, owner_train.num_classes, sigma=sigma, orders=orders, device=dev)
        for idx in parts:
            est = model()
            est.fit(x[idx].reshape(len(idx), -1).numpy(), y[idx].numpy())
            built.append(est)
        return cls(built, owner_train.num_classes, sigma=sigma, orders=orders)

    def votes(self, x: object) -> torch.Tensor:
        """The teachers' vote histogram of each query: ``(N, K)`` int64, rows sum to ``T``."""
        t = as_tensor(x, name="queries")
        if t.dim() < 2:
            raise InputError(f"queries: expected a batch (N, ...), got shape {tuple(t.shape)}")
        out = torch.zeros(len(t), self.num_classes, dtype=torch.int64)
        for start in range(0, len(t), self.batch_size):
            chunk = t[start : start + self.batch_size]
            rows = out[start : start + len(chunk)]
            for teacher in self._teachers:
                labels = teacher(chunk).reshape(-1).long()
                if labels.shape != (len(chunk),) or bool(
                    (labels < 0).any() | (labels >= self.num_classes).any()
                ):
                    raise InputError(f"a teacher returned labels outside 0..{self.num_classes - 1}")
                rows.scatter_add_(1, labels[:, None], torch.ones(len(chunk), 1, dtype=torch.int64))
        return out

    def query_rdp(self, x: object) -> torch.Tensor:
        """Per-query RDP of answering ``x`` with GNMax over the teachers' votes: ``(N, L)``."""
        return self.rdp_from_votes(self.votes(x))

    def rdp_from_votes(self, votes: torch.Tensor) -> torch.Tensor:
        return gnmax_rdp(votes, self.sigma, self.orders)


# ---------------------------------------------------------------------------- calibration


@dataclass(frozen=True, eq=False)
class Calibrator:
    """Maps an account's (queries, ε) to the price of its next request (module docstring).

    Attributes:
        orders: the Rényi orders (those of the :class:`PateCost` and ledgers).
        benign_rdp: ``r̄``, the mean per-query RDP of benign calibration queries ``(L,)``.
        delta: ``δ`` of the ε compared.
        tolerance: ``τ``, the ε by which benign users stray above ``ε_b`` (the margin).
        scale: ``s``, the excess beyond the margin that doubles the price.
        unit_work: ``w₀``, hash evaluations a query costs an account within ``τ`` of the
            benign curve.
        max_doublings: the price per query is at most ``w₀ · 2**max_doublings``.
        max_bits: the largest puzzle of a request.
    """

    orders: torch.Tensor
    benign_rdp: torch.Tensor
    delta: float
    tolerance: float
    scale: float
    unit_work: float
    max_doublings: float = 20.0
    max_bits: int = CALIBRATOR_MAX_BITS

    def __post_init__(self) -> None:
        o = _orders(self.orders)
        r = torch.as_tensor(self.benign_rdp, dtype=torch.float64)
        if r.shape != o.shape or not bool(torch.isfinite(r).all()) or bool((r < 0).any()):
            raise InputError(f"benign_rdp: expected {len(o)} finite, non-negative costs")
        object.__setattr__(self, "orders", o)
        object.__setattr__(self, "benign_rdp", r)
        if not (isinstance(self.delta, float) and 0 < self.delta < 1):
            raise InputError(f"delta: expected a value in (0, 1), got {self.delta!r}")
        for name in ("tolerance", "scale", "unit_work", "max_doublings"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                raise InputError(f"{name}: expected a positive number, got {v!r}")
        if (
            isinstance(self.max_bits, bool)
            or not isinstance(self.max_bits, int)
            or not 0 <= self.max_bits <= 64
        ):
            raise InputError(f"max_bits: expected an integer in 0..64, got {self.max_bits!r}")

    @classmethod
    def fit(
        cls,
        benign_rdp_rows: torch.Tensor,
        *,
        baseline_work: float,
        overhead: float = 1.0,
        orders: torch.Tensor | Sequence[float] | None = None,
        delta: float = DEFAULT_DELTA,
        streams: int = 20,
        horizon: int | None = None,
        seed: int = 0,
        max_doublings: float = 20.0,
        max_bits: int = CALIBRATOR_MAX_BITS,
    ) -> Calibrator:
        """Calibrate on the per-query costs of benign queries ``(N, L)`` (e.g.
        :meth:`PateCost.query_rdp` of natural inputs the owner holds out of the teachers'
        training; not the data the calibration is then evaluated on).

        Args:
            baseline_work: what answering one query costs the server, in hash evaluations.
            overhead: the share of ``baseline_work`` a benign user pays in proof of work.
            streams, horizon: ``streams`` bootstrap streams of ``horizon`` queries (default:
                ``N``) drawn with replacement from the rows (a generator seeded by ``seed``):
                ``τ`` is the largest excess over ``ε_b`` they reach, ``s`` the standard
                deviation of their excess at the horizon (both at least 1e-6).
        """
        o = _orders(orders)
        rows = torch.as_tensor(benign_rdp_rows, dtype=torch.float64)
        if rows.dim() != 2 or rows.shape[1] != len(o) or len(rows) < 2:
            raise InputError(
                f"benign_rdp_rows: expected (N >= 2, {len(o)}) per-query costs, got {tuple(rows.shape)}"
            )
        if not (math.isfinite(baseline_work) and baseline_work > 0) or not (
            math.isfinite(overhead) and overhead > 0
        ):
            raise InputError("baseline_work and overhead: expected positive numbers")
        if isinstance(streams, bool) or not isinstance(streams, int) or streams < 1:
            raise InputError(f"streams: expected a positive integer, got {streams!r}")
        horizon = len(rows) if horizon is None else horizon
        if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
            raise InputError(f"horizon: expected a positive integer, got {horizon!r}")
        mean = rows.mean(dim=0)
        n = torch.arange(1, horizon + 1, dtype=torch.float64)
        benign = rdp_to_epsilon(n[:, None] * mean, o, delta)
        gen = torch.Generator().manual_seed(seed)
        worst, final = 0.0, []
        for _ in range(streams):
            pick = torch.randint(len(rows), (horizon,), generator=gen)
            excess = rdp_to_epsilon(rows[pick].cumsum(dim=0), o, delta) - benign
            worst = max(worst, float(excess.max()))
            final.append(float(excess[-1]))
        spread = float(np.std(final))
        return cls(
            orders=o, benign_rdp=mean, delta=delta, tolerance=max(worst, 1e-6), scale=max(spread, 1e-6),
            unit_work=overhead * baseline_work / math.sqrt(2.0),
            max_doublings=max_doublings, max_bits=max_bits,
        )  # fmt: skip

    def benign_epsilon(self, queries: int | torch.Tensor) -> torch.Tensor:
        """``ε_b(n)``: ε of ``n`` queries each costing the benign mean."""
        n = torch.as_tensor(queries, dtype=torch.float64)
        return rdp_to_epsilon(n[..., None] * self.benign_rdp, self.orders, self.delta)

    def doublings(self, queries: int | torch.Tensor, epsilon: float | torch.Tensor) -> torch.Tensor:
        """``clip((ε − ε_b(n) − τ)/s, 0, max_doublings)``."""
        excess = torch.as_tensor(epsilon, dtype=torch.float64) - self.benign_epsilon(queries) - self.tolerance
        return (excess / self.scale).clamp(0.0, self.max_doublings)

    def query_work(self, queries: int | torch.Tensor, epsilon: float | torch.Tensor) -> torch.Tensor:
        """Hash evaluations for one query by an account at ``(n, ε)`` (that query included)."""
        return self.unit_work * torch.exp2(self.doublings(queries, epsilon))

    def request_work(self, ledger: PrivacyLedger, rdp_rows: torch.Tensor) -> float:
        """The work of a request of queries costing ``rdp_rows`` ``(n, L)`` from an account
        with ``ledger`` (not charged): each query priced at the account's count and ε after it."""
        if not torch.equal(ledger.orders, self.orders):
            raise InputError("ledger: its Rényi orders differ from the calibrator's")
        eps = ledger.epsilons_after(rdp_rows, self.delta)
        n = ledger.queries + torch.arange(1, len(eps) + 1, dtype=torch.float64)
        return float(self.query_work(n, eps).sum())

    def request_bits(self, ledger: PrivacyLedger, rdp_rows: torch.Tensor) -> int:
        """The puzzle for that request: ``round(log2(request_work))``, at most ``max_bits``."""
        return bits_for_work(self.request_work(ledger, rdp_rows), max_bits=self.max_bits)

    def state_dict(self) -> dict[str, Any]:
        """Everything, as tensors and plain values (``torch.save`` round-trips it)."""
        return {
            "orders": self.orders.clone(), "benign_rdp": self.benign_rdp.clone(), "delta": self.delta,
            "tolerance": self.tolerance, "scale": self.scale, "unit_work": self.unit_work,
            "max_doublings": self.max_doublings, "max_bits": self.max_bits,
        }  # fmt: skip

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Calibrator:
        keys = (
            "orders",
            "benign_rdp",
            "delta",
            "tolerance",
            "scale",
            "unit_work",
            "max_doublings",
            "max_bits",
        )
        state = check_state_keys("Calibrator", state, keys)
        orders = state_tensor("Calibrator", "orders", state["orders"], dtype=torch.float64, shape=(None,))
        benign = state_tensor("Calibrator", "benign_rdp", state["benign_rdp"], dtype=torch.float64,
                              shape=(len(orders),))  # fmt: skip
        return cls(orders=orders, benign_rdp=benign, **{k: state[k] for k in keys[2:]})


# ---------------------------------------------------------------------------- the server's side


class PowGate:
    """The server's side of calibrated proof of work, for any transport.

    ``challenge(account, x)`` prices a request's queries and returns a puzzle bound to the
    account and to the queries; ``redeem(account, header, nonce, x)`` checks the solution
    and charges the account; the server answers only after ``redeem`` returned.

    Args:
        cost: the teachers.
        calibrator: the price list (its orders must be the cost's).
        secret: the HMAC key (at least 16 bytes); a restart with a new key voids every
            outstanding puzzle.
        ttl: seconds a puzzle stays valid (long enough to solve a ``max_bits`` puzzle).
        seen: the replay memory (default: a new :class:`SeenChallenges`).
        cache: the costs of the last ``cache`` requests :meth:`challenge` priced are kept,
            so that :meth:`redeem` need not ask the teachers again; 0: none.

    Concurrency: accounts have their own ledgers (thread-safe). Two requests of one
    account priced concurrently are both priced on the ledger before either is charged,
    so a server that answers one account's requests in parallel should serialise them
    per account, as ``ServedAPI`` does. State: :meth:`state_dict` (every account's ledger
    and the replay memory); the teachers and calibrator are configuration.
    """

    def __init__(
        self,
        cost: PateCost,
        calibrator: Calibrator,
        secret: bytes,
        *,
        ttl: float = 600.0,
        seen: SeenChallenges | None = None,
        cache: int = 256,
    ) -> None:
        if not torch.equal(cost.orders, calibrator.orders):
            raise InputError("PowGate: the cost model and the calibrator use different Rényi orders")
        if not isinstance(secret, bytes) or len(secret) < 16:
            raise InputError("secret: expected at least 16 bytes")
        if not (math.isfinite(ttl) and ttl > 0):
            raise InputError(f"ttl: expected a positive number of seconds, got {ttl!r}")
        self.cost, self.calibrator, self.ttl = cost, calibrator, float(ttl)
        self._secret = secret
        self.seen = SeenChallenges() if seen is None else seen
        if isinstance(cache, bool) or not isinstance(cache, int) or cache < 0:
            raise InputError(f"cache: expected a non-negative integer, got {cache!r}")
        self.cache = cache
        self._priced: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._ledgers: dict[str, PrivacyLedger] = {}
        self._lock = StateLock()

    def ledger(self, account: str) -> PrivacyLedger:
        with self._lock:
            ledger = self._ledgers.get(account)
            if ledger is None:
                ledger = self._ledgers[account] = PrivacyLedger(self.calibrator.orders)
            return ledger

    def price(self, account: str, x: object) -> tuple[int, torch.Tensor]:
        """``(bits, rdp_rows)`` of a request of queries ``x`` for ``account`` (nothing charged)."""
        rows = self.cost.query_rdp(x)
        return self.calibrator.request_bits(self.ledger(account), rows), rows

    def challenge(self, account: str, x: torch.Tensor, *, now: float | None = None) -> Puzzle:
        """The puzzle the client must solve before ``x`` is answered."""
        bits, rows = self.price(account, x)
        digest = request_digest(x)
        puzzle = issue_puzzle(self._secret, account, bits, self.ttl, request=digest, now=now)
        if self.cache:
            with self._lock:
                self._priced[digest] = rows
                self._priced.move_to_end(digest)
                while len(self._priced) > self.cache:
                    self._priced.popitem(last=False)
        return puzzle

    def redeem(
        self,
        account: str,
        puzzle_header: str | Puzzle,
        nonce: str,
        x: torch.Tensor,
        *,
        now: float | None = None,
        rdp_rows: torch.Tensor | None = None,
    ) -> Puzzle:
        """Check the solution for the request ``x`` (raises :class:`PowError`), then charge
        the account with ``x``'s cost (``rdp_rows`` if the caller kept them from
        :meth:`price`, else those cached by :meth:`challenge`, else recomputed). Returns
        the puzzle."""
        digest = request_digest(x)
        puzzle = check_solution(
            self._secret, account, puzzle_header, nonce, now, request=digest, seen=self.seen
        )
        if rdp_rows is None:
            with self._lock:
                cached = self._priced.pop(digest, None)
            rdp_rows = self.cost.query_rdp(x) if cached is None else cached
        self.ledger(account).add(rdp_rows)
        return puzzle

    def state_dict(self) -> dict[str, Any]:
        with self._lock:
            ledgers = {a: led.state_dict() for a, led in self._ledgers.items()}
        return {"ledgers": ledgers, "seen": self.seen.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = check_state_keys("PowGate", state, ("ledgers", "seen"))
        if not isinstance(state["ledgers"], dict):
            raise InputError("PowGate: state 'ledgers': expected a dict of account -> ledger state")
        ledgers: dict[str, PrivacyLedger] = {}
        for account, sub in state["ledgers"].items():
            led = PrivacyLedger(self.calibrator.orders)
            led.load_state_dict(sub)
            ledgers[str(account)] = led
        self.seen.load_state_dict(state["seen"])
        with self._lock:
            self._ledgers = ledgers


__all__ = [
    "CALIBRATOR_MAX_BITS",
    "DEFAULT_DELTA",
    "DEFAULT_ORDERS",
    "PATE_SIGMA",
    "PATE_TEACHERS",
    "TEACHER_TRAINING",
    "Calibrator",
    "PateCost",
    "PowError",
    "PowGate",
    "PrivacyLedger",
    "Puzzle",
    "SeenChallenges",
    "bits_for_work",
    "check_solution",
    "expected_hashes",
    "gnmax_log_q",
    "gnmax_rdp",
    "gnmax_rdp_data_independent",
    "gnmax_rdp_from_log_q",
    "hash_rate",
    "issue_puzzle",
    "leading_zero_bits",
    "rdp_to_epsilon",
    "request_digest",
    "solve",
]
