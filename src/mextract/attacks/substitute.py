"""The pieces every learning-based attack is made of: querying the pool through the
oracle, the labelling losses, and one substitute-training loop.

Losses (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"):

* soft labels: ``T² · KL(softmax(z_v/T) ‖ softmax(z_s/T))``, the victim's tempered
  distribution as target. Answers arrive as probabilities, and ``softmax(log p / T)`` is
  ``p^(1/T)`` renormalised, so the victim's logits are never needed;
* hard labels: cross-entropy on the returned top-1 class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mextract.attacks.base import AttackContext
from mextract.errors import InputError
from mextract.oracle import answers_to_probs
from mextract.training import BatchLoss, LossFn, TrainConfig, Transform, fit

QUERY_CHUNK = 512


def query_pool(ctx: AttackContext, x: torch.Tensor) -> torch.Tensor:
    """Ask the oracle about ``x`` in chunks (reporting progress); returns the raw answers."""
    out = []
    for i in range(0, len(x), QUERY_CHUNK):
        out.append(ctx.api.query(x[i : i + QUERY_CHUNK]))
        ctx.emit(stage="query", done=min(i + QUERY_CHUNK, len(x)), total=len(x))
    return torch.cat(out) if out else torch.empty(0, ctx.api.num_classes)


def random_subset(ctx: AttackContext, n: int) -> torch.Tensor:
    """Indices of ``min(n, |pool|)`` distinct pool points, drawn with the run's generator."""
    if ctx.pool is None:
        raise InputError("this attack needs an attacker pool")
    return torch.randperm(len(ctx.pool), generator=ctx.generator)[: min(n, len(ctx.pool))]


def soft_targets(answers: torch.Tensor, ctx: AttackContext, temperature: float) -> torch.Tensor:
    """The victim's distribution at temperature ``T`` from any soft answer mode."""
    p = answers_to_probs(answers.double(), ctx.api.mode)
    if temperature != 1.0:
        p = p.clamp_min(0) ** (1.0 / temperature)
        p = p / p.sum(1, keepdim=True)
    return p.float()


def hard_targets(answers: torch.Tensor) -> torch.Tensor:
    """The top-1 class of each answer (for every mode, the argmax is the victim's label)."""
    return answers.argmax(1)


def kd_loss(temperature: float) -> LossFn:
    """Soft-label distillation loss at temperature ``T``, scaled by ``T²``."""
    if not temperature > 0:
        raise InputError(f"temperature: expected a positive number, got {temperature}")

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logq = F.log_softmax(logits / temperature, dim=1)
        return F.kl_div(logq, target, reduction="batchmean") * temperature**2

    return loss


def ce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on class indices."""
    return F.cross_entropy(logits, target)


def train_substitute(
    ctx: AttackContext,
    x: torch.Tensor,
    targets: torch.Tensor,
    *,
    soft: bool,
    temperature: float = 1.0,
    config: TrainConfig,
    transform: Transform | None = None,
    model: nn.Module | None = None,
    batch_loss: BatchLoss | None = None,
) -> nn.Module:
    """Train a (new, unless ``model`` is given) substitute on answered queries.

    ``soft=True`` expects ``targets`` from :func:`soft_targets` at the same temperature;
    ``soft=False`` expects class indices. The evaluator (if any) scores the substitute
    about ten times during training and at the end, filling ``ctx.history``.
    ``batch_loss`` replaces the soft/hard loss when an attack needs its own (e.g. SPSG's
    output-and-gradient matching); ``targets`` are then whatever that loss expects.
    """
    sub = ctx.make_substitute() if model is None else model
    loss = None if batch_loss is not None else kd_loss(temperature) if soft else ce_loss
    every = max(1, config.epochs // 10)

    def on_epoch(epoch: int, m: nn.Module) -> None:
        ctx.emit(stage="train", done=epoch, total=config.epochs)
        if epoch % every == 0 or epoch == config.epochs:
            ctx.report(m, epoch)

    seed = int(torch.randint(2**31 - 1, (1,), generator=ctx.generator))
    return fit(
        sub,
        x,
        targets,
        loss,
        config,
        batch_loss=batch_loss,
        seed=seed,
        device=ctx.device,
        transform=transform,
        on_epoch=on_epoch,
    )
