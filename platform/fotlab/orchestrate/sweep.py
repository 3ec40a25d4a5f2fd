"""`fotlab sweep SWEEP_SPEC [--resume]`: a Ray Tune sweep of `fotlab.train.train`, one MLflow parent run.

    fotlab sweep experiments/sweeps/fot_cpu.yaml            # 3-10 min on 2 CPU cores; live table of trials
    fotlab sweep experiments/sweeps/fot_cpu.yaml --resume   # continue the newest unfinished run of that sweep
    fotlab runs list --sweep fot-cpu                        # parent + child runs in the terminal

Steps (setup -> build -> fit -> report):
1. setup: validate the sweep (`load_sweep`), open the MLflow parent run on the driver (explicit artifact location;
   RUNNING until FINISHED / FAILED / KILLED), start or attach Ray (one pinned cluster per driver).
2. build: param space, search (Optuna TPE seeded / random / grid), scheduler (ASHA or FIFO), concurrency from
   the cluster's CPUs/GPUs and each trial's workers; the trainable is `sweep_trial.run_trial`.
3. fit: `Tuner.fit()` (or `Tuner.restore(...).fit()` with --resume) while `SweepMonitor` draws the trials.
   Ctrl-C: Tune saves its state, the parent run is KILLED and resumable. A SIGKILLed driver leaves the parent
   RUNNING and Tune's state up to a save period old: --resume reconciles it with the child runs (`sweep_resume`).
4. report: leaderboard + plots into the parent run, the best trial exported as a complete experiment spec
   (parent artifact `best_spec.yaml` and `<sweep dir>/best_spec.yaml`), parent FINISHED.

Known Ray 2.60 bug designed around: a scheduler stopping a trial that runs a nested Train V2 trainer leaks its
placement group and hangs the sweep. Single-worker trials therefore train inside the Tune trainable (no nested
trainer); multi-worker trials (nested TorchTrainer) only run without early stopping (see `sweep_trial`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

from fotlab import tracking
from fotlab.errors import FotlabError
from fotlab.names import (
    TAG_BEST_RUN,
    TAG_BEST_TRIAL,
    TAG_KIND,
    TAG_RESUMABLE,
    TAG_SWEEP_DIR,
    TAG_SWEEP_ROLE,
    TAG_TRIAL_ID,
)
from fotlab.orchestrate import sweep_resume, sweep_space
from fotlab.orchestrate.sweep_trial import TrialContext

EXIT_INTERRUPTED = 130


class SweepInterruptedError(FotlabError):
    """The sweep stopped before every trial ran (Ctrl-C); its parent run is KILLED and `--resume` continues it."""

    def __init__(self, message: str, run_id: str) -> None:
        super().__init__(message)
        self.run_id = run_id


@dataclasses.dataclass
class SweepOutcome:
    """What a finished sweep produced."""

    parent_run_id: str
    sweep_dir: Path
    rows: list[dict[str, Any]]  # leaderboard, best first
    best: dict[str, Any] | None
    best_spec: Path | None
    status: str = "FINISHED"

    def to_json(self) -> dict[str, Any]:
        return {
            "parent_run_id": self.parent_run_id,
            "status": self.status,
            "sweep_dir": str(self.sweep_dir),
            "best_spec": str(self.best_spec) if self.best_spec else None,
            "best": self.best,
            "n_trials": len(self.rows),
            "leaderboard": self.rows,
        }


def experiment_name(sweep) -> str:
    """The MLflow experiment of the sweep's parent and child runs (the base spec's, else the sweep's name)."""
    from fotlab.spec import trial_spec

    return trial_spec(sweep, {}, check_paths=False).tracking.experiment or sweep.name


def n_trials(sweep) -> int:
    """How many trials the sweep runs in all."""
    n = sweep_space.num_samples(sweep)
    for space in sweep.search_space.values():
        if space.type == "grid" or (sweep.search == "grid" and space.type == "choice"):
            n *= len(space.values or [])
    return n


