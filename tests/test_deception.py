"""Model deception: adversarial examples crafted on a substitute, transferred to the victim.

Tiny MLPs on scikit-learn's 8×8 digits (one thread, a few seconds in all): a victim, a
substitute trained on the victim's labels of the attacker pool (a stolen copy), a weak model
trained on 30 true labels, and an untrained one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from mextract.cli.deceive import app as deceive_app
from mextract.data import IMAGE_RANGE, UNBOUNDED, Splits, ValueRange, load_splits
from mextract.deception import (
    DeceptionConfig,
    config_grid,
    craft,
    default_config,
    random_targets,
    transfer_rate,
    transfer_table,
)
from mextract.errors import InputError
from mextract.metrics import agreement, predict_labels
from mextract.models import create_model, save_checkpoint
from mextract.training import TrainConfig, fit

MLP = {"dropout": 0.0}
TRAIN = TrainConfig(epochs=30, batch_size=64, lr=3e-3, optimizer="adam", weight_decay=0.0)


@dataclass
class Lab:
    splits: Splits
    victim: nn.Module
    mimic: nn.Module  # trained on the victim's labels of the pool: a stolen substitute
    weak: nn.Module  # trained on 30 true labels, independently of the victim
    untrained: nn.Module
    x: torch.Tensor
    y: torch.Tensor


def _mlp(hidden: tuple[int, ...], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("mlp", (1, 8, 8), 10, hidden=hidden, **MLP)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)  # conftest restores the count after each test


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        s = load_splits("digits", seed=0)
        assert s.victim_train.y is not None and s.test.y is not None and s.pool.y is not None
        victim = fit(_mlp((128,), 0), s.victim_train.x, s.victim_train.y, F.cross_entropy, TRAIN, seed=0)
        stolen = predict_labels(victim, s.pool.x)
        mimic = fit(_mlp((64,), 1), s.pool.x, stolen, F.cross_entropy, TRAIN, seed=1)
        weak = fit(_mlp((64,), 2), s.pool.x[:30], s.pool.y[:30], F.cross_entropy, TRAIN, seed=2)
        untrained = _mlp((64,), 5).eval()
        yield Lab(s, victim.eval(), mimic.eval(), weak.eval(), untrained, s.test.x[:200], s.test.y[:200])
    finally:
        torch.set_num_threads(before)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _norms(delta: torch.Tensor, norm: str) -> torch.Tensor:
    flat = delta.flatten(1)
    return flat.abs().amax(1) if norm == "linf" else flat.norm(dim=1)


# --------------------------------------------------------------------------- the attack


def test_white_box_pgd_fools_a_trained_net(lab: Lab) -> None:
    config = default_config((1, 8, 8), IMAGE_RANGE)
    assert (config.method, config.norm, config.eps, config.steps, config.step_size) == (
        "pgd",
        "linf",
        0.3,
        40,
        0.01,
    )
    res = transfer_rate(
        lab.victim, lab.victim, lab.x, lab.y, config, value_range=IMAGE_RANGE, generator=_gen()
    )
    assert res.white_box_rate >= 0.98 and res.rate == res.white_box_rate
    assert res.samples == 200 and res.evaluated == int((predict_labels(lab.victim, lab.x) == lab.y).sum())
    assert res.victim_accuracy == pytest.approx(res.evaluated / 200)


def test_transfer_from_a_stolen_copy_beats_independent_models(lab: Lab) -> None:
    """The threat: the substitute's examples fool the victim far more often than examples
    crafted on a model that does not mimic it (measured: 0.77 against 0.17 and 0.05)."""
    assert agreement(predict_labels(lab.mimic, lab.x), predict_labels(lab.victim, lab.x)) > 0.9
    config = DeceptionConfig(method="pgd", norm="linf", eps=0.15)
    rates = {
        name: transfer_rate(
            model, lab.victim, lab.x, lab.y, config, value_range=IMAGE_RANGE, generator=_gen()
        )
        for name, model in [("mimic", lab.mimic), ("weak", lab.weak), ("untrained", lab.untrained)]
    }
    assert rates["mimic"].rate >= 0.6
    assert rates["mimic"].rate > rates["weak"].rate + 0.3
    assert rates["mimic"].rate > rates["untrained"].rate + 0.4
    for r in rates.values():  # every source is fooled itself: white-box, the attack works
        assert r.white_box_rate >= 0.75


CONFIGS = [
    DeceptionConfig(method="fgsm", norm="linf", eps=0.1),
    DeceptionConfig(method="fgsm", norm="l2", eps=0.8),
    DeceptionConfig(method="pgd", norm="linf", eps=0.1, steps=7),
    DeceptionConfig(method="pgd", norm="l2", eps=0.8, steps=7),
    DeceptionConfig(method="pgd", norm="linf", eps=0.1, steps=7, momentum=0.9, targeted=True),
    DeceptionConfig(method="pgd", norm="l2", eps=0.8, steps=7, momentum=1.0, random_start=False),
    DeceptionConfig(method="pgd", norm="l2", eps=3.0, steps=5, step_size=2.0),  # steps overshoot: projected
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.summary())
def test_perturbations_stay_in_the_ball_and_the_range(lab: Lab, config: DeceptionConfig) -> None:
    adv = craft(lab.mimic, lab.x, lab.y, config, value_range=IMAGE_RANGE, generator=_gen())
    assert adv.shape == lab.x.shape and adv.dtype == lab.x.dtype
    norms = _norms(adv - lab.x, config.norm)
    assert float(norms.max()) <= config.eps * (1 + 1e-5)
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    assert float(norms.mean()) > 0.3 * config.eps  # it did move


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_unbounded_and_half_bounded_ranges(norm: str) -> None:
    g = _gen(3)
    x = torch.randn(64, 5, generator=g)
    y = torch.randint(0, 3, (64,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))
    config = DeceptionConfig(method="pgd", norm=norm, eps=0.5, steps=5)
    adv = craft(model, x, y, config, value_range=UNBOUNDED, generator=_gen())
    assert float(_norms(adv - x, norm).max()) <= 0.5 * (1 + 1e-5)
    xp = x.abs()
    half = ValueRange(low=0.0, high=None)
    adv = craft(model, xp, y, config, value_range=half, generator=_gen())
    assert float(adv.min()) >= 0.0 and float(_norms(adv - xp, norm).max()) <= 0.5 * (1 + 1e-5)
    assert float(adv.max()) > float(xp.max()) - 1e-6  # no upper clip
    # a float64 model on float32 inputs: the result keeps the inputs' dtype, in the ball
    adv = craft(model.double(), x, y, config, value_range=UNBOUNDED, generator=_gen())
    assert adv.dtype == torch.float32 and float(_norms(adv - x, norm).max()) <= 0.5 * (1 + 1e-5)


def test_targeted_attack_reaches_its_target_on_the_source(lab: Lab) -> None:
    config = DeceptionConfig(method="pgd", norm="linf", eps=0.3, steps=40, step_size=0.01, targeted=True)
    target = (lab.y + 3) % 10
    adv = craft(lab.mimic, lab.x, lab.y, config, value_range=IMAGE_RANGE, generator=_gen(), target=target)
    assert float((predict_labels(lab.mimic, adv) == target).double().mean()) >= 0.9
    # default targets: a class other than y, drawn from the generator (deterministic)
    t1, t2 = random_targets(lab.y, 10, _gen(7)), random_targets(lab.y, 10, _gen(7))
    assert torch.equal(t1, t2) and bool((t1 != lab.y).all()) and len(set(t1.tolist())) == 10
    res = transfer_rate(
        lab.mimic, lab.victim, lab.x, lab.y, config, value_range=IMAGE_RANGE, generator=_gen()
    )
    assert res.white_box_rate >= 0.9 and res.rate > 0.5  # targeted transfer from the stolen copy


def test_momentum_changes_the_result_and_respects_eps(lab: Lab) -> None:
    plain = DeceptionConfig(method="pgd", norm="linf", eps=0.1, steps=10)
    mi = DeceptionConfig(method="pgd", norm="linf", eps=0.1, steps=10, momentum=0.9)
    a = craft(lab.mimic, lab.x, lab.y, plain, value_range=IMAGE_RANGE, generator=_gen())
    b = craft(lab.mimic, lab.x, lab.y, mi, value_range=IMAGE_RANGE, generator=_gen())
    assert not torch.equal(a, b)
    assert float((a - b).abs().amax()) > 0.05
    assert float(_norms(b - lab.x, "linf").max()) <= 0.1 + 1e-6
    for norm, eps in (("linf", 0.1), ("l2", 0.8)):
        c = DeceptionConfig(method="pgd", norm=norm, eps=eps, steps=10, momentum=0.9)
        res = transfer_rate(lab.mimic, lab.victim, lab.x, lab.y, c, value_range=IMAGE_RANGE, generator=_gen())
        assert res.white_box_rate > 0.3
    # μ = 0 is plain PGD (the L1 normalisation changes no sign), one step with momentum is FGSM
    fgsm = DeceptionConfig(method="fgsm", norm="l2", eps=0.5)
    mfgsm = DeceptionConfig(method="fgsm", norm="l2", eps=0.5, momentum=0.9)
    assert torch.equal(
        craft(lab.mimic, lab.x, lab.y, fgsm, value_range=IMAGE_RANGE),
        craft(lab.mimic, lab.x, lab.y, mfgsm, value_range=IMAGE_RANGE),
    )


def test_deterministic_mode_restored_and_no_parameter_gradients(lab: Lab) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Dropout(0.5), nn.ReLU(), nn.Linear(32, 10))
    model.train()
    config = DeceptionConfig(method="pgd", norm="l2", eps=1.0, steps=5, targeted=True)
    a = craft(model, lab.x, lab.y, config, value_range=IMAGE_RANGE, generator=_gen(1), batch_size=37)
    b = craft(model, lab.x, lab.y, config, value_range=IMAGE_RANGE, generator=_gen(1), batch_size=37)
    c = craft(model, lab.x, lab.y, config, value_range=IMAGE_RANGE, generator=_gen(2), batch_size=37)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert model.training  # the caller's mode, restored
    assert all(p.grad is None for p in model.parameters())


def test_an_oracle_or_a_label_callable_can_be_the_victim(lab: Lab) -> None:
    from mextract.oracle import VictimOracle

    config = DeceptionConfig(method="pgd", norm="linf", eps=0.15, steps=10)
    oracle = VictimOracle(
        lab.victim, input_shape=(1, 8, 8), num_classes=10, mode="label", value_range=IMAGE_RANGE
    )
    calls: list[int] = []

    def labels(x: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        return predict_labels(lab.victim, x)

    ref = transfer_rate(
        lab.mimic, lab.victim, lab.x, lab.y, config, value_range=IMAGE_RANGE, generator=_gen()
    )
    for victim in (oracle.query, labels):
        res = transfer_rate(
            lab.mimic, victim, lab.x, lab.y, config, value_range=IMAGE_RANGE, generator=_gen()
        )
        assert (res.rate, res.evaluated, res.white_box_rate) == (ref.rate, ref.evaluated, ref.white_box_rate)
    assert calls == [200, ref.evaluated]  # the clean samples, then the adversarial ones
    assert oracle.ledger.count == 200 + ref.evaluated


def test_transfer_table_rows_and_common_random_numbers(lab: Lab) -> None:
    calls: list[int] = []

    def labels(x: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        return predict_labels(lab.victim, x)

    configs = [
        DeceptionConfig(eps=0.1, steps=5),
        DeceptionConfig(method="fgsm", norm="l2", eps=0.8, targeted=True),
    ]
    sources = {"mimic": lab.mimic, "untrained": lab.untrained}
    rows = transfer_table(sources, labels, lab.x, lab.y, configs, value_range=IMAGE_RANGE, seed=4)
    assert [(r.source, r.config) for r in rows] == [(s, c.summary()) for s in sources for c in configs]
    assert calls[0] == 200 and len(calls) == 1 + len(rows)  # clean labels asked once
    one = transfer_rate(lab.untrained, lab.victim, lab.x, lab.y, configs[1], value_range=IMAGE_RANGE,
                        generator=_gen(4))  # fmt: skip
    assert (rows[3].rate, rows[3].white_box_rate) == (one.rate, one.white_box_rate)
    assert rows[0].rate > rows[2].rate


def test_no_correct_sample_gives_nan(lab: Lab) -> None:
    wrong = (predict_labels(lab.victim, lab.x[:5]) + 1) % 10
    res = transfer_rate(
        lab.mimic, lab.victim, lab.x[:5], wrong, DeceptionConfig(eps=0.1), value_range=IMAGE_RANGE
    )
    assert res.evaluated == 0 and math.isnan(res.rate) and res.victim_accuracy == 0.0


# --------------------------------------------------------------------------- defaults


def test_default_configs_follow_the_papers() -> None:
    mnist = default_config((1, 28, 28), IMAGE_RANGE)
    assert (mnist.eps, mnist.steps, mnist.step_size, mnist.random_start) == (0.3, 40, 0.01, True)
    cifar = default_config((3, 32, 32), IMAGE_RANGE)
    assert (cifar.eps, cifar.steps, cifar.step_size) == (pytest.approx(8 / 255), 20, pytest.approx(2 / 255))
    assert default_config((1, 28, 28), IMAGE_RANGE, norm="l2").eps == pytest.approx(2.0)
    assert default_config((3, 32, 32), IMAGE_RANGE, norm="l2").eps == pytest.approx(0.5)
    assert default_config((1, 8, 8), IMAGE_RANGE, norm="l2").eps == pytest.approx(2.0 * 8 / 28)
    assert default_config((1, 28, 28), ValueRange(0.0, 255.0)).eps == pytest.approx(0.3 * 255)
    assert default_config((30,), UNBOUNDED).eps == pytest.approx(0.3)
    l2 = default_config((3, 32, 32), IMAGE_RANGE, norm="l2")
    assert l2.step_size == pytest.approx(2.5 * l2.eps / l2.n_steps)  # Madry et al.'s rule
    fgsm = DeceptionConfig(method="fgsm", eps=0.2)
    assert (fgsm.steps, fgsm.step_size, fgsm.random_start) == (1, 0.2, False)
    pgd = DeceptionConfig(eps=0.2)
    assert (pgd.steps, pgd.step_size, pgd.random_start) == (10, pytest.approx(0.05), True)
    grid = config_grid((1, 28, 28), IMAGE_RANGE)
    assert len(grid) == 12 and len({c.summary() for c in grid}) == 12
    assert {(c.method, c.norm, c.targeted, c.momentum) for c in grid if c.method == "pgd"} == {
        ("pgd", n, t, m) for n in ("linf", "l2") for t in (False, True) for m in (0.0, 0.9)
    }


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"eps": 0.0}, "eps"),
        ({"eps": float("nan")}, "eps"),
        ({"eps": True}, "eps"),
        ({"eps": 0.1, "method": "cw"}, "method"),
        ({"eps": 0.1, "norm": "l1"}, "norm"),
        ({"eps": 0.1, "steps": 0}, "steps"),
        ({"eps": 0.1, "steps": 2.5}, "steps"),
        ({"eps": 0.1, "method": "fgsm", "steps": 5}, "steps"),
        ({"eps": 0.1, "step_size": -1.0}, "step_size"),
        ({"eps": 0.1, "momentum": -0.1}, "momentum"),
        ({"eps": 0.1, "momentum": float("inf")}, "momentum"),
        ({"eps": 0.1, "targeted": "yes"}, "targeted"),
        ({"eps": 0.1, "random_start": 1}, "random_start"),
    ],
)
def test_bad_configs_are_refused_by_name(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(InputError, match=rf"^{field}: expected .*, got "):
        DeceptionConfig(**kwargs)


def test_bad_inputs_are_refused(lab: Lab) -> None:
    config = DeceptionConfig(eps=0.1, steps=2)
    x, y = lab.x[:10], lab.y[:10]

    def bad(match: str, **kw: Any) -> None:
        args = {"source": lab.mimic, "victim": lab.victim, "x": x, "y": y, "config": config,
                "value_range": IMAGE_RANGE, **kw}  # fmt: skip
        with pytest.raises(InputError, match=match):
            transfer_rate(**args)

    bad(r"y: expected shape \(10,\)", y=y[:9])
    nan = x.clone()
    nan[0, 0, 0, 0] = float("nan")
    bad("x: expected finite values", x=nan)
    bad("x: expected at least one sample", x=x[:0], y=y[:0])
    bad(r"x: expected values in \[0, 1\]", x=x * 3)
    bad("y: expected integer class indices", y=y.float())
    bad("victim: expected labels", victim=lambda t: torch.zeros(3, dtype=torch.long))
    bad("target: expected None for an untargeted config", target=(y + 1) % 10)
    targeted = DeceptionConfig(eps=0.1, steps=2, targeted=True)
    bad("target: expected classes different from y", config=targeted, target=y)
    with pytest.raises(InputError, match=r"y: expected classes in 0\.\.9"):
        craft(lab.mimic, x, y + 10, config, value_range=IMAGE_RANGE)
    with pytest.raises(InputError, match=r"model: expected a torch\.nn\.Module"):
        craft(lambda t: t, x, y, config, value_range=IMAGE_RANGE)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="norm"):
        default_config((1, 8, 8), IMAGE_RANGE, norm="l1")


# --------------------------------------------------------------------------- the command line


def _flat(text: str) -> str:
    return re.sub(r"[\s│╭╮╰╯─]+", " ", text)


@pytest.fixture(scope="module")
def checkpoints(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("deceive")
    s = lab.splits
    base = {"architecture": "mlp", "input_shape": [1, 8, 8], "num_classes": 10}
    victim_meta = {**base, "options": {"hidden": [128], **MLP}, "value_range": IMAGE_RANGE.to_json(),
                   "dataset": "digits", "split": s.meta, "seed": 0}  # fmt: skip
    paths = {
        "victim": save_checkpoint(root / "victim", lab.victim, victim_meta),
        "sub": save_checkpoint(root / "sub", lab.mimic, {**base, "options": {"hidden": [64], **MLP}}),
        "rnd": save_checkpoint(root / "rnd", lab.untrained, {**base, "options": {"hidden": [64], **MLP}}),
        "files": save_checkpoint(root / "files", lab.victim, {**victim_meta, "dataset": None}),
    }
    wine = create_model("mlp", (13,), 3, hidden=(4,))
    wine_meta = {"architecture": "mlp", "input_shape": [13], "num_classes": 3, "options": {"hidden": [4]}}
    paths["wine"] = save_checkpoint(root / "wine", wine, wine_meta)
    return paths


def test_cli_reports_transfer_for_substitute_and_reference(checkpoints: dict[str, Path]) -> None:
    runner = CliRunner()
    sources = [str(checkpoints["victim"]), str(checkpoints["sub"]), "--reference", str(checkpoints["rnd"])]
    args = [
        *sources,
        "--samples",
        "120",
        "--eps",
        "0.15",
        "--steps",
        "10",
        "--device",
        "cpu",
        "--threads",
        "1",
    ]
    r = runner.invoke(deceive_app, args, env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    out = _flat(r.output)
    assert "victim: mlp on digits" in out and "on 120 test samples" in out
    assert "substitute: sub (mlp)" in out and "reference 1: rnd (mlp)" in out
    assert "pgd L∞ ε=0.15 10×0.0375 rand" in out
    rates = [float(v) for v in re.findall(r"(\d+\.\d)%", out)]
    assert len(rates) >= 6  # accuracy, two fidelities, two rows of (fooled, white-box)
    sub_row = re.search(r"substitute pgd .*? \d+ ([\d.]+)% ([\d.]+)%", out)
    ref_row = re.search(r"reference 1 pgd .*? \d+ ([\d.]+)% ([\d.]+)%", out)
    assert sub_row is not None and ref_row is not None
    assert float(sub_row.group(1)) > float(ref_row.group(1)) + 30


def test_cli_all_runs_the_grid(checkpoints: dict[str, Path]) -> None:
    args = [
        str(checkpoints["victim"]),
        str(checkpoints["sub"]),
        "--all",
        "--samples",
        "40",
        "--device",
        "cpu",
    ]
    r = CliRunner().invoke(deceive_app, args, env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    out = _flat(r.output)
    assert out.count("substitute fgsm") == 4 and out.count("substitute pgd") == 8
    assert "μ=0.9" in out and "targeted" in out and "L2" in out


@pytest.mark.parametrize(
    ("which", "extra", "message"),
    [
        ("files", [], "expected a victim trained on a named dataset"),
        ("victim", ["--all", "--eps", "0.1"], "drop --eps"),
        ("victim", ["--eps", "-1"], "eps: expected a finite number > 0"),
        ("victim", ["--method", "fgsm", "--steps", "3"], "steps: expected 1 for fgsm"),
        ("victim", ["--momentum", "-1"], "--momentum"),
        ("mismatch", [], "expected a model of the victim's inputs"),
    ],
)
def test_cli_refuses_bad_input(
    checkpoints: dict[str, Path], which: str, extra: list[str], message: str
) -> None:
    victim = checkpoints["files" if which == "files" else "victim"]
    sub = checkpoints["wine" if which == "mismatch" else "sub"]
    r = CliRunner().invoke(
        deceive_app, [str(victim), str(sub), "--samples", "5", *extra], env={"COLUMNS": "200"}
    )
    assert r.exit_code == 2, r.output
    assert message in _flat(r.output)
    assert "Traceback" not in r.output
