"""Calibrated proof of work (mextract.defences.pow): puzzles, GNMax privacy cost, ledgers,
calibration, and the server-side gate."""

from __future__ import annotations

import io
import math
import threading

import numpy as np
import pytest
import torch

from mextract.defences.pow import (
    DEFAULT_ORDERS,
    Calibrator,
    PateCost,
    PowError,
    PowGate,
    PrivacyLedger,
    Puzzle,
    SeenChallenges,
    bits_for_work,
    check_solution,
    expected_hashes,
    gnmax_log_q,
    gnmax_rdp,
    gnmax_rdp_data_independent,
    hash_rate,
    issue_puzzle,
    leading_zero_bits,
    rdp_to_epsilon,
    request_digest,
    solve,
)
from mextract.errors import InputError

SECRET = b"k" * 32
NOW = 1_000_000.0


def kind(exc: pytest.ExceptionInfo[PowError]) -> str:
    return exc.value.kind


# ---------------------------------------------------------------------------- puzzles


def test_issue_solve_check_round_trip() -> None:
    puzzle = issue_puzzle(SECRET, "alice", 10, 60.0, now=NOW)
    header = puzzle.to_header()
    assert Puzzle.from_header(header) == puzzle
    assert header.startswith("v1;") and header.count(";") == 6
    nonce, hashes = solve(header)
    assert leading_zero_bits(puzzle.challenge, nonce) >= 10 and hashes == int(nonce, 16) + 1
    assert check_solution(SECRET, "alice", header, nonce, NOW + 1) == puzzle
    zero = issue_puzzle(SECRET, "alice", 0, 60.0, now=NOW)
    assert solve(zero) == ("0", 1)


def test_wrong_nonce_expired_forged_and_other_account_are_refused() -> None:
    puzzle = issue_puzzle(SECRET, "alice", 12, 60.0, now=NOW)
    header = puzzle.to_header()
    nonce, _ = solve(puzzle)
    bad = next(n for n in (f"{i:x}" for i in range(100)) if leading_zero_bits(puzzle.challenge, n) < 12)
    with pytest.raises(PowError, match="too few zero bits") as e:
        check_solution(SECRET, "alice", header, bad, NOW)
    assert kind(e) == "insufficient"
    with pytest.raises(PowError, match="expired") as e:
        check_solution(SECRET, "alice", header, nonce, puzzle.expires + 0.5)
    assert kind(e) == "expired"
    # an easier puzzle claimed with the same signature, or a puzzle of another server
    easier = header.replace(";12;", ";1;")
    for forged, secret in ((easier, SECRET), (header, b"x" * 32)):
        with pytest.raises(PowError, match="forged") as e:
            check_solution(secret, "alice", forged, nonce, NOW)
        assert kind(e) == "forged"
    with pytest.raises(PowError, match="another account") as e:
        check_solution(SECRET, "bob", header, nonce, NOW)
    assert kind(e) == "wrong_account"


def test_request_binding() -> None:
    x = torch.rand(4, 1, 8, 8)
    puzzle = issue_puzzle(SECRET, "alice", 4, 60.0, request=request_digest(x), now=NOW)
    nonce, _ = solve(puzzle)
    check_solution(SECRET, "alice", puzzle.to_header(), nonce, NOW, request=request_digest(x))
    with pytest.raises(PowError, match="another request") as e:
        check_solution(SECRET, "alice", puzzle.to_header(), nonce, NOW, request=request_digest(x + 1e-3))
    assert kind(e) == "wrong_request"
    assert request_digest(x) == request_digest(x.clone()) != request_digest(x.double())


def test_replay_is_refused_with_seen_challenges() -> None:
    seen = SeenChallenges()
    puzzle = issue_puzzle(SECRET, "alice", 4, 60.0, now=NOW)
    nonce, _ = solve(puzzle)
    check_solution(SECRET, "alice", puzzle.to_header(), nonce, NOW, seen=seen)
    with pytest.raises(PowError, match="already redeemed") as e:
        check_solution(SECRET, "alice", puzzle.to_header(), nonce, NOW + 1, seen=seen)
    assert kind(e) == "replayed"
    other = f"{int(nonce, 16) + 1:x}"  # another solution of the same puzzle is a replay too
    with pytest.raises(PowError):
        check_solution(SECRET, "alice", puzzle.to_header(), other, NOW + 1, seen=seen)


