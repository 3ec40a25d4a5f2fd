"""One sweep trial: the Ray Tune function trainable around the plain `fotlab.train.train`.

Design choices:
- Single-worker trials (scaling.num_workers 0 or 1) call `train()` inside the Tune trainable and report with
  `ray.tune.report` (the report shim: `ray.train.report` raises inside Tune). No nested Train V2 trainer means
  nothing leaks when ASHA stops the trial (Ray 2.60 leaks a nested trainer's placement group and the sweep
  hangs), so early stopping is safe here.
- Multi-worker trials run a nested `TorchTrainer` (workers = `worker.train_worker`) whose reports reach Tune
  through `TuneReportCallback`. The driver refuses early stopping for them (`sweep_space.check_stopping`).
- Every report carries the sweep metric (Tune checks it), `step` (ASHA's time) and `steps_total`; a checkpoint
  goes with the report whenever the loop writes one, so `Tuner.restore` resumes a trial where it stopped.
- A report is where Tune stops a trial (`ray.tune.report` raises SystemExit). So nothing is reported at the last
  step from inside the loop: the trial saves its model, runs the spec's evaluations, closes its MLflow run and
  only then makes its final report. A trial stopped early (or by Ctrl-C) leaves its run to the driver
  (`sweep_monitor`), which knows which of the two it was.
- MLflow: the trial owns its child run (tags: `mlflow.parentRunId`, `fotlab.sweep`, `fotlab.trial_id`). A restored
  trial finds its run by trial id and continues it (no duplicate runs) and does not log steps it already logged.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

from fotlab import tracking
from fotlab.orchestrate.run_record import numeric_metrics
from fotlab.orchestrate.sweep_space import TIME_ATTR, TrialResources, decode_params

TAG_TRIAL_ID = "fotlab.trial_id"
TAG_SWEEP_ROLE = "fotlab.sweep_role"  # "parent" | "trial"
TAG_STOPPED_EARLY = "fotlab.stopped_early"
TAG_RESUMED_FROM = "fotlab.resumed_from"  # the checkpoint a restored trial continued from
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


def spec_for(context: TrialContext, params: dict[str, Any]):
    """The trial's experiment spec (base + set + params), tracked in the sweep's MLflow experiment."""
    from fotlab.spec import trial_spec

    spec = trial_spec(context.sweep, params, check_paths=False)  # checked on the driver by load_sweep
    tracking_section = spec.tracking.model_copy(update={"experiment": context.experiment, "uri": context.tracking_uri})
    return spec.model_copy(update={"tracking": tracking_section})


def child_run_id(uri: str, parent_run_id: str, trial_id: str) -> str | None:
    """The MLflow child run of `trial_id` under `parent_run_id`, if the trial created one already."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    parent = client.get_run(parent_run_id)
    found = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`{tracking.TAG_PARENT_RUN}` = '{parent_run_id}' and tags.`{TAG_TRIAL_ID}` = '{trial_id}'",
        max_results=1,
    )
    return found[0].info.run_id if found else None


def open_child_run(context: TrialContext, spec, params: dict[str, Any], trial_id: str,
                   trial_name: str) -> tuple[tracking.TrackedRun, int]:
    """(the trial's child run, the last step it already logged): created once, reopened on a restore.

    A new run gets the full spec as params plus the swept fields again as `sweep/<field>` params and as
    `fotlab.<field>` tags, and a name that says what varies (`<trial>: lr=0.003 memory.layers=[1]`), so MLflow's
    compare view and run table pick the trials apart.
    """
    existing = child_run_id(context.tracking_uri, context.parent_run_id, trial_id)
    tags = {tracking.TAG_SWEEP: context.sweep.name, TAG_SWEEP_ROLE: "trial", TAG_TRIAL_ID: trial_id,
            **tracking.swept_param_tags(params)}
    run_name = f"{trial_name}: {tracking.describe_params(params)}" if params else trial_name
    run = tracking.start_spec_run(spec, uri=context.tracking_uri, run_name=run_name, run_id=existing, tags=tags,
                                  parent_run_id=context.parent_run_id)
    if existing is None:
        run.log_params({f"sweep/{key}": value for key, value in params.items()})
        return run, 0
    history = run.client.get_metric_history(run.run_id, tracking.TRAIN_LOSS)
    return run, max((m.step for m in history), default=0)


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

    def on_checkpoint(self, step: int, path: Path, metrics: dict[str, float]) -> None:
        from ray.tune import Checkpoint

        self.latest.update(numeric_metrics(metrics))
        # Tune wants the metric in every report (without it a resume uses the trial's own checkpoint copy).
        if self.metric in self.latest and step < self.steps_total:
            self.report(step, checkpoint=Checkpoint.from_directory(str(path)))

    def report(self, step: int, checkpoint=None, **extra: Any) -> None:
        import ray.tune

        ray.tune.report({**self.latest, TIME_ATTR: int(step), STEPS_TOTAL: self.steps_total, **extra},
                        checkpoint=checkpoint)


