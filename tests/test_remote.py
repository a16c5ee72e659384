"""Every attack through RemoteOracle against a served victim: no attack needs internals.

Each registered attack runs twice with the same seed: against the local oracle, and over
HTTP (a real uvicorn server on 127.0.0.1, a free port) through :class:`RemoteOracle`. The
two runs must spend the same queries, and end with the same substitute (same fidelity;
for direct extraction, the same recovered function); the server's per-client ledger must
count exactly what the attack reports.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import torch
from torch import nn

from mextract.attacks import ATTACKS, create_attack
from mextract.data import IMAGE_RANGE, UNBOUNDED
from mextract.errors import BudgetExceededError, DataError, InputError
from mextract.metrics import Evaluator
from mextract.oracle import RemoteAPIError, RemoteOracle, VictimOracle
from mextract.oracle.remote import split_url
from mextract.server import ServedAPI, create_app, running

TINY = {"epochs": 3, "batch_size": 32}
ACTIVE = {"rounds": 2, "round_epochs": 1, "train": TINY}

#: attack → (answer mode, options, budget); learning attacks against the digits CNN
LEARNING: dict[str, tuple[str, dict[str, Any], int]] = {
    "kd": ("probs", {"train": {"epochs": 10, "batch_size": 32}}, 200),
    "hard": ("label", {"train": {"epochs": 10, "batch_size": 32}}, 200),
    "hard_augment": ("label", {"train": TINY}, 150),
    "hard_boundary": ("label", {"steps": 3, "train": TINY}, 150),
    "hard_mixup": ("label", {"train": TINY}, 150),
    "kd_erasing": ("probs", {"train": TINY}, 150),
    "spsg": ("probs", {"n_segments": 4, "train": TINY}, 100),
    "active": ("probs", ACTIVE, 150),
    "marich": ("probs", ACTIVE, 150),
    "active_hard": ("label", ACTIVE, 100),
    "knockoff": ("probs", {"train": TINY}, 150),
    "dfme": ("logits", {"batch_size": 16, "latent_dim": 16, "ngf": 8, "n_substitute": 1, "evaluations": 2},
             400),
    "dfme_hard": ("label", {"batch_size": 16, "latent_dim": 16, "ngf": 8, "n_substitute": 1, "evaluations": 2,
                            "train": TINY}, 400),
    "maze": ("logits", {"batch_size": 16, "latent_dim": 16, "ngf": 8, "directions": 2, "n_clone": 2,
                        "n_replay": 2, "evaluations": 2, "train": TINY}, 400),
}


def _relu_net(sizes: list[int], seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
    net = nn.Sequential(*layers).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    return net.eval()


#: direct extraction: attack → (victim layer sizes, budget), FP64 logits, unbounded inputs
DIRECT: dict[str, tuple[list[int], int]] = {
    "equation_solving": ([6, 3], 50),
    "relu_cryptanalysis": ([6, 5, 2], 20_000),
    "relu2_cryptanalysis": ([10, 8, 6, 2], 100_000),
}


#: tabular and tree extraction: attack -> (dataset, answer mode, options, budget)
TABULAR: dict[str, tuple[str, str, dict[str, Any], int]] = {
    "tabular": ("wine", "label", {"model": "logreg", "rounds": 3}, 90),
    "path_finding": ("iris", "leaf", {}, 10_000),
}


def test_the_table_covers_every_registered_attack() -> None:
    assert set(LEARNING) | set(DIRECT) | set(TABULAR) == set(ATTACKS)


@pytest.mark.parametrize("name", sorted(TABULAR))
def test_tabular_and_tree_attacks_run_over_http_exactly_as_locally(name: str) -> None:
    """The API publishes its record fields; a thief reads them over HTTP and spends as locally."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.tree import DecisionTreeClassifier

    from mextract.data import load_splits
    from mextract.data.tabular import TabularSchema

    dataset, mode, options, budget = TABULAR[name]
    splits = load_splits(dataset)
    schema = TabularSchema.from_json(splits.meta["schema"])
    assert splits.victim_train.y is not None
    x, y = splits.victim_train.x.numpy(), splits.victim_train.y.numpy()
    est = (DecisionTreeClassifier(max_depth=5, random_state=0) if name == "path_finding"
           else LogisticRegression(max_iter=2000)).fit(x, y)  # fmt: skip
    ev = Evaluator.from_victim(est, splits.test)
    want = create_attack(name, **options)(VictimOracle(est, mode=mode, features=schema), None, budget,
                                          evaluator=ev, seed=0)  # fmt: skip
    api = ServedAPI(VictimOracle(est, mode=mode, features=schema), name="tab")
    with running(create_app(api)) as url, RemoteOracle(f"{url}/v2/models/tab", client_id="thief") as remote:
        assert remote.mode.value == mode and remote.features == schema
        got = create_attack(name, **options)(remote, None, budget, evaluator=ev, seed=0)
    assert got.queries == want.queries == remote.ledger.count == api.spent("thief")
    assert got.metrics["fidelity"] == want.metrics["fidelity"]
    if name == "path_finding":
        assert got.metrics["leaves"] == want.metrics["leaves"] == est.get_n_leaves()


