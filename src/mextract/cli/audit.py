"""``mextract audit``: the owner's audit of a victim, one command, a report at the end."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

console = Console()

Jobs = Annotated[
    int | None, typer.Option(min=1, help="Cells run at once, in worker processes (default: one per core).")
]
WorkerThreads = Annotated[int, typer.Option(min=1, help="Torch threads per worker process.")]
BackendOpt = Annotated[
    str, typer.Option(help="'local' (processes on this machine) or 'ray' (the [ray] extra).")
]
Address = Annotated[
    str | None, typer.Option(help="Ray cluster address (default: a local Ray instance on 127.0.0.1).")
]


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def check_backend(ctx: typer.Context, backend: str, address: str | None) -> None:
    if backend not in ("local", "ray"):
        raise typer.BadParameter(
            f"expected 'local' or 'ray', got {backend!r}", ctx=ctx, param_hint="'--backend'"
        )
    if address is not None and backend != "ray":
        raise typer.BadParameter("--address is for --backend ray", ctx=ctx, param_hint="'--address'")
    if backend == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise typer.BadParameter(
                "the Ray backend needs the [ray] extra: pip install 'mextract[ray]'",
                ctx=ctx,
                param_hint="'--backend'",
            ) from None


def run_with_progress(plan: Any, out: Path, **kwargs: Any) -> Any:
    from mextract.cli.progress import ProgressBars
    from mextract.experiments import run_plan

    with ProgressBars(console) as bars:
        return run_plan(plan, out, callback=bars, **kwargs)


def audit(
    ctx: typer.Context,
    victim: Annotated[
        Path | None,
        typer.Argument(
            exists=True,
            file_okay=False,
            help="A victim checkpoint folder (train-victim's out/victim). Default: the lab's mnist victim.",
        ),
    ] = None,
    out: Annotated[Path, typer.Option(help="Run folder: victims, records, report.")] = Path("runs/audit"),
    quick: Annotated[
        bool, typer.Option("--quick", help="A first look in a few minutes (says what it leaves out).")
    ] = False,
    seeds: Annotated[
        int | None, typer.Option(min=1, help="Seeds per thief and budget (default 3; quick 1).")
    ] = None,
    budget: Annotated[
        list[int] | None,
        typer.Option("--budget", "-b", help="Thieves' budgets (repeatable; default 100 300 1000)."),
    ] = None,
    thief: Annotated[
        list[str] | None, typer.Option("--thief", help="Thieves to run (repeatable; see --list).")
    ] = None,
    protection: Annotated[
        list[str] | None, typer.Option("--protection", "-p", help="Protections (repeatable; see --list).")
    ] = None,
    url: Annotated[
        str | None, typer.Option(help="Audit a prediction API (an Open Inference Protocol model endpoint).")
    ] = None,
    dataset: Annotated[
        str | None, typer.Option(help="With --url: the dataset of the thieves' data and the test set.")
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(envvar="MEXTRACT_API_KEY", help="With --url: the thieves' account key.")
    ] = None,
    evaluator_key: Annotated[
        str | None,
        typer.Option(
            envvar="MEXTRACT_EVALUATOR_KEY", help="With --url: a second account, for the measurements."
        ),
    ] = None,
    list_: Annotated[
        bool, typer.Option("--list", help="List thieves, protections and measures, and exit.")
    ] = False,
    jobs: Jobs = None,
    threads: WorkerThreads = 1,
    backend: BackendOpt = "local",
    address: Address = None,
    device: Annotated[str, typer.Option(help="'auto', 'cpu', 'cuda' or 'cuda:N'.")] = "auto",
    fresh: Annotated[bool, typer.Option("--fresh", help="Recompute instead of reusing records.")] = False,
) -> None:
    """Audit a victim: how cheaply it is stolen, and what each protection costs honest users.

    Prints the plan's size and an estimate first, runs it (killed and restarted, it redoes no
    finished cell), then writes report.html, report.md and report.json into --out.
    """
    from mextract.errors import MextractError
    from mextract.experiments import MEASURES, PROTECTIONS, THIEVES, VictimSpec, audit_plan, estimate_seconds
    from mextract.experiments.backends import failures_message, plan_record

    if list_:
        for name, t in THIEVES.items():
            console.print(f"thief       {name:24} {t.label} ({t.attack})", markup=False)
        for name, p in PROTECTIONS.items():
            console.print(f"protection  {name:24} {p.label} ({p.kind})", markup=False)
        for name, m in MEASURES.items():
            console.print(f"measure     {name:24} {m.description}", markup=False)
        return
    check_backend(ctx, backend, address)
    if out.exists() and not out.is_dir():
        raise typer.BadParameter(f"{out} is a file; expected a run folder", ctx=ctx, param_hint="'--out'")
    shape: Any = None
    classes: int | None = None
    if url is not None:
        if victim is not None:
            raise typer.BadParameter(
                "give a victim checkpoint or --url, not both", ctx=ctx, param_hint="'--url'"
            )
        if dataset is None:
            raise typer.BadParameter(
                "--url needs --dataset (the thieves' data and the test set)",
                ctx=ctx,
                param_hint="'--dataset'",
            )
        if (api_key is None) != (evaluator_key is None):
            raise typer.BadParameter(
                "on a server with accounts, give --api-key and --evaluator-key",
                ctx=ctx,
                param_hint="'--api-key'",
            )
        from mextract.oracle import RemoteOracle

        try:
            with RemoteOracle(url, client_id="mextract-audit-evaluator", api_key=evaluator_key) as api:
                shape, classes = list(api.input_shape), int(api.num_classes)
        except MextractError as exc:
            raise typer.BadParameter(str(exc), ctx=ctx, param_hint="'--url'") from None
        # the workers read the keys from the environment: they are never written to a record
        from mextract.experiments.cells import API_KEY_ENV, EVALUATOR_KEY_ENV

        for name, value in ((API_KEY_ENV, api_key), (EVALUATOR_KEY_ENV, evaluator_key)):
            if value is not None:
                os.environ[name] = value
        spec = VictimSpec(dataset=dataset, url=url)
    elif dataset is not None:
        raise typer.BadParameter(
            "--dataset is for --url (a checkpoint names its own)", ctx=ctx, param_hint="'--dataset'"
        )
    elif victim is None:
        spec = VictimSpec(dataset="mnist")
    else:
        from mextract.models import read_meta, split_seed_of

        try:
            meta = read_meta(victim)
        except MextractError as exc:
            raise typer.BadParameter(str(exc), ctx=ctx, param_hint="'VICTIM'") from None
        if meta.get("dataset") is None:
            raise typer.BadParameter(
                "this victim was trained on files only; the audit needs a victim of a named dataset",
                ctx=ctx,
                param_hint="'VICTIM'",
            )
        split_seed = split_seed_of(meta)
        preset = "fast"  # the recipe variants (trigger, adversarial) are retrained with
        record = victim.parent / "victim.json"  # train-victim's record beside the checkpoint
        if record.is_file():
            from mextract.experiments import Record

            preset = str(Record.load(record).config.get("preset", preset))
        spec = VictimSpec(
            dataset=meta["dataset"],
            split_seed=split_seed,
            architecture=meta["architecture"],
            preset=preset,
            checkpoint=str(victim.resolve()),
        )
        shape, classes = meta["input_shape"], int(meta["num_classes"])
    try:
        plan = audit_plan(
            spec,
            quick=quick,
            seeds=seeds,
            budgets=budget,
            thieves=thief,
            protections=protection,
            input_shape=shape,
            num_classes=classes,
        )
    except MextractError as exc:
        raise typer.BadParameter(str(exc), ctx=ctx) from None
    n_jobs = jobs or os.cpu_count() or 1
    size = 1
    for s in shape or [1, 28, 28]:
        size *= int(s)
    estimate = estimate_seconds(plan, jobs=n_jobs, input_size=size)
    work = plan.work()
    console.print(
        f"{plan.name}: {len(work)} cells ({sum(c.kind == 'cell' for c in work)} thieves' runs), "
        f"{n_jobs} job(s) × {threads} thread(s) on {backend}; rough estimate {_minutes(estimate)}",
        markup=False,
    )
    for line in plan.left_out:
        console.print(f"  leaves out: {line}", style="dim", markup=False)
    out.mkdir(parents=True, exist_ok=True)
    plan_record(plan, estimate).save(out / "records" / f"plan-{plan.name}.json")
    from mextract.cli.runtime import configure_runtime

    try:
        console.print(configure_runtime(device, threads), style="dim", markup=False)
    except MextractError as exc:
        raise typer.BadParameter(str(exc), ctx=ctx, param_hint="'--device'") from None
    result = run_with_progress(
        plan,
        out,
        backend=backend,
        jobs=n_jobs,
        threads=threads,
        address=address,
        device=None if device == "auto" else device,
        resume=not fresh,
    )
    console.print(
        f"{result.ran} cell(s) run, {result.reused} reused, in {_minutes(result.wall_s)}", markup=False
    )
    paths = write_audit_report(out)
    if result.failed:
        console.print(failures_message(result), style="red", markup=False)
        raise typer.Exit(1)
    console.print(f"report: {paths['html']}", markup=False)


def write_audit_report(out: Path) -> dict[str, Path]:
    """Build the report from the run folder's records alone, and print its first lines."""
    from mextract.experiments import load_records
    from mextract.experiments.analysis import headline
    from mextract.experiments.html import write_report

    records = load_records(out)
    paths = write_report(records, out)
    for line in headline(records):
        console.print(line, markup=False)
    return paths
