"""``mextract deceive``: do adversarial examples crafted on a stolen substitute fool the victim?

Model deception (:mod:`mextract.deception`): the thief crafts adversarial examples
white-box on the substitute and sends them to the victim. This command measures the
transfer rate on the victim's own test split, for the substitute and for any reference
models (another substitute, an independently trained model, an untrained one).

Examples::

    mextract deceive runs/demo/victim runs/demo/substitute-kd-probs-1000-s0
    mextract deceive VICTIM SUB --reference runs/other/victim --norm l2 --targeted
    mextract deceive VICTIM SUB --all --samples 500      # the 12-attack grid

Defaults are the papers' (:func:`mextract.deception.default_config`): untargeted PGD L∞,
ε = 0.3 with 40 steps of 0.01 for grayscale images, ε = 8/255 with 20 steps of 2/255 for
colour ones (Madry et al. 2018).
"""

from __future__ import annotations

import math
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mextract.errors import InputError, MextractError

if TYPE_CHECKING:
    from mextract.data import ValueRange
    from mextract.deception import DeceptionConfig

console = Console()
err_console = Console(stderr=True)

#: every option that chooses the attack: ``--all`` replaces them by the grid
_ATTACK_OPTIONS = ("method", "norm", "eps", "steps", "step_size", "targeted", "momentum", "random_start")


class Method(StrEnum):
    fgsm = "fgsm"
    pgd = "pgd"


class Norm(StrEnum):
    linf = "linf"
    l2 = "l2"


def _bad(ctx: typer.Context, hint: str, message: str) -> typer.BadParameter:
    return typer.BadParameter(message, ctx=ctx, param_hint=hint)


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether option ``name`` was set (on the command line or otherwise), not left at its
    default. By the source's name: typer may vendor its own click, with its own enum."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def _config_hint(message: str) -> str:
    """The option a :class:`~mextract.deception.DeceptionConfig` error names (``eps: ...``)."""
    field = message.split(":", 1)[0].strip()
    return f"'--{field.replace('_', '-')}'" if field in _ATTACK_OPTIONS else "'--eps'"


def _read(ctx: typer.Context, hint: str, path: Path) -> dict[str, Any]:
    from mextract.models import read_meta

    try:
        return read_meta(path)
    except MextractError as exc:
        raise _bad(ctx, hint, str(exc)) from None


def _build_configs(
    ctx: typer.Context,
    input_shape: tuple[int, ...],
    value_range: ValueRange,
    *,
    grid: bool,
    method: Method,
    norm: Norm,
    eps: float | None,
    steps: int | None,
    step_size: float | None,
    targeted: bool,
    momentum: float,
    random_start: bool | None,
) -> list[DeceptionConfig]:
    from mextract.deception import DeceptionConfig, config_grid, default_config

    if grid:
        given = [name for name in _ATTACK_OPTIONS if _given(ctx, name)]
        if given:
            names = ", ".join(f"--{n.replace('_', '-')}" for n in given)
            raise _bad(ctx, "'--all'", f"--all runs the grid at the papers' settings; drop {names}")
        return config_grid(input_shape, value_range)
    base = default_config(input_shape, value_range, norm=norm.value)
    try:
        if method is Method.fgsm:
            config = DeceptionConfig(
                method="fgsm",
                norm=norm.value,
                eps=base.eps if eps is None else eps,
                steps=steps,
                step_size=step_size,
                targeted=targeted,
                momentum=momentum,
                random_start=random_start,
            )
        else:
            # the paper's step size belongs to the paper's radius and steps; otherwise 2.5·eps/steps
            keep = eps is None and steps is None and step_size is None
            config = DeceptionConfig(
                method="pgd",
                norm=norm.value,
                eps=base.eps if eps is None else eps,
                steps=base.steps if steps is None else steps,
                step_size=base.step_size if keep else step_size,
                targeted=targeted,
                momentum=momentum,
                random_start=random_start,
            )
    except InputError as exc:
        raise _bad(ctx, _config_hint(str(exc)), str(exc)) from None
    return [config]