def test_seen_challenges_drops_expired_bounds_memory_and_is_thread_safe() -> None:
    seen = SeenChallenges(max_entries=3)
    assert seen.add("a", 10.0, now=0.0) and not seen.add("a", 10.0, now=1.0)
    assert seen.add("b", 20.0, now=0.0) and seen.add("c", 30.0, now=0.0)
    with pytest.raises(PowError, match="retry later") as e:
        seen.add("d", 40.0, now=5.0)
    assert kind(e) == "capacity" and len(seen) == 3
    assert seen.add("d", 40.0, now=15.0)  # "a" expired and was dropped
    assert "a" not in seen and len(seen) == 3
    restored = SeenChallenges(max_entries=3)
    restored.load_state_dict(torch.load(_saved(seen.state_dict()), weights_only=True))
    assert not restored.add("d", 40.0, now=16.0)

    many = SeenChallenges()
    wins: list[bool] = []
    threads = [
        threading.Thread(target=lambda: wins.append(many.add("same", 10.0, now=0.0))) for _ in range(16)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == [False] * 15 + [True]


@pytest.mark.parametrize(
    "header",
    [
        "",
        "v2;" + "0" * 32 + ";4;1.0;" + "0" * 16 + ";-;" + "0" * 64,
        "v1;" + "0" * 31 + ";4;1.0;" + "0" * 16 + ";-;" + "0" * 64,
        "v1;" + "0" * 32 + ";-4;1.0;" + "0" * 16 + ";-;" + "0" * 64,
        "v1;" + "0" * 32 + ";4;nan;" + "0" * 16 + ";-;" + "0" * 64,
        "v1;" + "0" * 32 + ";4;1.0;" + "0" * 16 + ";-;" + "0" * 63,
        "v1;" + "0" * 32 + ";4;1.0;" + "0" * 16 + ";-",
    ],
)
def test_malformed_headers(header: str) -> None:
    with pytest.raises(PowError, match="malformed") as e:
        check_solution(SECRET, "alice", header, "0", NOW)
    assert kind(e) == "malformed"


def test_bad_nonces_are_refused() -> None:
    puzzle = issue_puzzle(SECRET, "alice", 0, 60.0, now=NOW)
    for nonce in ("", "a b", "x" * 65, "é"):
        with pytest.raises(PowError, match="nonce"):
            check_solution(SECRET, "alice", puzzle.to_header(), nonce, NOW)


def test_solve_counts_hashes_and_expected_work_is_2_to_the_bits() -> None:
    assert [expected_hashes(b) for b in (0, 1, 10)] == [1, 2, 1024]
    for bits in (4, 7):
        counts = []
        for seed in range(300):
            puzzle = Puzzle(f"{seed:032x}", bits, 0.0, "0" * 16, "-", "0" * 64)
            nonce, hashes = solve(puzzle)
            assert leading_zero_bits(puzzle.challenge, nonce) >= bits
            assert all(leading_zero_bits(puzzle.challenge, f"{i:x}") < bits for i in range(hashes - 1))
            counts.append(hashes)
        mean = float(np.mean(counts))  # geometric: mean 2**bits, sd of the mean 2**bits / sqrt(300)
        assert abs(mean - 2**bits) < 0.25 * 2**bits, (bits, mean)
    with pytest.raises(PowError) as e:
        solve(Puzzle("0" * 32, 200, 0.0, "0" * 16, "-", "0" * 64), max_hashes=100)
    assert kind(e) == "unsolved"


def test_hash_rate_is_measured() -> None:
    assert 1e4 < hash_rate(0.05) < 1e9


def test_bits_for_work_rounds_log2() -> None:
    assert [bits_for_work(w) for w in (0.0, 1.0, 1.5, 3.0, 1000.0, 1e30)] == [0, 0, 1, 2, 10, 32]
    assert bits_for_work(1e30, max_bits=40) == 40


# ---------------------------------------------------------------------------- GNMax RDP


def _theorem6(votes: list[float], sigma: float, order: float) -> float:
    """PATE 2018's bound, written out in plain floats for one histogram and one order."""
    top = max(votes)
    i_top = votes.index(top)
    q = sum(
        0.5 * math.erfc((top - v) / (math.sqrt(2) * sigma) / math.sqrt(2))
        for i, v in enumerate(votes)
        if i != i_top
    )
    q = min(q, 1 - 1 / len(votes))
    independent = order / sigma**2
    mu2 = sigma * math.sqrt(math.log(1 / q))
    mu1 = mu2 + 1
    e1, e2 = mu1 / sigma**2, mu2 / sigma**2
    if mu2 <= 1 or q * math.exp(e2) >= 1 or order > mu1:
        return independent
    if q > math.exp((mu2 - 1) * e2) / (mu1 / (mu1 - 1) * mu2 / (mu2 - 1)) ** mu2:
        return independent
    a = (1 - q) / (1 - (q * math.exp(e2)) ** ((mu2 - 1) / mu2))
    b = math.exp(e1) / q ** (1 / (mu1 - 1))
    dependent = math.log((1 - q) * a ** (order - 1) + q * b ** (order - 1)) / (order - 1)
    return min(dependent, independent)


def test_rdp_matches_theorem_6_written_out() -> None:
    rng = np.random.default_rng(0)
    for _ in range(40):
        k, t, sigma = int(rng.integers(2, 11)), int(rng.integers(10, 200)), float(rng.uniform(1, 20))
        votes = rng.multinomial(t, rng.dirichlet(np.full(k, 0.3))).astype(float)
        got = gnmax_rdp(torch.tensor(votes), sigma)
        for j in (0, 10, 40, 80):
            want = _theorem6(votes.tolist(), sigma, float(DEFAULT_ORDERS[j]))
            assert math.isclose(float(got[j]), want, rel_tol=1e-6, abs_tol=1e-12), (votes, sigma, j)


def test_data_dependent_rdp_is_at_most_the_independent_one_and_equal_on_uniform_votes() -> None:
    gen = torch.Generator().manual_seed(0)
    votes = torch.multinomial(torch.rand(200, 10, generator=gen) ** 4, 50, replacement=True, generator=gen)
    hist = torch.zeros(200, 10).scatter_add_(1, votes, torch.ones(200, 50))
    independent = gnmax_rdp_data_independent(3.0)
    rdp = gnmax_rdp(hist, 3.0)
    assert rdp.shape == (200, len(DEFAULT_ORDERS)) and bool((rdp >= 0).all())
    assert bool((rdp <= independent + 1e-12).all()) and bool((rdp < independent - 1e-9).any())
    uniform = torch.full((10,), 5.0)
    assert torch.equal(gnmax_rdp(uniform, 3.0), independent)
    assert math.isclose(float(gnmax_log_q(uniform, 3.0)), math.log(0.9))


def test_unanimous_votes_cost_little_and_split_votes_much() -> None:
    unanimous = torch.tensor([0.0, 50, 0, 0, 0, 0, 0, 0, 0, 0])
    split = torch.tensor([0.0, 26, 24, 0, 0, 0, 0, 0, 0, 0])
    sigma = 5.0
    assert float(gnmax_log_q(unanimous, sigma)) < -20
    cheap = rdp_to_epsilon(100 * gnmax_rdp(unanimous, sigma))
    dear = rdp_to_epsilon(100 * gnmax_rdp(split, sigma))
    assert float(gnmax_rdp(unanimous, sigma)[10]) < 1e-6
    assert float(cheap) < 1.5 and float(dear) > 10 * float(cheap)


def test_rdp_input_checks() -> None:
    with pytest.raises(InputError, match="sigma"):
        gnmax_rdp(torch.ones(3), 0.0)
    with pytest.raises(InputError, match="non-negative"):
        gnmax_rdp(torch.tensor([1.0, -1.0]), 1.0)
    with pytest.raises(InputError, match="orders"):
        gnmax_rdp_data_independent(1.0, [1.0, 2.0])
    with pytest.raises(InputError, match="delta"):
        rdp_to_epsilon(torch.zeros(len(DEFAULT_ORDERS)), delta=0.0)


# ---------------------------------------------------------------------------- ledger


def _saved(state: object) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return buf


def _rows(n: int, seed: int, split: float) -> torch.Tensor:
    """Per-query costs of ``n`` 20-teacher histograms, a share ``split`` of them contested."""
    gen = torch.Generator().manual_seed(seed)
    votes = torch.zeros(n, 10)
    top = torch.randint(10, (n,), generator=gen)
    contested = torch.rand(n, generator=gen) < split
    votes[torch.arange(n), top] = torch.where(contested, 11.0, 20.0)
    votes[torch.arange(n), (top + 1) % 10] += torch.where(contested, 9.0, 0.0)
    return gnmax_rdp(votes, 2.0)


def test_ledger_composes_additively_and_epsilon_grows() -> None:
    rows = _rows(50, 0, 0.3)
    ledger, once = PrivacyLedger(), PrivacyLedger()
    eps = []
    for i in range(0, 50, 10):
        ledger.add(rows[i : i + 10])
        eps.append(ledger.epsilon())
    once.add(rows)
    assert ledger.queries == once.queries == 50
    assert torch.allclose(ledger.rdp, rows.sum(0)) and torch.allclose(ledger.rdp, once.rdp)
    assert eps == sorted(eps) and eps[-1] > eps[0]
    fresh = PrivacyLedger()
    after = fresh.epsilons_after(rows)
    assert fresh.queries == 0 and math.isclose(float(after[-1]), once.epsilon())
    assert bool((after[1:] >= after[:-1]).all())
    assert ledger.epsilon(1e-3) < ledger.epsilon(1e-8)


def test_ledger_state_round_trip() -> None:
    ledger = PrivacyLedger()
    ledger.add(_rows(7, 1, 0.5))
    state = torch.load(_saved(ledger.state_dict()), weights_only=True)
    restored = PrivacyLedger()
    restored.load_state_dict(state)
    assert restored.queries == 7 and torch.equal(restored.rdp, ledger.rdp)
    assert restored.epsilon() == ledger.epsilon()
    with pytest.raises(InputError, match="orders"):
        PrivacyLedger(DEFAULT_ORDERS[:10]).load_state_dict(state)
    with pytest.raises(InputError, match="missing"):
        restored.load_state_dict({"queries": 1})
    with pytest.raises(InputError, match="per-query costs"):
        restored.add(torch.zeros(3, 5))


# ---------------------------------------------------------------------------- calibration


def _requests(cal: Calibrator, rows: torch.Tensor, batch: int = 64) -> list[int]:
    ledger, bits = PrivacyLedger(cal.orders), []
    for i in range(0, len(rows), batch):
        bits.append(cal.request_bits(ledger, rows[i : i + batch]))
        ledger.add(rows[i : i + batch])
    return bits


def test_calibrator_prices_benign_streams_at_the_unit_and_disagreeing_ones_higher() -> None:
    cal = Calibrator.fit(_rows(400, 0, 0.1), baseline_work=1000.0, seed=0)
    assert cal.tolerance > 0 and cal.scale > 0 and math.isclose(cal.unit_work, 1000 / math.sqrt(2))
    unit = bits_for_work(64 * cal.unit_work)
    benign = _requests(cal, _rows(1000, 1, 0.1))
    attack = _requests(cal, _rows(1000, 2, 0.5))
    assert set(benign) == {unit}
    assert attack[0] >= unit and attack[-1] >= unit + 10 and attack == sorted(attack)
    # the benign cost stays within the allowance: PoW <= 1 x the baseline per query
    assert sum(2**b for b in benign) / 1000 <= 1000.0
    assert float(cal.benign_epsilon(0)) < float(cal.benign_epsilon(10)) < float(cal.benign_epsilon(1000))
    assert float(cal.query_work(10, 1e6)) == cal.unit_work * 2**cal.max_doublings


def test_calibrator_state_round_trip_and_checks() -> None:
    cal = Calibrator.fit(_rows(100, 0, 0.2), baseline_work=50.0)
    again = Calibrator.from_state_dict(torch.load(_saved(cal.state_dict()), weights_only=True))
    assert again.state_dict().keys() == cal.state_dict().keys()
    assert again.tolerance == cal.tolerance and torch.equal(again.benign_rdp, cal.benign_rdp)
    with pytest.raises(InputError, match="orders"):
        cal.request_work(PrivacyLedger(DEFAULT_ORDERS[:5]), torch.zeros(1, 5))
    with pytest.raises(InputError, match="positive"):
        Calibrator.fit(_rows(10, 0, 0.2), baseline_work=0.0)


# ---------------------------------------------------------------------------- PATE teachers


def test_pate_cost_on_digits_separates_natural_digits_from_noise() -> None:
    from sklearn.linear_model import LogisticRegression

    from mextract.data import load_splits

    splits = load_splits("digits", seed=0)
    cost = PateCost.fit(
        splits.victim_train, teachers=10, sigma=1.0, seed=0, model=lambda: LogisticRegression(max_iter=500)
    )
    assert cost.num_teachers == 10
    votes = cost.votes(splits.test.x)
    assert votes.shape == (len(splits.test), 10) and bool((votes.sum(1) == 10).all())
    assert splits.test.y is not None and float(votes.argmax(1).eq(splits.test.y).float().mean()) > 0.85
    natural = cost.query_rdp(splits.test.x[:200])
    noise = cost.query_rdp(
        torch.rand(200, *splits.test.input_shape, generator=torch.Generator().manual_seed(0))
    )
    eps_natural, eps_noise = float(rdp_to_epsilon(natural.sum(0))), float(rdp_to_epsilon(noise.sum(0)))
    assert eps_noise > 2 * eps_natural, (eps_natural, eps_noise)
    at_2 = int((DEFAULT_ORDERS == 2.0).nonzero())  # an order where the data-dependent bound applies
    assert float(natural[:, at_2].mean()) < 0.5 * float(noise[:, at_2].mean())


def test_pate_cost_zoo_teachers_and_checks() -> None:
    from mextract.data import Dataset
    from mextract.training import TrainConfig

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(24, 1, 8, 8, generator=gen)
    data = Dataset(x, torch.arange(24) % 3, ("a", "b", "c"), "tiny")
    cost = PateCost.fit(
        data, teachers=3, sigma=1.0, model="logreg", config=TrainConfig(epochs=1), device="cpu"
    )
    assert cost.query_rdp(x[:5]).shape == (5, len(DEFAULT_ORDERS))
    with pytest.raises(InputError, match="at least 26"):
        PateCost.fit(data, teachers=13)
    with pytest.raises(InputError, match="outside"):
        PateCost([lambda t: torch.full((len(t),), 7)], 3).votes(x)


# ---------------------------------------------------------------------------- the gate


def _gate() -> PowGate:
    """Two callable teachers that agree on inputs with a positive mean and split otherwise."""
    teachers = [
        lambda t: torch.where(t.flatten(1).mean(1) > 0, 0, 1),
        lambda t: torch.zeros(len(t), dtype=torch.long),
    ]
    cost = PateCost(teachers, 2, sigma=0.2)
    benign = cost.query_rdp(torch.rand(50, 3))
    return PowGate(cost, Calibrator.fit(benign, baseline_work=8.0), SECRET, ttl=60.0)


def test_gate_challenge_solve_redeem() -> None:
    gate = _gate()
    x = torch.rand(8, 3)
    puzzle = gate.challenge("alice", x, now=NOW)
    assert puzzle.bits == bits_for_work(8 * gate.calibrator.unit_work)
    nonce, _ = solve(puzzle.to_header())
    teachers = gate.cost
    gate.cost = PateCost([lambda t: 1 / 0], 2)  # redeem reuses the cost the challenge computed
    gate.redeem("alice", puzzle.to_header(), nonce, x, now=NOW + 1)
    gate.cost = teachers
    assert gate.ledger("alice").queries == 8 and gate.ledger("bob").queries == 0
    assert torch.allclose(gate.ledger("alice").rdp, teachers.query_rdp(x).sum(0))
    with pytest.raises(PowError, match="already redeemed"):
        gate.redeem("alice", puzzle.to_header(), nonce, x, now=NOW + 2)
    other = gate.challenge("alice", x, now=NOW)
    nonce, _ = solve(other)
    with pytest.raises(PowError, match="another request"):
        gate.redeem("alice", other.to_header(), nonce, -x, now=NOW + 1)
    with pytest.raises(PowError, match="another account"):
        gate.redeem("bob", other.to_header(), nonce, x, now=NOW + 1)
    assert gate.ledger("alice").queries == 8
    # contested queries (the teachers split) cost more than agreed ones
    assert gate.price("carol", -torch.rand(64, 3))[0] > gate.price("carol", torch.rand(64, 3))[0]

    state = torch.load(_saved(gate.state_dict()), weights_only=True)
    again = _gate()
    again.load_state_dict(state)
    assert again.ledger("alice").queries == 8 and challenge_seen(again, puzzle)


def challenge_seen(gate: PowGate, puzzle: Puzzle) -> bool:
    return puzzle.challenge in gate.seen
