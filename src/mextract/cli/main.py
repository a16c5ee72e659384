"""``mextract``: train victims, steal them, and report — from the command line."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from mextract.errors import MextractError

app = typer.Typer(
    name="mextract",
    help="A lab for model extraction (model stealing) attacks and the defences against them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()


def _mount_subcommands() -> None:
    from mextract.cli.direct import app as direct_app

    app.add_typer(direct_app, name="direct", help="Direct extraction: recover the parameters themselves.")


_mount_subcommands()
err_console = Console(stderr=True)

Seed = Annotated[int, typer.Option(help="Seed for every random choice of the run.")]
Device = Annotated[str, typer.Option(help="'auto' (CUDA when present), 'cpu' or 'cuda'.")]
Fresh = Annotated[bool, typer.Option("--fresh", help="Recompute instead of reusing records.")]
PgdEps = Annotated[
    float | None,
    typer.Option(help="Adversarially train the victim: L-inf PGD radius on [0, 1] inputs (MNIST: 0.3)."),
]
PgdSteps = Annotated[int, typer.Option(help="PGD steps (step size 2.5*eps/steps).")]


@app.callback()
def _setup(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log details.")] = False) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


def _results_table(records: list[Any], title: str) -> None:
    from mextract.experiments import results_rows
    from mextract.experiments.report import COLUMNS

    header, rows = results_rows(records)
    for line in header:
        console.print(line)
    table = Table(title=title)
    for c in COLUMNS:
        table.add_column(c, justify="left" if c in ("strategy", "answers") else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Run folder for checkpoints and records.")] = Path("runs/demo"),
    seed: Seed = 0,
    device: Device = "auto",
    fresh: Fresh = False,
) -> None:
    """Train a victim on bundled MNIST and steal it with the soft- and hard-label baselines."""
    from mextract.cli.progress import ProgressBars
    from mextract.experiments import demo as run_demo
    from mextract.experiments import markdown_table

    with ProgressBars(console) as bars:
        records = run_demo(out, seed=seed, device=device, callback=bars, resume=not fresh)
    _results_table(records, "model extraction on mnist")
    (out / "results.md").write_text(markdown_table(records))
    console.print(f"records, checkpoints and results.md are in {out}/")


@app.command("train-victim")
def train_victim(
    out: Annotated[Path, typer.Option(help="Run folder: the checkpoint goes to OUT/victim/.")],
    dataset: Annotated[str, typer.Option(help="A dataset name (see `mextract list`).")] = "mnist",
    model: Annotated[str | None, typer.Option(help="A zoo model; default depends on the data.")] = None,
    preset: Annotated[str, typer.Option(help="'fast' (CPU) or 'paper' (the sources' 50 epochs).")] = "fast",
    data_root: Annotated[Path | None, typer.Option(help="Data location (cifar10).")] = None,
    victim_data: Annotated[Path | None, typer.Option(help=".npz or image folder for training.")] = None,
    test_data: Annotated[Path | None, typer.Option(help=".npz or image folder for testing.")] = None,
    pgd_eps: PgdEps = None,
    pgd_steps: PgdSteps = 7,
    seed: Seed = 0,
    device: Device = "auto",
    fresh: Fresh = False,
) -> None:
    """Stage 0: train a victim with the sources' recipe and save its checkpoint."""
    from mextract.cli.progress import ProgressBars
    from mextract.experiments import train_victim_run

    with ProgressBars(console) as bars:
        record = train_victim_run(out, dataset=dataset, model=model, preset=preset, seed=seed,
                                  data_root=data_root, victim_data=victim_data, test_data=test_data,
                                  device=device, callback=bars, resume=not fresh,
                                  adversarial=_pgd(pgd_eps, pgd_steps))  # fmt: skip
    console.print(
        f"victim {record.name}: test accuracy {100 * record.metrics['test_accuracy']:.2f}% "
        f"-> {out / 'victim'}"
    )


def _pgd(eps: float | None, steps: int) -> Any:
    from mextract.defences.adversarial import PGDConfig

    return None if eps is None else PGDConfig.for_eps(eps, steps)


def _parse_options(options: list[str]) -> dict[str, Any]:
    parsed: dict[str, Any] = {}
    for item in options:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise MextractError(f"--option: expected KEY=VALUE, got {item!r}")
        try:
            parsed[key] = json.loads(value)
        except json.JSONDecodeError:
            parsed[key] = value
    return parsed