def resume_dir(output_dir: Path, stack: contextlib.ExitStack) -> Path | None:
    """The newest checkpoint to resume from: the trial's own checkpoints (local) or Tune's (restored elsewhere)."""
    import ray.tune

    own = output_dir / "checkpoints"
    if own.is_dir() and any(own.glob("step-*")):
        return own
    checkpoint = ray.tune.get_checkpoint()
    if checkpoint is not None:
        return Path(stack.enter_context(checkpoint.as_directory()))
    return None


def run_trial(config: dict[str, Any], context: TrialContext) -> None:
    """The Tune function trainable: build the trial's spec and child run, train, report, close the run."""
    import ray.tune

    tune_context = ray.tune.get_context()
    trial_id = tune_context.get_trial_id()
    params = decode_params(config, context.sweep.search_space, context.decode)
    spec = spec_for(context, params)
    run, logged_up_to = open_child_run(context, spec, params, trial_id, tune_context.get_trial_name())
    output_dir = Path(context.sweep_dir) / "outputs" / trial_id
    try:
        spec = tracking.with_local_init_from(spec, context.tracking_uri, output_dir / "init_from")  # runs:/, models:/
        if context.resources.nested:
            _train_nested(spec, context, run, output_dir, trial_id)
        else:
            _train_here(spec, context, run, output_dir, logged_up_to)
    except SystemExit:
        raise  # Tune stopped the trial (scheduler or Ctrl-C): the driver closes the run (sweep_monitor)
    except BaseException as err:
        run.fail(err)
        raise


def _train_here(spec, context: TrialContext, run: tracking.TrackedRun, output_dir: Path,
                logged_up_to: int) -> dict[str, float]:
    """Single-worker trial: `train()` in this Tune actor; returns the final metrics (+ evaluations)."""
    import torch

    from fotlab.orchestrate.worker import run_evaluations
    from fotlab.train import train
    from fotlab.train.checkpoint import resolve_checkpoint
    from fotlab.train.runtime import Runtime, TrainHooks

    resources = context.resources
    torch.set_num_threads(max(1, int(resources.cpus_per_worker)))
    device = "cuda" if resources.gpus_per_worker > 0 and torch.cuda.is_available() else "cpu"
    reporter = TrialReporter(run, context.sweep.metric, spec.train.steps, logged_up_to)
    with contextlib.ExitStack() as stack:
        resume_from = resume_dir(output_dir, stack)
        if resume_from is not None:
            run.set_tags({TAG_RESUMED_FROM: str(resolve_checkpoint(resume_from))})
        runtime = Runtime(output_dir=output_dir, device=device, resume_from=resume_from)
        result = train(spec, runtime, TrainHooks(reporter.on_log, reporter.on_checkpoint))
    metrics = numeric_metrics(result.metrics)
    run.log_datasets(result.datasets)
    metrics.update(run_evaluations(spec, result, runtime.device, run))
    if spec.tracking.log_model:
        run.log_model_dir(result.model_dir, step=result.final_step)
    close_child_run(run, metrics, result.final_step)
    reporter.latest.update(metrics)
    reporter.report(result.final_step, model_dir=str(result.model_dir))
    return metrics


def close_child_run(run: tracking.TrackedRun, metrics: dict[str, float], step: int) -> None:
    """Final metrics not logged yet, then FINISHED (a trial that ran to its last step)."""
    logged = run.client.get_run(run.run_id).data.metrics
    run.log_metrics({k: v for k, v in metrics.items() if k not in logged}, step)
    run.set_tags({TAG_STOPPED_EARLY: "false"})
    run.finish("FINISHED")


def _train_nested(spec, context: TrialContext, run: tracking.TrackedRun, output_dir: Path,
                  trial_id: str) -> dict[str, float]:
    """Multi-worker trial: a nested Train V2 TorchTrainer whose reports reach Tune via TuneReportCallback.

    Rerunning with the same RunConfig(name, storage_path) resumes from its latest checkpoint (Train V2 resume).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from fotlab.orchestrate.worker import train_worker

    scaling = spec.scaling
    scaling_kwargs: dict[str, Any] = dict(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu)
    if scaling.resources_per_worker:
        scaling_kwargs["resources_per_worker"] = dict(scaling.resources_per_worker)
    config = {"spec": spec.model_dump(mode="json"),  # plain data, re-validated by the workers (as `fotlab run`)
              "run_id": run.run_id, "tracking_uri": run.uri, "log_model": spec.tracking.log_model,
              "output_dir": str(output_dir), "report_every": NESTED_REPORT_EVERY, "channel": None,
              "resume": True, "train_fn": None}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(**scaling_kwargs),
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        run_config=RunConfig(
            name=f"train-{trial_id}", storage_path=str(Path(context.sweep_dir) / "nested"),
            failure_config=FailureConfig(max_failures=spec.failure.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.train.keep_checkpoints),
            callbacks=[TuneReportCallback()],
        ),
    )
    result = trainer.fit()
    value = result.return_value or {}
    metrics = numeric_metrics(value.get("metrics") or result.metrics or {})
    close_child_run(run, metrics, int(value.get("final_step") or spec.train.steps))
    return metrics
