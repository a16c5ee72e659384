"""The served API without HTTP: per-client stacks around one shared victim, and their state."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from mextract.data import IMAGE_RANGE
from mextract.defences import DawnWatermark
from mextract.defences.detection import Prada
from mextract.errors import BudgetExceededError, InputError
from mextract.oracle import VictimOracle
from mextract.server import ServedAPI


def _victim(mode: str = "probs") -> VictimOracle:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 5))
    return VictimOracle(net, input_shape=(1, 4, 4), num_classes=5, mode=mode, value_range=IMAGE_RANGE)


def test_each_client_has_its_own_ledger_budget_and_evidence() -> None:
    victim = _victim()
    api = ServedAPI(victim, defence='dawn:{"fraction": 0.5}', budget=40)
    torch.manual_seed(1)
    x, y = torch.rand(30, 1, 4, 4), torch.rand(20, 1, 4, 4)
    a = api.query("alice", x)
    api.query("bob", y)
    assert (api.spent("alice"), api.spent("bob"), api.remaining("alice")) == (30, 20, 10)
    assert victim.ledger.count == 0  # the shared victim's own ledger is not anyone's
    alice, bob = api.oracle("alice"), api.oracle("bob")
    assert isinstance(alice, DawnWatermark) and alice is not bob
    ax, _ = alice.watermark_set
    bx, _ = bob.watermark_set
    assert 0 < len(ax) < 30 and 0 < len(bx) < 20  # each holds marks of its own queries only
    assert all(any(torch.equal(row, q) for q in x) for row in ax)
    assert all(any(torch.equal(row, q) for q in y) for row in bx)
    with pytest.raises(BudgetExceededError):
        api.query("alice", x[:11])
    # DAWN's decisions are per client: carol's marks on the same queries are not alice's ...
    assert not torch.equal(api.query("carol", x), a)
    shared = ServedAPI(_victim(), defence='dawn:{"fraction": 0.5, "per_client": false}')
    # ... unless one key serves everyone
    assert torch.equal(shared.query("alice", x), shared.query("carol", x))
    assert api.usage()["alice"] == {"spent": 30, "remaining": 10}


def test_prada_flags_the_prober_and_not_the_other_client() -> None:
    api = ServedAPI(_victim("label"), detect=Prada(), on_alarm="block")
    g = torch.Generator().manual_seed(0)
    for _ in range(6):  # a natural-looking client: independent uniform images
        api.query("honest", torch.rand(40, 1, 4, 4, generator=g))
    base = torch.rand(1, 1, 4, 4, generator=g)
    for i in range(1, 250):  # a prober: ever closer to one point, distances far from normal
        api.query("prober", (base + torch.randn(1, 1, 4, 4, generator=g) * 0.5**i).clamp(0, 1))
        if api.usage()["prober"]["flagged"]:
            break
    assert api.usage()["prober"]["flagged"] and not api.usage()["honest"]["flagged"]
    with pytest.raises(Exception, match="blocked"):
        api.query("prober", base)
    api.query("honest", torch.rand(1, 1, 4, 4, generator=g))


def _dawn(api: ServedAPI, client: str) -> DawnWatermark:
    layer = api.oracle(client)
    while not isinstance(layer, DawnWatermark):
        layer = layer.inner  # type: ignore[attr-defined]
    return layer


def test_state_round_trips_through_torch_save() -> None:
    spec = 'dawn:{"fraction": 0.3}+dp_noise:{"epsilon": 1.0}'
    api = ServedAPI(_victim(), defence=spec, budget=100, detect=Prada())
    for cid in ("alice", "bob"):
        api.query(cid, torch.rand(25, 1, 4, 4))
    buffer = io.BytesIO()
    torch.save(api.state_dict(), buffer)
    buffer.seek(0)
    restored = ServedAPI(_victim(), defence=spec, budget=100, detect=Prada())
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    fresh = ServedAPI(_victim(), defence=spec, budget=100, detect=Prada())
    assert restored.usage() == api.usage()
    x = torch.rand(10, 1, 4, 4)
    want = api.query("alice", x)
    assert torch.equal(restored.query("alice", x), want)  # the noise stream goes on where it was
    assert not torch.equal(fresh.query("alice", x), want)  # (a fresh stack starts it again)
    assert restored.spent("alice") == api.spent("alice") == 35
    assert len(_dawn(restored, "bob")) == len(_dawn(api, "bob")) > len(_dawn(fresh, "bob")) == 0
    with pytest.raises(InputError, match="PRADA"):
        ServedAPI(_victim(), defence=spec, budget=100).load_state_dict(api.state_dict())


def test_bad_configuration_and_client_ids_are_named() -> None:
    with pytest.raises(InputError, match="needs the owner's side"):
        ServedAPI(_victim(), defence="cosine")
    with pytest.raises(KeyError, match="unknown defence 'honeyy'"):
        ServedAPI(_victim(), defence="honeyy")
    with pytest.raises(InputError, match="budget"):
        ServedAPI(_victim(), budget=0)
    with pytest.raises(InputError, match="name"):
        ServedAPI(_victim(), name="a/b")
    api = ServedAPI(_victim())
    for bad in ("", "x" * 129, "tab\there", "é"):
        with pytest.raises(InputError, match="client id"):
            api.query(bad, torch.rand(1, 1, 4, 4))
    assert api.clients == []
