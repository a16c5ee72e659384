"""Reference checks: each defence equals a peer's implementation (IBM ART's postprocessors,
SciPy) or a worked example computed by hand from its paper's equations.

The table these tests back is ``docs/faithfulness.md``. A worked example here is written
from the equations in plain Python floats, not with the code under test, so that a change
of algorithm (e.g. MAD's published vertex oracle versus this lab's truncated variant)
fails it.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import math

import numpy as np
import pytest
import torch
from art.defences.postprocessor import ClassLabels, GaussianNoise, HighConfidence, Rounded
from art.defences.postprocessor import ReverseSigmoid as ArtRS
from scipy import stats
from torch import nn

from mextract.defences import (
    AdaptiveMisinformation,
    DawnWatermark,
    LabelOnly,
    NoisyProbabilities,
    Prada,
    PredictionPoisoning,
    ReverseSigmoid,
    Rounding,
    TopK,
)
from mextract.defences.perturb import noisy_probabilities
from mextract.oracle import VictimOracle

K = 5


def probs_victim(k: int = K) -> VictimOracle:
    """A float64 victim whose logits are its input: query ``log p`` to be answered from ``p``."""
    return VictimOracle(lambda x: x, input_shape=(k,), num_classes=k, mode="logits", dtype=torch.float64)


def random_probs(n: int = 32, k: int = K, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(n, k, generator=g, dtype=torch.float64) * scale, dim=1)


P = random_probs()


# ---------------------------------------------------------------- IBM ART postprocessors


@pytest.mark.parametrize(("beta", "gamma"), [(1.0, 0.1), (0.5, 0.3), (2.0, 1.0), (0.2, 3.0)])
def test_reverse_sigmoid_equals_art(beta: float, gamma: float) -> None:
    ours = ReverseSigmoid(probs_victim(), beta=beta, gamma=gamma).query(torch.log(P))
    art = ArtRS(beta=beta, gamma=gamma)(P.numpy())
    np.testing.assert_allclose(ours.numpy(), art, rtol=0, atol=1e-12)


def test_reverse_sigmoid_worked_example() -> None:
    """Lee et al. 2019, eq. of the reverse sigmoid: ``r = β(σ(γ·logit p) − ½)``, answer
    ``(p − r)`` clipped and renormalised; by hand for p = (0.7, 0.2, 0.1)."""
    p = [0.7, 0.2, 0.1]
    beta, gamma = 0.8, 0.5
    r = [beta * (1 / (1 + math.exp(-gamma * math.log(q / (1 - q)))) - 0.5) for q in p]
    raw = [min(1.0, max(0.0, q - ri)) for q, ri in zip(p, r, strict=True)]
    expected = [v / sum(raw) for v in raw]
    out = ReverseSigmoid(probs_victim(3), beta=beta, gamma=gamma).query(torch.log(torch.tensor([p])))
    np.testing.assert_allclose(out[0].numpy(), expected, atol=1e-12)
    # γ = 1: σ(logit p) = p, so p − r = (1 − β)p + β/2; β = 1 answers the uniform vector
    flat = ReverseSigmoid(probs_victim(3), beta=1.0, gamma=1.0).query(torch.log(torch.tensor([p])))
    np.testing.assert_allclose(flat[0].numpy(), [1 / 3] * 3, atol=1e-12)
    half = ReverseSigmoid(probs_victim(3), beta=0.5, gamma=1.0).query(torch.log(torch.tensor([p])))
    np.testing.assert_allclose(half[0].numpy(), [(0.5 * q + 0.25) / 1.25 for q in p], atol=1e-12)


@pytest.mark.parametrize("decimals", [1, 2, 3, 4])  # ART refuses 0 decimals
def test_rounding_equals_art_rounded(decimals: int) -> None:
    ours = Rounding(probs_victim(), decimals=decimals).query(torch.log(P))
    np.testing.assert_allclose(ours.numpy(), Rounded(decimals=decimals)(P.numpy()), rtol=0, atol=1e-12)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_topk_equals_art_high_confidence_at_the_kth_cutoff(k: int) -> None:
    """ART's ``HighConfidence`` zeroes every probability below a cutoff; with the cutoff
    between a row's k-th and (k+1)-th largest probability it keeps exactly the top k."""
    ours = TopK(probs_victim(), k=k).query(torch.log(P))
    ordered = P.sort(dim=1, descending=True).values
    for i in range(len(P)):
        cutoff = float(ordered[i, k - 1] + ordered[i, k]) / 2
        art = HighConfidence(cutoff=cutoff)(P[i : i + 1].numpy())
        np.testing.assert_allclose(ours[i : i + 1].numpy(), art, rtol=0, atol=1e-12)