def _pct(v: float) -> str:
    return "—" if math.isnan(v) else f"{100 * v:.1f}%"


def deceive(
    ctx: typer.Context,
    victim: Annotated[
        Path, typer.Argument(exists=True, file_okay=False, help="The victim's checkpoint folder.")
    ],
    substitute: Annotated[
        Path,
        typer.Argument(exists=True, file_okay=False, help="The substitute's checkpoint folder (the source)."),
    ],
    reference: Annotated[
        list[Path] | None,
        typer.Option(
            "--reference",
            metavar="CKPT",
            exists=True,
            file_okay=False,
            help="Another source model's checkpoint, for comparison (repeatable).",
        ),
    ] = None,
    method: Annotated[Method, typer.Option(help="'pgd' (iterative) or 'fgsm' (one step).")] = Method.pgd,
    norm: Annotated[Norm, typer.Option(help="The ball of the perturbation: 'linf' or 'l2'.")] = Norm.linf,
    eps: Annotated[
        float | None,
        typer.Option(help="Radius, in the inputs' units (default: the papers' for the victim's inputs)."),
    ] = None,
    steps: Annotated[
        int | None, typer.Option(help="PGD iterations (default: 40 grayscale, 20 colour; FGSM: 1).")
    ] = None,
    step_size: Annotated[
        float | None,
        typer.Option(help="Step size (default: the paper's, else 2.5*eps/steps; FGSM: eps)."),
    ] = None,
    targeted: Annotated[
        bool, typer.Option("--targeted", help="Aim at a random class other than the true one.")
    ] = False,
    momentum: Annotated[float, typer.Option(help="MI-FGSM momentum (Dong et al. 2018); 0: none.")] = 0.0,
    random_start: Annotated[
        bool | None,
        typer.Option(
            "--random-start/--no-random-start",
            help="Start from a random point of the ball (default: yes for PGD, no for FGSM).",
        ),
    ] = None,
    samples: Annotated[
        int, typer.Option(min=1, help="Test samples drawn (seeded) from the test split.")
    ] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the sample draw, random starts and targets.")] = 0,
    grid: Annotated[
        bool,
        typer.Option("--all", help="Run the grid: FGSM/PGD × L∞/L2 × untargeted/targeted × momentum 0/0.9."),
    ] = False,
    device: Annotated[
        str, typer.Option(help="'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N'.")
    ] = "auto",
    threads: Annotated[
        int | None,
        typer.Option(min=1, help="Torch CPU threads (default: $OMP_NUM_THREADS, else one per core)."),
    ] = None,
) -> None:
    """Model deception: craft adversarial examples on the substitute (white-box) and report
    how often they fool the victim, on the test samples the victim classifies correctly."""
    from mextract._utils import resolve_device
    from mextract.cli.runtime import configure_runtime
    from mextract.data import ValueRange, dataset_info

    meta = _read(ctx, "'VICTIM'", victim)
    dataset = meta.get("dataset")
    if dataset is None or dataset == "files":
        raise _bad(
            ctx,
            "'VICTIM'",
            f"{victim}: expected a victim trained on a named dataset (its checkpoint names "
            f"{'none' if dataset is None else 'files'}); deceive attacks that dataset's test split",
        )
    try:
        dataset_info(dataset)
    except MextractError as exc:
        raise _bad(ctx, "'VICTIM'", str(exc)) from None
    shape = tuple(int(s) for s in meta["input_shape"])
    k = int(meta["num_classes"])
    sources: list[tuple[str, str, Path]] = [("substitute", "'SUBSTITUTE'", substitute)]
    sources += [(f"reference {i + 1}", "'--reference'", p) for i, p in enumerate(reference or [])]
    metas = []
    for _, hint, path in sources:
        m = _read(ctx, hint, path)
        if tuple(int(s) for s in m["input_shape"]) != shape or int(m["num_classes"]) != k:
            raise _bad(
                ctx,
                hint,
                f"{path}: expected a model of the victim's inputs {shape} and {k} classes, "
                f"got {tuple(m['input_shape'])} and {m['num_classes']}",
            )
        metas.append(m)
    value_range = ValueRange.from_json(meta.get("value_range"), shape)
    configs = _build_configs(
        ctx, shape, value_range, grid=grid, method=method, norm=norm, eps=eps, steps=steps,
        step_size=step_size, targeted=targeted, momentum=momentum, random_start=random_start,
    )  # fmt: skip
    try:
        dev = resolve_device(device)
    except MextractError as exc:
        raise _bad(ctx, "'--device'", str(exc)) from None
    try:
        console.print(configure_runtime(device, threads), style="dim", markup=False)
    except MextractError as exc:
        raise _bad(ctx, "'--threads'", str(exc)) from None
    try:
        _run(victim, meta, sources, metas, configs, value_range, samples, seed, dev)
    except MextractError as exc:  # found during the work: one line, exit status 2
        err_console.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from None


