"""Accounts, the query log and persistent state: a real server on 127.0.0.1, a real SQLite file."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from mextract.cli import app as cli
from mextract.data import IMAGE_RANGE
from mextract.defences import DawnWatermark
from mextract.defences.detection import Prada
from mextract.defences.pow import Calibrator, PateCost, PowGate, Puzzle, solve
from mextract.errors import BudgetExceededError, DataError, InputError
from mextract.oracle import RemoteAPIError, RemoteOracle, VictimOracle
from mextract.protocol import encode_request
from mextract.server import ServedAPI, create_app, running
from mextract.server.store import AuthError, Store

INFER = "/v2/models/victim/infer"


def _victim(mode: str = "probs") -> VictimOracle:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 5))
    return VictimOracle(net, input_shape=(1, 4, 4), num_classes=5, mode=mode, value_range=IMAGE_RANGE)


def _body(n: int, seed: int = 0) -> tuple[bytes, dict[str, str]]:
    x = np.random.default_rng(seed).random((n, 1, 4, 4), dtype=np.float32)
    return encode_request(x, input_name="input", output_name="output", binary=True)


def _post(base: str, key: str | None, n: int, seed: int = 0) -> httpx.Response:
    content, headers = _body(n, seed)
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.post(base + INFER, content=content, headers=headers)


def test_keys_are_stored_hashed_and_checked(tmp_path: Path) -> None:
    with Store(tmp_path / "api.db") as store:
        account, key = store.create_account("alice", budget=10)
        assert key.startswith("mx-") and len(key) > 40 and account.key_start == key[:9]
        assert store.authenticate(key).name == "alice"
        with pytest.raises(AuthError, match="no API key") as missing:
            store.authenticate(None)
        assert missing.value.status == 401
        with pytest.raises(AuthError, match="not valid") as wrong:
            store.authenticate(key + "x")
        assert wrong.value.status == 403
        store.revoke("alice")
        with pytest.raises(AuthError, match="revoked") as revoked:
            store.authenticate(key)
        assert revoked.value.status == 403
        with pytest.raises(InputError, match="exists already"):
            store.create_account("alice")
        with pytest.raises(InputError, match="account name"):
            store.create_account("a b")
    raw = (tmp_path / "api.db").read_bytes() + b"".join(p.read_bytes() for p in tmp_path.glob("api.db-*"))
    assert key.encode() not in raw and key[9:].encode() not in raw  # the key itself is nowhere on disk


def test_the_log_is_append_only_and_the_store_serves_one_api(tmp_path: Path) -> None:
    path = tmp_path / "api.db"
    with Store(path) as store:
        store.create_account("alice")
        api = ServedAPI(_victim(), store=store)
        api.query("alice", torch.rand(3, 1, 4, 4))
        assert [r[3] for r in store.log_rows("alice")] == [0, 1, 2]
        with pytest.raises(DataError, match="another API"):
            ServedAPI(_victim("label"), store=store)
    db = sqlite3.connect(path)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("DELETE FROM queries")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("UPDATE queries SET account = 'bob'")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "api.db")


def test_http_keys_budgets_and_the_log(store: Store) -> None:
    _, alice = store.create_account("alice", budget=30)
    _, bob = store.create_account("bob")
    _, admin = store.create_account("root", admin=True)
    api = ServedAPI(_victim(), store=store)
    with running(create_app(api)) as base:
        missing = _post(base, None, 2)
        assert missing.status_code == 401 and "no API key" in missing.json()["error"]
        assert _post(base, "mx-wrong", 2).status_code == 403
        assert httpx.get(f"{base}/v2/models/victim").status_code == 401  # metadata too
        assert httpx.get(f"{base}/v2/health/ready").status_code == 200  # health needs no key
        for i in range(3):
            ok = _post(base, alice, 10, seed=i)
            assert ok.status_code == 200 and ok.headers["x-queries-remaining"] == str(20 - 10 * i)
        spent = _post(base, alice, 1)
        assert spent.status_code == 403 and spent.json()["kind"] == "budget_exhausted"
        assert "30 of 30" in spent.json()["error"]
        assert _post(base, bob, 4).status_code == 200  # bob is not alice
        store.revoke("bob")
        refused = _post(base, bob, 1)
        assert refused.status_code == 403 and "revoked" in refused.json()["error"]
        # one log row per answered sample, and none for a refused request
        assert store.spent() == {"alice": 30, "bob": 4}
        assert len(store.log_rows()) == 34
        admin_view = httpx.get(f"{base}/v2/admin/accounts", headers={"Authorization": f"Bearer {admin}"})
        rows = {r["name"]: r for r in admin_view.json()}
        assert rows["alice"]["spent"] == 30 and rows["alice"]["remaining"] == 0 and not rows["bob"]["active"]
        not_admin = httpx.get(f"{base}/v2/admin/accounts", headers={"Authorization": f"Bearer {alice}"})
        assert not_admin.status_code == 403


def test_rate_limits_answer_429_with_retry_after_and_the_client_waits(store: Store) -> None:
    _, key = store.create_account("alice", rate=40.0, burst=8)
    api = ServedAPI(_victim(), store=store)
    with running(create_app(api)) as base:
        assert _post(base, key, 8).status_code == 200
        limited = _post(base, key, 8)
        assert limited.status_code == 429 and limited.json()["kind"] == "rate_limited"
        assert int(limited.headers["retry-after"]) >= 1 and 0 < limited.json()["retry_after"] <= 0.2 + 1e-6
        too_big = _post(base, key, 9)
        assert too_big.status_code == 400 and "burst of 8" in too_big.json()["error"]
        assert store.spent() == {"alice": 8}
        with RemoteOracle(f"{base}/v2/models/victim", api_key=key) as remote:
            assert remote.batch_size == 8  # the account's burst, from the usage route
            start = time.monotonic()
            remote.query(torch.rand(48, 1, 4, 4))  # 6 batches at 40/s: waits, never fails
            assert time.monotonic() - start >= 0.9
        assert store.spent() == {"alice": 56}


def _dawn_layer(api: ServedAPI, client: str) -> DawnWatermark:
    layer = api.oracle(client)
    while not isinstance(layer, DawnWatermark):
        layer = layer.inner  # type: ignore[attr-defined]
    return layer


@pytest.mark.parametrize("snapshot_every", [1, 4, 1000])
def test_a_restart_resumes_budgets_evidence_and_detector_state(tmp_path: Path, snapshot_every: int) -> None:
    """A second server on the same file, while the first is gone without close() (a crash):
    snapshot + replay rebuild the first's state exactly."""
    path = tmp_path / "api.db"
    spec = 'dawn:{"fraction": 0.3}+dp_noise:{"epsilon": 1.0}'
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(n, 1, 4, 4, generator=g) for n in (5, 9, 3, 12, 7, 6)]
    old_store = Store(path)
    old_store.create_account("alice", budget=60)
    first = ServedAPI(_victim(), defence=spec, store=old_store, detect=Prada(), snapshot_every=snapshot_every)
    for b in batches:
        first.query("alice", b)
    with Store(path) as store:
        again = ServedAPI(_victim(), defence=spec, store=store, detect=Prada(), snapshot_every=snapshot_every)
        assert again.spent("alice") == 42 and again.remaining("alice") == 18  # before any request
        nxt = torch.rand(10, 1, 4, 4, generator=g)
        got = again.query("alice", nxt)
        assert torch.equal(got, first.oracle("alice").query(nxt))  # the noise stream went on
        a, b = _dawn_layer(first, "alice").watermark_set, _dawn_layer(again, "alice").watermark_set
        assert len(a[0]) > 0 and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert again.detect is not None and first.detect is not None
        assert again.detect.report("alice") == first.detect.report("alice")
        with pytest.raises(BudgetExceededError):
            again.query("alice", torch.rand(9, 1, 4, 4))
        assert store.spent() == {"alice": 52}
    old_store.close()