def test_label_only_equals_art_class_labels_row_by_row() -> None:
    """ART 1.20's ``ClassLabels`` sets ``labels[:, argmax] = 1`` for the whole batch (every
    row gets every row's top class), so it is compared one row at a time; the lab's
    label-only answer is one-hot per row."""
    ours = LabelOnly(probs_victim()).query(torch.log(P))
    for i in range(len(P)):
        np.testing.assert_array_equal(ours[i : i + 1].numpy(), ClassLabels()(P[i : i + 1].numpy()))
    assert (ours.sum(1) == 1).all()
    assert (ClassLabels()(P.numpy()).sum(1) > 1).any()  # ART's batch behaviour, documented above


def test_noisy_probabilities_post_processing_equals_art_gaussian_noise() -> None:
    """Same probabilities, same noise draws: where no noisy entry exceeds 1 (the lab also
    clips at 1), the answer is ART's ``GaussianNoise``."""
    defence = NoisyProbabilities(probs_victim(), epsilon=0.9, mechanism="gaussian", delta=1e-5)
    scale = 0.05  # ART takes the standard deviation itself; the lab derives it from (ε, δ)
    p = random_probs(64, scale=0.3)
    np.random.seed(0)
    art = GaussianNoise(scale=scale)(p.numpy())
    np.random.seed(0)
    noise = torch.from_numpy(np.random.normal(loc=0.0, scale=scale, size=tuple(p.shape)))
    assert (p + noise).max() < 1
    np.testing.assert_allclose(noisy_probabilities(p, noise).numpy(), art, atol=1e-12)
    # and the mechanism's σ is the one stated: √2·√(2 ln(1.25/δ))/ε
    assert defence.scale == pytest.approx(math.sqrt(2) * math.sqrt(2 * math.log(1.25 / 1e-5)) / 0.9)


def test_laplace_noise_has_the_stated_scale() -> None:
    """With K = 2, p = (½, ½) and noise small enough never to clip, out₀ = (½ + n₀)/(1 + n₀ + n₁),
    so 2·out₀ − 1 ≈ n₀ − n₁, the difference of two Laplace(b) draws: standard deviation 2b,
    with b = 2/ε the paper's (Dwork & Roth) scale for an L1 sensitivity of 2."""
    defence = NoisyProbabilities(probs_victim(2), epsilon=2000.0, mechanism="laplace", seed=3)
    out = defence.query(torch.zeros(20000, 2, dtype=torch.float64))
    assert defence.scale == pytest.approx(2 / 2000.0)
    assert float((2 * out[:, 0] - 1).std()) == pytest.approx(2 * defence.scale, rel=0.05)


def test_gaussian_noise_is_sigma_times_a_standard_normal() -> None:
    """The Gaussian mechanism's σ is too large for clipping never to bite, so its draws are
    reproduced from the same seeded generator (one uniform batch, then the normals)."""
    defence = NoisyProbabilities(probs_victim(3), epsilon=0.5, mechanism="gaussian", delta=1e-5, seed=4)
    p = random_probs(500, 3)
    out = defence.query(torch.log(p))
    g = torch.Generator().manual_seed(4)
    torch.rand(p.shape, generator=g, dtype=torch.float64)
    z = torch.randn(p.shape, generator=g, dtype=torch.float64)
    assert float(z.std()) == pytest.approx(1.0, rel=0.05)
    np.testing.assert_allclose(out.numpy(), noisy_probabilities(p, defence.scale * z).numpy(), atol=1e-12)


# ---------------------------------------------------------------- MAD (Orekondy et al. 2020)


