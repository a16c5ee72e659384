"""State dicts of oracles and defences (save, load, continue identically) and thread safety."""

from __future__ import annotations

import copy
import functools
import io
import pickle
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn

from mextract.defences import (
    AdaptiveMisinformation,
    CosineWatermark,
    DawnWatermark,
    HoneyLabels,
    LabelOnly,
    NoisyProbabilities,
    Prada,
    PradaClient,
    PredictionPoisoning,
    ReverseSigmoid,
    Rounding,
    TopK,
)
from mextract.errors import BudgetExceededError, InputError
from mextract.oracle import Ledger, Oracle, VictimOracle, load_stack_state_dict, stack_state_dict

KEY = b"owner-secret-key-0123456789"


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).eval()


MODEL = model()


def victim(mode: str = "probs", budget: int | None = None) -> VictimOracle:
    return VictimOracle(MODEL, input_shape=(4,), num_classes=3, mode=mode, budget=budget, device="cpu")


def batch(seed: int, n: int = 16) -> torch.Tensor:
    return torch.rand(n, 4, generator=torch.Generator().manual_seed(seed))


def roundtrip(state: dict[str, Any]) -> dict[str, Any]:
    """Through ``torch.save`` and ``torch.load(weights_only=True)``, as a server would persist it."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def saved_bytes(state: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


@pytest.fixture
def fast_switching() -> Iterator[None]:
    """Switch threads as often as possible, so that a missing lock shows up as a race."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


