"""The driver's view of a running sweep: a live rich table of trials, and closing child runs Tune stopped.

`SweepMonitor` is a Ray Tune `Callback` (called on the driver, in Tune's loop):
- it redraws a table of every trial (status, swept values, step, metric) at most twice a second, on stderr;
- when the scheduler (ASHA) stops a trial, the trial's process is killed before it can close its MLflow child
  run, so the monitor closes it: FINISHED with `fotlab.stopped_early=true` (stopping is a normal outcome of a
  sweep, as in Ray's own MLflow callback); a trial that errors is closed FAILED.
The callback is pickled into Tune's experiment state; the live display is not (it is re-attached on resume).
"""

from __future__ import annotations

import time
from typing import Any

from ray.tune import Callback

from fotlab import tracking
from fotlab.names import TAG_STOPPED_EARLY
from fotlab.orchestrate.live_metrics import SweepLiveMetrics
from fotlab.orchestrate.sweep_space import TIME_ATTR
from fotlab.orchestrate.sweep_trial import STEPS_TOTAL, child_run_id

REFRESH_S = 0.5
DONE_STATES = ("TERMINATED", "ERROR")


def stopped_early(result: dict[str, Any] | None) -> bool:
    """True when a trial's last report is before its last step (the scheduler stopped it)."""
    if not result or TIME_ATTR not in result or STEPS_TOTAL not in result:
        return False
    return int(result[TIME_ATTR]) < int(result[STEPS_TOTAL])


def short_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class SweepMonitor(Callback):
    """Live table of trials + MLflow closing of stopped / errored trials (see the module docstring)."""

    def __init__(self, sweep, tracking_uri: str, parent_run_id: str, progress: bool = True) -> None:
        self.sweep = sweep
        self.tracking_uri = tracking_uri
        self.parent_run_id = parent_run_id
        self.progress = progress
        self.trials: list = []  # Tune's Trial objects, as of the last step
        self._live = None
        self._live_metrics = None  # Prometheus gauges (fotlab.orchestrate.live_metrics)
        self._last_draw = 0.0

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_live=None, _live_metrics=None, trials=[])
        return state

    # -- Tune callback hooks -------------------------------------------------------------------------------------
    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        self.trials = list(trials)
        if self._live_metrics is None:  # made here, in Tune's loop: not pickled with the callback
            sweep = self.sweep
            self._live_metrics = SweepLiveMetrics(sweep.name, self.parent_run_id, sweep.metric, sweep.mode)
        self._live_metrics.on_trials(self.trials)
        if time.monotonic() - self._last_draw >= REFRESH_S:
            self.draw()

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        if stopped_early(trial.last_result):
            self._close_child(trial.trial_id, "FINISHED", {TAG_STOPPED_EARLY: "true"})

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._close_child(trial.trial_id, "FAILED", {})

    # -- display ---------------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Open the live table (stderr) when progress is on."""
        if not self.progress or self._live is not None:
            return
        from rich.console import Console
        from rich.live import Live

        self._live = Live(self.table(), console=Console(stderr=True), auto_refresh=False, transient=False)
        self._live.__enter__()

    def close(self) -> None:
        if self._live is not None:
            self.draw()
            self._live.__exit__(None, None, None)
            self._live = None

    def draw(self) -> None:
        self._last_draw = time.monotonic()
        if self._live is not None:
            self._live.update(self.table(), refresh=True)

    def table(self):
        """A rich Table: one row per trial, best value of the sweep metric marked."""
        from rich.table import Table

        sweep = self.sweep
        n_done = sum(t.status in DONE_STATES for t in self.trials)
        table = Table(
            title=f"sweep {sweep.name}: {n_done}/{len(self.trials)} trials done ({sweep.metric}, {sweep.mode})"
        )
        for column in ("trial", "status", *sweep.search_space, "step", sweep.metric):
            table.add_column(column, no_wrap=True)
        best = self.best_trial_id()
        for trial in self.trials:
            result = trial.last_result or {}
            status = trial.status
            if status == "TERMINATED" and stopped_early(result):
                status = "STOPPED EARLY"
            steps = f"{result.get(TIME_ATTR, 0)}/{result.get(STEPS_TOTAL, '?')}" if result else "-"
            value = result.get(sweep.metric)
            mark = " *" if trial.trial_id == best else ""
            table.add_row(
                trial.trial_id,
                status,
                *[short_value(trial.config.get(k, "")) for k in sweep.search_space],
                steps,
                ("-" if value is None else f"{value:.4f}") + mark,
            )
        return table

    def best_trial_id(self) -> str | None:
        scored = [
            (t.last_result[self.sweep.metric], t.trial_id)
            for t in self.trials
            if t.last_result and self.sweep.metric in t.last_result
        ]
        if not scored:
            return None
        return (min(scored) if self.sweep.mode == "min" else max(scored))[1]

    def unfinished(self, n_expected: int) -> bool:
        """True when the sweep ended before every trial ran (an interrupt)."""
        return len(self.trials) < n_expected or any(t.status not in DONE_STATES for t in self.trials)

    # -- MLflow ----------------------------------------------------------------------------------------------------
    def _close_child(self, trial_id: str, status: str, tags: dict[str, str]) -> None:
        try:
            run_id = child_run_id(self.tracking_uri, self.parent_run_id, trial_id)
            if run_id is None:
                return
            run = tracking.TrackedRun(self.tracking_uri, run_id, experiment_id="")
            if run.info().info.status == "RUNNING":
                run.set_tags(tags)
                run.finish(status)
        except Exception as err:  # noqa: BLE001 - tracking trouble must not stop the sweep
            print(f"sweep: could not close the MLflow run of trial {trial_id}: {tracking.one_line(err)}")