def test_alarms_are_logged_and_degrade_the_account(store: Store) -> None:
    store.create_account("prober")
    api = ServedAPI(_victim("probs"), store=store, detect=Prada(), on_alarm="degrade")
    g = torch.Generator().manual_seed(0)
    base = torch.rand(1, 1, 4, 4, generator=g)
    for i in range(1, 300):
        answers = api.query("prober", (base + torch.randn(1, 1, 4, 4, generator=g) * 0.5**i).clamp(0, 1))
        if api.detect is not None and api.detect.flagged("prober"):
            break
    assert store.alarms("prober") and "PRADA flagged query" in store.alarms("prober")[0][3]
    later = api.query("prober", torch.rand(4, 1, 4, 4, generator=g))
    assert torch.equal(later.sum(1), torch.ones(4)) and set(later.unique().tolist()) <= {0.0, 1.0}
    assert answers.shape == (1, 5)


def test_keys_command_line(tmp_path: Path) -> None:
    runner = CliRunner()
    db = str(tmp_path / "api.db")
    made = runner.invoke(cli, ["keys", "create", "alice", "--store", db, "--budget", "100", "--rate", "5"])
    assert made.exit_code == 0, made.output
    key = made.stdout.strip().splitlines()[-1]
    assert key.startswith("mx-")
    with Store(db) as store:
        assert store.authenticate(key).name == "alice" and store.account("alice").burst == 5
    listed = runner.invoke(cli, ["keys", "list", "--store", db, "--json"])
    assert listed.exit_code == 0 and '"budget": 100' in listed.stdout and key not in listed.stdout
    assert runner.invoke(cli, ["keys", "revoke", "alice", "--store", db]).exit_code == 0
    again = runner.invoke(cli, ["keys", "revoke", "alice", "--store", db], env={"COLUMNS": "200"})
    assert again.exit_code == 2 and "revoked already" in again.output
    assert runner.invoke(cli, ["keys", "create", "b", "--store", db, "--burst", "3"]).exit_code == 2
    args = ["keys", "list", "--store", str(tmp_path / "none.db")]
    nothing = runner.invoke(cli, args, env={"COLUMNS": "200"})
    assert nothing.exit_code == 2 and "does not exist" in nothing.output


