"""``mextract``: train victims, steal them, and report — from the command line.

Every command checks its whole command line before any work: names (datasets, models,
attacks, defences, answer modes), options, JSON, paths and budgets. A bad value is a usage
error — the usage line, one message naming the option, exit status 2 — rendered by typer
itself, as are typer's own usage errors (unknown command or option, missing argument).
Errors found later (data that does not hold what it should) are one ``error:`` line and
exit status 2; never a traceback.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import warnings
from collections.abc import Callable, Iterator
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mextract.cli.runtime import configure_runtime
from mextract.errors import InputError, MextractError

app = typer.Typer(
    name="mextract",
    help="A lab for model extraction (model stealing) attacks and the defences against them.",
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)
T = TypeVar("T")


def _mount_subcommands() -> None:
    from mextract.cli.direct import app as direct_app

    app.add_typer(direct_app, name="direct", help="Direct extraction: recover the parameters themselves.")
    from mextract.cli.audit import audit
    from mextract.cli.deceive import deceive

    app.command("audit")(audit)
    app.command("deceive")(deceive)


_mount_subcommands()


class Precision(StrEnum):
    float32 = "float32"
    float64 = "float64"


class AlarmAction(StrEnum):
    log = "log"
    block = "block"
    degrade = "degrade"


#: Far above any budget in the sources (1,250,000 queries) or in the lab; a larger number is a typo.
MAX_BUDGET = 1_000_000_000

Seed = Annotated[int, typer.Option(help="Seed for every random choice of the run.")]
Device = Annotated[str, typer.Option(help="'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N'.")]
Threads = Annotated[
    int | None,
    typer.Option(min=1, help="Torch CPU threads (default: $OMP_NUM_THREADS, else one per core)."),
]
Fresh = Annotated[bool, typer.Option("--fresh", help="Recompute instead of reusing records.")]
PgdEps = Annotated[
    float | None,
    typer.Option(help="Adversarially train the victim: L-inf PGD radius on [0, 1] inputs (MNIST: 0.3)."),
]
PgdSteps = Annotated[int, typer.Option(min=1, help="PGD steps (step size 2.5*eps/steps).")]
Scale = Annotated[
    float | None,
    typer.Option(help="Divide the values of your files by this (e.g. 255 for float pixel values)."),
]
DataRoot = Annotated[
    Path | None, typer.Option(exists=True, help="Data location (cifar10), or $MEXTRACT_CIFAR10.")
]
#: a model file's flags, for what the file does not say (see docs/external-models.md)
InputShape = Annotated[
    str | None,
    typer.Option(help="With a model file: the shape of one input, e.g. 1,28,28 (where the file leaves "
                 "it open; checked where it does not)."),
]  # fmt: skip
NumClasses = Annotated[
    int | None, typer.Option("--classes", min=2, help="With a model file: its number of classes (checked).")
]
InputRange = Annotated[
    str | None,
    typer.Option(help="With a model file: the range of its input values LOW,HIGH (default: 0,1 for "
                 "images, -inf,inf for features); queries outside it are refused."),
]  # fmt: skip
Trust = Annotated[
    list[str] | None,
    typer.Option(help="With a .skops file: a type to trust beyond skops' defaults (repeatable); only "
                 "for files you trust, since loading them runs their code."),
]  # fmt: skip
#: the user's table (docs/tabular.md): a CSV or Parquet file, its class column and feature types
TableFile = Annotated[
    Path | None,
    typer.Option("--data", exists=True, dir_okay=False,
                 help="Your table (.csv, .tsv, .parquet) instead of --dataset; needs --target."),
]  # fmt: skip
TargetColumn = Annotated[str | None, typer.Option(help="With --data: the column holding the class.")]
Categorical = Annotated[
    list[str] | None,
    typer.Option(help="With --data: a numeric column to treat as categories (repeatable; text columns "
                 "are categorical anyway)."),
]  # fmt: skip
Ordinal = Annotated[
    list[str] | None, typer.Option(help="With --data: a column of ordered levels (repeatable).")
]
Drop = Annotated[
    list[str] | None, typer.Option(help="With --data: a column to leave out, e.g. an ID (repeatable).")
]
VICTIM_HELP = ("A victim checkpoint folder (from train-victim), or a model file: .onnx, .skops, XGBoost "
               ".json/.ubj, LightGBM .txt")  # fmt: skip


def _existing(help_text: str) -> Any:
    return typer.Option(exists=True, help=help_text)


@app.callback()
def _setup(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log details.")] = False) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


# --------------------------------------------------------------------------- checks


@contextlib.contextmanager
def _option(ctx: typer.Context, name: str) -> Iterator[None]:
    """Turn a mextract error raised while checking ``name`` into a usage error naming it."""
    try:
        yield
    except MextractError as exc:
        raise typer.BadParameter(str(exc), ctx=ctx, param_hint=f"'{name}'") from None


def _check(ctx: typer.Context, name: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    with _option(ctx, name):
        return fn(*args, **kwargs)


def _runtime(ctx: typer.Context, device: str, threads: int | None) -> None:
    """Check the device, set the threads, and say so (once, before the work)."""
    from mextract._utils import resolve_device

    _check(ctx, "--device", resolve_device, device)
    console.print(_check(ctx, "--threads", configure_runtime, device, threads), style="dim", markup=False)


def _table_dataset(
    ctx: typer.Context,
    dataset: str | None,
    data: Path | None,
    target: str | None,
    categorical: list[str] | None,
    ordinal: list[str] | None,
    drop: list[str] | None,
) -> str | None:
    """``--data FILE --target COL`` (and its feature flags) as a dataset spec, checked by
    reading the file; else ``dataset`` as given."""
    if data is None:
        for name, value in (("--target", target), ("--categorical", categorical), ("--ordinal", ordinal),
                            ("--drop", drop)):  # fmt: skip
            if value:
                raise typer.BadParameter("is for --data", ctx=ctx, param_hint=f"'{name}'")
        return dataset
    if dataset is not None:
        raise typer.BadParameter("give --dataset or --data, not both", ctx=ctx, param_hint="'--data'")
    if target is None:
        raise typer.BadParameter("needs --target COLUMN, the column holding the class", ctx=ctx,
                                 param_hint="'--data'")  # fmt: skip
    from mextract.data import dataset_info
    from mextract.data.tabular import table_spec

    spec = table_spec(data, target, categorical=categorical or (), ordinal=ordinal or (), drop=drop or ())
    _check(ctx, "--data", dataset_info, spec)  # reads the file, once for the whole command
    return spec


def _plan_runtime(
    ctx: typer.Context, device: str, threads: int | None, jobs: int, backend: str, address: str | None
) -> int:
    """Check where a plan's cells run, set this process's runtime, say where they run, and
    return the torch threads per cell (this process's with one job, else ``--threads`` or 1)."""
    from mextract.cli.audit import check_backend

    check_backend(ctx, backend, address)
    _runtime(ctx, device, threads)
    if jobs > 1 or backend == "ray":
        where = "Ray tasks" if backend == "ray" else f"{jobs} worker processes"
        console.print(f"cells run as {where}, {threads or 1} torch thread(s) each", style="dim", markup=False)
    import torch

    return torch.get_num_threads() if jobs == 1 else threads or 1


def _check_out(ctx: typer.Context, name: str, path: Path | None) -> None:
    if path is not None and path.exists() and not path.is_dir():
        raise typer.BadParameter(f"{path} is a file; expected a run folder", ctx=ctx, param_hint=f"'{name}'")


def _check_model(ctx: typer.Context, name: str, model: str | None, shape: Any, classes: int) -> None:
    if model is None:
        return
    from mextract.models import check_model_name, create_model

    _check(ctx, name, check_model_name, model)
    _check(ctx, name, create_model, model, shape, classes)  # does it take this input shape?


def _check_pgd(ctx: typer.Context, eps: float | None, steps: int) -> Any:
    from mextract.defences.adversarial import PGDConfig

    if eps is None:
        return None
    return _check(ctx, "--pgd-eps", PGDConfig.for_eps, eps, steps)


def _check_scale(ctx: typer.Context, scale: float | None) -> None:
    if scale is not None and not 0 < scale < float("inf"):
        raise typer.BadParameter(f"expected a positive number, got {scale}", ctx=ctx, param_hint="'--scale'")


def _check_budget(ctx: typer.Context, budget: int) -> None:
    if not 1 <= budget <= MAX_BUDGET:
        raise typer.BadParameter(
            f"expected a number of queries from 1 to {MAX_BUDGET:,}, got {budget:,}", ctx=ctx,
            param_hint="'--budget'",
        )  # fmt: skip


def _parse_options(options: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; values are JSON where they parse as JSON, else strings."""
    parsed: dict[str, Any] = {}
    for item in options:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"expected KEY=VALUE, got {item!r}")
        try:
            parsed[key] = json.loads(value)
        except json.JSONDecodeError:
            parsed[key] = value
    return parsed


def _results_table(records: list[Any], title: str) -> None:
    from mextract.experiments import results_rows
    from mextract.experiments.report import COLUMNS

    header, rows = results_rows(records)
    for line in header:
        console.print(line, markup=False)
    table = Table(title=title)
    for c in COLUMNS:
        table.add_column(c, justify="left" if c in ("strategy", "answers") else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)


# --------------------------------------------------------------------------- commands


@app.command()
def demo(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="Run folder for checkpoints and records.")] = Path("runs/demo"),
    seed: Seed = 0,
    device: Device = "auto",
    threads: Threads = None,
    fresh: Fresh = False,
) -> None:
    """Train a victim on bundled MNIST and steal it with the soft- and hard-label baselines."""
    _check_out(ctx, "--out", out)
    _runtime(ctx, device, threads)
    from mextract.cli.progress import ProgressBars
    from mextract.experiments import demo as run_demo
    from mextract.experiments import markdown_table

    with ProgressBars(console) as bars:
        records = run_demo(out, seed=seed, device=device, callback=bars, resume=not fresh)
    _results_table(records, "model extraction on mnist")
    (out / "results.md").write_text(markdown_table(records))
    console.print(f"records, checkpoints and results.md are in {out}/", markup=False)


@app.command("train-victim")
def train_victim(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="Run folder: the checkpoint goes to OUT/victim/.")],
    dataset: Annotated[
        str | None, typer.Option(help="A dataset name (see `mextract list`); default mnist.")
    ] = None,
    data: TableFile = None,
    target: TargetColumn = None,
    categorical: Categorical = None,
    ordinal: Ordinal = None,
    drop: Drop = None,
    model: Annotated[str | None, typer.Option(help="A zoo model; default depends on the data.")] = None,
    preset: Annotated[str, typer.Option(help="'fast' (CPU) or 'paper' (the sources' 50 epochs).")] = "fast",
    data_root: DataRoot = None,
    victim_data: Annotated[Path | None, _existing(".npz or image folder for training.")] = None,
    test_data: Annotated[Path | None, _existing(".npz or image folder for testing.")] = None,
    scale: Scale = None,
    pgd_eps: PgdEps = None,
    pgd_steps: PgdSteps = 7,
    seed: Seed = 0,
    device: Device = "auto",
    threads: Threads = None,
    fresh: Fresh = False,
) -> None:
    """Stage 0: train a victim with the sources' recipe and save its checkpoint."""
    from mextract.data import dataset_info
    from mextract.training import victim_recipe

    _check_out(ctx, "--out", out)
    dataset = _table_dataset(ctx, dataset, data, target, categorical, ordinal, drop) or "mnist"
    info = _check(ctx, "--dataset", dataset_info, dataset, data_root)
    _check_model(ctx, "--model", model, info.input_shape, info.num_classes)
    _check(ctx, "--preset", victim_recipe, preset)
    _check_scale(ctx, scale)
    adversarial = _check_pgd(ctx, pgd_eps, pgd_steps)
    _runtime(ctx, device, threads)
    from mextract.cli.progress import ProgressBars
    from mextract.experiments import train_victim_run

    with ProgressBars(console) as bars:
        record = train_victim_run(out, dataset=dataset, model=model, preset=preset, seed=seed,
                                  data_root=data_root, victim_data=victim_data, test_data=test_data,
                                  scale=scale, device=device, callback=bars, resume=not fresh,
                                  adversarial=adversarial)  # fmt: skip
    console.print(
        f"victim {record.name}: test accuracy {100 * record.metrics['test_accuracy']:.2f}% "
        f"-> {out / 'victim'}",
        markup=False,
    )


@app.command()
def attack(
    ctx: typer.Context,
    victim: Annotated[Path | None, typer.Argument(help=f"{VICTIM_HELP}; or give --url.")] = None,
    url: Annotated[
        str | None,
        typer.Option(help="Attack a prediction API instead: http://HOST:PORT/v2/models/NAME (Open Inference "
                     "Protocol: mextract serve, Triton, KServe, MLServer)."),
    ] = None,
    client_id: Annotated[
        str | None, typer.Option(help="With --url: the X-Client-Id to send (default: mextract-attacker).")
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(envvar="MEXTRACT_API_KEY", show_envvar=True,
                     help="With --url: the account's API key (servers with accounts)."),
    ] = None,
    evaluator_key: Annotated[
        str | None,
        typer.Option(envvar="MEXTRACT_EVALUATOR_KEY", show_envvar=True,
                     help="With --api-key: a second account's key, for scoring."),
    ] = None,
    dataset: Annotated[
        str | None,
        typer.Option(help="With --url or a model file: pool and test set from the lab's split of this "
                     "dataset."),
    ] = None,
    data: TableFile = None,
    target: TargetColumn = None,
    categorical: Categorical = None,
    ordinal: Ordinal = None,
    drop: Drop = None,
    split_seed: Annotated[int, typer.Option(help="With --dataset: the split's seed.")] = 0,
    attack: Annotated[str, typer.Option("--attack", "-a", help="Attack name (see `mextract list`).")] = "kd",
    budget: Annotated[int, typer.Option(help="Most queries the attack may spend.")] = 1000,
    mode: Annotated[
        str | None,
        typer.Option(help="Answer mode: logits, probs (default), topk, rounded, label, leaf (a tree .skops "
                     "file). With --url: what the API answers, if it does not say."),
    ] = None,
    k: Annotated[int | None, typer.Option(min=1, help="Classes revealed in mode topk.")] = None,
    decimals: Annotated[int | None, typer.Option(min=0, help="Decimals kept in mode rounded.")] = None,
    precision: Annotated[
        Precision, typer.Option(help="Oracle precision: float32, or float64 for exact (direct) extraction.")
    ] = Precision.float32,
    substitute: Annotated[str | None, typer.Option(help="Substitute architecture.")] = None,
    pool_data: Annotated[Path | None, _existing("Attacker pool: .npz or image folder.")] = None,
    pool_dataset: Annotated[
        str | None, typer.Option(help="Out-of-domain pool: a dataset name, natural_patches or font_glyphs.")
    ] = None,
    test_data: Annotated[Path | None, _existing("Test set: .npz or image folder.")] = None,
    data_root: DataRoot = None,
    scale: Scale = None,
    option: Annotated[list[str] | None, typer.Option(help="Attack option KEY=VALUE (repeatable).")] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder for the record and substitute.")] = None,
    record: Annotated[Path | None, typer.Option(help="Also write the JSON record here.")] = None,
    seed: Seed = 0,
    device: Device = "auto",
    threads: Threads = None,
    fresh: Fresh = False,
    input_shape: InputShape = None,
    classes: NumClasses = None,
    value_range: InputRange = None,
    trust: Trust = None,
    missing: Annotated[
        str | None,
        typer.Option(help="With a decision tree .skops file: 'stop' takes incomplete queries (a missing "
                     "feature stops the path at its node, as BigML does)."),
    ] = None,
) -> None:
    """Steal a saved victim or model file, or a prediction API at --url, and report accuracy, fidelity
    and queries."""
    from mextract.attacks import ATTACKS, create_attack
    from mextract.errors import UnknownNameError

    if (victim is None) == (url is None):
        raise typer.BadParameter("give a victim checkpoint folder or model file, or --url, exactly one",
                                 ctx=ctx, param_hint="'victim'/'--url'")  # fmt: skip
    if attack not in ATTACKS:
        raise typer.BadParameter(str(UnknownNameError("attack", attack, list(ATTACKS))), ctx=ctx,
                                 param_hint="'--attack'")  # fmt: skip
    options = _check(ctx, "--option", _parse_options, option or [])
    atk = _check(ctx, "--option", create_attack, attack, **dict(options))
    _check_budget(ctx, budget)
    from mextract.models import is_model_file

    is_file = victim is not None and is_model_file(victim)
    if missing is not None and (not is_file or missing != "stop"):
        raise typer.BadParameter("expected 'stop', with a decision tree model file (.skops)", ctx=ctx,
                                 param_hint="'--missing'")  # fmt: skip
    dataset = _table_dataset(ctx, dataset, data, target, categorical, ordinal, drop)
    if not is_file:
        _no_file_flags(ctx, input_shape, classes, value_range, trust)
    if victim is not None:
        for name, value in (("--client-id", client_id), ("--api-key", api_key)):
            if value is not None:
                raise typer.BadParameter("is for --url", ctx=ctx, param_hint=f"'{name}'")
    if victim is not None and is_file:
        model = _file_model(ctx, victim, input_shape, classes, value_range, trust)
        api = _file_api(ctx, model, mode, k, decimals, precision)
        has_data = dataset is not None
        if dataset is not None:
            _check_dataset(ctx, dataset, data_root, api, victim.name)
            api = _with_schema(ctx, api, dataset, split_seed, data_root)
    elif victim is not None:
        if dataset is not None:
            raise typer.BadParameter("is for --url or a model file (a checkpoint brings its own data)",
                                     ctx=ctx, param_hint="'--dataset'")  # fmt: skip
        api, has_data = _checkpoint_api(ctx, victim, mode, k, decimals, precision)
    else:
        assert url is not None
        if precision is not Precision.float32:
            raise typer.BadParameter("is the API's: it answers in its own precision", ctx=ctx,
                                     param_hint="'--precision'")  # fmt: skip
        from mextract.experiments.runner import DEFAULT_ATTACKER

        client_id = client_id or DEFAULT_ATTACKER
        if api_key is not None and evaluator_key is None:
            raise typer.BadParameter("with --api-key, give --evaluator-key too (a second account), so that "
                                     "scoring spends none of the thief's budget", ctx=ctx,
                                     param_hint="'--evaluator-key'")  # fmt: skip
        api, left = _url_api(ctx, url, client_id, api_key, mode, k, decimals)
        if left is not None and budget > left:
            who = "this account" if api_key else f"client {client_id!r}"
            raise typer.BadParameter(f"{url} will answer {who} "
                                     f"{left:,} more queries, not {budget:,}", ctx=ctx,
                                     param_hint="'--budget'")  # fmt: skip
        has_data = dataset is not None
        if dataset is not None:
            _check_dataset(ctx, dataset, data_root, api, "the API")
    _check_model(ctx, "--substitute", substitute, api.input_shape, api.num_classes)
    _check(ctx, "--option" if options else "--mode", atk.check_api, api, None, budget)
    if pool_data is not None and pool_dataset is not None:
        raise typer.BadParameter("give --pool-data or --pool-dataset, not both", ctx=ctx,
                                 param_hint="'--pool-dataset'")  # fmt: skip
    if pool_dataset is not None:
        from mextract.data.transfer import check_pool

        _check(ctx, "--pool-dataset", check_pool, pool_dataset, api.input_shape, data_root)
    if not has_data and ((pool_data is None and pool_dataset is None) or test_data is None):
        where = "--dataset, or " if url is not None or is_file else ""
        who = "this API" if url else "this model file" if is_file else "this victim was trained on files"
        raise typer.BadParameter(
            f"{who}: give {where}an attacker pool (--pool-data or --pool-dataset) and --test-data", ctx=ctx,
            param_hint="'--url'" if url else "'victim'",
        )  # fmt: skip
    _check_scale(ctx, scale)
    _check_out(ctx, "--out", out)
    if record is not None and record.is_dir():
        raise typer.BadParameter(f"{record} is a folder; expected a file name", ctx=ctx,
                                 param_hint="'--record'")  # fmt: skip
    _runtime(ctx, device, threads)
    from mextract.cli.progress import ProgressBars
    from mextract.experiments import attack_run

    with ProgressBars(console) as bars:
        rec = attack_run(
            victim,
            url=url,
            client_id=client_id,
            api_key=api_key,
            evaluator_key=evaluator_key,
            dataset=dataset,
            split_seed=split_seed,
            attack=attack,
            budget=budget,
            mode=mode if url is not None else (mode or "probs"),
            input_shape=input_shape if is_file else None,
            num_classes=classes if is_file else None,
            value_range=value_range if is_file else None,
            trusted=trust if is_file else None,
            missing=missing,
            k=k,
            decimals=decimals,
            precision=precision.value,
            substitute=substitute,
            seed=seed,
            pool_data=pool_data,
            pool_dataset=pool_dataset,
            test_data=test_data,
            data_root=data_root,
            scale=scale,
            attack_options=options,
            out=out,
            device=device,
            callback=bars,
            resume=not fresh,
        )
    _results_table([rec], f"{attack} against {victim or url}")
    if record is not None:
        rec.save(record)
        console.print(f"record written to {record}", markup=False)


def _answer_mode(ctx: typer.Context, mode: str, k: int | None, decimals: int | None) -> Any:
    from mextract.oracle import AnswerMode

    answer_mode = _check(ctx, "--mode", AnswerMode.parse, mode)
    if k is not None and answer_mode is not AnswerMode.TOPK:
        raise typer.BadParameter(f"k is for --mode topk, not {mode!r}", ctx=ctx, param_hint="'--k'")
    if answer_mode is AnswerMode.TOPK and k is None:
        raise typer.BadParameter("--mode topk needs --k", ctx=ctx, param_hint="'--k'")
    if decimals is not None and answer_mode is not AnswerMode.ROUNDED:
        raise typer.BadParameter(f"decimals are for --mode rounded, not {mode!r}", ctx=ctx,
                                 param_hint="'--decimals'")  # fmt: skip
    if answer_mode is AnswerMode.ROUNDED and decimals is None:
        raise typer.BadParameter("--mode rounded needs --decimals", ctx=ctx, param_hint="'--decimals'")
    return answer_mode


def _no_file_flags(
    ctx: typer.Context, input_shape: str | None, classes: int | None, value_range: str | None,
    trust: list[str] | None,
) -> None:
    """Refuse a model file's flags for a checkpoint folder or a url."""
    flags = (("--input-shape", input_shape), ("--classes", classes), ("--value-range", value_range),
             ("--trust", trust or None))  # fmt: skip
    for name, value in flags:
        if value is not None:
            raise typer.BadParameter("is for a model file (.onnx, .skops, .json, .ubj, .txt)", ctx=ctx,
                                     param_hint=f"'{name}'")  # fmt: skip


def _file_model(
    ctx: typer.Context,
    victim: Path,
    input_shape: str | None,
    classes: int | None,
    value_range: str | None,
    trust: list[str] | None,
) -> Any:
    """Load a model file (the check of its format, contents and of the flags that describe it)."""
    from mextract.errors import InputError
    from mextract.models import load_external
    from mextract.models.external import parse_shape, parse_value_range

    shape = None if input_shape is None else _check(ctx, "--input-shape", parse_shape, input_shape)
    declared = None if value_range is None else _check(ctx, "--value-range", parse_value_range, value_range)
    try:
        return load_external(victim, input_shape=shape, num_classes=classes, value_range=declared,
                             trusted=trust)  # fmt: skip
    except InputError as exc:  # the file contradicts a flag, or needs one
        hint = "'--trust'" if "skops" in str(exc) else "'victim'/'--input-shape'/'--classes'"
        raise typer.BadParameter(str(exc), ctx=ctx, param_hint=hint) from None
    except MextractError as exc:
        raise typer.BadParameter(str(exc), ctx=ctx, param_hint="'victim'") from None


def _file_api(
    ctx: typer.Context, model: Any, mode: str | None, k: int | None, decimals: int | None,
    precision: Precision,
) -> Any:
    """The public description of the API a model file would be served behind."""
    import torch

    from mextract.oracle import APIDescription

    answer_mode = _answer_mode(ctx, mode or "probs", k, decimals)
    if k is not None and k >= model.num_classes:
        raise typer.BadParameter(f"expected fewer than the model's {model.num_classes} classes, got {k}",
                                 ctx=ctx, param_hint="'--k'")  # fmt: skip
    dtype = torch.float64 if precision is Precision.float64 else torch.float32
    return APIDescription(model.input_shape, model.num_classes, mode=answer_mode, k=k, decimals=decimals,
                          value_range=model.value_range, dtype=dtype)  # fmt: skip


def _with_schema(ctx: typer.Context, api: Any, dataset: str, split_seed: int, data_root: Path | None) -> Any:
    """The description of a model file served on a tabular split: with the split's fields."""
    import dataclasses

    from mextract.data import load_splits

    if len(api.input_shape) != 1:
        return api
    schema = _check(ctx, "--dataset", load_splits, dataset, seed=split_seed, root=data_root).schema
    return api if schema is None else dataclasses.replace(api, features=schema)


def _check_dataset(ctx: typer.Context, dataset: str, data_root: Path | None, api: Any, who: str) -> None:
    """A named dataset's inputs and classes must be the victim's (``who``: "the API", a file)."""
    from mextract.data import dataset_info

    info = _check(ctx, "--dataset", dataset_info, dataset, data_root)
    if tuple(info.input_shape) != tuple(api.input_shape):
        raise typer.BadParameter(f"{dataset} has inputs of shape {info.input_shape}; {who} takes "
                                 f"{tuple(api.input_shape)}", ctx=ctx, param_hint="'--dataset'")  # fmt: skip
    if info.num_classes != api.num_classes:
        raise typer.BadParameter(f"{dataset} has {info.num_classes} classes; {who} answers {api.num_classes}",
                                 ctx=ctx, param_hint="'--dataset'")  # fmt: skip
    lo, hi, vr = info.value_range.low, info.value_range.high, api.value_range
    below = vr.low is not None and (lo is None or lo < vr.low)
    if below or (vr.high is not None and (hi is None or hi > vr.high)):
        raise typer.BadParameter(f"{dataset} has values in {info.value_range}; {who} takes {vr} "
                                 "(--value-range)", ctx=ctx, param_hint="'--dataset'")  # fmt: skip


def _checkpoint_api(
    ctx: typer.Context,
    victim: Path,
    mode: str | None,
    k: int | None,
    decimals: int | None,
    precision: Precision,
) -> tuple[Any, bool]:
    """The public description of the API a checkpoint would be served behind, and whether
    the checkpoint brings its own data (a dataset name)."""
    import torch

    from mextract.data import ValueRange
    from mextract.models import read_meta, schema_of
    from mextract.oracle import APIDescription

    meta = _check(ctx, "victim", read_meta, victim)
    answer_mode = _answer_mode(ctx, mode or "probs", k, decimals)
    if k is not None and k >= meta["num_classes"]:
        raise typer.BadParameter(f"expected fewer than the victim's {meta['num_classes']} classes, got {k}",
                                 ctx=ctx, param_hint="'--k'")  # fmt: skip
    dtype = torch.float64 if precision is Precision.float64 else torch.float32
    api = APIDescription(meta["input_shape"], meta["num_classes"], mode=answer_mode, k=k, decimals=decimals,
                         value_range=ValueRange.from_json(meta["value_range"], meta["input_shape"]),
                         dtype=dtype, features=schema_of(meta))  # fmt: skip
    return api, meta.get("dataset") is not None


def _url_api(
    ctx: typer.Context,
    url: str,
    client_id: str | None,
    api_key: str | None,
    mode: str | None,
    k: int | None,
    decimals: int | None,
) -> tuple[Any, int | None]:
    """The API's public description, read from the endpoint (one metadata request), and how
    many queries it will still answer this client (``None``: it does not say)."""
    from mextract.oracle import RemoteOracle
    from mextract.server import check_client_id

    if client_id is not None:
        _check(ctx, "--client-id", check_client_id, client_id)
    if mode is not None:
        _answer_mode(ctx, mode, k, decimals)
    with _check(ctx, "--url", RemoteOracle, url, client_id=client_id, api_key=api_key, mode=mode, k=k,
                decimals=decimals, retries=1) as remote:  # fmt: skip
        return remote.description, remote.ledger.remaining


@app.command()
def serve(
    ctx: typer.Context,
    victim: Annotated[Path, typer.Argument(help=f"{VICTIM_HELP}.")],
    defence: Annotated[
        str, typer.Option("--defence", "-d", help="Defence spec, e.g. 'dawn+label_only' (`mextract list`).")
    ] = "none",
    mode: Annotated[
        str, typer.Option(help="Answer mode: logits, probs, topk, rounded, label, leaf (trees).")
    ] = "probs",
    k: Annotated[int | None, typer.Option(min=1, help="Classes revealed in mode topk.")] = None,
    decimals: Annotated[int | None, typer.Option(min=0, help="Decimals kept in mode rounded.")] = None,
    precision: Annotated[
        Precision, typer.Option(help="Answer precision: float32, or float64 (exact logits).")
    ] = Precision.float32,
    budget: Annotated[
        int | None, typer.Option(help="Queries each client id may have answered (default: no limit).")
    ] = None,
    detect: Annotated[bool, typer.Option("--detect", help="Watch every client with PRADA.")] = False,
    on_alarm: Annotated[
        AlarmAction, typer.Option(help="With --detect, what an alarm does: log, block the client, or "
                                  "degrade its answers to labels.")
    ] = AlarmAction.log,
    store: Annotated[
        Path | None,
        typer.Option(help="Accounts, query log and state in this SQLite file (`mextract keys`): every "
                     "client needs an API key, every answer is logged, state survives restarts."),
    ] = None,
    snapshot_every: Annotated[
        int, typer.Option(min=1, help="With --store: save an account's state every N requests.")
    ] = 100,
    pow: Annotated[
        bool,
        typer.Option("--pow", help="Calibrated proof of work: every request solves a puzzle priced on "
                     "its client's PATE privacy cost (trains the teachers at start)."),
    ] = False,
    name: Annotated[str, typer.Option(help="The model's name in the API's paths.")] = "victim",
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8000,
    max_body_mb: Annotated[float, typer.Option(min=0.001, help="Largest request body, in MiB.")] = 64.0,
    data_root: DataRoot = None,
    seed: Seed = 0,
    device: Device = "auto",
    threads: Threads = None,
    input_shape: InputShape = None,
    classes: NumClasses = None,
    value_range: InputRange = None,
    trust: Trust = None,
    dataset: Annotated[
        str | None,
        typer.Option(help="With a tabular model file: publish the record fields of this dataset's split."),
    ] = None,
    data: TableFile = None,
    target: TargetColumn = None,
    categorical: Categorical = None,
    ordinal: Ordinal = None,
    drop: Drop = None,
    split_seed: Annotated[int, typer.Option(help="With --dataset or --data: the split's seed.")] = 0,
    missing: Annotated[
        str | None,
        typer.Option(help="With a decision tree .skops file: 'stop' takes incomplete queries (NaN: a "
                     "missing feature stops the path at its node, as BigML does)."),
    ] = None,
) -> None:
    """Serve a victim (checkpoint or model file) as a prediction API (Open Inference Protocol REST:
    Triton's, KServe's)."""
    import signal
    import socket

    from mextract.defences.registry import check_defence_spec
    from mextract.models import is_model_file, read_meta

    _answer_mode(ctx, mode, k, decimals)
    dataset = _table_dataset(ctx, dataset, data, target, categorical, ordinal, drop)
    if not is_model_file(victim) and (dataset is not None or missing is not None):
        raise typer.BadParameter("is for a model file (a checkpoint publishes its own fields)", ctx=ctx,
                                 param_hint="'--dataset'/'--data'" if dataset is not None else "'--missing'")
    if missing is not None and missing != "stop":
        raise typer.BadParameter("expected 'stop'", ctx=ctx, param_hint="'--missing'")
    if is_model_file(victim):  # a model file: no owner's side (training data, architecture) for defences
        from mextract.defences.registry import build_defence
        from mextract.oracle import VictimOracle

        model = _file_model(ctx, victim, input_shape, classes, value_range, trust)
        if pow:
            raise typer.BadParameter("prices queries on the owner's training data, which a model file "
                                     "does not bring (serve a checkpoint)", ctx=ctx,
                                     param_hint="'--pow'")  # fmt: skip
        try:
            build_defence(defence, VictimOracle(model, mode="logits"), None)
        except MextractError as exc:
            note = "; a model file brings none (serve a checkpoint)" if "owner's side" in str(exc) else ""
            raise typer.BadParameter(f"{exc}{note}", ctx=ctx, param_hint="'--defence'") from None
        what = model.describe()
    else:
        _no_file_flags(ctx, input_shape, classes, value_range, trust)
        meta = _check(ctx, "victim", read_meta, victim)
        _check(ctx, "--defence", check_defence_spec, defence, tuple(meta["input_shape"]), meta["num_classes"],
               meta["architecture"], seed)  # fmt: skip
        what = meta["architecture"]
    if budget is not None:
        _check_budget(ctx, budget)
    if on_alarm is not AlarmAction.log and not detect:
        raise typer.BadParameter("needs --detect", ctx=ctx, param_hint="'--on-alarm'")
    if store is not None:
        if budget is not None:
            raise typer.BadParameter("with --store, budgets are the accounts' (mextract keys create "
                                     "--budget)", ctx=ctx, param_hint="'--budget'")  # fmt: skip
        accounts = _check(ctx, "--store", _store_accounts, store)
        if not accounts:
            raise typer.BadParameter(f"{store} has no accounts: create one with `mextract keys create "
                                     f"--store {store} NAME`", ctx=ctx, param_hint="'--store'")  # fmt: skip
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise typer.BadParameter(f"expected letters, digits, '-', '_' or '.', got {name!r}", ctx=ctx,
                                 param_hint="'--name'")  # fmt: skip
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        raise typer.BadParameter(f"cannot listen on {host}:{port} ({exc.strerror or exc})", ctx=ctx,
                                 param_hint="'--host'/'--port'") from None  # fmt: skip
    _runtime(ctx, device, threads)
    import uvicorn

    from mextract.experiments import served_api
    from mextract.server import create_app

    api = served_api(victim, defence=defence, mode=mode, k=k, decimals=decimals, precision=precision.value,
                     budget=budget, detect=detect, on_alarm=on_alarm.value, store=store,
                     snapshot_every=snapshot_every, pow=pow, name=name, seed=seed, data_root=data_root,
                     device=device, input_shape=input_shape, num_classes=classes, value_range=value_range,
                     trusted=trust, dataset=dataset, split_seed=split_seed, missing=missing)  # fmt: skip
    app_ = create_app(api, max_body_bytes=int(max_body_mb * 2**20))
    d = api.description
    answers = d.mode.value + (f" (k={d.k})" if d.k else "")
    answers += f" (decimals={d.decimals})" if d.decimals is not None else ""
    console.print(
        f"serving {what} as {name!r}: inputs {list(d.input_shape)} in {d.value_range}, "
        f"{d.num_classes} classes, answers {answers}, defence {defence}"
        + (f", {budget:,} queries per client" if budget else "")
        + (f", accounts and log in {store}" if store else "") + (", proof of work" if pow else ""),
        markup=False, soft_wrap=True,
    )  # fmt: skip
    console.print(f"  http://{host}:{port}/v2/models/{name}  (Ctrl-C stops)", markup=False)
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    # uvicorn stops cleanly on SIGTERM, then raises the signal again: make that an exit, not a kill,
    # so that the state is saved below (docker stop, systemd, Kubernetes send SIGTERM)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        uvicorn.run(app_, host=host, port=port, log_level="warning", access_log=False)
    finally:
        api.close()  # every client's state into the store


keys_app = typer.Typer(help="API keys of a served model's accounts (for `mextract serve --store`).",
                       no_args_is_help=True)  # fmt: skip
app.add_typer(keys_app, name="keys")
StoreOption = Annotated[Path, typer.Option(help="The SQLite store of `mextract serve --store`.")]


def _store_accounts(path: Path) -> list[Any]:
    from mextract.server.store import Store

    if not path.is_file():
        from mextract.errors import DataError

        raise DataError(f"{path} does not exist: create an account first (mextract keys create)")
    with Store(path) as st:
        return st.accounts()


@keys_app.command("create")
def keys_create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The account's name (letters, digits, - _ .).")],
    store: StoreOption,
    budget: Annotated[int | None, typer.Option(help="Queries the account may have answered.")] = None,
    rate: Annotated[float | None, typer.Option(help="Queries per second (a token bucket).")] = None,
    burst: Annotated[
        int | None, typer.Option(min=1, help="Most queries at once (default: a second's).")
    ] = None,
    admin: Annotated[bool, typer.Option("--admin", help="May read every account's usage.")] = False,
) -> None:
    """Create an account; its API key is printed once (only its hash is stored)."""
    from mextract.server.store import Store

    if budget is not None:
        _check_budget(ctx, budget)
    if burst is not None and rate is None:
        raise typer.BadParameter("needs --rate", ctx=ctx, param_hint="'--burst'")
    if rate is not None and not 0 < rate < float("inf"):
        raise typer.BadParameter(f"expected a positive number, got {rate}", ctx=ctx, param_hint="'--rate'")
    with _check(ctx, "--store", Store, store) as st:
        account, key = _check(ctx, "name", st.create_account, name, budget=budget, rate=rate, burst=burst,
                              admin=admin)  # fmt: skip
    limits = [f"budget {account.budget:,}" if account.budget else "no budget",
              f"{account.rate:g}/s (burst {account.burst})" if account.rate else "no rate limit"]  # fmt: skip
    err_console.print(f"account {name!r} ({', '.join(limits)}{', admin' if admin else ''}); "
                      "its key, shown only now:", markup=False)  # fmt: skip
    typer.echo(key)


@keys_app.command("list")
def keys_list(
    ctx: typer.Context,
    store: StoreOption,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """The admin view: every account's limits, queries spent and detector alarms."""
    from mextract.server.store import Store

    _check(ctx, "--store", _store_accounts, store)
    with Store(store) as st:
        rows = st.usage()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=str(store))
    for column in ("account", "key", "budget", "spent", "remaining", "rate", "status", "alarms"):
        table.add_column(column, justify="right" if column in ("budget", "spent", "remaining") else "left")
    for r in rows:
        status = ("admin, " if r["admin"] else "") + ("active" if r["active"] else "revoked")
        rate = f"{r['rate']:g}/s, burst {r['burst']}" if r["rate"] else "-"
        table.add_row(r["name"], r["key"], _count(r["budget"]), f"{r['spent']:,}", _count(r["remaining"]),
                      rate, status, "\n".join(r["alarms"]) or "-")  # fmt: skip
    console.print(table)


def _count(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


@keys_app.command("revoke")
def keys_revoke(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The account whose key to revoke.")],
    store: StoreOption,
) -> None:
    """Revoke an account's key: its requests are refused (403); its log stays."""
    from mextract.server.store import Store

    _check(ctx, "--store", _store_accounts, store)
    with Store(store) as st:
        _check(ctx, "name", st.revoke, name)
    console.print(f"revoked the key of account {name!r}", markup=False)


@app.command()
def matrix(
    ctx: typer.Context,
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
    threads: Threads = None,
    fresh: Fresh = False,
    jobs: Annotated[int, typer.Option(min=1, help="Cells run at once, in processes (one thread each).")] = 1,
    backend: Annotated[str, typer.Option(help="'local' or 'ray' (the [ray] extra).")] = "local",
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: local Ray).")] = None,
) -> None:
    """Attack x defence matrix: utility of each defence, and each attack against it."""
    from mextract.attacks.registry import check_attack_spec
    from mextract.data import dataset_info
    from mextract.defences.registry import check_defence_spec
    from mextract.experiments import (
        FULL_ATTACKS,
        FULL_DEFENCES,
        STAGE3_ATTACKS,
        STAGE3_DEFENCES,
        matrix_table,
        run_matrix,
    )
    from mextract.models import default_model_for
    from mextract.oracle import APIDescription

    if stage3 and full:
        raise typer.BadParameter("give --stage3 or --full, not both", ctx=ctx, param_hint="'--stage3'")
    if full:
        defence = defence or list(FULL_DEFENCES)
        attack = attack or list(FULL_ATTACKS)
    if stage3:
        defence = defence or ["none", *STAGE3_DEFENCES]
        attack = attack or list(STAGE3_ATTACKS)
        trigger = 0 if trigger is None else trigger
    if not defence or not attack:
        raise typer.BadParameter(
            "give at least one --defence and one --attack (or --stage3, or --full)", ctx=ctx,
            param_hint="'--defence'/'--attack'",
        )  # fmt: skip
    _check_out(ctx, "--out", out)
    info = _check(ctx, "--dataset", dataset_info, dataset)
    arch = default_model_for(info.input_shape)
    for spec in defence:
        _check(ctx, "--defence", check_defence_spec, spec, info.input_shape, info.num_classes, arch, seed)
    _check_budget(ctx, budget)
    plain = APIDescription(info.input_shape, info.num_classes, value_range=info.value_range)  # undefended
    for spec in attack:
        _check(ctx, "--attack", check_attack_spec, spec, plain, budget)
    if trigger is not None and not 0 <= trigger < info.num_classes:
        raise typer.BadParameter(f"expected a class of {dataset} (0..{info.num_classes - 1}), got {trigger}",
                                 ctx=ctx, param_hint="'--trigger'")  # fmt: skip
    adversarial = _check_pgd(ctx, pgd_eps, pgd_steps)
    cell_threads = _plan_runtime(ctx, device, threads, jobs, backend, address)

    from mextract.cli.progress import ProgressBars

    with ProgressBars(console) as bars:
        records = run_matrix(out, defences=defence, attacks=attack, budget=budget, dataset=dataset, seed=seed,
                             trigger_target=trigger, adversarial=adversarial,
                             detect=detect, device=None if device == "auto" else device, callback=bars,
                             resume=not fresh, jobs=jobs, backend="ray" if backend == "ray" else "local",
                             threads=cell_threads,
                             address=address)  # fmt: skip
    table = matrix_table(records)
    (out / "matrix.md").write_text(table)
    typer.echo(table)
    console.print(f"records and matrix.md are in {out}/", markup=False)


@app.command()
def reproduce(
    ctx: typer.Context,
    experiment: Annotated[str, typer.Argument(help="The sources' experiment to reproduce: cifar10.")],
    scale: Annotated[
        str, typer.Option(help="full (the sources' sizes, a GPU), small (CPU, < 20 min), tiny (smoke test).")
    ] = "small",
    data_root: Annotated[
        Path | None,
        typer.Option(
            envvar="MEXTRACT_CIFAR10",
            help="Your CIFAR-10: a cifar-10-batches-py folder, an image folder (train/, test/) or its tar.",
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder (default runs/cifar10-SCALE).")] = None,
    time_limit: Annotated[
        str | None,
        typer.Option(help="Start no cell that would end after this (e.g. 9m, 600s); rerun to continue."),
    ] = None,
    dawn: Annotated[bool, typer.Option(help="The lab's rows: DAWN on top of honey labels (stage 3).")] = True,
    device: Device = "auto",
    threads: Threads = None,
    fresh: Fresh = False,
    jobs: Annotated[int, typer.Option(min=1, help="Cells run at once, in processes (one thread each).")] = 1,
    backend: Annotated[str, typer.Option(help="'local' or 'ray' (the [ray] extra).")] = "local",
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: local Ray).")] = None,
) -> None:
    """The sources' CIFAR-10 experiment, stages 0-3, with their figures beside the lab's (resumable)."""
    from mextract.cli.progress import ProgressBars
    from mextract.experiments.reproduce import (
        check_time_limit,
        reproduction_tables,
        run_reproduction,
        scale_of,
    )

    if experiment != "cifar10":
        from mextract.errors import UnknownNameError

        raise typer.BadParameter(str(UnknownNameError("experiment", experiment, ["cifar10"])), ctx=ctx,
                                 param_hint="'EXPERIMENT'")  # fmt: skip
    _check(ctx, "--scale", scale_of, scale)
    limit = None if time_limit is None else _check(ctx, "--time-limit", check_time_limit, time_limit)
    out = out or Path(f"runs/cifar10-{scale}")
    _check_out(ctx, "--out", out)
    from mextract.data import dataset_info

    _check(ctx, "--data-root", dataset_info, "cifar10", data_root)
    cell_threads = _plan_runtime(ctx, device, threads, jobs, backend, address)

    with ProgressBars(console) as bars:
        result = run_reproduction(out, scale=scale, data_root=data_root, time_limit=limit, jobs=jobs,
                                  threads=cell_threads,
                                  backend="ray" if backend == "ray" else "local", address=address,
                                  device=None if device == "auto" else device, callback=bars,
                                  resume=not fresh, dawn=dawn)  # fmt: skip
    tables = reproduction_tables(result.records, scale)
    (out / "tables.md").write_text(tables)
    typer.echo(tables)
    console.print(f"{result.ran} cells run, {result.reused} reused, in {result.wall_s / 60:.1f} min; "
                  f"records and tables.md are in {out}/", markup=False)  # fmt: skip
    if result.left:
        console.print(f"stopped before the time limit: {len(result.left)} cells left; rerun the same command "
                      "(with the same --out) to continue", markup=False)  # fmt: skip
    if result.failed:
        from mextract.experiments.backends import failures_message

        console.print(failures_message(result), style="red", markup=False)
        raise typer.Exit(1)


@app.command()
def report(
    ctx: typer.Context,
    run: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="A run folder holding records.")],
    markdown: Annotated[bool, typer.Option(help="Print a Markdown table instead.")] = False,
    html: Annotated[
        bool, typer.Option("--html", help="Also write report.html, report.md and report.json (with plots).")
    ] = False,
) -> None:
    """Rebuild the tables of a run folder (attacks, a matrix, an audit) from its records alone."""
    from mextract.experiments import load_records, markdown_table, matrix_table

    records = load_records(run)
    if not any(r.kind != "plan" for r in records):
        raise typer.BadParameter(
            f"{run} holds no mextract records (expected a run folder of `mextract demo`, "
            "`train-victim`, `attack`, `matrix`, `audit` or `reproduce`)", ctx=ctx, param_hint="'run'",
        )  # fmt: skip
    from mextract.experiments.reproduce import is_reproduction, reproduction_tables

    if is_reproduction(records):  # `mextract reproduce cifar10`
        typer.echo(reproduction_tables(records))
        return
    audit_run = any(r.kind == "cell" and r.config.get("cell", {}).get("thief") for r in records)
    if audit_run or html:
        from mextract.cli.audit import write_audit_report

        paths = write_audit_report(run)
        console.print(f"report: {paths['html']}", markup=False)
        if audit_run:
            return
    if any(r.kind == "cell" for r in records):  # a matrix folder
        typer.echo(matrix_table(records))
    elif markdown:
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


# --------------------------------------------------------------------------- entry point


def _show_warning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    err_console.print(f"[yellow]warning:[/yellow] {escape(str(message))}")


def main() -> None:
    """Entry point. typer renders usage errors itself (usage line, message, exit 2);
    mextract's own errors found during the work become one ``error:`` line and exit 2."""
    warnings.showwarning = _show_warning
    try:
        app(prog_name="mextract")
    except MextractError as exc:
        err_console.print(f"[red]error:[/red] {escape(str(exc))}")
        sys.exit(2)
