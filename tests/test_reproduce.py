"""The sources' CIFAR-10 experiment as a plan: a tiny run end to end on CIFAR-shaped data made
here (never ../shared), stopped by a time limit and resumed; its tables; the pieces it needs."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mextract.cli import app
from mextract.data import load_splits
from mextract.data.registry import subset_spec
from mextract.errors import DataError, InputError, UnknownNameError
from mextract.experiments import load_records
from mextract.experiments.reproduce import (
    ROWS,
    check_time_limit,
    cifar10_plan,
    reproduction_tables,
    row_id,
    run_reproduction,
    scale_of,
)
from mextract.training import placement

runner = CliRunner()


def _cifar_folder(root: Path, per_batch: int = 100, test: int = 200) -> Path:
    """A ``cifar-10-batches-py`` folder of learnable CIFAR-shaped images: each class its own
    colour, with noise, and the left half brighter or darker by the class's parity."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    colours = rng.uniform(40, 215, size=(10, 3))

    def batch(n: int) -> dict[bytes, object]:
        y = rng.integers(0, 10, n)
        x = colours[y][:, :, None, None] + rng.normal(0, 30, (n, 3, 32, 32))
        x[:, :, :, :16] += (y % 2 * 40 - 20)[:, None, None, None]
        return {b"data": np.clip(x, 0, 255).astype(np.uint8).reshape(n, -1), b"labels": y.tolist()}

    for i in range(1, 6):
        with (folder / f"data_batch_{i}").open("wb") as f:
            pickle.dump(batch(per_batch), f)
    with (folder / "test_batch").open("wb") as f:
        pickle.dump(batch(test), f)
    return folder


@pytest.fixture
def cifar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MEXTRACT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MEXTRACT_CIFAR10", raising=False)
    return _cifar_folder(tmp_path / "data")