def _gate(bits_scale: float = 64.0) -> PowGate:
    """A tiny calibrated proof of work: 5 random linear teachers on the 4×4 inputs."""
    torch.manual_seed(1)
    teachers = [nn.Sequential(nn.Flatten(), nn.Linear(16, 5)).eval() for _ in range(5)]
    cost = PateCost(teachers, 5)
    benign = cost.query_rdp(torch.rand(64, 1, 4, 4, generator=torch.Generator().manual_seed(2)))
    calibrator = Calibrator.fit(benign, baseline_work=bits_scale, max_bits=14)
    return PowGate(cost, calibrator, secret=b"0123456789abcdef-test")


def test_proof_of_work_is_asked_for_solved_by_remote_oracle_and_refused_wrong(store: Store) -> None:
    _, key = store.create_account("alice", budget=100)
    gate = _gate()
    api = ServedAPI(_victim(), store=store, pow=gate)
    auth = {"Authorization": f"Bearer {key}"}
    with running(create_app(api)) as base:
        content, headers = _body(4, seed=1)
        asked = httpx.post(base + INFER, content=content, headers={**headers, **auth})
        assert asked.status_code == 428 and asked.json()["kind"] == "proof_of_work"
        puzzle = asked.headers["x-pow-puzzle"]
        assert puzzle == asked.json()["puzzle"] and store.spent() == {}
        bad = {**headers, **auth, "X-PoW-Puzzle": puzzle, "X-PoW-Nonce": "nope"}
        wrong = httpx.post(base + INFER, content=content, headers=bad)
        if Puzzle.from_header(puzzle).bits > 0:  # a nonce that happens to solve it is astronomically rare
            assert wrong.status_code == 403 and wrong.json()["kind"] == "proof_of_work_invalid"
        nonce, _ = solve(puzzle)
        proof = {**headers, **auth, "X-PoW-Puzzle": puzzle, "X-PoW-Nonce": nonce}
        assert httpx.post(base + INFER, content=content, headers=proof).status_code == 200
        replayed = httpx.post(base + INFER, content=content, headers=proof)
        assert replayed.status_code == 403 and "replayed" in replayed.json()["error"]
        other, other_headers = _body(4, seed=2)  # a puzzle prices one request, not another
        moved = httpx.post(base + INFER, content=other, headers={**other_headers, **auth,
                           "X-PoW-Puzzle": puzzle, "X-PoW-Nonce": nonce})  # fmt: skip
        assert moved.status_code == 403 and moved.json()["kind"] == "proof_of_work_invalid"
        assert store.spent() == {"alice": 4}
        with RemoteOracle(f"{base}/v2/models/victim", api_key=key, batch_size=8) as remote:
            remote.query(torch.rand(24, 1, 4, 4))
            assert remote.pow_puzzles == 3 and remote.pow_hashes >= 3
        assert store.spent() == {"alice": 28}
        assert gate.ledger("alice").queries == 28  # the privacy cost of every answered query


def test_remote_oracle_refuses_a_puzzle_over_its_limit(store: Store) -> None:
    _, key = store.create_account("alice")
    api = ServedAPI(_victim(), store=store, pow=_gate(bits_scale=2.0**20))
    with running(create_app(api)) as base, RemoteOracle(f"{base}/v2/models/victim", api_key=key,
                                                         max_pow_bits=4) as remote:  # fmt: skip
        with pytest.raises(RemoteAPIError, match="solves at most 4 bits"):
            remote.query(torch.rand(8, 1, 4, 4))
        assert remote.ledger.count == 0 and remote.pow_hashes == 0 and store.spent() == {}
