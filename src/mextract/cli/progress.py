"""Progress bars for the library's progress events (the library itself never draws)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

STAGE_NAMES = {"victim": "victim training", "query": "querying", "train": "training"}


class ProgressBars:
    """A callback that turns ``{"stage", "done", "total", ...}`` events into rich bars."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(bar_width=12), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeRemainingColumn(compact=True, elapsed_when_finished=True),
            console=console, transient=False,
        )  # fmt: skip
        self.prefix = ""
        self.tasks: dict[str, Any] = {}
        self.last: Any = None  # the task a "score" event (a history point) belongs to

    def __enter__(self) -> ProgressBars:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __call__(self, event: dict[str, Any]) -> None:
        stage = event.get("stage", "")
        if stage == "attack":
            self.prefix, self.tasks = f"{event.get('name', '')}: ", {}
            return
        if stage == "score":  # the runner scored a snapshot of the substitute
            if self.last is not None and "fidelity" in event:
                self.progress.update(self.last, info=f"fidelity {100 * event['fidelity']:.1f}%")
            return
        if "total" not in event:
            return
        if stage not in self.tasks:
            desc = self.prefix + STAGE_NAMES.get(stage, stage)
            self.tasks[stage] = self.progress.add_task(desc, total=event["total"], info="")
        self.last = self.tasks[stage]
        self.progress.update(self.last, completed=event["done"], total=event["total"])
        if event.get("resumed"):
            self.progress.update(self.last, info="reused from the run folder")