def open_parent(sweep, base_spec, uri: str, sweep_path: str | None) -> tuple[tracking.TrackedRun, Path]:
    """A new parent run (+ the Tune experiment folder it will own)."""
    from fotlab.orchestrate.runner import new_run_name
    from fotlab.spec import resolve_artifact_root, resolve_storage_path

    name = new_run_name(sweep.name)
    sweep_dir = Path(resolve_storage_path(base_spec)) / "sweeps" / name
    if "://" in str(base_spec.storage.path or ""):
        raise FotlabError("storage.path: sweeps keep their Tune state on local or mounted storage for now")
    experiment_id = tracking.setup_experiment(uri, experiment_name(sweep), resolve_artifact_root(base_spec, uri))
    tags = {
        **tracking.default_tags(),
        TAG_KIND: "sweep",
        tracking.TAG_SWEEP: sweep.name,
        TAG_SWEEP_ROLE: "parent",
        TAG_SWEEP_DIR: str(sweep_dir),
        TAG_RESUMABLE: "true",
    }
    run = tracking.start_run(uri, experiment_id, run_name=name, tags=tags)
    run.log_params(
        {
            "metric": sweep.metric,
            "mode": sweep.mode,
            "num_samples": sweep.num_samples,
            "search": sweep.search,
            "scheduler": sweep.scheduler.name,
            "seed": sweep.seed,
            "base": sweep.base,
            "set": json.dumps(sweep.set),
            **{f"space/{k}": json.dumps(v.model_dump(exclude_none=True)) for k, v in sweep.search_space.items()},
        }
    )
    if sweep_path:
        run.log_artifact(sweep_path)
    return run, sweep_dir


def reopen_parent(sweep, uri: str) -> tuple[tracking.TrackedRun, Path]:
    """The newest parent run of `sweep.name`, reopened as RUNNING (`--resume`)."""
    filters = f"tags.`{TAG_SWEEP_ROLE}` = 'parent'"
    try:
        found = tracking.search_runs(
            uri, experiment=experiment_name(sweep), sweep=sweep.name, filter_string=filters, max_results=1
        )
    except tracking.TrackingError:
        found = []
    if not found:
        raise FotlabError(f"--resume: no earlier run of sweep {sweep.name!r} in {uri}")
    parent = found[0]
    if parent.info.status == "FINISHED":
        raise FotlabError(
            f"--resume: sweep {sweep.name!r} (run {parent.info.run_id}) already FINISHED; nothing to resume"
        )
    run = tracking.start_run(uri, parent.info.experiment_id, run_id=parent.info.run_id, tags={TAG_RESUMABLE: "true"})
    return run, Path(parent.data.tags[TAG_SWEEP_DIR])


def cluster_resources() -> dict[str, float]:
    import ray

    return {k: float(v) for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}


def build_tuner(sweep, base_spec, context: TrialContext, monitor, resume: bool, local: bool = True):
    """A Tuner for the sweep: new, or restored from `context.sweep_dir` (--resume)."""
    from ray import tune

    from fotlab.orchestrate.sweep_trial import run_trial

    space, _ = sweep_space.param_space(sweep)
    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context), context.resources.trainable())
    if resume:
        if not tune.Tuner.can_restore(context.sweep_dir):
            raise FotlabError(f"--resume: no Tune state in {context.sweep_dir} (the sweep never started?)")
        tuner = tune.Tuner.restore(
            context.sweep_dir, trainable, resume_unfinished=True, resume_errored=True, param_space=space
        )
        tuner._local_tuner.get_run_config().callbacks = [monitor]  # the pickled callback has no live display
        return tuner
    total = n_trials(sweep)
    cluster = cluster_resources()
    if local:
        sweep_space.check_fits(context.resources, cluster)  # an autoscaling cluster may still grow
    concurrency = sweep_space.max_concurrency(sweep, context.resources, cluster, total)
    max_steps = max([base_spec.train.steps, *[int(v) for v in _swept_values(sweep, "train.steps")]])
    tune_config = tune.TuneConfig(
        search_alg=sweep_space.search_algorithm(sweep, concurrency),
        scheduler=sweep_space.scheduler(sweep, base_spec, max_steps),
        num_samples=sweep_space.num_samples(sweep),
        # Optuna is a Searcher (Tune caps it with a ConcurrencyLimiter); the basic generator caps itself.
        max_concurrent_trials=concurrency if sweep.search == "optuna" else None,
        reuse_actors=False,
    )
    run_config = tune.RunConfig(
        name=Path(context.sweep_dir).name,
        storage_path=str(Path(context.sweep_dir).parent),
        callbacks=[monitor],
        verbose=0,
        # no checkpoint_config: trials keep fotlab's checkpoints in their own folder (fotlab.train.checkpoint)
        failure_config=tune.FailureConfig(max_failures=max(0, base_spec.failure.max_failures)),
    )
    return tune.Tuner(trainable, param_space=space, tune_config=tune_config, run_config=run_config)


