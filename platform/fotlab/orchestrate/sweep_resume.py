"""`fotlab sweep --resume` after the driver was lost (SIGKILL, a crash, a reboot): Tune's saved state against
the MLflow child runs the trials wrote themselves.

Tune saves its experiment state (trials + searcher) only every TUNE_GLOBAL_CHECKPOINT_S seconds (10 s or more),
so a driver killed between two saves leaves a state older than what ran; the child runs are the record of what
did run. `Tuner.restore(..., resume_unfinished=True, resume_errored=True)` then:
- re-runs a trial that finished after the last save (saved PENDING or RUNNING): the trial finds its child run
  FINISHED and only reports what that run recorded (`recorded_report`), so it completes once, not twice;
- suggests again the trials created after the last save, under new trial ids. The searcher's saved state
  (seeded) makes the same suggestions, and the new trial adopts the orphaned child run with the same swept
  values (`adopt_orphan`): its run id, its logged steps and its checkpoints (the output folder is renamed), so one
  configuration never gets a second child run;
- never re-runs a trial saved TERMINATED: a child run such a trial left RUNNING (stopped by the scheduler, the
  driver killed before its monitor closed the run) is closed here as the monitor would have (`reconcile`).
A child run that no restored trial adopted is marked KILLED once the sweep has run every trial
(`close_lost_children`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from fotlab import tracking
from fotlab.names import TAG_ADOPTED_FROM_TRIAL, TAG_STOPPED_EARLY, TAG_TRIAL_ID
from fotlab.orchestrate.sweep_space import TIME_ATTR

RUN_NAME_TAG = "mlflow.runName"  # MLflow renames the run when this tag changes
LOST_TRIAL = "its trial was lost with the sweep's driver (not in Tune's saved state) and did not run again"
CLAIMS_DIR = ".adopted"  # <sweep dir>/outputs/.adopted/<run id>.<trial id>: one adopter per orphan


def reconcile(uri: str, parent_run_id: str, sweep_dir: str | Path) -> tuple[tuple[str, str], ...]:
    """Before a restored sweep fits: close the child runs that trials Tune saved as TERMINATED left RUNNING;
    return the orphans, (run id, trial id) of the child runs whose trial Tune's saved state does not know."""
    from ray import tune

    from fotlab.orchestrate.sweep_monitor import stopped_early

    if not tune.Tuner.can_restore(str(sweep_dir)):
        return ()  # build_tuner says what is wrong
    analysis_log = logging.getLogger("ray.tune.analysis.experiment_analysis")
    level = analysis_log.level
    analysis_log.setLevel(logging.ERROR)  # it also reads each trial's results, and warns for a trial with none yet
    try:
        saved = {trial.trial_id: trial for trial in tune.ExperimentAnalysis(str(sweep_dir)).trials}
    finally:
        analysis_log.setLevel(level)
    orphans = []
    for run in tracking.child_runs(uri, parent_run_id):
        trial = saved.get(run.data.tags.get(TAG_TRIAL_ID, ""))
        if trial is None:
            orphans.append((run.info.run_id, run.data.tags.get(TAG_TRIAL_ID, "")))
        elif run.info.status == "RUNNING" and trial.status == "TERMINATED":
            # a trial that ran to its end closes its own run before its last report: the scheduler stopped this
            # one, and the driver died before its monitor closed the run (errored trials run again: resume_errored)
            child = tracking.TrackedRun(uri, run.info.run_id, run.info.experiment_id)
            child.set_tags({TAG_STOPPED_EARLY: str(stopped_early(trial.last_result)).lower()})
            child.finish("FINISHED")
    return tuple(orphans)


def adopt_orphan(
    uri: str, orphans: tuple[tuple[str, str], ...], params: dict[str, Any], trial_id: str, run_name: str, outputs: Path
) -> str | None:
    """The orphaned child run (of `orphans`, from `reconcile`) with this trial's swept values, now this trial's
    (tagged with its trial id and renamed; its output folder `outputs/<old trial id>` becomes `outputs/<trial_id>`),
    or None."""
    wanted = tracking.swept_param_tags(params)
    for run_id, old_trial in orphans:
        run = tracking.get_run(uri, run_id)
        if run.data.tags.get(TAG_TRIAL_ID, "") != old_trial:
            continue  # adopted already
        if any(run.data.tags.get(key) != value for key, value in wanted.items()):
            continue
        if not _claim(outputs / CLAIMS_DIR / f"{run_id}.{old_trial}"):
            continue  # another restored trial with the same values is taking it
        old_output, new_output = outputs / old_trial, outputs / trial_id
        if old_trial and old_output.is_dir() and not new_output.exists():
            old_output.rename(new_output)
        tags = {TAG_TRIAL_ID: trial_id, TAG_ADOPTED_FROM_TRIAL: old_trial, RUN_NAME_TAG: run_name}
        tracking.TrackedRun(uri, run_id, run.info.experiment_id).set_tags(tags)
        return run_id
    return None


def _claim(path: Path) -> bool:
    """Create `path` if nobody did (atomic: O_EXCL); True for the one caller that created it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def recorded_report(uri: str, run, metric: str, steps_total: int, steps_key: str) -> dict[str, Any]:
    """The final report of a trial whose child run `run` already FINISHED: the run's latest metrics, at its last
    step (`steps_total`, unless the scheduler had stopped it early: then its last report of `metric`)."""
    step = steps_total
    if run.data.tags.get(TAG_STOPPED_EARLY) == "true":
        step = tracking.TrackedRun(uri, run.info.run_id, run.info.experiment_id).last_step(metric)
    return {**tracking.numeric_metrics(run.data.metrics), TIME_ATTR: step, steps_key: steps_total}


def close_lost_children(uri: str, parent_run_id: str, trial_ids: set[str]) -> list[str]:
    """Once every trial ran: mark KILLED the child runs left RUNNING by trials the sweep no longer has (lost from
    Tune's saved state with the driver, and not adopted by a trial run again); returns their run ids."""
    closed = []
    for run in tracking.child_runs(uri, parent_run_id):
        if run.info.status != "RUNNING" or run.data.tags.get(TAG_TRIAL_ID) in trial_ids:
            continue
        child = tracking.TrackedRun(uri, run.info.run_id, run.info.experiment_id)
        child.fail(LOST_TRIAL, status="KILLED")
        closed.append(run.info.run_id)
    return closed