def test_tiny_reproduction_stops_at_the_time_limit_resumes_and_prints_the_sources_tables(
    cifar: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    plan = cifar10_plan("tiny")
    # the time limit: the first victim starts (nothing is known of a victim's duration yet);
    # once it is done the limit has passed, so nothing else starts, and nothing is half-written
    first = run_reproduction(out, scale="tiny", data_root=cifar, time_limit=0.5)
    assert first.ran == 1 and not first.failed
    assert len(first.left) == len(plan.work()) - 1
    assert len(list((out / "records").glob("*.json"))) == 1
    # a rerun in the same folder (the command line) continues: the finished victim is reused
    result = runner.invoke(app, ["reproduce", "cifar10", "--scale", "tiny", "--data-root", str(cifar),
                                 "--out", str(out), "--threads", "1"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"{len(plan.work()) - 1} cells run, 1 reused" in result.output
    tables = (out / "tables.md").read_text()
    for title in ("Stage 0", "Stage 1", "Stage 2", "Stage 3"):
        assert title in tables
    for row in ROWS:  # every row of the sources, with their figures beside the lab's
        assert row.name in tables
        for v in row.sources:
            if v is not None:
                assert f"{v:.2f}%" in tables
    assert "Not run yet" not in tables
    shown = runner.invoke(app, ["report", str(out)])  # the tables again, from the records alone
    assert shown.exit_code == 0 and "Stage 3: honey labels" in shown.output
    records = load_records(out)
    cells = [r for r in records if r.kind == "cell"]
    assert len(cells) == len(plan.cells)
    assert {r.config["substitute"] for r in cells} == {"cnn"}
    assert all(r.metrics["status"] == "ok" for r in cells), [r.metrics for r in cells]
    # every thief paid what the scale's budget says, through the counted API
    for r in cells:
        assert 0 < r.metrics["queries"] <= r.config["budget"]
    stage3 = [r for r in cells if str(r.config["thief"]).startswith("stage 3")]
    assert stage3 and all("trigger_wsr" in r.metrics for r in stage3)
    assert all("dawn_p" in r.metrics for r in stage3 if "DAWN" in str(r.config["thief"]))
    victims = [r for r in records if r.kind == "victim"]
    assert len(victims) == 2 and all(v.metrics["test_accuracy"] > 0.5 for v in victims)  # learnable data
    # a third run has nothing left to do
    again = run_reproduction(out, scale="tiny", data_root=cifar)
    assert again.ran == 0 and again.reused == len(plan.work())
    assert reproduction_tables(again.records, "tiny") == tables


def test_the_plan_holds_every_row_of_the_sources_at_their_budgets() -> None:
    plan = cifar10_plan("full")
    budgets = {c.thief: c.budget for c in plan.cells}
    for row in ROWS:
        if row.sources_queries is not None and row.attack != "hard":
            assert budgets[row_id(row)] == row.sources_queries  # 4,785, 3,203, 3,000, 1,250,000
    assert budgets[row_id(ROWS[0])] == 25_000  # KD on the whole pool
    # the stage-2 basic attack labels the pool (25,000 distinct images) and trains 50 epochs
    basic = next(c for c in plan.cells if c.thief == "stage 2 · basic")
    assert basic.budget == 25_000 and '"epochs":50' in str(basic.attack)
    assert {c.substitute for c in plan.cells} == {"vgg11"}
    victims = plan.victims
    assert {v.architecture for v in victims} == {"resnet18"} and {v.preset for v in victims} == {"paper"}
    assert sorted(str(v.trigger_target) for v in victims) == ["0", "None"]
    assert all(v.dataset == "cifar10" for v in victims)
    # the small budgets' comparison runs over seeds
    active = [c for c in plan.cells if c.thief and "active (entropy" in c.thief]
    assert [c.seed for c in active] == [0, 1, 2]
    small = cifar10_plan("small")
    assert {v.dataset for v in small.victims} == {'cifar10:{"test":2000,"train":6000}'}
    assert "scale 'small'" in small.left_out[-1]


def test_bad_input_to_the_reproduction_is_named(cifar: Path, tmp_path: Path) -> None:
    with pytest.raises(UnknownNameError, match="scale"):
        scale_of("huge")
    for bad in ("soon", "-5m", "0"):
        with pytest.raises(InputError, match="time limit"):
            check_time_limit(bad)
    assert check_time_limit("9m") == 540 and check_time_limit("90s") == 90 and check_time_limit("2") == 2
    with pytest.raises(DataError, match="no data path"):
        run_reproduction(tmp_path / "x", scale="tiny")
    result = runner.invoke(app, ["reproduce", "imagenet", "--data-root", str(cifar)])
    assert result.exit_code != 0 and "unknown experiment 'imagenet'" in result.output
    result = runner.invoke(app, ["reproduce", "cifar10", "--scale", "huge", "--data-root", str(cifar)])
    assert result.exit_code != 0 and "unknown scale 'huge'" in result.output
    result = runner.invoke(app, ["reproduce", "cifar10", "--time-limit", "soon", "--data-root", str(cifar)])
    assert result.exit_code != 0 and "--time-limit" in result.output


def test_a_class_stratified_subset_of_a_dataset_is_a_dataset_name(cifar: Path) -> None:
    spec = subset_spec("cifar10", train=300, test=100)
    s = load_splits(spec, root=cifar)
    assert (len(s.victim_train), len(s.pool), len(s.test)) == (150, 150, 100)
    full = load_splits("cifar10", root=cifar)
    counts = torch.bincount(torch.cat([s.victim_train.y, s.pool.y]), minlength=10).float()  # type: ignore[list-item]
    expected = torch.bincount(torch.cat([full.victim_train.y, full.pool.y]), minlength=10).float() * 300 / 500  # type: ignore[list-item]
    assert (counts - expected).abs().max() <= 1  # class shares kept
    # the same subset for every split seed; only the split differs
    other = load_splits(spec, root=cifar, seed=1)

    def sums(d: object) -> torch.Tensor:
        return torch.sort(torch.cat([d.victim_train.x, d.pool.x]).flatten(1).sum(1)).values  # type: ignore[attr-defined]

    assert torch.equal(sums(s), sums(other))
    with pytest.raises(DataError, match="asked for 900"):
        load_splits(subset_spec("cifar10", train=900), root=cifar)
    with pytest.raises(InputError, match="unknown subset options"):
        load_splits('cifar10:{"size": 10}', root=cifar)
    with pytest.raises(InputError, match="cannot hold one of each"):
        load_splits(subset_spec("cifar10", test=5), root=cifar)


def test_training_uses_the_accelerator_only_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = torch.zeros(100, 3, 32, 32), torch.zeros(100, dtype=torch.long)
    cpu = placement(torch.device("cpu"), x, y)
    assert not (cpu.resident or cpu.autocast or cpu.channels_last)
    # a GPU with room for the data: resident, bf16 autocast, channels-last images
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10**9, 2 * 10**9))
    gpu = placement(torch.device("cuda"), x, y)
    assert gpu.resident and gpu.autocast and gpu.channels_last
    assert not placement(torch.device("cuda"), torch.zeros(100, 5), y).channels_last  # not images
    # one that is too full keeps the data on the host and copies batches
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10**6, 2 * 10**9))
    assert not placement(torch.device("cuda"), x, y).resident


def test_the_accelerator_path_of_the_training_loop_trains_and_saves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GPU path (resident data, augmentation on the data's device, bf16 autocast,
    channels-last), forced on the CPU, where torch runs all of it: the model still learns,
    and comes back with contiguous weights that a checkpoint can hold."""
    import mextract.training as training
    from mextract.data.augment import trivial_augment_wide
    from mextract.models import create_model, load_checkpoint, save_checkpoint

    seen: list[training.Placement] = []

    def forced(device: torch.device, x: torch.Tensor, targets: torch.Tensor) -> training.Placement:
        seen.append(training.Placement(device, resident=True, autocast=True, channels_last=True))
        return seen[-1]

    monkeypatch.setattr(training, "placement", forced)
    g = torch.Generator().manual_seed(0)
    y = torch.randint(2, (256,), generator=g)
    x = 0.25 + 0.5 * y.view(-1, 1, 1, 1).float() * torch.ones(256, 3, 32, 32)
    x = (x + 0.1 * torch.randn(256, 3, 32, 32, generator=g)).clamp(0, 1)
    torch.manual_seed(0)
    model = create_model("cnn", (3, 32, 32), 2)
    cfg = training.TrainConfig(epochs=3, batch_size=32, lr=0.05)
    training.fit(model, x, y, torch.nn.functional.cross_entropy, cfg, transform=trivial_augment_wide)
    assert seen and seen[0].autocast and seen[0].channels_last
    assert all(p.is_contiguous() for p in model.parameters())
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc > 0.9
    save_checkpoint(
        tmp_path / "m", model, {"architecture": "cnn", "input_shape": [3, 32, 32], "num_classes": 2}
    )
    loaded, _ = load_checkpoint(tmp_path / "m")
    assert torch.equal(loaded(x[:8]), model(x[:8]))
