"""``mextract direct``: exact parameter extraction of a one-hidden-layer ReLU victim.

Examples::

    mextract direct run --victim runs/x/victim             # a saved relu1 checkpoint
    mextract direct run --victim-kind relu1 --dataset mnist --hidden 32 --epochs 5
    mextract direct run --victim-kind gaussian --inputs 50 --hidden 16 --classes 5
"""

from __future__ import annotations

import logging
from enum import StrEnum
from pathlib import Path

import numpy as np
import torch
import typer
from rich.console import Console
from rich.table import Table
from torch import nn

from mextract.attacks.direct import gaussian_relu1
from mextract.errors import MextractError

app = typer.Typer(help="Direct extraction: recover a victim's parameters exactly.")
console = Console()
logger = logging.getLogger(__name__)


@app.callback()
def _group() -> None:
    """Direct extraction: recover a victim's parameters exactly (a command group)."""


def _trained_victim(dataset: str, h: int, epochs: int, seed: int) -> tuple[nn.Module, torch.Tensor]:
    from mextract._utils import seeded
    from mextract.data import load_splits
    from mextract.models import create_model
    from mextract.training import TrainConfig, VictimRecipe, train_victim

    s = load_splits(dataset, seed=seed)
    with seeded(seed):
        net = create_model("relu1", s.test.input_shape, s.test.num_classes, hidden=h)
    recipe = VictimRecipe(
        train=TrainConfig(epochs=epochs, batch_size=64, lr=2e-3, optimizer="adam", weight_decay=0.0),
        label_smoothing=0.0,
        augment="none",
    )
    train_victim(net, s.victim_train, recipe, seed=seed, device="cpu")
    return net.double().eval(), s.test.x.double()


class VictimKind(StrEnum):
    relu1 = "relu1"
    gaussian = "gaussian"


@app.command("run")
def run(
    ctx: typer.Context,
    victim: Path | None = typer.Option(None, exists=True, help="checkpoint folder of a relu1 victim"),
    victim_kind: VictimKind = typer.Option(
        VictimKind.relu1, help="'relu1' (trained on --dataset) or 'gaussian'"
    ),
    dataset: str = typer.Option("mnist", help="dataset for a trained victim and its test set"),
    hidden: int = typer.Option(16, min=1, help="hidden units of a built victim"),
    inputs: int = typer.Option(20, min=1, help="inputs of a gaussian victim"),
    classes: int = typer.Option(3, min=2, help="outputs of a gaussian victim"),
    epochs: int = typer.Option(5, min=1, help="training epochs of a relu1 victim"),
    budget: int = typer.Option(1_000_000, min=1, help="query budget"),
    seed: int = typer.Option(0, help="seed of the victim and the attack"),
    float32: bool = typer.Option(False, "--float32", help="serve float32 answers (as most APIs do)"),
    threads: int | None = typer.Option(
        None, min=1, help="Torch CPU threads (default: $OMP_NUM_THREADS, else one per core)."
    ),
) -> None:
    """Extract a one-hidden-layer ReLU victim from its logits and report the error."""
    from mextract.attacks.direct import ReLUCryptanalysis, align_relu1, query_floor
    from mextract.cli.runtime import configure_runtime
    from mextract.data import dataset_info
    from mextract.models import read_meta
    from mextract.oracle import VictimOracle

    def bad(option: str, message: str) -> typer.BadParameter:
        return typer.BadParameter(message, ctx=ctx, param_hint=f"'{option}'")

    try:
        if victim is not None:
            meta = read_meta(victim)
            if meta["architecture"] != "relu1":
                raise bad("--victim", f"expected a relu1 checkpoint, got a {meta['architecture']!r} one")
        elif victim_kind is VictimKind.relu1:
            dataset_info(dataset)
    except MextractError as exc:
        raise bad("--victim" if victim is not None else "--dataset", str(exc)) from None
    console.print(configure_runtime("cpu", threads), style="dim", markup=False)
    if victim is not None:
        from mextract.models import load_checkpoint

        net, meta = load_checkpoint(victim)
        net = net.double().eval()
        shape = tuple(meta["input_shape"])
        test = torch.randn(10_000, *shape, dtype=torch.float64)
    elif victim_kind is VictimKind.gaussian:
        net, shape = gaussian_relu1(inputs, hidden, classes, seed), (inputs,)
        test = torch.randn(10_000, inputs, dtype=torch.float64)
    else:
        net, test = _trained_victim(dataset, hidden, epochs, seed)
        shape = tuple(test.shape[1:])
    with torch.no_grad():
        k = int(net(test[:1]).shape[1])
    answer_dtype = torch.float32 if float32 else torch.float64
    oracle = VictimOracle(
        net, input_shape=shape, num_classes=k, mode="logits", dtype=answer_dtype, device="cpu"
    )
    with console.status("extracting ..."):
        res = ReLUCryptanalysis()(oracle, None, budget, seed=seed)
    al = align_relu1(res.model, net)
    d = int(np.prod(shape))
    h = al.matched + al.missing
    gauss = torch.randn(
        100_000, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1)
    )
    with torch.no_grad():
        fid = {
            name: float((res.model(x).argmax(1) == net(x).argmax(1)).double().mean())
            for name, x in (("test", test), ("gauss", gauss))
        }
    floor = query_floor(d, h, k)
    table = Table(title=f"direct extraction of a {d}-{h}-{k} ReLU network")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for name, value in [
        ("queries", f"{res.queries}"),
        ("floor P/K", f"{floor:.1f}"),
        ("queries / floor", f"{res.queries / floor:.2f}"),
        ("wall time (s)", f"{res.wall_time_s:.2f}"),
        ("answers", str(answer_dtype).removeprefix("torch.")),
        (
            "check on fresh queries (counted)",
            f"{int(res.metrics.get('verify_queries', 0))}, rel. error "
            f"{res.metrics.get('verify_rel_error', float('nan')):.2g}",
        ),
        ("units matched", f"{al.matched}/{h}"),
        ("max rel. parameter error", f"{al.max_rel_error:.3g}"),
        ("fidelity (test)", f"{100 * fid['test']:.2f}%"),
        ("fidelity (100k Gaussian)", f"{100 * fid['gauss']:.3f}%"),
    ]:
        table.add_row(name, value)
    console.print(table)
