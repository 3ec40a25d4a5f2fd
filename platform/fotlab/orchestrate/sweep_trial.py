"""One sweep trial: the Ray Tune function trainable around the experiment pipeline (`pipeline.run_pipeline`).

Design choices:
- Single-worker trials (scaling.num_workers 0 or 1) run the pipeline inside the Tune trainable and report with
  `ray.tune.report` (the report shim: `ray.train.report` raises inside Tune). No nested Train V2 trainer means
  nothing leaks when ASHA stops the trial (Ray 2.60 leaks a nested trainer's placement group and the sweep
  hangs), so early stopping is safe here.
- Multi-worker trials run a nested Ray trainer built by `trainer.build_trainer` (the one `fotlab run` uses, so
  every `scaling`, `storage` and `failure` field means the same) whose workers run `worker.train_worker` and
  whose reports reach Tune through `TuneReportCallback`. The driver refuses early stopping for them
  (`sweep_space.check_stopping`).
- Every report carries the sweep metric (Tune checks it), `step` (ASHA's time) and `steps_total`. Checkpoints
  are fotlab's, in the trial's output folder (`<sweep dir>/outputs/<trial id>`), so `Tuner.restore` resumes a
  trial where it stopped.
- A report is where Tune stops a trial (`ray.tune.report` raises SystemExit). So nothing is reported at the last
  step from inside the loop: the trial saves its model, runs the spec's evaluations, closes its MLflow run and
  only then makes its final report. A trial stopped early (or by Ctrl-C) leaves its run to the driver
  (`sweep_monitor`), which knows which of the two it was.
- MLflow: the trial owns its child run (tags: `mlflow.parentRunId`, `fotlab.sweep`, `fotlab.trial_id`). A restored
  trial finds its run by trial id and continues it (no duplicate runs) and does not log steps it already logged;
  a restored trial whose run already FINISHED only reports what the run recorded; after a lost driver, a trial
  Tune suggested again adopts its lost twin's run (`sweep_resume`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fotlab import model_refs, tracking
from fotlab.names import SWEEP_PARAM_PREFIX, TAG_KIND, TAG_RESUMED_FROM, TAG_STOPPED_EARLY, TAG_SWEEP_ROLE, TAG_TRIAL_ID
from fotlab.orchestrate import sweep_resume
from fotlab.orchestrate.sweep_space import TIME_ATTR, TrialResources, decode_params
from fotlab.tracking import numeric_metrics

STEPS_TOTAL = "steps_total"
NESTED_REPORT_EVERY = 10  # nested TorchTrainer: ray.train.report every this many steps between checkpoints


@dataclasses.dataclass(frozen=True)
class TrialContext:
    """What every trial of one sweep needs besides its Tune config (sent once through `tune.with_parameters`)."""

    sweep: Any  # SweepSpec (picklable, carries its base spec)
    decode: dict[str, dict[str, Any]]  # choice labels -> values (sweep_space.param_space)
    tracking_uri: str
    experiment: str  # MLflow experiment name of the parent and its children
    parent_run_id: str
    sweep_dir: str  # Tune experiment folder; trial outputs go to <sweep_dir>/outputs/<trial id>
    resources: TrialResources
    orphans: tuple[tuple[str, str], ...] = ()  # --resume: (run id, trial id) of children whose trial Tune lost


def spec_for(context: TrialContext, params: dict[str, Any]):
    """The trial's experiment spec (base + set + params), tracked in the sweep's MLflow experiment."""
    from fotlab.spec import trial_spec

    spec = trial_spec(context.sweep, params, check_paths=False)  # checked on the driver by load_sweep
    tracking_section = spec.tracking.model_copy(update={"experiment": context.experiment, "uri": context.tracking_uri})
    return spec.model_copy(update={"tracking": tracking_section})


def child_run_id(uri: str, parent_run_id: str, trial_id: str) -> str | None:
    """The MLflow child run of `trial_id` under `parent_run_id`, if the trial created one already."""
    found = tracking.child_runs(uri, parent_run_id, {TAG_TRIAL_ID: trial_id})
    return found[0].info.run_id if found else None


def child_run_name(trial_name: str, params: dict[str, Any]) -> str:
    """What a trial's run is called: `<trial>: lr=0.003 memory.layers=[1]` (what varies, for MLflow's views)."""
    return f"{trial_name}: {tracking.describe_params(params)}" if params else trial_name


def find_child_run(context: TrialContext, params: dict[str, Any], trial_id: str, trial_name: str):
    """The child run this trial already has (a restored trial), or the orphaned run it adopts (a trial Tune lost
    with its driver and suggested again, see `sweep_resume`), else None."""
    uri = context.tracking_uri
    found = tracking.child_runs(uri, context.parent_run_id, {TAG_TRIAL_ID: trial_id})
    if found:
        return found[0]
    outputs = Path(context.sweep_dir) / "outputs"
    adopted = sweep_resume.adopt_orphan(
        uri, context.orphans, params, trial_id, child_run_name(trial_name, params), outputs
    )
    return tracking.get_run(uri, adopted) if adopted else None


def open_child_run(
    context: TrialContext, spec, params: dict[str, Any], trial_id: str, trial_name: str, existing=None
) -> tuple[tracking.TrackedRun, int]:
    """(the trial's child run, the last step it already logged): created once, reopened when `existing` (the
    trial's run found by `find_child_run`).

    A new run gets the full spec as params plus the swept fields again as `sweep/<field>` params and as
    `fotlab.<field>` tags, and a name that says what varies (`child_run_name`), so MLflow's compare view and run
    table pick the trials apart.
    """
    tags = {
        TAG_KIND: "trial",
        tracking.TAG_SWEEP: context.sweep.name,
        TAG_SWEEP_ROLE: "trial",
        TAG_TRIAL_ID: trial_id,
        **tracking.swept_param_tags(params),
    }
    run = tracking.start_spec_run(
        spec,
        uri=context.tracking_uri,
        run_name=child_run_name(trial_name, params),
        run_id=existing.info.run_id if existing is not None else None,
        tags=tags,
        parent_run_id=context.parent_run_id,
    )
    if existing is None:
        run.log_params({f"{SWEEP_PARAM_PREFIX}{key}": value for key, value in params.items()})
        return run, 0
    return run, run.last_step(tracking.TRAIN_LOSS)


class TrialReporter:
    """`TrainHooks` callables of a single-worker trial: MLflow child-run logging + `ray.tune.report`."""

    def __init__(self, run: tracking.TrackedRun, metric: str, steps_total: int, logged_up_to: int) -> None:
        self.run = run
        self.metric = metric
        self.steps_total = steps_total
        self.logged_up_to = logged_up_to  # steps at or below were logged before a restore: not again
        self.latest: dict[str, float] = {}

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        if step > self.logged_up_to:
            self.run.log_metrics(metrics, step)
        self.latest.update(numeric_metrics(metrics))
        if self.metric in metrics and step < self.steps_total:  # the last step is reported after train()
            self.report(step)

    def report(self, step: int, **extra: Any) -> None:
        import ray.tune

        ray.tune.report({**self.latest, TIME_ATTR: int(step), STEPS_TOTAL: self.steps_total, **extra})


def run_trial(config: dict[str, Any], context: TrialContext) -> None:
    """The Tune function trainable: build the trial's spec and child run, run the pipeline, report, close the run."""
    import ray.tune

    tune_context = ray.tune.get_context()
    trial_id, trial_name = tune_context.get_trial_id(), tune_context.get_trial_name()
    params = decode_params(config, context.sweep.search_space, context.decode)
    spec = spec_for(context, params)
    existing = find_child_run(context, params, trial_id, trial_name)
    if existing is not None and existing.info.status == "FINISHED":  # it ran to its end before the driver was lost
        metric, steps = context.sweep.metric, spec.train.steps
        ray.tune.report(sweep_resume.recorded_report(context.tracking_uri, existing, metric, steps, STEPS_TOTAL))
        return
    run, logged_up_to = open_child_run(context, spec, params, trial_id, trial_name, existing)
    output_dir = Path(context.sweep_dir) / "outputs" / trial_id
    try:
        spec = model_refs.with_local_init_from(spec, context.tracking_uri, output_dir / "init_from")  # runs:/, models:/
        if context.resources.nested:
            _train_nested(spec, context, run, output_dir, trial_id)
        else:
            _train_here(spec, context, run, output_dir, logged_up_to)
    except SystemExit:
        raise  # Tune stopped the trial (scheduler or Ctrl-C): the driver closes the run (sweep_monitor)
    except BaseException as err:
        run.fail(err)
        raise


def _train_here(
    spec, context: TrialContext, run: tracking.TrackedRun, output_dir: Path, logged_up_to: int
) -> dict[str, float]:
    """Single-worker trial: the pipeline in this Tune actor; returns the final metrics (+ evaluations)."""
    import torch

    from fotlab.orchestrate.pipeline import run_pipeline
    from fotlab.orchestrate.worker import latest_checkpoint_in, resume_dir
    from fotlab.train.runtime import Runtime, TrainHooks

    resources = context.resources
    torch.set_num_threads(max(1, int(resources.cpus_per_worker)))
    device = "cuda" if resources.gpus_per_worker > 0 and torch.cuda.is_available() else "cpu"
    reporter = TrialReporter(run, context.sweep.metric, spec.train.steps, logged_up_to)
    resume_from = resume_dir(output_dir, spec.train.framework)
    if resume_from is not None:
        run.set_tags({TAG_RESUMED_FROM: str(latest_checkpoint_in(resume_from, spec.train.framework))})
    runtime = Runtime(output_dir=output_dir, device=device, resume_from=resume_from)
    result = run_pipeline(spec, run, runtime, TrainHooks(reporter.on_log))
    close_child_run(run, result.metrics, result.final_step)
    reporter.latest.update(result.metrics)
    reporter.report(result.final_step, model_dir=str(result.model_dir))
    return result.metrics


def close_child_run(run: tracking.TrackedRun, metrics: dict[str, float], step: int) -> None:
    """Final metrics not logged yet, then FINISHED (a trial that ran to its last step)."""
    run.close(metrics, step, {TAG_STOPPED_EARLY: "false"})


def trial_trainer(
    spec, context: TrialContext, run: tracking.TrackedRun, output_dir: Path, trial_id: str, callbacks: Sequence = ()
):
    """The nested Ray trainer of a multi-worker trial (`trainer.build_trainer`, as `fotlab run`); `callbacks`:
    the trial's `TuneReportCallback` (it can only be made inside the Tune session).

    Rerunning with the same run name and storage path resumes from the trial's checkpoints.
    """
    from fotlab.orchestrate.trainer import WorkerConfig, build_trainer
    from fotlab.orchestrate.worker import train_worker

    config = WorkerConfig(
        spec=spec, run_id=run.run_id, tracking_uri=run.uri, output_dir=str(output_dir), report_every=NESTED_REPORT_EVERY
    )
    return build_trainer(
        train_worker,
        config,
        run_name=f"train-{trial_id}",
        storage_path=str(Path(context.sweep_dir) / "nested"),
        callbacks=callbacks,
    )


def _train_nested(
    spec, context: TrialContext, run: tracking.TrackedRun, output_dir: Path, trial_id: str
) -> dict[str, float]:
    """Multi-worker trial: fit the nested trainer (its workers run the pipeline), then close the child run."""
    from ray.tune.integration.ray_train import TuneReportCallback

    result = trial_trainer(spec, context, run, output_dir, trial_id, callbacks=[TuneReportCallback()]).fit()
    value = result.return_value or {}
    metrics = numeric_metrics(value.get("metrics") or result.metrics or {})
    close_child_run(run, metrics, int(value.get("final_step") or spec.train.steps))
    return metrics