def surrogate_answering(s: list[float]) -> nn.Module:
    """A surrogate whose softmax is ``s`` on every input (zero weights, bias log s)."""
    layer = nn.Linear(len(s), len(s)).double()
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.copy_(torch.log(torch.tensor(s, dtype=torch.float64)))
    return nn.Sequential(layer)


def angular(c: list[float], y: list[float], s: list[float]) -> float:
    """The paper's objective on last-layer gradients: ‖u(c) − u(y)‖², u(v) = (v − s)/‖v − s‖."""

    def unit(v: list[float]) -> list[float]:
        d = [a - b for a, b in zip(v, s, strict=True)]
        n = math.sqrt(sum(a * a for a in d))
        return [a / n for a in d]

    return sum((a - b) ** 2 for a, b in zip(unit(c), unit(y), strict=True))


Y, S, EPS = [0.6, 0.3, 0.1], [0.2, 0.2, 0.6], 0.4


def mad_answer(argmax: bool, oracle: str = "extreme") -> list[float]:
    mad = PredictionPoisoning(
        probs_victim(3), surrogate=surrogate_answering(S), epsilon=EPS, argmax=argmax, oracle=oracle
    )
    return mad.query(torch.log(torch.tensor([Y], dtype=torch.float64)))[0].tolist()


def test_mad_worked_example_vertex_oracle_then_line_search() -> None:
    """The paper's heuristic: y* = the vertex of largest objective, ỹ = y + α(y* − y) with
    α = min(1, ε/‖y* − y‖₁). Vertices' objectives: e₁ 0.184, e₂ 1.092, e₃ 3.890, so y* = e₃,
    ‖e₃ − y‖₁ = 1.8, α = 2/9 and ỹ = (0.6·7/9, 0.3·7/9, 0.1·7/9 + 2/9)."""
    vertices = [[1.0 if i == k else 0.0 for i in range(3)] for k in range(3)]
    values = [angular(v, Y, S) for v in vertices]
    assert values == pytest.approx([0.1843, 1.0922, 3.8898], abs=1e-4)
    expected = [0.6 * 7 / 9, 0.3 * 7 / 9, 0.1 * 7 / 9 + 2 / 9]
    assert mad_answer(argmax=False) == pytest.approx(expected, abs=1e-9)
    # the lab's truncated variant answers another point (it scores vertices after truncation)
    truncated = mad_answer(argmax=False, oracle="truncated")
    assert truncated == pytest.approx([0.6 * 5 / 7, 0.3 * 5 / 7 + 2 / 7, 0.1 * 5 / 7], abs=1e-9)
    assert max(abs(a - b) for a, b in zip(truncated, expected, strict=True)) > 0.2


def test_mad_argmax_worked_example_over_class_subsets() -> None:
    """MAD-argmax: the candidates are the uniform distributions on class subsets containing
    the top class (top nudged by 1e-5): {1}, {1,2}, {1,3}, {1,2,3} score 0.184, 0.110, 0.763,
    0.110, so y* ≈ (½, 0, ½), ‖y* − y‖₁ = 0.8, α = ½ and ỹ ≈ (0.55, 0.15, 0.30)."""
    subsets = [(1, 0, 0), (1, 1, 0), (1, 0, 1), (1, 1, 1)]
    extremes = []
    for sub in subsets:
        v = [a + (1e-5 if i == 0 else 0.0) for i, a in enumerate(sub)]
        extremes.append([a / sum(v) for a in v])
    values = [angular(v, Y, S) for v in extremes]
    assert values == pytest.approx([0.1843, 0.1102, 0.7628, 0.1102], abs=1e-4)
    star = extremes[2]
    alpha = min(1.0, EPS / sum(abs(a - b) for a, b in zip(star, Y, strict=True)))
    expected = [(1 - alpha) * a + alpha * b for a, b in zip(Y, star, strict=True)]
    assert expected == pytest.approx([0.55, 0.15, 0.30], abs=1e-5)
    assert mad_answer(argmax=True) == pytest.approx(expected, abs=1e-9)
    # the lab's former variant (α capped along each y → e_k) is a different answer
    truncated = mad_answer(argmax=True, oracle="truncated")
    assert max(abs(a - b) for a, b in zip(truncated, expected, strict=True)) > 0.2