@pytest.fixture(scope="module")
def served_digits(digits_victim) -> Iterator[dict[str, ServedAPI]]:  # type: ignore[no-untyped-def]
    """The digits CNN served in every answer mode the table uses (one model per mode)."""
    apis = {}
    for mode in ("probs", "label", "logits"):
        victim = VictimOracle(digits_victim, input_shape=(1, 8, 8), num_classes=10, mode=mode,
                              value_range=IMAGE_RANGE, device="cpu")  # fmt: skip
        apis[mode] = ServedAPI(victim, name=f"digits-{mode}")
    yield apis


def _serve(api: ServedAPI) -> Any:
    return running(create_app(api))


@pytest.mark.parametrize("name", sorted(LEARNING))
def test_every_learning_attack_runs_over_http_exactly_as_locally(  # type: ignore[no-untyped-def]
    name, digits_splits, digits_victim, served_digits
) -> None:
    mode, options, budget = LEARNING[name]
    api = served_digits[mode]
    ev = Evaluator.from_victim(digits_victim, digits_splits.test)
    local = VictimOracle(digits_victim, input_shape=(1, 8, 8), num_classes=10, mode=mode,
                         value_range=IMAGE_RANGE, device="cpu")  # fmt: skip
    run = {"substitute": "cnn", "evaluator": ev, "seed": 0, "device": "cpu"}
    want = create_attack(name, **options)(local, digits_splits.pool, budget, **run)
    endpoint = f"{api.name}"
    with _serve(api) as url, RemoteOracle(f"{url}/v2/models/{endpoint}", client_id=f"thief-{name}") as remote:
        assert remote.mode.value == mode and remote.value_range == IMAGE_RANGE  # read from the endpoint
        got = create_attack(name, **options)(remote, digits_splits.pool, budget, **run)
    assert got.queries == want.queries == remote.ledger.count == api.spent(f"thief-{name}") <= budget
    assert got.queries > 0
    assert got.metrics["fidelity"] == pytest.approx(want.metrics["fidelity"], abs=1e-9), (got.metrics,
                                                                                          want.metrics)
    if name in ("kd", "hard"):  # the baselines steal even with 200 queries
        assert got.metrics["fidelity"] >= 0.7