def run_threads(targets: list[Callable[[], object]]) -> None:
    errors: list[BaseException] = []

    def wrap(fn: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as exc:  # surfaced in the main thread below
                errors.append(exc)

        return run

    threads = [threading.Thread(target=wrap(fn)) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


# ============================================================================ the defaults


STATELESS: dict[str, Callable[[Oracle], Oracle]] = {
    "TopK": lambda inner: TopK(inner, k=2),
    "Rounding": lambda inner: Rounding(inner, decimals=1),
    "LabelOnly": LabelOnly,
    "HoneyLabels": lambda inner: HoneyLabels(inner, threshold=0.5),
    "ReverseSigmoid": ReverseSigmoid,
    "PredictionPoisoning": lambda inner: PredictionPoisoning(inner, surrogate=model(), epsilon=0.5),
    "AdaptiveMisinformation": lambda inner: AdaptiveMisinformation(inner, misinformation=model()),
}


@pytest.mark.parametrize("name", sorted(STATELESS))
def test_stateless_defences_have_an_empty_state(name: str) -> None:
    oracle = STATELESS[name](victim())
    oracle.query(batch(0))
    assert oracle.state_dict() == {}
    oracle.load_state_dict({})
    with pytest.raises(InputError, match=rf"{name}: .*unexpected keys \['generator'\]"):
        oracle.load_state_dict({"generator": torch.zeros(3)})


def test_prada_client_layer_has_no_state_of_its_own() -> None:
    monitor = Prada(min_distances=10)
    client = monitor.client("alice", victim())
    client.query(batch(0))
    assert client.state_dict() == {}
    layers = stack_state_dict(client)["layers"]
    assert [layer["type"] for layer in layers] == ["PradaClient", "VictimOracle"]


# ============================================================================ the ledger


def test_ledger_round_trip_and_checks() -> None:
    a = Ledger(100, log=True)
    a.charge(7)
    a.charge(5)
    a.record(batch(0, 3), torch.zeros(3, 3))
    state = roundtrip(a.state_dict())
    assert state == {"budget": 100, "count": 12, "calls": 2}  # no log in the state
    b = Ledger(100)
    b.load_state_dict(state)
    assert (b.count, b.calls, b.remaining) == (12, 2, 88)
    with pytest.raises(InputError, match=r"Ledger: state has missing keys \['calls'\]"):
        b.load_state_dict({"budget": None, "count": 1})
    with pytest.raises(InputError, match="'count': expected a non-negative integer"):
        b.load_state_dict({"budget": None, "count": -1, "calls": 0})
    assert (b.count, b.calls) == (12, 2)  # a refused state changes nothing


def test_ledger_copies_and_pickles_with_a_fresh_lock() -> None:
    a = Ledger(10)
    a.charge(4)
    for b in (copy.deepcopy(a), pickle.loads(pickle.dumps(a))):
        b.charge(6)
        assert (a.count, b.count) == (4, 10)
        with pytest.raises(BudgetExceededError):
            b.charge(1)


@pytest.mark.usefixtures("fast_switching")
def test_ledger_charges_are_atomic_across_threads() -> None:
    ledger = Ledger(5_000)
    successes = [0] * 8

    def client(i: int) -> Callable[[], None]:
        def run() -> None:
            for _ in range(1_000):
                try:
                    ledger.charge(1)
                except BudgetExceededError:
                    continue
                successes[i] += 1

        return run

    run_threads([client(i) for i in range(8)])
    assert sum(successes) == 5_000
    assert (ledger.count, ledger.calls) == (5_000, 5_000)


@pytest.mark.usefixtures("fast_switching")
def test_ledger_log_keeps_queries_and_answers_paired_across_threads() -> None:
    ledger = Ledger(log=True)

    def client(i: int) -> Callable[[], None]:
        def run() -> None:
            for j in range(200):
                x = torch.full((1, 2), float(i * 1_000 + j))
                ledger.record(x, x[:, :1])

        return run

    run_threads([client(i) for i in range(4)])
    xs, answers = ledger.log()
    assert len(xs) == 800
    assert torch.equal(xs[:, 0], answers[:, 0])


# ============================================================================ stacks


def test_stack_state_lists_every_layer_outermost_first() -> None:
    oracle = DawnWatermark(LabelOnly(victim()), KEY, fraction=0.3)
    oracle.query(batch(0))
    state = stack_state_dict(oracle)
    assert [layer["type"] for layer in state["layers"]] == ["DawnWatermark", "LabelOnly", "VictimOracle"]
    assert state["layers"][1]["state"] == {}


def test_stack_state_refuses_another_stack() -> None:
    state = roundtrip(stack_state_dict(DawnWatermark(LabelOnly(victim()), KEY)))
    with pytest.raises(InputError) as info:
        load_stack_state_dict(LabelOnly(victim()), state)
    assert str(info.value) == (
        "state for 3 layers (DawnWatermark, LabelOnly, VictimOracle), "
        "this stack has 2 (LabelOnly, VictimOracle)"
    )
    with pytest.raises(InputError, match="layer 1 is LabelOnly in the state, TopK here"):
        load_stack_state_dict(DawnWatermark(TopK(victim(), k=1), KEY), state)
    with pytest.raises(InputError, match=r"stack: state has missing keys \['layers'\]"):
        load_stack_state_dict(LabelOnly(victim()), {})


def test_stack_load_is_all_or_nothing() -> None:
    def build() -> tuple[NoisyProbabilities, DawnWatermark]:
        dawn = DawnWatermark(victim(), KEY, fraction=0.3)
        return NoisyProbabilities(dawn, epsilon=2.0, seed=1), dawn

    (source, _), (target, target_dawn), (twin, twin_dawn) = build(), build(), build()
    for seed in range(3):
        source.query(batch(seed))
    state = roundtrip(stack_state_dict(source))
    seen = state["layers"][1]["state"]["seen"]
    assert len(seen) > 1
    state["layers"][1]["state"]["seen"] = seen[::-1]  # corrupt the DAWN layer
    with pytest.raises(InputError, match="DawnWatermark: state 'seen': the digests do not match"):
        load_stack_state_dict(target, state)
    # the outer layer had been loaded before the DAWN layer refused: it was restored
    x = batch(10)
    assert torch.equal(target.query(x), twin.query(x))
    assert len(target_dawn) == len(twin_dawn)
    assert target.ledger.count == twin.ledger.count == 16


# ============================================================================ noise


@pytest.mark.parametrize(("mechanism", "epsilon"), [("laplace", 2.0), ("gaussian", 0.9)])
def test_noisy_probabilities_continue_identically(mechanism: str, epsilon: float) -> None:
    def build() -> NoisyProbabilities:
        return NoisyProbabilities(victim(), epsilon=epsilon, mechanism=mechanism, seed=3)

    a = build()
    for seed in range(3):
        a.query(batch(seed))
    state = roundtrip(stack_state_dict(a))
    b1, b2, c = build(), build(), build()
    load_stack_state_dict(b1, state)
    load_stack_state_dict(b2, state)
    assert b1.ledger.count == b2.ledger.count == a.ledger.count == 48
    assert c.ledger.count == 0
    b1.query(batch(99))  # b1's generator moves on; b2 (loaded from the same dict) must not
    for seed in (10, 11):
        x = batch(seed)
        expected = a.query(x)
        assert torch.equal(b2.query(x), expected)
        assert not torch.equal(c.query(x), expected)  # the fresh one is at another position
    assert b2.ledger.state_dict() == a.ledger.state_dict()


def test_noisy_probabilities_refuse_a_bad_generator_state() -> None:
    oracle = NoisyProbabilities(victim(), epsilon=1.0)
    with pytest.raises(InputError, match=r"'generator': expected dtype torch\.uint8"):
        oracle.load_state_dict({"generator": torch.zeros(5056)})
    with pytest.raises(InputError, match="'generator': not a CPU generator state"):
        oracle.load_state_dict({"generator": torch.zeros(7, dtype=torch.uint8)})


# ============================================================================ DAWN


def suspect(x: torch.Tensor) -> torch.Tensor:
    """A fixed suspect: labels from a fixed rule."""
    return (x.sum(dim=1) * 7).long() % 3


def test_dawn_continues_identically_without_saving_the_key() -> None:
    def build(key: bytes = KEY) -> DawnWatermark:
        return DawnWatermark(victim(), key, fraction=0.3)

    a = build()
    for seed in range(4):
        a.query(batch(seed))
    assert len(a) > 3
    saved = saved_bytes(stack_state_dict(a))
    assert KEY not in saved  # the key is configuration, never state
    state = roundtrip(stack_state_dict(a))
    b, c = build(), build()
    load_stack_state_dict(b, state)
    assert len(b) == len(a) and len(c) == 0
    for got, want in zip(b.watermark_set, a.watermark_set, strict=True):
        assert torch.equal(got, want)
    assert b.verify(suspect) == a.verify(suspect)
    assert a.verify(suspect).total == len(a)

    recorded = len(a)
    x_old = batch(2)  # a repeat: already recorded, so not recorded again
    assert torch.equal(b.query(x_old), a.query(x_old))
    assert len(a) == len(b) == recorded
    for seed in (10, 11):
        x = batch(seed)
        assert torch.equal(b.query(x), a.query(x))
        c.query(x)
    assert len(b) == len(a) > recorded
    assert len(c) < len(a)
    for got, want in zip(b.watermark_set, a.watermark_set, strict=True):
        assert torch.equal(got, want)
    assert b.verify(suspect) == a.verify(suspect) != c.verify(suspect)

    with pytest.raises(InputError, match="digests do not match the recorded queries under this oracle's key"):
        build(b"another key").load_state_dict(state["layers"][0]["state"])


def test_dawn_load_copies() -> None:
    a = DawnWatermark(victim(), KEY, fraction=0.3)
    a.query(batch(0))
    state = a.state_dict()
    b = DawnWatermark(victim(), KEY, fraction=0.3)
    b.load_state_dict(state)
    x_before = b.watermark_set[0].clone()
    state["marked_x"].zero_()
    state["marked_y"].zero_()
    assert torch.equal(b.watermark_set[0], x_before)
    assert torch.equal(a.watermark_set[0], x_before)


@pytest.mark.usefixtures("fast_switching")
def test_dawn_records_concurrent_repeats_once() -> None:
    sequential, concurrent = (DawnWatermark(victim(), KEY, fraction=0.3) for _ in range(2))
    batches = [batch(seed % 3) for seed in range(12)]  # every batch three to four times
    for x in batches:
        sequential.query(x)
    run_threads([functools.partial(concurrent.query, x) for x in batches])
    assert len(concurrent) == len(sequential)
    got = {tuple(row.tolist()) for row in concurrent.watermark_set[0]}
    assert got == {tuple(row.tolist()) for row in sequential.watermark_set[0]}


# ============================================================================ cosine


def test_cosine_continues_identically() -> None:
    reference = torch.rand(50, 4, generator=torch.Generator().manual_seed(5))

    def build() -> CosineWatermark:
        return CosineWatermark(victim(), KEY, reference=reference, target=0, log_size=20, null_keys=99)

    def suspect(x: torch.Tensor) -> torch.Tensor:  # a fixed suspect, mostly off the target class
        return torch.softmax(4 * x[:, :3].double() - torch.tensor([2.0, 0.0, 0.0], dtype=torch.float64), 1)

    a = build()
    for seed in range(3):  # 48 queries: the reservoir is in use
        a.query(batch(seed))
    assert len(a.logged_queries) == 20
    saved = saved_bytes(stack_state_dict(a))
    assert KEY not in saved
    state = roundtrip(stack_state_dict(a))
    b, b2, c = build(), build(), build()
    load_stack_state_dict(b, state)
    load_stack_state_dict(b2, state)
    assert torch.equal(b.logged_queries, a.logged_queries)
    b2.query(batch(50))  # moves b2's log in place; b's must not move with it
    assert torch.equal(b.logged_queries, a.logged_queries)
    for seed in (10, 11, 12):
        x = batch(seed)
        assert torch.equal(b.query(x), a.query(x))
        c.query(x)
    assert torch.equal(b.logged_queries, a.logged_queries)
    assert not torch.equal(c.logged_queries, a.logged_queries)
    assert b.verify(suspect) == a.verify(suspect)
    assert b.verify(suspect) != c.verify(suspect)
    assert b.ledger.count == a.ledger.count == 96


def test_cosine_refuses_an_inconsistent_log() -> None:
    reference = torch.rand(50, 4, generator=torch.Generator().manual_seed(5))
    oracle = CosineWatermark(victim(), KEY, reference=reference, log_size=20)
    state = oracle.state_dict()
    with pytest.raises(InputError, match="'seen': 3 queries cannot leave 0 in the log"):
        oracle.load_state_dict({**state, "seen": 3})
    with pytest.raises(InputError, match=r"'log': expected shape \(N, 4\)"):
        oracle.load_state_dict({**state, "log": torch.zeros(2, 5)})


# ============================================================================ PRADA


def natural(seed: int, n: int = 40) -> torch.Tensor:
    return torch.rand(n, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def synthetic(seed: int, n: int = 40) -> torch.Tensor:
    """Tiny perturbations of two points: the kind of stream PRADA flags."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(2, 4, generator=g, dtype=torch.float64)
    steps = 1e-3 * torch.rand(n, 4, generator=g, dtype=torch.float64)
    return base[torch.arange(n) % 2] + steps * 2.0 ** -(torch.arange(n) % 7)[:, None]


def classes(x: torch.Tensor) -> torch.Tensor:
    return (x[:, 0] * 3).long().clamp(max=2)


STREAMS: dict[str | int, Callable[[int], torch.Tensor]] = {"alice": natural, 7: synthetic, "bob": synthetic}


def feed(monitor: Prada, client: str | int, seeds: range) -> None:
    for seed in seeds:
        x = STREAMS[client](seed)
        monitor.observe(client, x, classes(x))


def test_prada_continues_identically() -> None:
    a = Prada(min_distances=10, delta=0.9)
    for client in STREAMS:
        feed(a, client, range(2))
    assert any(r.flagged for r in a.reports().values())
    assert any(not r.flagged for r in a.reports().values())
    state = roundtrip(a.state_dict())
    assert [entry["id"] for entry in state["clients"]] == ["alice", 7, "bob"]
    b, c = Prada(min_distances=10, delta=0.9), Prada(min_distances=10, delta=0.9)
    b.load_state_dict(state)
    assert b.reports() == a.reports()
    for client in STREAMS:
        feed(a, client, range(2, 4))
        feed(b, client, range(2, 4))
        feed(c, client, range(2, 4))
    assert b.reports() == a.reports() != c.reports()
    assert a.report("alice").queries == 160 and c.report("alice").queries == 80


def test_prada_client_state_moves_one_client() -> None:
    a = Prada(min_distances=10, delta=0.9)
    for client in STREAMS:
        feed(a, client, range(2))
    state = roundtrip(a.client_state_dict(7))
    b = Prada(min_distances=10, delta=0.9)
    feed(b, "bob", range(1))
    bob = b.report("bob")
    b.load_client_state_dict(7, state)
    assert b.report(7) == a.report(7)
    assert b.report("bob") == bob and b.report("alice").queries == 0
    feed(a, 7, range(2, 4))
    feed(b, 7, range(2, 4))
    assert b.report(7) == a.report(7)

    assert b.client_state_dict("nobody") == {}
    b.load_client_state_dict(7, {})  # an empty state forgets the client
    assert b.report(7).queries == 0


def test_prada_state_checks() -> None:
    monitor = Prada(min_distances=10)
    feed(monitor, "alice", range(1))
    state = monitor.client_state_dict("alice")
    before = monitor.report("alice")
    bad = {**state, "growing": [{**state["growing"][0], "dists": []}]}
    with pytest.raises(InputError, match=r"distances for .* stored inputs"):
        monitor.load_client_state_dict("alice", bad)
    with pytest.raises(InputError, match="contradicts flagged"):
        monitor.load_client_state_dict("alice", {**state, "flagged": True, "first_alarm": None})
    assert monitor.report("alice") == before

    x = natural(0)
    monitor.observe(("a", "tuple"), x, classes(x))
    with pytest.raises(InputError, match=r"client id \('a', 'tuple'\) \(tuple\) cannot be saved"):
        monitor.state_dict()
    assert monitor.client_state_dict(("a", "tuple"))["queries"] == 40  # one client's state needs no id


def test_prada_behind_a_server_stack() -> None:
    """The monitor's state and the clients' stacks are saved apart (the monitor is shared)."""
    monitor = Prada(min_distances=10)
    alice = monitor.client("alice", victim())
    for seed in range(3):
        alice.query(batch(seed).float())
    stack = roundtrip(stack_state_dict(alice))
    shared = roundtrip(monitor.state_dict())
    monitor2 = Prada(min_distances=10)
    alice2 = PradaClient(victim(), monitor2, "alice")
    load_stack_state_dict(alice2, stack)
    monitor2.load_state_dict(shared)
    x = batch(10)
    assert torch.equal(alice2.query(x), alice.query(x))
    assert alice2.report == alice.report
    assert alice2.ledger.count == alice.ledger.count == 64


@pytest.mark.usefixtures("fast_switching")
def test_prada_concurrent_clients_match_sequential() -> None:
    clients = ["alice", 7, "bob", "carol"]
    streams = {**STREAMS, "carol": natural}

    def feed_one(monitor: Prada, client: str | int) -> None:
        for seed in range(4):
            x = streams[client](seed + 17 * len(str(client)))
            monitor.observe(client, x, classes(x))

    sequential = Prada(min_distances=10, delta=0.9)
    for client in clients:
        feed_one(sequential, client)
    concurrent = Prada(min_distances=10, delta=0.9)
    run_threads([functools.partial(feed_one, concurrent, c) for c in clients])
    assert {cid: concurrent.report(cid) for cid in clients} == sequential.reports()


def test_prada_monitor_copies_with_a_fresh_lock() -> None:
    a = Prada(min_distances=10)
    feed(a, "alice", range(1))
    b = copy.deepcopy(a)
    feed(b, "alice", range(1, 2))
    assert (a.report("alice").queries, b.report("alice").queries) == (40, 80)


@pytest.mark.usefixtures("fast_switching")
def test_prada_concurrent_batches_of_one_client_are_processed_whole() -> None:
    """Identical batches give the same result in any order, so threads must match a loop
    (without the lock, one batch's pending distances leak into another's: it fails)."""
    x = natural(0)
    sequential = Prada(min_distances=10, delta=0.9)
    for _ in range(16):
        sequential.observe("alice", x, classes(x))
    concurrent = Prada(min_distances=10, delta=0.9)
    run_threads([functools.partial(concurrent.observe, "alice", x, classes(x)) for _ in range(16)])
    assert concurrent.report("alice") == sequential.report("alice")