def test_mad_argmax_matches_a_brute_force_subset_search_for_any_top_class() -> None:
    """Every row's answer equals the one found by enumerating, in plain Python, every class
    subset containing that row's top class (whichever class it is)."""
    x = torch.randn(12, K, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2
    torch.manual_seed(2)
    sur = nn.Sequential(nn.Linear(K, 6), nn.ReLU(), nn.Linear(6, K)).double()
    out = PredictionPoisoning(probs_victim(), surrogate=sur, epsilon=0.7, argmax=True).query(x)
    ys, ss = torch.softmax(x, 1).tolist(), torch.softmax(sur(x), 1).detach().tolist()
    assert len({max(range(K), key=y.__getitem__) for y in ys}) > 1  # several top classes
    for y, s, got in zip(ys, ss, out.tolist(), strict=True):
        top = max(range(K), key=y.__getitem__)
        best, best_val = None, -1.0
        for bits in itertools.product([0, 1], repeat=K):
            if not bits[top]:
                continue
            v = [b + (1e-5 if i == top else 0.0) for i, b in enumerate(bits)]
            v = [a / sum(v) for a in v]
            if angular(v, y, s) > best_val:
                best, best_val = v, angular(v, y, s)
        assert best is not None
        alpha = min(1.0, 0.7 / sum(abs(a - b) for a, b in zip(best, y, strict=True)))
        expected = [(1 - alpha) * a + alpha * b for a, b in zip(y, best, strict=True)]
        assert got == pytest.approx(expected, abs=1e-9)


def test_mad_greedy_subset_search_beyond_ten_classes_keeps_the_label_and_budget() -> None:
    k = 12
    x = torch.randn(40, k, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    torch.manual_seed(0)
    sur = nn.Sequential(nn.Linear(k, 8), nn.ReLU(), nn.Linear(8, k)).double()
    y = torch.softmax(x, 1)
    exhaustive = PredictionPoisoning(probs_victim(k), surrogate=sur, epsilon=2.0, argmax=True)
    out = exhaustive.query(x)
    assert (out.argmax(1) == y.argmax(1)).all()
    assert ((out - y).abs().sum(1) <= 2.0 + 1e-9).all()
    # at full budget the answer is the chosen subset extreme; its objective is at least that of
    # every single-pair extreme {top, j} the greedy search scores first
    s = torch.softmax(sur(x), 1).detach()
    chosen = PredictionPoisoning.objective(out[:, None, :], y, s)[:, 0]
    top = y.argmax(1)
    pairs = torch.zeros(len(x), k, k, dtype=torch.float64)
    pairs[torch.arange(len(x)), :, top] = 1 + 1e-5
    pairs += torch.eye(k, dtype=torch.float64)
    pairs /= pairs.sum(2, keepdim=True)
    assert (chosen >= PredictionPoisoning.objective(pairs, y, s).max(1).values - 1e-9).all()


def test_mad_angular_deviation_grows_with_epsilon() -> None:
    """The paper's Fig. (perturbation angle against ε): the mean angular deviation of the
    surrogate's gradient grows with the budget, from 0 at ε = 0."""
    x = torch.randn(64, K, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 3
    torch.manual_seed(1)
    sur = nn.Sequential(nn.Linear(K, 8), nn.ReLU(), nn.Linear(8, K)).double()
    y = torch.softmax(x, 1)
    s = torch.softmax(sur(x), 1).detach()
    angles = []
    for eps in [0.0, 0.1, 0.5, 1.0, 2.0]:
        out = PredictionPoisoning(probs_victim(), surrogate=sur, epsilon=eps).query(x)
        cos = 1 - PredictionPoisoning.objective(out[:, None, :], y, s)[:, 0] / 2
        angles.append(float(torch.rad2deg(torch.arccos(cos.clamp(-1, 1))).mean()))
    assert angles[0] == pytest.approx(0.0, abs=1e-6)
    assert all(b > a for a, b in itertools.pairwise(angles))
    assert angles[-1] > 90  # at full budget the gradient is turned more than a right angle on average


# ---------------------------------------------------------------- PRADA (Juuti et al. 2019)


def prada_by_hand(
    xs: list[float], cs: list[int], min_distances: int, min_class: int
) -> list[tuple[int, float]]:
    """Algorithm 1 on one-dimensional inputs, written out: per class a growing set with its
    distances ``D_{G_c}`` (starting at 0) and threshold ``T_c ← max(T_c, mean − std)``;
    ``D`` gets every query's distance to its class's growing set; once the pooled ``D`` (only
    classes with ``≥ min_class`` distances) exceeds ``min_distances``, 3σ outliers go and
    ``W`` is SciPy's Shapiro–Wilk statistic."""
    stored: dict[int, list[float]] = {}
    dists: dict[int, list[float]] = {}
    threshold: dict[int, float] = {}
    pool: list[tuple[float, int]] = []
    history = []
    for i, (x, c) in enumerate(zip(xs, cs, strict=True)):
        if c not in stored:
            stored[c], dists[c], threshold[c] = [x], [0.0], 0.0
        else:
            d = min(abs(x - g) for g in stored[c])
            pool.append((d, c))
            if d > threshold[c]:
                stored[c].append(x)
                dists[c].append(d)
                mean = sum(dists[c]) / len(dists[c])
                std = math.sqrt(sum((v - mean) ** 2 for v in dists[c]) / len(dists[c]))
                threshold[c] = max(threshold[c], mean - std)
        count = {k: sum(1 for _, kk in pool if kk == k) for k in stored}
        pooled = [d for d, k in pool if count[k] >= min_class]
        if len(pooled) > min_distances:
            mean = sum(pooled) / len(pooled)
            std = math.sqrt(sum((v - mean) ** 2 for v in pooled) / len(pooled))
            kept = [v for v in pooled if abs(v - mean) <= 3 * std]
            history.append((i, float(stats.shapiro(kept).statistic)))
    return history


def synthetic_stream() -> tuple[list[float], list[int]]:
    """Class 0: 60 natural points about 2 apart; class 1: 8 probes 0.5 apart far away (a
    short search), interleaved from query 10 on."""
    rng = np.random.default_rng(0)
    xs = [float(2 * j + v) for j, v in enumerate(rng.normal(0, 0.2, 60))]
    cs = [0] * 60
    for j in range(8):
        xs.insert(10 + 6 * j, 500.0 + 0.5 * j)
        cs.insert(10 + 6 * j, 1)
    return xs, cs


@pytest.mark.parametrize("min_class", [0, 10])
def test_prada_worked_example_matches_algorithm_1_by_hand(min_class: int) -> None:
    xs, cs = synthetic_stream()
    expected = prada_by_hand(xs, cs, min_distances=20, min_class=min_class)
    for batch in (1, len(xs)):  # one query at a time, and the whole stream in one batch
        monitor = Prada(delta=0.5, min_distances=20, min_class_distances=min_class)
        for start in range(0, len(xs), batch):
            x = torch.tensor(xs[start : start + batch], dtype=torch.float64)[:, None]
            monitor.observe("c", x, torch.tensor(cs[start : start + batch]))
        got = monitor.report("c").w_history
        assert [i for i, _ in got] == [i for i, _ in expected]
        np.testing.assert_allclose([w for _, w in got], [w for _, w in expected], rtol=0, atol=1e-12)


def test_prada_class_pooling_rule_changes_w_on_the_worked_example() -> None:
    """The reference code's rule (a class's distances count once it has 10) leaves out the 7
    probe distances of class 1, so W is that of class 0's distances alone (0.973 at the end,
    never below 0.9); Algorithm 1 pools them and W falls to 0.721 (an alarm at δ = 0.9)."""
    xs, cs = synthetic_stream()
    paper = prada_by_hand(xs, cs, min_distances=20, min_class=0)
    reference = prada_by_hand(xs, cs, min_distances=20, min_class=10)
    assert paper[-1][1] == pytest.approx(0.7214, abs=1e-4)
    assert reference[-1][1] == pytest.approx(0.9731, abs=1e-4)
    only0 = prada_by_hand([x for x, c in zip(xs, cs, strict=True) if c == 0], [0] * 60, 20, 0)
    assert reference[-1][1] == pytest.approx(only0[-1][1], abs=1e-12)
    for min_class, flagged in [(0, True), (10, False)]:
        monitor = Prada(delta=0.9, min_distances=20, min_class_distances=min_class)
        monitor.observe("c", torch.tensor(xs, dtype=torch.float64)[:, None], torch.tensor(cs))
        assert monitor.report("c").flagged == flagged


def test_prada_w_separates_a_natural_stream_from_a_synthetic_one() -> None:
    """The paper's Fig. 3 at small scale: natural queries keep W high; queries that are small
    steps from earlier ones (a Jacobian-style augmentation) drive it down."""
    g = torch.Generator().manual_seed(0)
    natural = torch.rand(300, 16, generator=g, dtype=torch.float64)
    seeds = torch.rand(10, 16, generator=g, dtype=torch.float64)
    steps = [seeds]
    for _ in range(29):
        steps.append((steps[-1] + 0.01 * torch.randn(10, 16, generator=g, dtype=torch.float64)).clamp(0, 1))
    synthetic = torch.cat(steps)
    for stream, low in [(natural, False), (synthetic, True)]:
        monitor = Prada(delta=0.9)
        monitor.observe("c", stream, torch.zeros(len(stream), dtype=torch.long))
        report = monitor.report("c")
        assert report.flagged == low, report.w_history
        assert min(w for _, w in report.w_history) < 0.5 if low else report.w_history[-1][1] > 0.95


# ---------------------------------------------------------------- DAWN (Szyller et al. 2021)


def dawn_oracle(k: int = 10) -> VictimOracle:
    return VictimOracle(lambda x: x, input_shape=(k,), num_classes=k, mode="logits")


def test_dawn_decision_is_the_keyed_hash_of_the_query_by_hand() -> None:
    """A query is marked when the first 8 bytes of HMAC-SHA256(k, x) fall below fraction·2⁶⁴,
    its label is (t + 1 + h₂ mod (K − 1)) mod K; with a client, k = HMAC(key, "dawn-client:" + id)."""
    x = torch.randn(200, 10, generator=torch.Generator().manual_seed(0))
    for client in (None, "alice"):
        dawn = DawnWatermark(dawn_oracle(), b"owner", client=client, fraction=0.3)
        k = b"owner" if client is None else hmac.new(b"owner", b"dawn-client:alice", hashlib.sha256).digest()
        marked, offset = dawn.decide(x)
        for row, m, o in zip(x, marked.tolist(), offset.tolist(), strict=True):
            h = hmac.new(k, row.numpy().tobytes(), hashlib.sha256).digest()
            assert m == (int.from_bytes(h[:8], "big") < 0.3 * 2.0**64)
            assert o == 1 + int.from_bytes(h[8:16], "big") % 9


def test_dawn_marks_each_client_independently() -> None:
    """The paper's per-client decisions: the same query is marked for one client and not for
    another (about fraction·(1 − fraction) of queries differ), and deterministically so."""
    x = torch.randn(2000, 10, generator=torch.Generator().manual_seed(1))
    alice = DawnWatermark(dawn_oracle(), b"owner", client="alice", fraction=0.2).decide(x)[0]
    bob = DawnWatermark(dawn_oracle(), b"owner", client="bob", fraction=0.2).decide(x)[0]
    again = DawnWatermark(dawn_oracle(), b"owner", client="alice", fraction=0.2).decide(x)[0]
    assert torch.equal(alice, again)
    differ = float((alice != bob).float().mean())
    assert differ == pytest.approx(2 * 0.2 * 0.8, abs=0.04)


def test_served_dawn_per_client_uses_the_account_name() -> None:
    from mextract.server.api import ServedAPI

    victim = VictimOracle(lambda x: x, input_shape=(10,), num_classes=10, mode="logits")
    api = ServedAPI(victim, defence='dawn:{"fraction": 0.3}')  # per client: the default
    x = torch.randn(100, 10, generator=torch.Generator().manual_seed(2))
    a, b = api.query("alice", x), api.query("bob", x)
    assert not torch.equal(a.argmax(1), b.argmax(1))
    alice = api.oracle("alice")
    assert isinstance(alice, DawnWatermark) and alice.client == "alice"
    own = DawnWatermark(dawn_oracle(), b"mextract-dawn-0", client="alice", fraction=0.3)
    assert torch.equal(own.query(x), a)
    shared = ServedAPI(victim, defence='dawn:{"fraction": 0.3, "per_client": false}')  # one key for all
    assert torch.equal(shared.query("alice", x), shared.query("bob", x))


# ---------------------------------------------------------------- adaptive misinformation


def test_adaptive_misinformation_worked_example() -> None:
    """Kariyappa & Qureshi 2020: ỹ = (1 − α)·y + α·ŷ_mis with α = σ(ν(τ − max y)), by hand."""
    y, mis = [0.55, 0.35, 0.10], [0.05, 0.15, 0.80]
    tau, nu = 0.6, 20.0
    alpha = 1 / (1 + math.exp(-nu * (tau - max(y))))
    expected = [(1 - alpha) * a + alpha * b for a, b in zip(y, mis, strict=True)]
    model = surrogate_answering(mis)  # a misinformation model answering ŷ_mis on every input
    defence = AdaptiveMisinformation(probs_victim(3), misinformation=model, tau=tau, nu=nu)
    out = defence.query(torch.log(torch.tensor([y], dtype=torch.float64)))
    assert out[0].tolist() == pytest.approx(expected, abs=1e-12)
    assert alpha == pytest.approx(0.7311, abs=1e-4)


# ---------------------------------------------------------------- distillation and metrics


def test_kd_targets_and_loss_are_hintons() -> None:
    """Hinton et al. 2015: the soft target at temperature T is softmax(z/T) (from the API's
    probabilities: p^(1/T) renormalised), and the loss T²·KL(p_T ‖ q_T), with SciPy's rel_entr."""
    from types import SimpleNamespace

    from scipy.special import rel_entr

    from mextract.attacks.substitute import kd_loss, soft_targets
    from mextract.oracle import AnswerMode

    g = torch.Generator().manual_seed(5)
    z, s = torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randn(16, 4, generator=g)
    ctx = SimpleNamespace(api=SimpleNamespace(mode=AnswerMode.PROBS))
    t = 3.0
    target = soft_targets(torch.softmax(z, 1), ctx, t)  # type: ignore[arg-type]
    torch.testing.assert_close(target, torch.softmax(z / t, 1).float(), atol=1e-6, rtol=0)
    q = torch.softmax(s / t, 1).numpy()
    expected = t**2 * rel_entr(target.numpy(), q).sum(1).mean()
    assert float(kd_loss(t)(s, target)) == pytest.approx(float(expected), rel=1e-5)


def test_metrics_equal_scikit_learn_and_scipy() -> None:
    from scipy.stats import entropy
    from sklearn.metrics import accuracy_score

    from mextract.metrics import agreement, answer_shift, expected_calibration_error

    g = torch.Generator().manual_seed(6)
    a, b = torch.randint(0, 5, (200,), generator=g), torch.randint(0, 5, (200,), generator=g)
    assert agreement(a, b) == pytest.approx(accuracy_score(b.numpy(), a.numpy()))  # fidelity, accuracy
    p, q = random_probs(50, seed=7), random_probs(50, seed=8)
    shift = answer_shift(q, p)
    kl = float(np.mean(entropy(p.numpy(), q.numpy(), axis=1)))
    assert shift["answer_kl"] == pytest.approx(kl, rel=1e-9)
    assert shift["answer_l1"] == pytest.approx(float(np.abs(p.numpy() - q.numpy()).sum(1).mean()))
    # Guo et al. 2017 ECE by hand: confidences 0.9 (right), 0.8 (wrong), 0.55 (right), 0.35 (wrong)
    probs = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.55, 0.45, 0.0], [0.35, 0.33, 0.32]])
    labels = torch.tensor([0, 1, 0, 2])
    # 10 bins of width 0.1, right-closed: each confidence is alone in its bin
    hand = (abs(0.9 - 1) + abs(0.8 - 0) + abs(0.55 - 1) + abs(0.35 - 0)) / 4
    assert expected_calibration_error(probs, labels, bins=10) == pytest.approx(hand, abs=1e-5)


