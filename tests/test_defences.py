"""Output-perturbation defences on hand-made logits: identity parameters, specified changes, stacking."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mextract.defences import (
    AdaptiveMisinformation,
    CosineWatermark,
    HoneyLabels,
    LabelOnly,
    NoisyProbabilities,
    PredictionPoisoning,
    ReverseSigmoid,
    Rounding,
    TopK,
)
from mextract.errors import InputError, UnknownNameError
from mextract.oracle import AnswerMode, VictimOracle

K = 4


def identity_victim(mode: str = "logits", **kw: object) -> VictimOracle:
    """A victim whose logits are its input, so tests choose the logits directly."""
    return VictimOracle(lambda x: x, input_shape=(K,), num_classes=K, mode=mode, **kw)  # type: ignore[arg-type]


LOGITS = torch.tensor(
    [[3.0, 2.0, 0.0, -1.0], [5.0, 1.0, 0.0, 0.0], [0.1, 0.0, -0.2, 0.05], [-1.0, 4.0, 3.5, 0.0]]
)
X = torch.randn(64, K, generator=torch.Generator().manual_seed(0)) * 3


def linear(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(K, 8), nn.ReLU(), nn.Linear(8, K))


@pytest.mark.parametrize(
    ("make", "mode"),
    [
        (lambda o: TopK(o, k=K), "topk"),
        (lambda o: HoneyLabels(o, threshold=0.0), "label"),
        (lambda o: HoneyLabels(o, threshold=0.0, output="probs"), "probs"),
        (lambda o: ReverseSigmoid(o, beta=0.0), "probs"),
        (lambda o: NoisyProbabilities(o, epsilon=math.inf), "probs"),
        (lambda o: PredictionPoisoning(o, surrogate=linear(1), epsilon=0.0), "probs"),
        (lambda o: AdaptiveMisinformation(o, misinformation=linear(2), tau=0.0), "probs"),
        (lambda o: LabelOnly(o), "label"),
        (lambda o: CosineWatermark(o, key=1, reference=X, epsilon=0.0), "probs"),
    ],
)
@pytest.mark.parametrize("inner_mode", ["logits", "probs"])
def test_identity_parameters_answer_like_the_plain_oracle(make, mode, inner_mode) -> None:  # type: ignore[no-untyped-def]
    defended = make(identity_victim(inner_mode))
    plain = identity_victim(mode, k=K)
    torch.testing.assert_close(defended.query(X), plain.query(X))
    assert defended.mode is AnswerMode(mode)


def test_honey_labels_answer_the_runner_up_below_the_margin() -> None:
    honey = HoneyLabels(identity_victim(), threshold=1.5)
    # margins: 1.0 (flip), 4.0 (keep), 0.05 (flip), 0.5 (flip)
    assert honey.query(LOGITS).argmax(1).tolist() == [1, 0, 3, 2]
    soft = HoneyLabels(identity_victim("probs"), threshold=1.5, output="probs").query(LOGITS)
    p = torch.softmax(LOGITS, 1)
    torch.testing.assert_close(soft[0, [0, 1]], p[0, [1, 0]])  # top-1 and top-2 swapped
    torch.testing.assert_close(soft[1], p[1])  # confident row untouched
    torch.testing.assert_close(soft.sum(1), torch.ones(4))


def test_topk_rounding_label_only() -> None:
    o = identity_victim()
    top = TopK(o, k=2).query(LOGITS)
    assert ((top > 0).sum(1) == 2).all()
    r = Rounding(o, decimals=1).query(LOGITS)
    assert torch.allclose(r * 10, torch.round(r * 10), atol=1e-5)
    lab = LabelOnly(o).query(LOGITS)
    assert lab.sum(1).eq(1).all() and lab.argmax(1).tolist() == [0, 0, 0, 1]


def test_reverse_sigmoid_keeps_labels_but_breaks_the_probabilities() -> None:
    p = torch.softmax(X, 1)
    rs = ReverseSigmoid(identity_victim(), beta=0.6, gamma=0.3).query(X)
    torch.testing.assert_close(rs.sum(1), torch.ones(len(X)))
    assert (rs - p).abs().max() > 0.05
    assert (rs.argmax(1) == p.argmax(1)).float().mean() > 0.9


def test_dp_noise_has_the_stated_scale_and_is_seeded() -> None:
    noisy = NoisyProbabilities(identity_victim(), epsilon=4.0, seed=3)
    assert noisy.scale == pytest.approx(0.5)  # Laplace b = Δ₁/ε = 2/4
    a = noisy.query(X)
    b = NoisyProbabilities(identity_victim(), epsilon=4.0, seed=3).query(X)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a.sum(1), torch.ones(len(X)))
    assert (a - torch.softmax(X, 1)).abs().mean() > 0.05
    g = NoisyProbabilities(identity_victim(), epsilon=0.5, mechanism="gaussian", delta=1e-5)
    assert g.scale == pytest.approx(math.sqrt(2) * math.sqrt(2 * math.log(1.25e5)) / 0.5)
    with pytest.raises(InputError, match="epsilon < 1"):
        NoisyProbabilities(identity_victim(), epsilon=2.0, mechanism="gaussian")
    with pytest.raises(UnknownNameError):
        NoisyProbabilities(identity_victim(), epsilon=1.0, mechanism="cauchy")


def test_mad_stays_within_its_l1_budget_and_maximises_deviation() -> None:
    sur = linear(5)
    y = torch.softmax(X, 1)
    for eps, keep in [(0.5, False), (1.0, True), (2.0, False)]:
        out = PredictionPoisoning(identity_victim(), surrogate=sur, epsilon=eps, argmax=keep).query(X)
        assert ((out - y).abs().sum(1) <= eps + 1e-5).all()
        torch.testing.assert_close(out.sum(1), torch.ones(len(X)))
        assert (out - y).abs().sum(1).mean() > 0.1
        if keep:
            assert (out.argmax(1) == y.argmax(1)).all()
    # the chosen answer deviates the surrogate's gradient direction at least as much as a random vertex
    s = torch.softmax(sur(X), 1).detach()
    out = PredictionPoisoning(identity_victim(), surrogate=sur, epsilon=2.0).query(X)
    dev = (torch.nn.functional.normalize(out - s, dim=1) - torch.nn.functional.normalize(y - s, dim=1)).norm(
        dim=1
    )
    other = torch.eye(K)[torch.randint(K, (len(X),), generator=torch.Generator().manual_seed(1))]
    dev_other = (
        torch.nn.functional.normalize(other - s, dim=1) - torch.nn.functional.normalize(y - s, dim=1)
    ).norm(dim=1)
    assert (dev >= dev_other - 1e-5).all()


def test_adaptive_misinformation_only_touches_unconfident_queries() -> None:
    mis = linear(7)
    am = AdaptiveMisinformation(identity_victim(), misinformation=mis, tau=0.6, nu=1000.0)
    confident = torch.tensor([[9.0, 0.0, 0.0, 0.0]])
    unsure = torch.tensor([[0.1, 0.0, 0.05, 0.0]])
    torch.testing.assert_close(am.query(confident), torch.softmax(confident, 1))
    torch.testing.assert_close(am.query(unsure), torch.softmax(mis(unsure), 1).detach())


def test_defences_stack_and_count_each_sample_once() -> None:
    inner = identity_victim(budget=100)
    stacked = TopK(ReverseSigmoid(NoisyProbabilities(inner, epsilon=50.0), beta=0.3), k=2)
    out = stacked.query(X)
    assert ((out > 0).sum(1) <= 2).all() and stacked.ledger is inner.ledger
    assert inner.ledger.count == 64


def test_defences_need_a_full_answer() -> None:
    with pytest.raises(InputError, match="expected an inner oracle answering 'logits' or 'probs'"):
        TopK(identity_victim("label"), k=2)
    with pytest.raises(InputError, match="expected an Oracle"):
        TopK(lambda x: x, k=2)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="k"):
        TopK(identity_victim(), k=0)


def test_pgd_stays_in_the_ball_and_raises_the_loss(digits_splits, digits_victim) -> None:  # type: ignore[no-untyped-def]
    from mextract.defences.adversarial import PGDConfig, pgd

    x, y = digits_splits.test.x[:64], digits_splits.test.y[:64]
    cfg = PGDConfig(eps=0.1, alpha=0.03, steps=5)
    adv = pgd(digits_victim, x, y, cfg, generator=torch.Generator().manual_seed(0))
    assert (adv - x).abs().max() <= 0.1 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    clean = torch.nn.functional.cross_entropy(digits_victim(x), y)
    assert torch.nn.functional.cross_entropy(digits_victim(adv), y) > clean + 0.5
    with pytest.raises(InputError, match="steps"):
        PGDConfig(steps=0)


def test_adversarial_training_makes_the_victim_more_robust(digits_splits) -> None:  # type: ignore[no-untyped-def]
    from mextract.defences.adversarial import PGDConfig, adversarial_training, pgd
    from mextract.models import create_model
    from mextract.training import TrainConfig, VictimRecipe, train_victim

    recipe = VictimRecipe(train=TrainConfig(epochs=6, batch_size=64, lr=0.05), augment="none")
    cfg = PGDConfig(eps=0.1, alpha=0.05, steps=2)
    torch.manual_seed(0)
    plain = train_victim(create_model("cnn", (1, 8, 8), 10), digits_splits.victim_train, recipe, seed=0)
    torch.manual_seed(0)
    robust = adversarial_training(
        create_model("cnn", (1, 8, 8), 10), digits_splits.victim_train, recipe, attack=cfg, seed=0
    )
    x, y = digits_splits.test.x, digits_splits.test.y

    def robust_acc(m: nn.Module) -> float:
        adv = pgd(
            m, x, y, PGDConfig(eps=0.1, alpha=0.04, steps=3), generator=torch.Generator().manual_seed(1)
        )
        return float((m(adv).argmax(1) == y).float().mean())

    assert robust_acc(robust) > robust_acc(plain) + 0.1
    assert float((robust(x).argmax(1) == y).float().mean()) > 0.8


def test_defence_registry_builds_and_stacks_from_specs(digits_splits, digits_victim) -> None:  # type: ignore[no-untyped-def]
    from mextract.defences.registry import DEFENCES, Owner, build_defence, honest_accuracy

    owner = Owner(victim=digits_victim, train=digits_splits.victim_train, architecture="cnn")
    plain = VictimOracle(digits_victim, input_shape=(1, 8, 8), num_classes=10, mode="logits")
    d = build_defence('reverse_sigmoid:{"beta": 0.5}+topk:{"k": 2}', plain, owner)
    assert isinstance(d, TopK) and isinstance(d.inner, ReverseSigmoid) and d.inner.beta == 0.5
    mad = build_defence('mad:{"epsilon": 1e+0}', plain, owner)
    assert isinstance(mad, PredictionPoisoning)
    assert build_defence("none", plain, owner) is plain
    assert honest_accuracy(build_defence("honey", plain, owner), digits_splits.test) < honest_accuracy(
        plain, digits_splits.test
    )
    with pytest.raises(UnknownNameError, match="unknown defence 'honeypot'"):
        build_defence("honeypot", plain, owner)
    with pytest.raises(InputError, match="bad options"):
        build_defence('topk:{"kk": 2}', plain, owner)
    assert {"honey", "mad", "dp_noise", "adaptive_misinformation", "cosine"} <= set(DEFENCES)
    from mextract.defences.ownership import DawnWatermark

    marks = build_defence('cosine:{"epsilon": 0.05}+dawn', plain, owner)
    assert isinstance(marks, DawnWatermark) and isinstance(marks.inner, CosineWatermark)
    assert marks.inner.epsilon == 0.05 and marks.mode is AnswerMode.PROBS


def test_owner_trains_the_misinformation_model_once(digits_splits, digits_victim) -> None:  # type: ignore[no-untyped-def]
    from mextract.defences.registry import Owner, build_defence

    owner = Owner(victim=digits_victim, train=digits_splits.victim_train, architecture="logreg")
    plain = VictimOracle(digits_victim, input_shape=(1, 8, 8), num_classes=10, mode="logits")
    a = build_defence('adaptive_misinformation:{"epochs": 1}', plain, owner)
    b = build_defence('adaptive_misinformation:{"epochs": 1}', plain, owner)
    assert isinstance(a, AdaptiveMisinformation) and a.misinformation is b.misinformation


def test_pgd_step_size_rule() -> None:
    from mextract.defences.adversarial import PGDConfig

    cfg = PGDConfig.for_eps(0.3, steps=10)
    assert (cfg.eps, cfg.steps) == (0.3, 10) and cfg.alpha == pytest.approx(0.075)
    with pytest.raises(InputError):
        PGDConfig.for_eps(0.0)


def test_adversarially_trained_victim_run_is_recorded_and_resumed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from mextract.defences.adversarial import PGDConfig
    from mextract.experiments import train_victim_run
    from mextract.models import load_checkpoint

    pgd = PGDConfig.for_eps(0.2, steps=2)
    common = {"dataset": "digits", "model": "logreg", "device": "cpu"}
    plain = train_victim_run(tmp_path / "plain", **common)
    robust = train_victim_run(tmp_path / "adv", adversarial=pgd, **common)
    assert "adversarial" not in plain.config and robust.config["adversarial"]["eps"] == 0.2
    a, _ = load_checkpoint(tmp_path / "plain" / "victim")
    b, _ = load_checkpoint(tmp_path / "adv" / "victim")
    assert not torch.equal(a.state_dict()["1.weight"], b.state_dict()["1.weight"])
    again = train_victim_run(tmp_path / "adv", adversarial=pgd, **common)
    assert again.metrics == robust.metrics and again.created == robust.created