def _swept_values(sweep, key: str) -> list[Any]:
    space = sweep.search_space.get(key)
    return space.corners() if space is not None else []


def run_sweep(
    sweep, *, resume: bool = False, address: str | None = None, progress: bool = True, sweep_path: str | None = None
) -> SweepOutcome:
    """Run (or with `resume`, continue) `sweep`; raises `SweepInterruptedError` when stopped before the end."""
    from fotlab.orchestrate.cluster import ensure_ray
    from fotlab.orchestrate.sweep_monitor import SweepMonitor
    from fotlab.spec import resolve_tracking_uri, trial_spec

    base_spec = trial_spec(sweep, {}, check_paths=False)
    uri = resolve_tracking_uri(base_spec)
    parent, sweep_dir = reopen_parent(sweep, uri) if resume else open_parent(sweep, base_spec, uri, sweep_path)
    resources = sweep_space.trial_resources(base_spec)
    try:
        sweep_space.check_stopping(sweep, resources)
        sweep_space.report_interval(base_spec, sweep.metric)  # the metric is reported at all
        ensure_ray(address)
        if resources.nested:  # worker reports carry only the metrics of that step
            os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
        _, decode = sweep_space.param_space(sweep)
        orphans = sweep_resume.reconcile(uri, parent.run_id, sweep_dir) if resume else ()  # a lost driver's trials
        context = TrialContext(
            sweep, decode, uri, experiment_name(sweep), parent.run_id, str(sweep_dir), resources, orphans
        )
        monitor = SweepMonitor(sweep, uri, parent.run_id, progress=progress)
        tuner = build_tuner(sweep, base_spec, context, monitor, resume, local=address is None)
        monitor.start()
        try:
            with contextlib.redirect_stdout(sys.stderr):  # Tune's own banners; stdout is for the summary
                results = tuner.fit()
        finally:
            monitor.close()
    except BaseException as err:
        parent.set_tags({TAG_RESUMABLE: "true" if Path(sweep_dir).is_dir() else "false"})
        parent.fail(err, status="KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    if monitor.unfinished(n_trials(sweep)):
        _kill_running_children(uri, parent.run_id)
        parent.fail("interrupted before every trial ran", status="KILLED")
        raise SweepInterruptedError(
            f"sweep {sweep.name} interrupted (parent run {parent.run_id}); continue it with "
            f"`fotlab sweep {sweep_path or 'SWEEP_SPEC'} --resume`",
            parent.run_id,
        )
    return finish_sweep(sweep, parent, sweep_dir, results, decode)


def _kill_running_children(uri: str, parent_run_id: str) -> None:
    """Children left RUNNING by an interrupt become KILLED (a resume reopens them)."""
    for run in children(uri, parent_run_id):
        if run.info.status == "RUNNING":
            tracking.TrackedRun(uri, run.info.run_id, run.info.experiment_id).finish("KILLED")


def children(uri: str, parent_run_id: str) -> list:
    return tracking.child_runs(uri, parent_run_id)


def finish_sweep(sweep, parent: tracking.TrackedRun, sweep_dir: Path, results, decode) -> SweepOutcome:
    """Leaderboard, plots, best spec into the parent run; parent FINISHED (FAILED when no trial produced a value)."""
    from fotlab.orchestrate import sweep_report

    child_runs = {r.data.tags.get(TAG_TRIAL_ID, ""): r.info.run_id for r in children(parent.uri, parent.run_id)}
    rows = sweep_report.leaderboard(results, sweep, decode, child_runs)
    sweep_resume.close_lost_children(parent.uri, parent.run_id, {row["trial_id"] for row in rows})
    sweep_report.log_report(parent, rows, sweep, sweep_dir)
    best = sweep_report.best_row(rows, sweep.metric)
    if best is None:
        parent.set_tags({TAG_RESUMABLE: "false"})
        parent.fail(f"no trial reported {sweep.metric}")
        raise FotlabError(
            f"sweep {sweep.name}: no trial reported {sweep.metric} (see `fotlab runs list --sweep {sweep.name}`)"
        )
    params = {key: best[key] for key in sweep.search_space}
    best_spec = sweep_report.export_best_spec(sweep, params, best, sweep_dir / sweep_report.BEST_SPEC)
    parent.log_artifact(best_spec)
    parent.log_metrics(
        {
            f"best/{sweep.metric}": best[sweep.metric],
            "n_trials": len(rows),
            "n_stopped_early": sum(r["status"] == "STOPPED EARLY" for r in rows),
            "n_errors": sum(r["status"] == "ERROR" for r in rows),
        },
        step=0,
    )
    parent.set_tags({TAG_BEST_TRIAL: best["trial_id"], TAG_BEST_RUN: best["run_id"], TAG_RESUMABLE: "false"})
    parent.finish("FINISHED")
    return SweepOutcome(parent.run_id, sweep_dir, rows, best, best_spec)


def print_summary(outcome: SweepOutcome, sweep) -> None:
    """The closing lines: leaderboard (top 10), best spec path, how to browse."""
    import shutil

    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(100, shutil.get_terminal_size(fallback=(160, 24)).columns))
    table = Table(title=f"sweep {sweep.name}: leaderboard ({sweep.metric}, {sweep.mode})")
    columns = ["trial_id", "status", "step", *sweep.search_space, sweep.metric]
    for column in columns:
        table.add_column(column, no_wrap=True)
    for row in outcome.rows[:10]:
        table.add_row(*[_cell(row[c], metric=c == sweep.metric) for c in columns])
    console.print(table)
    console.print(
        f"[bold green]sweep {sweep.name} FINISHED[/] (parent run {outcome.parent_run_id}, best trial "
        f"{outcome.best['trial_id']}: run {outcome.best['run_id']})",
        soft_wrap=True,
    )
    console.print(f"best spec: {outcome.best_spec}", soft_wrap=True)
    console.print(f"  train it: fotlab run {outcome.best_spec}", soft_wrap=True)
    console.print(f"browse: `fotlab runs list --sweep {sweep.name}`  or  `fotlab ui`", soft_wrap=True)


def _cell(value: Any, metric: bool = False) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if metric else f"{value:.4g}"
    return "" if value is None else str(value)


def sweep_command(args: argparse.Namespace) -> dict | int:
    """`fotlab sweep SWEEP_SPEC [--resume] [--address URL] [--json]`."""
    from fotlab.spec import load_sweep

    sweep = load_sweep(args.spec)
    as_json = bool(getattr(args, "json", False))
    redirect = contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext()
    try:
        with redirect:
            outcome = run_sweep(
                sweep,
                resume=bool(getattr(args, "resume", False)),
                address=getattr(args, "address", None),
                progress=not as_json,
                sweep_path=args.spec,
            )
    except SweepInterruptedError as err:
        print(str(err), file=sys.stderr)
        if as_json:
            print(json.dumps({"parent_run_id": err.run_id, "status": "KILLED"}))
        return EXIT_INTERRUPTED
    if not as_json:
        print_summary(outcome, sweep)
    return outcome.to_json()