@app.command()
def attack(
    victim: Annotated[Path, typer.Argument(help="A victim checkpoint folder (from train-victim).")],
    attack: Annotated[str, typer.Option("--attack", "-a", help="Attack name (see `mextract list`).")] = "kd",
    budget: Annotated[int, typer.Option(help="Most queries the attack may spend.")] = 1000,
    mode: Annotated[str, typer.Option(help="Answer mode: logits, probs, topk, rounded, label.")] = "probs",
    k: Annotated[int | None, typer.Option(help="Classes revealed in mode topk.")] = None,
    decimals: Annotated[int | None, typer.Option(help="Decimals kept in mode rounded.")] = None,
    precision: Annotated[
        str, typer.Option(help="Oracle precision: float32, or float64 for exact (direct) extraction.")
    ] = "float32",
    substitute: Annotated[str | None, typer.Option(help="Substitute architecture.")] = None,
    pool_data: Annotated[Path | None, typer.Option(help="Attacker pool: .npz or image folder.")] = None,
    pool_dataset: Annotated[
        str | None, typer.Option(help="Out-of-domain pool: a dataset name or natural_patches.")
    ] = None,
    test_data: Annotated[Path | None, typer.Option(help="Test set: .npz or image folder.")] = None,
    data_root: Annotated[Path | None, typer.Option(help="Data location (cifar10).")] = None,
    option: Annotated[list[str] | None, typer.Option(help="Attack option KEY=VALUE (repeatable).")] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder for the record and substitute.")] = None,
    record: Annotated[Path | None, typer.Option(help="Also write the JSON record here.")] = None,
    seed: Seed = 0,
    device: Device = "auto",
    fresh: Fresh = False,
) -> None:
    """Steal a saved victim through its oracle and report accuracy, fidelity and queries."""
    from mextract.cli.progress import ProgressBars
    from mextract.experiments import attack_run

    with ProgressBars(console) as bars:
        rec = attack_run(
            victim,
            attack=attack,
            budget=budget,
            mode=mode,
            k=k,
            decimals=decimals,
            precision=precision,
            substitute=substitute,
            seed=seed,
            pool_data=pool_data,
            pool_dataset=pool_dataset,
            test_data=test_data,
            data_root=data_root,
            attack_options=_parse_options(option or []),
            out=out,
            device=device,
            callback=bars,
            resume=not fresh,
        )
    _results_table([rec], f"{attack} against {victim}")
    if record is not None:
        rec.save(record)
        console.print(f"record written to {record}")


@app.command()
def matrix(
    out: Annotated[Path, typer.Option(help="Run folder for the victim and every cell's record.")] = Path(
        "runs/matrix"
    ),
    defence: Annotated[
        list[str] | None, typer.Option("--defence", "-d", help="Defence spec (repeatable), e.g. honey.")
    ] = None,
    attack: Annotated[
        list[str] | None, typer.Option("--attack", "-a", help="Attack spec (repeatable), e.g. kd.")
    ] = None,
    budget: Annotated[int, typer.Option(help="Queries per attack.")] = 2000,
    dataset: Annotated[str, typer.Option(help="Dataset of the victim.")] = "mnist",
    trigger: Annotated[
        int | None, typer.Option(help="Embed the 3x3 trigger watermark mapped to this class.")
    ] = None,
    detect: Annotated[bool, typer.Option("--detect", help="Put PRADA in front of every API.")] = False,
    stage3: Annotated[
        bool, typer.Option("--stage3", help="The sources' stage 3: honey labels, trigger, hard attacks.")
    ] = False,
    pgd_eps: PgdEps = None,
    pgd_steps: PgdSteps = 7,
    full: Annotated[
        bool, typer.Option("--full", help="Every API defence against every in-domain catalogue attack.")
    ] = False,
    seed: Seed = 0,
    device: Device = "auto",
    fresh: Fresh = False,
) -> None:
    """Attack x defence matrix: utility of each defence, and each attack against it."""
    from mextract.cli.progress import ProgressBars
    from mextract.experiments import (
        FULL_ATTACKS,
        FULL_DEFENCES,
        STAGE3_ATTACKS,
        STAGE3_DEFENCES,
        matrix_table,
        run_matrix,
    )

    if stage3 and full:
        raise MextractError("give --stage3 or --full, not both")
    if full:
        defence = defence or list(FULL_DEFENCES)
        attack = attack or list(FULL_ATTACKS)
    if stage3:
        defence = defence or ["none", *STAGE3_DEFENCES]
        attack = attack or list(STAGE3_ATTACKS)
        trigger = 0 if trigger is None else trigger
    if not defence or not attack:
        raise MextractError("give at least one --defence and one --attack (or --stage3, or --full)")
    with ProgressBars(console) as bars:
        records = run_matrix(out, defences=defence, attacks=attack, budget=budget, dataset=dataset, seed=seed,
                             trigger_target=trigger, adversarial=_pgd(pgd_eps, pgd_steps),
                             detect=detect, device=device, callback=bars,
                             resume=not fresh)  # fmt: skip
    table = matrix_table(records)
    (out / "matrix.md").write_text(table)
    typer.echo(table)
    console.print(f"records and matrix.md are in {out}/")


@app.command()
def report(
    run: Annotated[Path, typer.Argument(help="A run folder holding records.")],
    markdown: Annotated[bool, typer.Option(help="Print a Markdown table instead.")] = False,
) -> None:
    """Rebuild the results table of a run folder from its records alone."""
    from mextract.experiments import load_records, markdown_table

    records = load_records(run)
    if markdown:
        typer.echo(markdown_table(records))
    else:
        _results_table(records, str(run))


@app.command("list")
def list_names() -> None:
    """List datasets, models, attacks, defences, answer modes and victim presets."""
    from mextract.attacks import ATTACKS
    from mextract.data import DATASETS
    from mextract.defences.registry import DEFENCES
    from mextract.models import MODELS
    from mextract.oracle import AnswerMode
    from mextract.training import VICTIM_PRESETS

    table = Table(show_header=False)
    table.add_row("datasets", ", ".join(DATASETS))
    table.add_row("models", ", ".join(MODELS))
    table.add_row("attacks", ", ".join(ATTACKS))
    table.add_row("defences", ", ".join(DEFENCES) + " (stack with +)")
    table.add_row("answer modes", ", ".join(m.value for m in AnswerMode))
    table.add_row("victim presets", ", ".join(VICTIM_PRESETS))
    console.print(table)


def main() -> None:
    """Entry point: run the app, turning mextract's own errors into one clear line."""
    try:
        app(standalone_mode=False)
    except MextractError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(130)
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise
