"""The owner's record of a served API, in one SQLite file: accounts, the query log,
state snapshots and alarms.

Why SQLite: it is embedded (no server to run), transactional, and in WAL mode lets
readers (``mextract keys list``, the admin endpoint) read while the server writes. The
file is opened with ``synchronous=FULL``: a transaction that has committed is on disk,
so a crash — ``kill -9``, or the machine losing power — never loses an answered request.

Tables:

* ``accounts`` — one row per API key: the key's SHA-256 (never the key itself: keys are
  256-bit random tokens, so an unsalted fast hash cannot be inverted or brute-forced),
  the first characters of the key (to tell keys apart), a query budget, a token-bucket
  rate limit, an admin flag, and when it was revoked.
* ``queries`` — the query log, append-only (triggers refuse UPDATE and DELETE): one row
  per answered *sample*, with its account, the request it came in, its position in that
  request, the time, the input's raw bytes and the answer's raw bytes (in the API's
  dtype). A request's rows are committed in one transaction *before* its answer leaves
  the server.
* ``snapshots`` — per account, the latest state of its defence stack and detector
  (``state_dict`` saved with ``torch.save``) and the log position it covers. The state
  after that position is rebuilt by replaying the logged requests, so a restart, even
  after ``kill -9``, resumes budgets, PRADA histories and watermark evidence exactly.
* ``alarms`` — detector alarms per account.
* ``meta`` — the public description and defence spec of the API that writes the log;
  a store refuses to serve another API (its log and state would not fit).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mextract.errors import DataError, InputError, MextractError

KEY_PREFIX = "mx-"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS accounts (
    name TEXT PRIMARY KEY,
    key_sha256 TEXT NOT NULL UNIQUE,
    key_start TEXT NOT NULL,
    budget INTEGER,
    rate REAL,
    burst INTEGER,
    admin INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    revoked REAL
);
CREATE TABLE IF NOT EXISTS queries (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    account TEXT NOT NULL,
    request TEXT NOT NULL,
    item INTEGER NOT NULL,
    time REAL NOT NULL,
    input BLOB NOT NULL,
    answer BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS queries_by_account ON queries (account, seq);
CREATE TRIGGER IF NOT EXISTS queries_append_only_update BEFORE UPDATE ON queries
BEGIN SELECT RAISE(ABORT, 'the query log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS queries_append_only_delete BEFORE DELETE ON queries
BEGIN SELECT RAISE(ABORT, 'the query log is append-only'); END;
CREATE TABLE IF NOT EXISTS snapshots (
    account TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    time REAL NOT NULL,
    state BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS alarms (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    account TEXT NOT NULL,
    time REAL NOT NULL,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL
);
"""


class AuthError(MextractError):
    """A request without a valid key: ``status`` 401 (no key) or 403 (wrong or revoked)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Account:
    """One API key's account (the key itself is never stored)."""

    name: str
    key_start: str
    budget: int | None
    rate: float | None
    burst: int | None
    admin: bool
    created: float
    revoked: float | None

    @property
    def active(self) -> bool:
        return self.revoked is None


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _check_name(name: str) -> str:
    ok = isinstance(name, str) and 0 < len(name) <= 64 and all(c.isalnum() or c in "-_." for c in name)
    if not ok:
        raise InputError(f"account name: expected 1 to 64 letters, digits, '-', '_' or '.', got {name!r}")
    return name