def _run(
    victim_path: Path,
    meta: dict[str, Any],
    sources: list[tuple[str, str, Path]],
    metas: list[dict[str, Any]],
    configs: list[DeceptionConfig],
    value_range: ValueRange,
    samples: int,
    seed: int,
    device: torch.device,
) -> None:
    from mextract.data import load_splits
    from mextract.deception import transfer_table
    from mextract.metrics import agreement, predict_labels
    from mextract.models import load_checkpoint, split_seed_of

    split_seed = split_seed_of(meta)
    splits = load_splits(meta["dataset"], seed=split_seed, root=meta.get("data_root"))
    test = splits.test
    if test.y is None:
        raise InputError(f"{meta['dataset']}: the test split has no labels")
    n = min(samples, len(test))
    idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    x, y = test.x[idx], test.y[idx]
    value_range.check(x, f"{meta['dataset']} test split", hint=" (the victim's declared range)")
    net, _ = load_checkpoint(victim_path)
    net = net.to(device)
    clean = predict_labels(net, x)
    models: dict[str, torch.nn.Module] = {}
    info: dict[str, tuple[str, str, float]] = {}
    for (role, _, path), m in zip(sources, metas, strict=True):
        model, _ = load_checkpoint(path)
        model = model.to(device)
        models[role] = model
        info[role] = (path.name, str(m["architecture"]), agreement(predict_labels(model, x), clean))
    with console.status(f"crafting {len(configs)} attack(s) on {len(models)} source(s) ..."):
        rows = transfer_table(models, net, x, y, configs, value_range=value_range, seed=seed)
    acc = agreement(clean, y)
    console.print(
        f"victim: {meta['architecture']} on {meta['dataset']}, accuracy {_pct(acc)} on {n} test samples; "
        f"attacks evaluated on the {int((clean == y).sum())} it classifies correctly",
        markup=False,
    )
    for role, (name, arch, fid) in info.items():
        console.print(f"{role}: {name} ({arch}), fidelity {_pct(fid)} on these samples", markup=False)
    table = Table(title=f"model deception: transfer to the victim ({victim_path.name})")
    table.add_column("source")
    table.add_column("attack")
    table.add_column("evaluated", justify="right")
    table.add_column("victim fooled", justify="right")
    table.add_column("white-box", justify="right")
    for row in rows:
        table.add_row(row.source, row.config, f"{row.evaluated}", _pct(row.rate), _pct(row.white_box_rate))
    console.print(table)
    console.print(
        "victim fooled: label changed (untargeted) or equal to the target (targeted); "
        "white-box: the same on the source itself; fidelity: agreement with the victim's labels",
        style="dim",
        markup=False,
    )


#: ``mextract deceive`` on its own (a one-command app); the main app registers :func:`deceive`.
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
app.command("deceive")(deceive)