# ---------------------------------------------------------------- the table itself


def _table_rows() -> list[list[str]]:
    from pathlib import Path

    doc = Path(__file__).resolve().parents[1] / "docs" / "faithfulness.md"
    rows = []
    for line in doc.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| <a id=") or (rows and line.startswith("| ") and "id=" in cells[0]):
            rows.append(cells)
    return rows


def test_faithfulness_table_covers_every_registered_attack_and_defence() -> None:
    import re

    from mextract.attacks.registry import ATTACKS
    from mextract.defences.registry import DEFENCES

    rows = _table_rows()
    named = {m for r in rows for m in re.findall(r"`([a-z0-9_]+)`", r[0])}
    assert set(ATTACKS) - named == set(), "attacks without a row in docs/faithfulness.md"
    assert set(DEFENCES) - named == set(), "defences without a row in docs/faithfulness.md"


def test_every_row_names_a_reference_test_that_exists() -> None:
    """Each row's test column cites ``tests/x.py::name`` (or ``::name``: the file cited
    before it in the cell, else this one); every cited test exists."""
    import re
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    for row in _table_rows():
        cell = row[3]
        tokens = re.findall(r"(test_[a-z_]+\.py)|::(test_[a-z0-9_]+\*?)", cell)
        assert tokens, f"row {row[0]!r} cites no test"
        current = "test_faithfulness.py"
        for path, name in tokens:
            if path:
                current = path
                assert (tests / current).is_file(), f"{current} does not exist"
                continue
            source = (tests / current).read_text()
            prefix = name.rstrip("*")  # "test_dawn_*" cites a family
            assert re.search(rf"^def {re.escape(prefix)}", source, re.M), f"{current}::{name} does not exist"