@pytest.mark.parametrize("name", sorted(DIRECT))
def test_direct_extraction_runs_over_http_on_fp64_logits(name) -> None:  # type: ignore[no-untyped-def]
    sizes, budget = DIRECT[name]
    net = _relu_net(sizes, seed=1)
    d, k = sizes[0], sizes[-1]
    victim = VictimOracle(net, input_shape=(d,), num_classes=k, mode="logits", dtype=torch.float64,
                          value_range=UNBOUNDED, device="cpu")  # fmt: skip
    api = ServedAPI(victim, name="net")
    with _serve(api) as url:
        remote = RemoteOracle(f"{url}/v2/models/net", client_id="thief", batch_size=4096)
        assert remote.dtype == torch.float64
        result = create_attack(name)(remote, None, budget, seed=0)
        remote.close()
    assert result.queries == remote.ledger.count == api.spent("thief")
    x = torch.randn(2000, d, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want, got = net(x), result.model(x)
    assert float((got - want).abs().max()) <= 1e-6 * float(want.abs().max())


def test_remote_oracle_batches_counts_and_honours_the_servers_budget(digits_victim) -> None:  # type: ignore[no-untyped-def]
    victim = VictimOracle(digits_victim, input_shape=(1, 8, 8), num_classes=10, value_range=IMAGE_RANGE,
                          device="cpu")  # fmt: skip
    api = ServedAPI(victim, budget=50)
    x = torch.rand(45, 1, 8, 8)
    with _serve(api) as url, RemoteOracle(f"{url}/v2/models/victim", client_id="a", batch_size=10) as remote:
        answers = remote.query(x)
        # chunks of 10 on the server, one batch of 45 here: equal up to float32 summation order
        assert torch.allclose(answers, victim.query(x), rtol=0, atol=1e-6)
        assert (remote.ledger.count, remote.ledger.calls, remote.ledger.remaining) == (45, 5, 5)
        with pytest.raises(BudgetExceededError):  # known to the client: refused before it is sent
            remote.query(x[:6])
        assert api.spent("a") == 45
        remote.ledger.budget = None  # a client that ignores what it was told: the server refuses
        with pytest.raises(BudgetExceededError):
            remote.query(x[:6])
        assert api.spent("a") == 45 and remote.ledger.count == 45
        with pytest.raises(DataError, match="values lie in"):  # checked before sending
            remote.query(x[:2] * 2)


def test_remote_oracle_states_and_checks_what_the_api_answers(digits_victim) -> None:  # type: ignore[no-untyped-def]
    victim = VictimOracle(digits_victim, input_shape=(1, 8, 8), num_classes=10, mode="label",
                          value_range=IMAGE_RANGE, device="cpu")  # fmt: skip
    with _serve(ServedAPI(victim)) as url:
        with pytest.raises(InputError, match="answers in mode label"):
            RemoteOracle(f"{url}/v2/models/victim", mode="probs")
        with pytest.raises(RemoteAPIError, match="unknown model 'nope'"):
            RemoteOracle(f"{url}/v2/models/nope", retries=0)
    with pytest.raises(InputError, match="expected http"):
        split_url("127.0.0.1:8000/victim")
    assert split_url("http://h:1/p/v2/models/m/versions/2") == ("http://h:1/p", "m", "2")


def test_remote_oracle_retries_honouring_retry_after() -> None:
    """A server that answers 503 with Retry-After twice, then the metadata, then 429 once."""
    calls: list[tuple[str, float]] = []
    meta = {"name": "m", "platform": "x", "inputs": [{"name": "in", "datatype": "FP32", "shape": [-1, 2]}],
            "outputs": [{"name": "out", "datatype": "FP32", "shape": [-1, 3]}]}  # fmt: skip
    def handler(request: httpx.Request) -> httpx.Response:
        calls.append((request.url.path, time.monotonic()))
        if len(calls) <= 2:
            return httpx.Response(503, headers={"Retry-After": "0"}, json={"error": "warming up"})
        if request.method == "GET":
            return httpx.Response(200, json=meta)
        if len(calls) == 4:
            return httpx.Response(429, headers={"Retry-After": "0"}, json={"error": "slow down"})
        body = {"model_name": "m", "outputs": [{"name": "out", "datatype": "FP32", "shape": [1, 3],
                                                "data": [0.2, 0.3, 0.5]}]}  # fmt: skip
        return httpx.Response(200, json=body)

    mock = httpx.MockTransport(handler)
    remote = RemoteOracle("http://127.0.0.1:9/v2/models/m", transport=mock, backoff=5.0)
    assert (remote.input_shape, remote.num_classes, remote.mode.value) == ((2,), 3, "probs")
    out = remote.query(torch.zeros(1, 2))
    assert torch.allclose(out, torch.tensor([[0.2, 0.3, 0.5]]))
    assert len(calls) == 5 and remote.ledger.count == 1
    assert calls[-1][1] - calls[0][1] < 2.0  # Retry-After: 0 was honoured instead of the 5 s backoff
    failing = RemoteOracle("http://127.0.0.1:9/v2/models/m", transport=httpx.MockTransport(
        lambda r: httpx.Response(200, json=meta) if r.method == "GET" else httpx.Response(
            503, headers={"Retry-After": "0"}, json={"error": "down"})), retries=2)  # fmt: skip
    with pytest.raises(RemoteAPIError, match="503: down"):
        failing.query(torch.zeros(1, 2))
    assert failing.ledger.count == 0  # nothing answered, nothing counted
