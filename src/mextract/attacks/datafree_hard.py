"""A label-only data-free thief, in the spirit of DFMS-HL (Sanyal, Addepalli & Babu, "Towards
Data-Free Model Stealing in a Hard Label Setting", CVPR 2022) — a simplified variant, not
the paper's method.

DFMS-HL trains a GAN on a *proxy* data set and steers its generator with the substitute's
class-diversity loss; the victim's top-1 labels train the substitute. This lab's variant
keeps the label-only threat model and the generator–substitute game but has no proxy data
and no discriminator:

* **Generator**: the DFAD/DFME generator of :mod:`mextract.attacks.datafree`
  (``latent_dim = 256``, ``ngf = 64``, pixels ``clamp(tanh(a), 0, 1)``).
* **Generator loss** (white-box, against the substitute only: no query is spent on it —
  labels carry no gradient a finite difference could read): maximise the entropy of each
  image's substitute prediction (points near the substitute's decision boundaries, where
  the victim's label is most informative) plus ``diversity`` times the entropy of the
  batch-mean prediction (DFMS's class-diversity term: images the substitute spreads over
  every class)::

      L_G = - mean_i H(S(x_i)) - λ · H(mean_i S(x_i)),   λ = diversity = 1

* **Substitute**: cross-entropy on the victim's top-1 labels (only the argmax of any
  answer is read), SGD lr 0.1, momentum 0.9, weight decay 5e-4 (DFME's substitute
  settings); generator Adam lr 1e-3 (as this lab's ``dfme``: DFAD's rate).
* **Schedule**: per iteration ``n_G = 1`` generator step then ``n_S = 5`` substitute
  steps on fresh batches of ``batch_size = 64`` generated images (as this lab's
  ``dfme``). The learning rates stay constant (DFME's decays happen at 10 %, 30 % and
  50 % of a 20M-query run, beyond the budgets this variant is meant for).
* **Final phase** (``retrain``, on by default): a fresh substitute is trained on every
  stored image and its label (cross-entropy), with ``train`` (the project's substitute
  schedule, :data:`~mextract.attacks.datafree.RETRAIN_TRAINING`).

**Query accounting.** Only substitute steps query: ``c = n_S · B`` per iteration (320 with
the defaults), ``⌊budget / c⌋`` iterations, the remainder unspent; each generated image
the victim labels is one query, and is kept for the final phase.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mextract.attacks.base import Attack, AttackContext
from mextract.attacks.datafree import RETRAIN_TRAINING, DFMEGenerator, QueryStore, check_retrain
from mextract.attacks.substitute import train_substitute
from mextract.errors import InputError
from mextract.oracle import APIDescription, answers_to_probs
from mextract.training import TrainConfig

logger = logging.getLogger(__name__)


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of each row of probabilities."""
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