class Store:
    """An API's accounts, query log, state snapshots and alarms in one SQLite file (WAL).

    Thread-safe: one connection, used under a lock (SQLite has one writer at a time anyway).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise DataError(f"{self.path} is a folder; expected an SQLite file (e.g. api.db)")
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise DataError(f"{self.path}: not a usable SQLite store ({exc})") from None
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # ------------------------------------------------------------------ the API it serves

    def bind(self, description: dict[str, Any], defence: str) -> None:
        """Remember which API writes this store, or refuse a different one."""
        want = json.dumps({"api": description, "defence": defence}, sort_keys=True)
        with self._transaction() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'api'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('api', ?)", (want,))
            elif row[0] != want:
                raise DataError(
                    f"{self.path} holds the log of another API ({row[0]}); this one is {want}: "
                    "give the API its own store"
                )

    # ------------------------------------------------------------------ accounts

    def create_account(
        self,
        name: str,
        *,
        budget: int | None = None,
        rate: float | None = None,
        burst: int | None = None,
        admin: bool = False,
    ) -> tuple[Account, str]:
        """A new account and its key (returned once; only its hash is stored)."""
        _check_name(name)
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
            raise InputError(f"budget: expected a positive number of queries, got {budget!r}")
        if rate is not None and not 0 < rate < float("inf"):
            raise InputError(f"rate: expected a positive number of queries per second, got {rate!r}")
        if burst is not None and (rate is None or isinstance(burst, bool) or burst < 1):
            raise InputError(f"burst: expected a positive number of queries, with a rate; got {burst!r}")
        if rate is not None and burst is None:
            burst = max(1, int(np.ceil(rate)))  # one second's worth
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        now = time.time()
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM accounts WHERE name = ?", (name,)).fetchone():
                raise InputError(f"account {name!r} exists already")
            db.execute(
                "INSERT INTO accounts VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL)",
                (name, _hash(key), key[: len(KEY_PREFIX) + 6], budget, rate, burst, int(admin), now),
            )
        return self.account(name), key

    def _row_account(self, row: tuple[Any, ...]) -> Account:
        name, key_start, budget, rate, burst, admin, created, revoked = row
        return Account(name, key_start, budget, rate, burst, bool(admin), created, revoked)

    _ACCOUNT = "SELECT name, key_start, budget, rate, burst, admin, created, revoked FROM accounts"

    def account(self, name: str) -> Account:
        with self._lock:
            row = self._db.execute(f"{self._ACCOUNT} WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise InputError(f"no account {name!r} in {self.path}")
        return self._row_account(row)

    def accounts(self) -> list[Account]:
        with self._lock:
            rows = self._db.execute(f"{self._ACCOUNT} ORDER BY name").fetchall()
        return [self._row_account(r) for r in rows]

    def revoke(self, name: str) -> Account:
        with self._transaction() as db:
            found = db.execute("UPDATE accounts SET revoked = ? WHERE name = ? AND revoked IS NULL",
                               (time.time(), name)).rowcount  # fmt: skip
        if not found:
            self.account(name)  # unknown: raises
            raise InputError(f"account {name!r} is revoked already")
        return self.account(name)

    def authenticate(self, key: str | None) -> Account:
        """The account of ``key``; :class:`AuthError` 401 without a key, 403 for a wrong or
        revoked one."""
        if not key:
            raise AuthError("no API key: send 'Authorization: Bearer <key>'", 401)
        with self._lock:
            row = self._db.execute(f"{self._ACCOUNT} WHERE key_sha256 = ?", (_hash(key),)).fetchone()
        if row is None:
            raise AuthError("this API key is not valid", 403)
        account = self._row_account(row)
        if not account.active:
            raise AuthError(f"the API key of account {account.name!r} was revoked", 403)
        return account

    # ------------------------------------------------------------------ the query log

    def log(self, account: str, request: str, x: np.ndarray, answers: np.ndarray) -> int:
        """Append one row per sample of an answered request, committed before returning;
        returns the last row's ``seq``."""
        now = time.time()
        rows = [(account, request, i, now, np.ascontiguousarray(x[i]).tobytes(),
                 np.ascontiguousarray(answers[i]).tobytes()) for i in range(len(x))]  # fmt: skip
        with self._transaction() as db:
            db.executemany(
                "INSERT INTO queries (account, request, item, time, input, answer) VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
            last = db.execute("SELECT last_insert_rowid()").fetchone()[0]
        return int(last)

    def spent(self, account: str | None = None) -> dict[str, int]:
        """Samples answered per account, counted from the log."""
        with self._lock:
            rows = self._db.execute(
                "SELECT account, COUNT(*) FROM queries GROUP BY account"
                if account is None else
                "SELECT account, COUNT(*) FROM queries WHERE account = ? GROUP BY account",
                () if account is None else (account,),
            ).fetchall()  # fmt: skip
        return {a: int(n) for a, n in rows}

    def requests(
        self, account: str, after: int, input_shape: tuple[int, ...], dtype: np.dtype[Any]
    ) -> Iterator[tuple[int, np.ndarray]]:
        """The account's logged requests after log position ``after``, in order: (last seq,
        the request's inputs as one batch)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, request, input FROM queries WHERE account = ? AND seq > ? ORDER BY seq",
                (account, after),
            ).fetchall()
        batch: list[np.ndarray] = []
        current, last = None, after
        for seq, request, raw in rows:
            if request != current and batch:
                yield last, np.stack(batch)
                batch = []
            current, last = request, seq
            batch.append(np.frombuffer(raw, dtype=dtype).reshape(input_shape))
        if batch:
            yield last, np.stack(batch)

    def log_rows(self, account: str | None = None) -> list[tuple[int, str, str, int]]:
        """``(seq, account, request, item)`` of every logged sample (for audits and tests)."""
        with self._lock:
            return self._db.execute(
                "SELECT seq, account, request, item FROM queries"
                + ("" if account is None else " WHERE account = ?") + " ORDER BY seq",
                () if account is None else (account,),
            ).fetchall()  # fmt: skip

    # ------------------------------------------------------------------ snapshots

    def save_snapshot(self, account: str, seq: int, state: dict[str, Any]) -> None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO snapshots VALUES (?, ?, ?, ?)",
                       (account, seq, time.time(), buffer.getvalue()))  # fmt: skip

    def snapshot(self, account: str) -> tuple[int, dict[str, Any]] | None:
        """The latest snapshot of ``account``: (log position it covers, state), or ``None``."""
        with self._lock:
            query = "SELECT seq, state FROM snapshots WHERE account = ?"
            row = self._db.execute(query, (account,)).fetchone()
        if row is None:
            return None
        return int(row[0]), torch.load(io.BytesIO(row[1]), weights_only=True)

    # ------------------------------------------------------------------ alarms

    def alarm(self, account: str, kind: str, detail: str) -> None:
        with self._transaction() as db:
            db.execute("INSERT INTO alarms (account, time, kind, detail) VALUES (?, ?, ?, ?)",
                       (account, time.time(), kind, detail))  # fmt: skip

    def alarms(self, account: str | None = None) -> list[tuple[str, float, str, str]]:
        with self._lock:
            return self._db.execute(
                "SELECT account, time, kind, detail FROM alarms"
                + ("" if account is None else " WHERE account = ?") + " ORDER BY id",
                () if account is None else (account,),
            ).fetchall()  # fmt: skip

    def usage(self) -> list[dict[str, Any]]:
        """The admin view: every account with its limits, queries spent and alarms."""
        spent = self.spent()
        alarms: dict[str, list[str]] = {}
        for account, _, kind, detail in self.alarms():
            alarms.setdefault(account, []).append(f"{kind}: {detail}")
        out = []
        for a in self.accounts():
            n = spent.get(a.name, 0)
            left = None if a.budget is None else max(a.budget - n, 0)
            out.append({
                "name": a.name, "key": a.key_start + "…", "admin": a.admin, "active": a.active,
                "budget": a.budget, "spent": n, "remaining": left,
                "rate": a.rate, "burst": a.burst, "alarms": alarms.get(a.name, []),
            })  # fmt: skip
        return out
