"""Ownership verification: trigger-set watermark, DAWN, conferrable-example fingerprints."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mextract.defences.cosine import CosineWatermark
from mextract.defences.ownership import (
    DawnWatermark,
    TriggerWatermark,
    binomial_verification,
    fingerprint_auc,
    generate_fingerprints,
    train_references,
    train_surrogates,
    watermark_training_set,
    wsr,
)
from mextract.errors import InputError
from mextract.metrics import predict_labels
from mextract.models import create_model
from mextract.oracle import VictimOracle
from mextract.training import TrainConfig, VictimRecipe, fit, train_victim

RECIPE = VictimRecipe(train=TrainConfig(epochs=12, batch_size=64, lr=0.05), augment="none")
SMALL = TrainConfig(epochs=10, batch_size=64, lr=0.05)


def _oracle(model: nn.Module, mode: str = "probs") -> VictimOracle:
    return VictimOracle(model, input_shape=(1, 8, 8), num_classes=10, mode=mode, device="cpu")


@pytest.fixture(scope="module")
def independent(digits_splits) -> nn.Module:  # type: ignore[no-untyped-def]
    return train_references(digits_splits.victim_train, 1, seed=77, config=SMALL)[0]


# ---------------------------------------------------------------------------- trigger watermark


def test_trigger_stamps_the_corner_only() -> None:
    wm = TriggerWatermark(target=3, size=2)
    x = torch.zeros(4, 1, 8, 8)
    out = wm.apply(x)
    assert torch.all(out[:, :, -2:, -2:] == 1) and out.sum() == 4 * 4 and x.sum() == 0


def test_watermark_training_set_adds_the_fraction(digits_splits) -> None:  # type: ignore[no-untyped-def]
    data = digits_splits.victim_train
    wm = TriggerWatermark(target=0, fraction=0.05)
    marked = watermark_training_set(data, wm, seed=0)
    extra = len(marked) - len(data)
    assert extra == -(-len(data) * 5 // 100)
    assert torch.all(marked.y[len(data) :] == 0) and torch.all(marked.x[len(data) :, :, -3:, -3:] == 1)


def test_trigger_embeds_in_the_victim_and_not_in_a_clean_model(digits_splits, digits_victim) -> None:  # type: ignore[no-untyped-def]
    wm = TriggerWatermark(target=0, size=2)
    torch.manual_seed(0)
    victim = train_victim(
        create_model("cnn", (1, 8, 8), 10), watermark_training_set(digits_splits.victim_train, wm),
        RECIPE, seed=0, device="cpu",
    )  # fmt: skip
    test = digits_splits.test
    assert wm.wsr(victim, test.x, test.y) > 0.9
    assert wsr(digits_victim, test.x, 0, labels=test.y, size=2) < 0.1


# ---------------------------------------------------------------------------- DAWN


def test_dawn_marks_the_keyed_fraction_deterministically(digits_splits, digits_victim) -> None:  # type: ignore[no-untyped-def]
    x = torch.rand(4000, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    dawn = DawnWatermark(_oracle(digits_victim), key=b"owner", fraction=0.05)
    marked, offset = dawn.decide(x)
    assert abs(float(marked.float().mean()) - 0.05) < 0.015
    assert torch.all((offset >= 1) & (offset <= 9))
    again, offset2 = dawn.decide(x)
    assert torch.equal(marked, again) and torch.equal(offset, offset2)
    other, _ = DawnWatermark(_oracle(digits_victim), key=b"other", fraction=0.05).decide(x)
    assert not torch.equal(marked, other)  # the key decides


def test_dawn_marked_answers_are_wrong_and_the_rest_unchanged(digits_splits, digits_victim) -> None:  # type: ignore[no-untyped-def]
    x = digits_splits.pool.x
    plain = _oracle(digits_victim).query(x)
    inner = _oracle(digits_victim)
    dawn = DawnWatermark(inner, key=7, fraction=0.1)
    answers = dawn.query(x)
    assert inner.ledger.count == len(x)
    marked, _ = dawn.decide(x)
    assert torch.equal(answers[~marked], plain[~marked])
    assert torch.all(answers[marked].argmax(1) != plain[marked].argmax(1))
    assert torch.allclose(answers[marked].sort(1).values, plain[marked].sort(1).values)  # a swap
    wx, wy = dawn.watermark_set
    assert len(dawn) == int(marked.sum()) and torch.equal(wy, answers[marked].argmax(1))
    assert torch.equal(wx, x[marked])
    dawn.query(x[marked][:3])  # repeated queries: same answers, recorded once
    assert len(dawn) == int(marked.sum())
    labels = DawnWatermark(_oracle(digits_victim, "label"), key=7, fraction=0.1).query(x)
    assert torch.equal(labels.argmax(1), answers.argmax(1))


def test_dawn_verifies_a_stolen_model_but_not_an_independent_one(
    digits_splits, digits_victim, independent
) -> None:  # type: ignore[no-untyped-def]
    pool = digits_splits.pool.x
    dawn = DawnWatermark(_oracle(digits_victim, "label"), key=b"k", fraction=0.05)
    y = dawn.query(pool).argmax(1)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        stolen = create_model("cnn", (1, 8, 8), 10)
    fit(
        stolen, pool, y, F.cross_entropy, TrainConfig(epochs=20, batch_size=64, lr=0.05), seed=5, device="cpu"
    )
    result = dawn.verify(stolen)
    assert result.total == len(dawn) >= 20
    assert result.stolen and result.p_value < 1e-3 and result.wsr > 0.5
    clean = dawn.verify(independent)
    assert not clean.stolen and clean.wsr < 0.2
    assert not dawn.verify(digits_victim).stolen  # the victim itself answers its true top-1


def test_binomial_bound() -> None:
    r = binomial_verification(5, 8, 1 / 9)
    assert r.p_value == pytest.approx(7.09e-4, rel=0.01) and r.stolen
    assert not binomial_verification(4, 8, 1 / 9).stolen
    with pytest.raises(InputError):
        binomial_verification(1, 2, 0.0)


# ---------------------------------------------------------------------------- cosine watermark


def _cosine(victim: nn.Module, reference: torch.Tensor, key: int = 0, **kw: object) -> CosineWatermark:
    return CosineWatermark(_oracle(victim, "logits"), key, reference=reference, **kw)  # type: ignore[arg-type]


def test_cosine_answers_follow_the_formula(digits_splits, digits_victim) -> None:  # type: ignore[no-untyped-def]
    x = digits_splits.pool.x
    wm = _cosine(digits_victim, digits_splits.victim_train.x, epsilon=0.1)
    q = _oracle(digits_victim).query(x)
    answers = wm.query(x)
    a = wm.signal(x).float()
    t, e = wm.target, 0.1
    torch.testing.assert_close(answers.sum(1), torch.ones(len(x)))
    torch.testing.assert_close(answers[:, t], (q[:, t] + e * (1 + a)) / (1 + 2 * e))
    others = [c for c in range(10) if c != t]
    torch.testing.assert_close(answers[:, others], (q[:, others] + (e * (1 - a) / 9)[:, None]) / (1 + 2 * e))
    # the projection is standardised on the reference, so the signal spans whole periods there
    phase = torch.arccos(wm.signal(digits_splits.victim_train.x).clamp(-1, 1))
    assert float(phase.max()) > 3.0 and float(phase.min()) < 0.2
    # the top-1 answer moves only where the victim's own margin is below 2ε/(1 + 2ε)
    moved = answers.argmax(1) != q.argmax(1)
    top2 = q.topk(2, dim=1).values
    assert bool(((top2[:, 0] - top2[:, 1])[moved] < 2 * e / (1 + 2 * e) + 1e-6).all())
    # the key decides the direction and the class; the same key, the same answers
    assert torch.equal(_cosine(digits_victim, digits_splits.victim_train.x).query(x), answers)
    assert not torch.equal(_cosine(digits_victim, digits_splits.victim_train.x, key=1).query(x), answers)


def test_cosine_verifies_a_distilled_model_but_not_innocent_ones(
    digits_splits, digits_victim, independent
) -> None:  # type: ignore[no-untyped-def]
    """A cnn distilled (T = 3) from the watermarked answers carries the signal; the same
    distillation from the plain answers, an independent model and the victim itself do not.
    (Measured over keys 0-3: distilled cnns z = 4.9-6.5, all at the p-value floor 5e-4;
    innocent models p >= 0.06.)"""
    from mextract.attacks.substitute import kd_loss

    pool, owner_x = digits_splits.pool.x, torch.cat([digits_splits.victim_train.x, digits_splits.test.x])
    wm = _cosine(digits_victim, digits_splits.victim_train.x)
    config = TrainConfig(epochs=30, batch_size=64, lr=0.05)

    def distil(answers: torch.Tensor) -> nn.Module:
        target = answers ** (1 / 3)
        target = target / target.sum(1, keepdim=True)
        return fit(create_model("cnn", (1, 8, 8), 10), pool, target, kd_loss(3.0), config, seed=0)

    substitute = distil(wm.query(pool))
    stolen = wm.verify(substitute, owner_x, baseline=digits_victim)  # on the owner's inputs
    assert stolen.stolen and stolen.p_value == 1 / 2000 and stolen.z > 3, stolen
    assert torch.equal(wm.logged_queries, pool)
    on_log = wm.verify(substitute, baseline=digits_victim)  # on the thief's own queries
    assert on_log.stolen and on_log.samples > 600, on_log
    innocent = [
        wm.verify(distil(_oracle(digits_victim).query(pool)), owner_x, baseline=digits_victim),
        wm.verify(independent, owner_x, baseline=digits_victim),
        wm.verify(digits_victim, owner_x),
    ]
    assert not any(r.stolen for r in innocent), innocent
    assert all(r.null_keys == 1999 and r.samples > 900 for r in [stolen, *innocent])


def test_cosine_p_value_is_exact_under_the_null(digits_splits, digits_victim) -> None:  # type: ignore[no-untyped-def]
    """A model that never saw the keyed answers: over 40 keys its p-values are uniform
    (the rank of an exchangeable statistic), so about 10% fall below 0.1."""
    owner_x = torch.cat([digits_splits.victim_train.x, digits_splits.test.x])
    ps = [_cosine(digits_victim, owner_x, key=k, null_keys=199).verify(digits_victim, owner_x).p_value
          for k in range(40)]  # fmt: skip
    assert all(1 / 200 <= p <= 1 for p in ps)
    assert sum(p < 0.1 for p in ps) <= 10  # Binomial(40, 0.1): P(> 10) < 0.3%
    assert sum(p > 0.5 for p in ps) >= 12


def test_cosine_log_is_a_bounded_uniform_sample(digits_splits, digits_victim) -> None:  # type: ignore[no-untyped-def]
    x = digits_splits.pool.x
    wm = _cosine(digits_victim, digits_splits.victim_train.x, log_size=100)
    for i in range(0, len(x), 64):
        wm.query(x[i : i + 64])
    log = wm.logged_queries
    assert len(log) == 100
    index = (log.flatten(1)[:, None] == x.flatten(1)[None]).all(2).float().argmax(1)
    assert torch.equal(x[index], log)  # every kept query was asked
    assert float(index.float().mean()) > 200  # not just the first 100 (mean ~ 360 if uniform)
    with pytest.raises(InputError, match="no query"):
        _cosine(digits_victim, digits_splits.victim_train.x).verify(digits_victim)


def test_bad_cosine_parameters(digits_splits, digits_victim) -> None:  # type: ignore[no-untyped-def]
    ref = digits_splits.victim_train.x
    for kwargs, match in [
        ({"epsilon": -0.1}, "epsilon"),
        ({"frequency": 0.0}, "frequency"),
        ({"target": 10}, "target"),
        ({"null_keys": 10}, "null_keys"),
        ({"alpha": 0.0}, "alpha"),
        ({"log_size": -1}, "log_size"),
    ]:
        with pytest.raises(InputError, match=match):
            _cosine(digits_victim, ref, **kwargs)
    with pytest.raises(InputError, match="logits"):
        CosineWatermark(_oracle(digits_victim, "label"), 0, reference=ref)
    with pytest.raises(InputError, match="constant"):
        _cosine(digits_victim, torch.zeros(5, 1, 8, 8))
    with pytest.raises(InputError, match="reference"):
        _cosine(digits_victim, torch.zeros(5, 64))
    with pytest.raises(InputError, match="key"):
        CosineWatermark(_oracle(digits_victim), "secret", reference=ref)  # type: ignore[arg-type]
    wm = _cosine(digits_victim, ref, target=3)
    with pytest.raises(InputError, match="target class 3"):  # every input is of the target class
        wm.verify(lambda x: torch.eye(10)[torch.full((len(x),), 3)], ref)
    with pytest.raises(InputError, match="shape"):
        wm.verify(digits_victim, torch.zeros(4, 64))
    with pytest.raises(InputError, match="NaN"):
        wm.verify(lambda x: torch.full((len(x), 10), float("nan")), ref)


# ---------------------------------------------------------------------------- fingerprints


@pytest.fixture(scope="module")
def fingerprint_setup(digits_splits, digits_victim):  # type: ignore[no-untyped-def]
    """Tiny models (MLPs on 8×8 digits, about 2 s in all): 4 + 4 models to generate with.

    The surrogates are distilled (``labels="soft"``): they model the thief the held-out test
    below steals with. ``eps`` is small (0.15 of the pixel range, 20 PGD steps to reach the
    victim's new label): the larger the ball, the more an adversarial example transfers to
    every model, independent ones included (with eps 0.3 and mixed surrogates, held-out
    clones and independent models retained alike, AUC about 0.5)."""
    owner = digits_splits.victim_train
    surrogates = train_surrogates(
        digits_victim, owner.x, 4, seed=10, model="mlp", config=SMALL, labels="soft"
    )
    references = train_references(owner, 4, seed=20, model="mlp", config=SMALL)
    fp = generate_fingerprints(
        digits_victim, surrogates, references, digits_splits.test.x[:150],
        n=40, eps=0.15, steps=50, lr=0.02, pgd_steps=20,
    )  # fmt: skip
    return surrogates, references, fp


def test_fingerprints_are_adversarial_examples_of_the_victim(
    digits_splits, digits_victim, fingerprint_setup
) -> None:  # type: ignore[no-untyped-def]
    """Every fingerprint moved the victim's label off its label on the seed, within eps."""
    _, _, fp = fingerprint_setup
    assert len(fp) == 40 and bool(fp.adversarial.all())
    assert torch.equal(predict_labels(digits_victim, fp.x), fp.labels)
    assert bool((fp.labels != fp.origin).all())
    seeds = digits_splits.test.x[:150]
    # each fingerprint lies within eps (0.15) of some seed whose victim label is its origin
    dist = (fp.x[:, None] - seeds[None]).abs().flatten(2).max(dim=2).values
    assert bool((dist.min(dim=1).values <= 0.15 + 1e-6).all())


def test_fingerprints_are_conferrable_on_their_own_models(digits_victim, fingerprint_setup) -> None:  # type: ignore[no-untyped-def]
    surrogates, references, fp = fingerprint_setup
    assert len(fp) == 40 and fp.retention(digits_victim) == 1.0
    assert torch.all(fp.scores[:-1] >= fp.scores[1:])
    kept = sum(fp.retention(m) for m in surrogates) / len(surrogates)
    lost = sum(fp.retention(m) for m in references) / len(references)
    assert kept > lost + 0.1, (kept, lost)
    assert fingerprint_auc(fp, surrogates, references) > 0.75


def test_fingerprints_separate_held_out_clones_from_independent_models(
    digits_splits, digits_victim, fingerprint_setup
) -> None:  # type: ignore[no-untyped-def]
    """Models that took no part in the generation: distilled clones (the kd attack's loss on
    the pool) and a fine-tuned copy of the victim retain more than independent models.
    (Measured over three seeds of every model here: clones 0.48–0.95, independent
    0.15–0.30.)"""
    from mextract.attacks.substitute import kd_loss

    _, _, fp = fingerprint_setup
    pool = digits_splits.pool
    with torch.no_grad():
        soft = torch.softmax(digits_victim(pool.x) / 3, dim=1)
    clones, independent = [], []
    for seed in (50, 51):
        torch.manual_seed(seed)
        clones.append(fit(create_model("mlp", (1, 8, 8), 10), pool.x, soft, kd_loss(3.0), SMALL, seed=seed))
        torch.manual_seed(seed + 10)
        independent.append(
            fit(create_model("mlp", (1, 8, 8), 10), pool.x, pool.y, F.cross_entropy, SMALL, seed=seed + 10)
        )
    copy = create_model("cnn", (1, 8, 8), 10)
    copy.load_state_dict(digits_victim.state_dict())
    clones.append(fit(copy, pool.x, pool.y, F.cross_entropy, TrainConfig(epochs=2, batch_size=64, lr=0.01)))
    kept = [fp.retention(m) for m in clones]
    lost = [fp.retention(m) for m in independent]
    assert bool(fp.adversarial.all())  # the retention is of the victim's *new* labels
    assert min(kept) > max(lost), (kept, lost)
    assert fingerprint_auc(fp, clones, independent) == 1.0


def test_owner_models_cycle_architectures_and_recipes(digits_splits, digits_victim) -> None:  # type: ignore[no-untyped-def]
    owner = digits_splits.victim_train
    tiny = TrainConfig(epochs=1, batch_size=256, lr=0.05)
    sur = train_surrogates(digits_victim, owner.x[:64], 4, model=["logreg", "mlp"], config=tiny)
    assert [len(m) for m in sur] == [2, 8, 2, 8]  # logreg, mlp, logreg, mlp (nn.Sequential lengths)
    quick = VictimRecipe(train=tiny, augment="none")
    ref = train_references(owner, 2, model="logreg", recipe=[quick, None], config=tiny)
    assert len(ref) == 2 and all(len(m) == 2 for m in ref)
    with pytest.raises(InputError, match="labels"):
        train_surrogates(digits_victim, owner.x[:8], 1, labels="probs")
    with pytest.raises(InputError, match="architecture"):
        train_references(owner, 1, model=[])


# ---------------------------------------------------------------------------- bad parameters


@pytest.mark.parametrize(
    "kwargs",
    [{"target": -1}, {"target": 0, "size": 0}, {"target": 0, "value": 2.0}, {"target": 0, "fraction": 0.0}],
)
def test_bad_trigger_parameters(kwargs) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InputError):
        TriggerWatermark(**kwargs)


def test_bad_dawn_parameters(digits_victim) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InputError, match="fraction"):
        DawnWatermark(_oracle(digits_victim), key=1, fraction=1.5)
    with pytest.raises(InputError, match="key"):
        DawnWatermark(_oracle(digits_victim), key="secret")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="key"):
        DawnWatermark(_oracle(digits_victim), key=b"")
    with pytest.raises(InputError, match="Oracle"):
        DawnWatermark(object(), key=1)  # type: ignore[arg-type]


def test_bad_fingerprint_and_watermark_inputs(digits_splits, digits_victim) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InputError, match="surrogate"):
        generate_fingerprints(digits_victim, [], [digits_victim], digits_splits.test.x[:4])
    with pytest.raises(InputError, match="adversarial"):  # eps far too small to move any label
        generate_fingerprints(
            digits_victim, [digits_victim], [digits_victim], digits_splits.test.x[:4], eps=1e-6, steps=1
        )
    with pytest.raises(InputError, match="images"):
        TriggerWatermark(0).apply(torch.zeros(3, 64))
    with pytest.raises(InputError, match="target"):
        watermark_training_set(digits_splits.victim_train, TriggerWatermark(12))