@dataclass(kw_only=True)
class DataFreeHardLabel(Attack):
    """A label-only data-free variant in the spirit of DFMS-HL (Sanyal et al., CVPR 2022):
    a generator trained against the substitute alone (boundary + class-diversity entropy),
    the victim's top-1 labels, and a final substitute trained on every stored pair.

    Args: batch_size 64, latent_dim 256, ngf 64, n_generator 1, n_substitute 5,
    lr_substitute 0.1 (SGD, momentum 0.9, weight decay 5e-4), lr_generator 1e-3 (Adam),
    diversity 1.0 (weight of the class-diversity entropy), evaluations (history points),
    retrain / train (the final phase). See the module docstring for the query accounting.

    Faithfulness: ``docs/faithfulness.md#dfme-hard``.
    """

    name: ClassVar[str] = "dfme_hard"
    needs_pool: ClassVar[bool] = False
    batch_size: int = 64
    latent_dim: int = 256
    ngf: int = 64
    n_generator: int = 1
    n_substitute: int = 5
    lr_substitute: float = 0.1
    lr_generator: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    diversity: float = 1.0
    evaluations: int = 10
    retrain: bool = True
    train: TrainConfig = RETRAIN_TRAINING

    @property
    def queries_per_iteration(self) -> int:
        """``n_S · B``: generator steps query nothing."""
        return self.n_substitute * self.batch_size

    def check_params(self, api: APIDescription, pool: torch.Tensor | None, budget: int) -> None:
        for name in ("batch_size", "latent_dim", "ngf", "n_substitute", "evaluations"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"{name}: expected a positive integer, got {v!r}")
        ng = self.n_generator
        if isinstance(ng, bool) or not isinstance(ng, int) or ng < 0:
            raise InputError(f"n_generator: expected a non-negative integer, got {self.n_generator!r}")
        if self.batch_size < 2:
            raise InputError(f"batch_size: expected at least 2 (batch norm), got {self.batch_size}")
        for name in ("lr_substitute", "lr_generator"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0:
                raise InputError(f"{name}: expected a positive number, got {v!r}")
        dv = self.diversity
        if isinstance(dv, bool) or not isinstance(dv, int | float) or dv < 0:
            raise InputError(f"diversity: expected a non-negative number, got {self.diversity!r}")
        check_retrain(self)
        if len(api.input_shape) != 3:
            raise InputError(
                "input shape: the data-free generator makes images, expected (C, H, W), "
                f"got {api.input_shape}"
            )
        if budget < self.queries_per_iteration:
            raise InputError(
                f"budget: expected at least {self.queries_per_iteration} queries (one iteration: "
                f"{self.n_substitute}·{self.batch_size} substitute queries), got {budget}"
            )

    def run(self, ctx: AttackContext) -> nn.Module:
        dev, gen = ctx.device, ctx.generator
        c, h, w = ctx.api.input_shape
        cost = self.queries_per_iteration
        iterations = ctx.budget // cost
        logger.info("dfme_hard: %d iterations of %d queries (budget %d)", iterations, cost, ctx.budget)
        g_net = DFMEGenerator((c, h, w), self.latent_dim, self.ngf).to(dev)
        sub = ctx.make_substitute().to(dev)
        opt_s = torch.optim.SGD(
            sub.parameters(), lr=self.lr_substitute, momentum=self.momentum, weight_decay=self.weight_decay
        )
        opt_g = torch.optim.Adam(g_net.parameters(), lr=self.lr_generator)
        store = QueryStore(iterations * cost, (c, h, w), ctx.api.num_classes)
        every = max(1, iterations // self.evaluations)
        b = self.batch_size

        def latent() -> torch.Tensor:
            return torch.randn(b, self.latent_dim, generator=gen).to(dev)

        loss_g = loss_s = float("nan")
        g_net.train()
        for it in range(1, iterations + 1):
            sub.eval()  # a fixed target for the generator (no batch-norm coupling)
            for p in sub.parameters():
                p.requires_grad_(False)
            for _ in range(self.n_generator):
                probs = torch.softmax(sub(g_net(latent())), 1)
                loss = -entropy(probs).mean() - self.diversity * entropy(probs.mean(0))
                opt_g.zero_grad(set_to_none=True)
                loss.backward()
                opt_g.step()
                loss_g = float(loss.detach())
            for p in sub.parameters():
                p.requires_grad_(True)
            sub.train()
            for _ in range(self.n_substitute):
                with torch.no_grad():
                    x = g_net(latent()).cpu()
                answers = ctx.api.query(x)
                store.add(x, answers_to_probs(answers.double(), ctx.api.mode))
                labels = answers.argmax(1).to(dev)
                loss = F.cross_entropy(sub(x.to(dev)), labels)
                opt_s.zero_grad(set_to_none=True)
                loss.backward()
                opt_s.step()
                loss_s = float(loss.detach())
            sub.eval()
            ctx.emit(stage="dfme_hard", done=it, total=iterations, loss_generator=loss_g,
                     loss_substitute=loss_s, queries=ctx.spent)  # fmt: skip
            if it % every == 0 or it == iterations:
                ctx.report(sub, it)
        logger.info("dfme_hard: done, %d queries, last losses G %.4f S %.4f", ctx.spent, loss_g, loss_s)
        if not self.retrain:
            return sub.eval()
        x_all, p_all = store.tensors()
        return train_substitute(ctx, x_all, p_all.argmax(1), soft=False, config=self.train)
