"""Query-selection strategies for pool-based active extraction.

A strategy decides *which* unlabelled pool points to send to the oracle next; how the
answers are turned into a training signal (soft KD targets or hard labels) is decided
elsewhere (:mod:`mextract.attacks.active`), so every strategy works with either.

Every strategy has the same call signature::

    chosen = strategy(substitute, pool_x, candidates, labeled, n, generator)

``candidates`` and ``labeled`` are index tensors into ``pool_x``; the result holds
``min(n, len(candidates))`` distinct entries of ``candidates``. Strategies only run the
*substitute* (never the victim), so selecting costs no query. All randomness comes from
``generator``; scoring is done in batched tensor operations (chunked forward passes,
``torch.cdist`` blocks, a running min-distance vector for k-center), never per-sample
Python loops over the pool.

Strategies (names in :data:`STRATEGIES`):

``random``
    uniform without replacement (ActiveThief's baseline; Pal et al., AAAI 2020).
``entropy``
    uncertainty sampling: the highest entropy of the substitute's softmax first
    (Lewis & Gale 1994; ActiveThief's "uncertainty").
``kcenter``
    greedy core-set (Sener & Savarese, ICLR 2018): repeatedly take the candidate
    farthest (Euclidean, penultimate features) from everything labelled or picked.
``dfal``
    DeepFool Active Learning (Ducoffe & Precioso 2018): the smallest DeepFool
    perturbation against the substitute first, i.e. the points nearest its boundary.
``dfal_kcenter``
    ActiveThief's combination: keep the ``rho · n`` smallest-DFAL candidates, then
    k-center among them.
``entropy_kmeans``
    MARICH-style (Karmakar & Basu, NeurIPS 2023): the ``factor · n`` highest-entropy
    candidates, K-means into ``n`` clusters on penultimate features, the point nearest
    each centroid.
``entropy_kmeans_grad``
    the sources' active hard-label strategy: the same entropy pre-filter, then K-means
    on BADGE gradient embeddings (Ash et al., ICLR 2020).

Features: the penultimate representation is the input of the model's *last*
``nn.Linear`` (for the zoo's ``nn.Sequential`` models exactly ``model[:-1](x)``), read
with a forward hook so that any model whose logits come from a final linear layer works.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from mextract.errors import InputError, UnknownNameError

logger = logging.getLogger(__name__)

#: Rows per forward pass / distance block when scoring the pool.
CHUNK = 1024


class Strategy(Protocol):
    """The uniform signature of every selection strategy."""

    def __call__(
        self,
        model: nn.Module,
        pool_x: torch.Tensor,
        candidates: torch.Tensor,
        labeled: torch.Tensor,
        n: int,
        generator: torch.Generator,
    ) -> torch.Tensor: ...


# ------------------------------------------------------------------------------ helpers


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return torch.device("cpu") if p is None else p.device


def _last_linear(model: nn.Module) -> nn.Linear:
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    if last is None:
        raise InputError(
            f"feature-space selection: expected a model whose logits come from a final nn.Linear, "
            f"got {type(model).__name__} without one"
        )
    return last


@torch.no_grad()
def embed(model: nn.Module, x: torch.Tensor, *, features: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(N, K)`` and penultimate features ``(N, D)`` of ``x`` (on the CPU, float32).

    The model runs in eval mode (restored afterwards) in chunks of :data:`CHUNK`.
    With ``features=False`` the second tensor is empty.
    """
    dev = _device(model)
    was_training = model.training
    model.eval()
    feats: list[torch.Tensor] = []
    handle = None
    if features:
        lin = _last_linear(model)

        def hook(_m: nn.Module, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
            feats.append(inputs[0].detach().float().flatten(1).cpu())

        handle = lin.register_forward_hook(hook)
    try:
        logits = [model(x[i : i + CHUNK].to(dev)).float().cpu() for i in range(0, len(x), CHUNK)]
    finally:
        if handle is not None:
            handle.remove()
        model.train(was_training)
    out = torch.cat(logits) if logits else torch.empty(0, 0)
    return out, (torch.cat(feats) if feats else torch.empty(len(x), 0))


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of ``softmax(logits)``, one value per row."""
    logp = torch.log_softmax(logits.double(), dim=1)
    return -(logp.exp() * logp).sum(1).float()


def min_distances(x: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Euclidean distance from each row of ``x`` to its nearest row of ``centers`` (blocked)."""
    out = torch.full((len(x),), float("inf"))
    if len(centers) == 0:
        return out
    for i in range(0, len(x), CHUNK):
        blk = torch.full((min(CHUNK, len(x) - i),), float("inf"))
        for j in range(0, len(centers), CHUNK):
            d = torch.cdist(x[i : i + CHUNK], centers[j : j + CHUNK]).amin(1)
            blk = torch.minimum(blk, d)
        out[i : i + CHUNK] = blk
    return out


def k_center_greedy(
    features: torch.Tensor, centers: torch.Tensor, n: int, generator: torch.Generator
) -> torch.Tensor:
    """Greedy k-center (Sener & Savarese 2018, Alg. 1): positions of ``n`` rows of ``features``.

    Each pick is the row with the largest distance to its nearest centre, the centres
    being ``centers`` (already labelled) plus all earlier picks. A running min-distance
    vector is updated after each pick with one batched distance computation. With no
    labelled centres, the first pick is uniform at random (from ``generator``).
    """
    m = len(features)
    if n >= m:
        return torch.arange(m)
    min_d = min_distances(features, centers)
    picks = torch.empty(n, dtype=torch.long)
    for t in range(n):
        if t == 0 and len(centers) == 0:
            j = int(torch.randint(m, (1,), generator=generator))
        else:
            j = int(torch.argmax(min_d))
        picks[t] = j
        d = torch.cdist(features, features[j : j + 1]).squeeze(1)
        min_d = torch.minimum(min_d, d)
        min_d[picks[: t + 1]] = -1.0  # never pick twice (even among duplicates)
    return picks


def kmeans(
    x: torch.Tensor, k: int, generator: torch.Generator, *, iters: int = 50
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched Lloyd K-means with k-means++ seeding (Arthur & Vassilvitskii 2007).

    Returns ``(centroids (k, D), assignment (N,))``. An empty cluster keeps its previous
    centroid; iterations stop when the assignment no longer changes.
    """
    n = len(x)
    if not 1 <= k <= n:
        raise InputError(f"kmeans: expected 1 <= k <= {n}, got {k}")
    first = int(torch.randint(n, (1,), generator=generator))
    idx = [first]
    d2 = torch.cdist(x, x[first : first + 1]).squeeze(1) ** 2
    for _ in range(1, k):
        total = d2.sum()
        if total > 0:
            j = int(torch.multinomial(d2 / total, 1, generator=generator))
        else:  # all remaining points coincide with a centre: any unused one will do
            free = torch.ones(n, dtype=torch.bool)
            free[idx] = False
            j = int(free.nonzero()[0])
        idx.append(j)
        d2 = torch.minimum(d2, torch.cdist(x, x[j : j + 1]).squeeze(1) ** 2)
    centroids = x[idx].clone()
    assign = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iters):
        new = torch.cdist(x, centroids).argmin(1)
        if torch.equal(new, assign):
            break
        assign = new
        counts = torch.bincount(assign, minlength=k).float()
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        nonempty = counts > 0
        centroids[nonempty] = sums[nonempty] / counts[nonempty].unsqueeze(1)
    return centroids, assign


def nearest_to_centroids(x: torch.Tensor, centroids: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
    """For each non-empty cluster, the position of its member nearest its centroid (distinct)."""
    k = len(centroids)
    d = torch.cdist(x, centroids)
    member = assign.unsqueeze(1) == torch.arange(k).unsqueeze(0)
    d = torch.where(member, d, torch.full_like(d, float("inf")))
    return d.argmin(0)[member.any(0)]


def gradient_embedding(logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """BADGE embedding (Ash et al. 2020): ∂CE(ŷ)/∂W of the last layer, ``(p − onehot(ŷ)) ⊗ h``.

    ``ŷ`` is the substitute's own prediction; the result is ``(N, K·D)``.
    """
    p = torch.softmax(logits, dim=1)
    p = p - torch.nn.functional.one_hot(p.argmax(1), p.shape[1]).to(p.dtype)
    return (p.unsqueeze(2) * features.unsqueeze(1)).flatten(1)


def deepfool_norms(
    model: nn.Module,
    x: torch.Tensor,
    *,
    max_iter: int = 10,
    overshoot: float = 0.02,
    classes: int = 4,
    batch_size: int = 256,
) -> torch.Tensor:
    """L2 norm of the multi-class DeepFool perturbation (Moosavi-Dezfooli et al. 2016) per row
    (see :func:`deepfool_perturbations`). Returns ``‖(1 + overshoot)·r‖₂`` (CPU, float32)."""
    r = deepfool_perturbations(
        model, x, max_iter=max_iter, overshoot=overshoot, classes=classes, batch_size=batch_size
    )
    return r.flatten(1).norm(dim=1)


@torch.enable_grad()
def deepfool_perturbations(
    model: nn.Module,
    x: torch.Tensor,
    *,
    max_iter: int = 10,
    overshoot: float = 0.02,
    classes: int = 4,
    batch_size: int = 256,
) -> torch.Tensor:
    """The multi-class DeepFool perturbation (Moosavi-Dezfooli et al. 2016) of each row.

    Batched: each chunk of ``batch_size`` rows is attacked together; a row leaves the
    active set as soon as ``x + (1 + overshoot)·r`` changes the model's label. Only the
    ``classes`` classes most likely at the clean input are considered (the
    ``nb_candidate`` / ``candidates`` option of cleverhans and foolbox); each iteration
    linearises their logit differences at the current point, steps to the nearest
    linearised boundary (plus 1e-4, as in DeepFool) and accumulates ``r``. Rows still unflipped after
    ``max_iter`` iterations keep their accumulated norm (a lower bound; they are among the
    farthest anyway). Returns ``(1 + overshoot)·r`` (CPU, float32, shaped like ``x``):
    ``x + `` it is the adversarial example.
    """
    dev = _device(model)
    was_training = model.training
    model.eval()
    c = max(2, classes)
    out = torch.zeros(x.shape, dtype=torch.float32)
    try:
        for s in range(0, len(x), batch_size):
            x0 = x[s : s + batch_size].to(dev)
            with torch.no_grad():
                logits0 = model(x0)
            c_eff = min(c, logits0.shape[1])
            order = logits0.argsort(1, descending=True)[:, :c_eff]  # column 0: the original label
            label = order[:, 0]
            r_tot = torch.zeros_like(x0)
            active = torch.ones(len(x0), dtype=torch.bool, device=dev)
            for _ in range(max_iter):
                idx = active.nonzero().squeeze(1)
                if len(idx) == 0:
                    break
                xa = (x0[idx] + (1 + overshoot) * r_tot[idx]).detach().requires_grad_(True)
                out_a = model(xa)
                still = out_a.argmax(1) == label[idx]
                active[idx[~still]] = False
                if not still.any():
                    break
                f = out_a.gather(1, order[idx])  # (b, c)
                grads = torch.stack(
                    [
                        torch.autograd.grad(f[:, j].sum(), xa, retain_graph=j < c_eff - 1)[0]
                        for j in range(c_eff)
                    ],
                    dim=1,
                ).flatten(2)  # (b, c, d)
                w = grads[:, 1:] - grads[:, :1]
                fd = (f[:, 1:] - f[:, :1]).detach()
                wn = w.norm(dim=2).clamp_min(1e-12)
                dist = fd.abs() / wn
                best = dist.argmin(1)
                ar = torch.arange(len(idx), device=dev)
                step = ((fd.abs()[ar, best] + 1e-4) / wn[ar, best] ** 2).unsqueeze(1) * w[ar, best]
                upd = idx[still]
                r_tot[upd] += step[still].view_as(r_tot[upd])
            out[s : s + batch_size] = ((1 + overshoot) * r_tot).detach().float().cpu()
    finally:
        model.train(was_training)
    return out


def _check_n(candidates: torch.Tensor, n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise InputError(f"n: expected a non-negative integer, got {n!r}")
    return min(n, len(candidates))


# ---------------------------------------------------------------------------- strategies


@dataclass(frozen=True, kw_only=True)
class RandomSelection:
    """Uniform sampling without replacement from the candidates."""

    name: ClassVar[str] = "random"

    def __call__(
        self, model: nn.Module, pool_x: torch.Tensor, candidates: torch.Tensor, labeled: torch.Tensor,
        n: int, generator: torch.Generator,
    ) -> torch.Tensor:
        n = _check_n(candidates, n)
        return candidates[torch.randperm(len(candidates), generator=generator)[:n]]


@dataclass(frozen=True, kw_only=True)
class EntropySelection:
    """Uncertainty sampling: the ``n`` candidates whose substitute softmax has the highest entropy."""

    name: ClassVar[str] = "entropy"

    def __call__(
        self, model: nn.Module, pool_x: torch.Tensor, candidates: torch.Tensor, labeled: torch.Tensor,
        n: int, generator: torch.Generator,
    ) -> torch.Tensor:
        n = _check_n(candidates, n)
        logits, _ = embed(model, pool_x[candidates], features=False)
        return candidates[torch.topk(entropy(logits), n).indices]


@dataclass(frozen=True, kw_only=True)
class KCenterSelection:
    """Greedy core-set (Sener & Savarese 2018) in the substitute's penultimate feature space."""

    name: ClassVar[str] = "kcenter"

    def __call__(
        self, model: nn.Module, pool_x: torch.Tensor, candidates: torch.Tensor, labeled: torch.Tensor,
        n: int, generator: torch.Generator,
    ) -> torch.Tensor:
        n = _check_n(candidates, n)
        _, fc = embed(model, pool_x[candidates])
        _, fl = embed(model, pool_x[labeled]) if len(labeled) else (None, fc[:0])
        return candidates[k_center_greedy(fc, fl, n, generator)]


@dataclass(frozen=True, kw_only=True)
class DFALSelection:
    """DFAL (Ducoffe & Precioso 2018): smallest DeepFool perturbation against the substitute first.

    As a strategy it only *ranks*: the published DFAL also adds each chosen point's DeepFool
    adversarial example to the training set, labelled with the point's queried label; that
    is :class:`~mextract.attacks.active.ActiveExtraction`'s ``adversarial_examples=True``
    (off by default: this lab's ActiveThief loop uses DFAL for selection only; measured in the
    faithfulness table).
    Faithfulness: ``docs/faithfulness.md#dfal``.

    ``overshoot = 0.02`` as in DeepFool and DFAL; ``max_iter`` bounds the iterations
    (DFAL uses cleverhans' 50; 10 suffice to rank: the nearest points flip in 1–3);
    ``classes`` limits the linearised classes to the most likely ones (see
    :func:`deepfool_norms`; cleverhans and foolbox default to 10, we take 4 to divide the
    backward passes by 2.5: the nearest boundary is almost always one of the runners-up).
    """

    name: ClassVar[str] = "dfal"
    max_iter: int = 10
    overshoot: float = 0.02
    classes: int = 4

    def __post_init__(self) -> None:
        if isinstance(self.max_iter, bool) or not isinstance(self.max_iter, int) or self.max_iter < 1:
            raise InputError(f"max_iter: expected a positive integer, got {self.max_iter!r}")
        if not self.overshoot >= 0:
            raise InputError(f"overshoot: expected a non-negative number, got {self.overshoot}")
        if isinstance(self.classes, bool) or not isinstance(self.classes, int) or self.classes < 2:
            raise InputError(f"classes: expected an integer >= 2, got {self.classes!r}")

    def scores(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return deepfool_norms(
            model, x, max_iter=self.max_iter, overshoot=self.overshoot, classes=self.classes
        )

    def adversarial(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """DFAL's adversarial examples of ``x`` against ``model``: ``x`` plus its DeepFool
        perturbation (the published DFAL adds them to the training set with the label
        queried for ``x``; :class:`~mextract.attacks.active.ActiveExtraction`'s
        ``adversarial_examples`` option)."""
        r = deepfool_perturbations(
            model, x, max_iter=self.max_iter, overshoot=self.overshoot, classes=self.classes
        )
        return x + r.to(x.dtype)

    def __call__(
        self, model: nn.Module, pool_x: torch.Tensor, candidates: torch.Tensor, labeled: torch.Tensor,
        n: int, generator: torch.Generator,
    ) -> torch.Tensor:
        n = _check_n(candidates, n)
        norms = self.scores(model, pool_x[candidates])
        return candidates[torch.topk(norms, n, largest=False).indices]


@dataclass(frozen=True, kw_only=True)
class DFALKCenterSelection(DFALSelection):
    """ActiveThief's DFAL+k-center: the ``rho·n`` smallest-DFAL candidates, then k-center.

    ActiveThief (Pal et al. 2020) pre-filters with DFAL and runs k-center on the
    survivors so that the picks are both near the boundary and diverse; ``rho`` sets the
    pre-filter size (our default 4: wide enough for k-center to spread the picks, narrow
    enough to stay near the boundary).
    """

    name: ClassVar[str] = "dfal_kcenter"
    rho: float = 4.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.rho >= 1:
            raise InputError(f"rho: expected a number >= 1, got {self.rho}")

    def __call__(
        self, model: nn.Module, pool_x: torch.Tensor, candidates: torch.Tensor, labeled: torch.Tensor,
        n: int, generator: torch.Generator,
    ) -> torch.Tensor:
        n = _check_n(candidates, n)
        m = min(len(candidates), max(n, round(self.rho * n)))
        norms = self.scores(model, pool_x[candidates])
        pre = candidates[torch.topk(norms, m, largest=False).indices]
        return KCenterSelection()(model, pool_x, pre, labeled, n, generator)


@dataclass(frozen=True, kw_only=True)
class EntropyKMeansSelection:
    """MARICH-style (Karmakar & Basu 2023): entropy pre-filter, then K-means for diversity.

    The ``factor·n`` highest-entropy candidates are clustered into ``n`` clusters by
    K-means (k-means++ seeding, Lloyd iterations) on the substitute's penultimate
    features; the member nearest each centroid is picked (empty clusters are made up
    from the highest-entropy unpicked points). ``factor`` (default 4) is our choice:
    MARICH shrinks its candidate set by constant ratios per step.
    """

    name: ClassVar[str] = "entropy_kmeans"
    factor: float = 4.0

    def __post_init__(self) -> None:
        if not self.factor >= 1:
            raise InputError(f"factor: expected a number >= 1, got {self.factor}")

    def embedding(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return features

    def __call__(
        self, model: nn.Module, pool_x: torch.Tensor, candidates: torch.Tensor, labeled: torch.Tensor,
        n: int, generator: torch.Generator,
    ) -> torch.Tensor:
        n = _check_n(candidates, n)
        if n == 0:
            return candidates[:0]
        logits, feats = embed(model, pool_x[candidates])
        h = entropy(logits)
        m = min(len(candidates), max(n, round(self.factor * n)))
        top = torch.topk(h, m).indices  # sorted by decreasing entropy
        z = self.embedding(logits[top], feats[top])
        centroids, assign = kmeans(z, n, generator)
        pos = nearest_to_centroids(z, centroids, assign)
        if len(pos) < n:  # empty clusters: fill with the most uncertain unpicked points
            used = torch.zeros(m, dtype=torch.bool)
            used[pos] = True
            pos = torch.cat([pos, (~used).nonzero().squeeze(1)[: n - len(pos)]])
        return candidates[top[pos]]


@dataclass(frozen=True, kw_only=True)
class EntropyKMeansGradSelection(EntropyKMeansSelection):
    """The sources' active hard-label strategy: entropy pre-filter, K-means on BADGE
    gradient embeddings ``(p − onehot(ŷ)) ⊗ h`` (Ash et al. 2020), in closed form."""

    name: ClassVar[str] = "entropy_kmeans_grad"

    def embedding(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return gradient_embedding(logits, features)


STRATEGIES: dict[str, Callable[..., Strategy]] = {
    cls.name: cls
    for cls in (
        RandomSelection,
        EntropySelection,
        KCenterSelection,
        DFALSelection,
        DFALKCenterSelection,
        EntropyKMeansSelection,
        EntropyKMeansGradSelection,
    )
}


def check_strategy_name(name: str) -> str:
    if name not in STRATEGIES:
        raise UnknownNameError("selection strategy", str(name), sorted(STRATEGIES))
    return name


def create_strategy(name: str, **options: Any) -> Strategy:
    """Build a strategy by name, e.g. ``create_strategy("dfal_kcenter", rho=4)``."""
    cls = STRATEGIES[check_strategy_name(name)]
    try:
        return cls(**options)
    except TypeError as exc:
        raise InputError(f"selection strategy {name!r}: bad options {sorted(options)}: {exc}") from exc