def test_new_options_refuse_bad_values_clearly() -> None:
    from mextract.defences.registry import build_defence
    from mextract.errors import InputError, UnknownNameError

    sur = surrogate_answering(S)
    with pytest.raises(UnknownNameError, match="MAD oracle"):
        PredictionPoisoning(probs_victim(3), surrogate=sur, oracle="vertex")
    with pytest.raises(InputError, match="argmax"):
        PredictionPoisoning(probs_victim(3), surrogate=sur, argmax="yes")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="min_class_distances"):
        Prada(min_class_distances=-1)
    with pytest.raises(InputError, match="client"):
        DawnWatermark(dawn_oracle(), b"k", client=1.5)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="per_client"):
        build_defence('dawn:{"per_client": "yes"}', dawn_oracle(), client="alice")


def test_selection_primitives_equal_scipy_and_scikit_learn() -> None:
    """Entropy sampling's score is SciPy's entropy of the softmax; the lab's K-means (MARICH,
    BADGE-style selection) stops at a Lloyd fixed point: scikit-learn's KMeans started from its
    centroids moves nothing and assigns every point alike."""
    from scipy.stats import entropy as scipy_entropy
    from sklearn.cluster import KMeans

    from mextract.attacks.selection import entropy, kmeans

    logits = torch.randn(50, 6, generator=torch.Generator().manual_seed(9))
    expected = scipy_entropy(torch.softmax(logits.double(), 1).numpy(), axis=1)
    np.testing.assert_allclose(entropy(logits).numpy(), expected, rtol=1e-5)
    g = torch.Generator().manual_seed(10)
    x = torch.cat([torch.randn(40, 3, generator=g, dtype=torch.float64) + 6 * i for i in range(4)])
    centroids, assign = kmeans(x, 4, torch.Generator().manual_seed(0))
    ref = KMeans(n_clusters=4, init=centroids.numpy(), n_init=1, max_iter=300).fit(x.numpy())
    np.testing.assert_allclose(ref.cluster_centers_, centroids.numpy(), atol=1e-9)
    np.testing.assert_array_equal(ref.labels_, assign.numpy())
