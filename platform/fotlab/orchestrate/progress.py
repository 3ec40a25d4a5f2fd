"""Live training progress on the driver: a rich progress bar fed by the run channel.

Shows step / total, the latest train loss, tokens per second and the ETA. It writes to stderr, so a
``--json`` run's stdout stays one JSON object (and ``--json`` turns the display off anyway).
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from fotlab.tracking import TOKENS_PER_S, TRAIN_LOSS


def pick_metric(metrics: dict[str, float], *candidates: str, contains: str | None = None) -> float | None:
    """The first metric named in ``candidates`` (or, failing that, whose name contains ``contains``)."""
    for name in candidates:
        if name in metrics:
            return metrics[name]
    if contains is not None:
        for name, value in metrics.items():
            if contains in name:
                return value
    return None


class LiveProgress:
    """A progress bar for one run; call `update(records)` with `(step, metrics)` records as they arrive."""

    def __init__(
        self, total_steps: int, *, enabled: bool = True, description: str = "train", console: Console | None = None
    ) -> None:
        self.enabled = enabled
        self.console = console
        self.last_step = 0
        self.last_metrics: dict[str, float] = {}
        self._progress: Progress | None = None
        self._task: Any = None
        self._total = total_steps
        self._description = description

    def __enter__(self) -> LiveProgress:
        if self.enabled:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("{task.fields[tps]} tok/s"),
                TimeRemainingColumn(),
                console=self.console or Console(stderr=True),
                transient=False,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(self._description, total=self._total, loss="-", tps="-")
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
            self._progress = None

    @property
    def task(self):
        """The rich task (None when the display is off)."""
        return None if self._progress is None else self._progress.tasks[0]

    def update(self, records: list[tuple[int, dict[str, float]]]) -> None:
        """Fold new records into the display (train metrics only move the bar forward)."""
        for step, metrics in records:
            self.last_step = max(self.last_step, step)
            self.last_metrics.update(metrics)
        if self._progress is None or not records:
            return
        loss = pick_metric(self.last_metrics, TRAIN_LOSS, contains="loss")
        tps = pick_metric(self.last_metrics, TOKENS_PER_S, contains="tokens_per")
        self._progress.update(
            self._task,
            completed=self.last_step,
            loss="-" if loss is None else f"{loss:.4f}",
            tps="-" if tps is None else f"{tps:,.0f}",
        )

    def note(self, message: str) -> None:
        """Print a line above the bar (or to stderr when the bar is off)."""
        console = self._progress.console if self._progress is not None else Console(stderr=True)
        console.print(message)
