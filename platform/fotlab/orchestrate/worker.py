"""The Ray Train worker function: resolve this worker's environment, then run the experiment pipeline.

Design choices:
- Everything Ray-specific about a worker lives here and stays short: rank / world size / device from
  `ray.train.get_context()`, the model wrapper (`ray.train.torch.prepare_model` for DDP; fotlab's own FSDP2,
  `fotlab.train.sharding`, when `spec.scaling.strategy == "fsdp"`: Ray's FSDP refuses CPU). The worker gets a
  frozen `trainer.WorkerConfig` (the validated spec itself, not re-parsed) and calls `pipeline.run_pipeline`
  (train -> log model -> register -> evaluations; rank 0 logs).
- Checkpoints are fotlab's (`fotlab.train.checkpoint`, kept per `train.keep_checkpoints`) in the run's output
  folder; Ray's reports carry metrics only (see `trainer.run_config`), and a restart resumes from that folder.
  A resume after a crash (`--resume`, a Ray restart) re-trains the steps between that checkpoint and the
  crash: rank 0's `TrackedRun` knows each metric's highest logged step and drops those points (one point per
  metric and step, `fotlab.metric_delivery`). It sends metrics from a background thread, so a tracking server
  that is down does not stop training; at the end it waits for them at most `tracking.flush_timeout_s` and
  saves what did not arrive (the driver then says where, see `runner.close_run`).
- Hooks run on every rank: rank 0 logs metrics to the driver's MLflow run and pushes them to the live display;
  all ranks call `ray.train.report` together (every `report_every` steps and at each checkpoint).
- One worker function for both `train.framework`s: a JAX run (Ray's `JaxTrainer`, see `trainer.build_trainer`)
  differs only in its torch device (CPU) and in having no model wrapper; the loop itself comes from the pipeline.
- A stop request from the driver (Ctrl-C) is checked every `STOP_POLL_STEPS` steps and agreed on by all ranks
  (all-reduce; a JAX run has no torch process group, its loop all-gathers the flag over JAX processes), so every
  rank stops after the same step and writes one last checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path
from typing import Any

import torch

from fotlab import names
from fotlab.orchestrate.live_metrics import LiveMetrics
from fotlab.orchestrate.trainer import WorkerConfig
from fotlab.tracking import TrackedRun, numeric_metrics

STOP_POLL_STEPS = 5  # should_stop() asks the driver every this many steps


class WorkerHooks:
    """`TrainHooks` callables for one worker."""

    def __init__(self, config: WorkerConfig, run: TrackedRun, rank: int, world_size: int, device: torch.device) -> None:
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.report_every: int = max(1, int(config.report_every))
        self.channel = config.channel
        self._last_report_step = 0
        self._n_stop_polls = 0
        self.run = run
        self.live = LiveMetrics.for_worker(config, rank)  # Prometheus, through ray.util.metrics

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        self.live.on_log(step, metrics)
        if self.rank == 0:
            self.run.log_metrics(metrics, step)  # steps logged before a restart are dropped there
            if self.channel is not None:
                self.channel.push(step, metrics)
        if step - self._last_report_step >= self.report_every:
            import ray.train

            self._last_report_step = step
            ray.train.report(_report_metrics(step, metrics))

    def on_checkpoint(self, step: int, path: Path, metrics: dict[str, float]) -> None:
        import ray.train

        self._last_report_step = step
        ray.train.report(_report_metrics(step, metrics))  # the checkpoint stays fotlab's (see the module doc)
        if names.CHECKPOINT_TIME_S in metrics:
            self.live.on_checkpoint(step, metrics[names.CHECKPOINT_TIME_S])

    def should_stop(self) -> bool:
        self._n_stop_polls += 1
        if self.channel is None or self._n_stop_polls % STOP_POLL_STEPS:
            return False
        wanted = self.channel.stop_requested() if self.rank == 0 else False
        if self.world_size > 1 and torch.distributed.is_initialized():
            flag = torch.tensor([1.0 if wanted else 0.0], device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            wanted = bool(flag.item() > 0)
        return wanted


def _report_metrics(step: int, metrics: dict[str, Any]) -> dict[str, Any]:
    return {"step": int(step), **numeric_metrics(metrics)}


def resume_dir(output_dir: Path, framework: str = "torch") -> Path | None:
    """This run's checkpoints root when it holds one (a `--resume`, or Ray restarting failed workers), else None."""
    root = Path(output_dir) / "checkpoints"
    return root if latest_checkpoint_in(root, framework) is not None else None


def latest_checkpoint_in(root: Path, framework: str = "torch") -> Path | None:
    """The newest complete checkpoint under the checkpoints root `root` of a `train.framework` run (fotlab.train's
    `step-*` folders, or the JAX loop's orbax `step_*` ones), or None."""
    if framework == "jax":
        from fotlab.jax.steps import latest_step, step_path

        step = latest_step(root)
        return None if step is None else step_path(root, step)
    from fotlab.train.checkpoint import latest_checkpoint

    return latest_checkpoint(Path(root))


def wrap_model_fn(spec, n_workers: int, device: torch.device):
    """(`Runtime.wrap_model`, sharded) for a worker: FSDP2 (fotlab.train.sharding) for strategy fsdp, at any
    number of workers (a 1-worker resume of an FSDP run stays sharded); else Ray's prepare_model (DDP)."""
    import ray.train.torch

    if spec.scaling.strategy == "fsdp":
        from fotlab.train.sharding import FsdpSettings, fsdp_wrapper

        return fsdp_wrapper(FsdpSettings.from_spec(spec), device), True
    parallel = None if n_workers <= 1 else "ddp"
    return functools.partial(ray.train.torch.prepare_model, parallel_strategy=parallel), False


def train_worker(config: WorkerConfig) -> dict[str, Any]:
    """`train_loop_per_worker` of the trainer (`trainer.build_trainer`): the pipeline on this worker.

    Both frameworks run here (the pipeline picks the loop from `spec.train.framework`). A JAX worker never asks
    Ray for a torch device (on a TPU worker that would need torch_tpu): its torch side (data pipeline,
    evaluations on the saved `model/`) runs on CPU, and JAX picks its own devices.
    Returns (rank 0's value becomes `Result.return_value`): final_step, metrics, model_dir, stopped_early, and
    undelivered (the file of metrics the tracking server did not get, or None).
    """
    import ray.train

    from fotlab.orchestrate.pipeline import run_pipeline
    from fotlab.train.runtime import Runtime, TrainHooks

    spec = config.spec
    jax = spec.train.framework == "jax"
    if config.quiet:
        quiet_worker_logs()
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = torch.device("cpu") if jax else _torch_device()
    run = TrackedRun(config.tracking_uri, config.run_id, experiment_id="")
    if rank == 0:  # a restarted run starts from the steps its MLflow run holds, and what it left unsent
        run.deliver_in_background(config.output_dir, spec.tracking.flush_timeout_s)
    hooks = WorkerHooks(config, run, rank, world_size, device)
    resume_from = resume_dir(Path(config.output_dir), spec.train.framework)
    placement: dict[str, Any] = {}  # the JAX loop places its arrays itself (fotlab.jax.sharding)
    if not jax:
        placement["wrap_model"], placement["sharded"] = wrap_model_fn(spec, world_size, device)
    runtime = Runtime(
        output_dir=Path(config.output_dir),
        device=device,
        rank=rank,
        world_size=world_size,
        resume_from=resume_from,
        **placement,
    )
    try:
        result = run_pipeline(spec, run, runtime, TrainHooks(hooks.on_log, hooks.on_checkpoint, hooks.should_stop))
    except BaseException:
        with contextlib.suppress(Exception):  # the metrics logged before the error reach the run (or a file)
            run.end_delivery()
        raise
    undelivered = run.end_delivery()  # None on ranks > 0: they log nothing
    return {
        "final_step": result.final_step,
        "metrics": result.metrics,
        "model_dir": str(result.model_dir),
        "checkpoint_dir": str(result.checkpoint_dir),
        "stopped_early": result.stopped_early,
        "resumed_from": str(resume_from) if resume_from else None,
        "undelivered": str(undelivered.path) if undelivered is not None else None,
    }


def _torch_device() -> torch.device:
    import ray.train.torch

    return ray.train.torch.get_device()


def quiet_worker_logs() -> None:
    """Keep this worker's console to warnings: the driver's live display already shows step, loss and tokens/s.

    The training loop's per-step lines and transformers' save/load bars go quiet, and so does Ray Train's
    "Reporting training result" line, whose logger (Ray 2.60) is named after its source file rather than
    "ray.train" (so `LoggingConfig` misses it).
    """
    logging.getLogger("fotlab.train").setLevel(logging.WARNING)
    logging.getLogger("fotlab.jax").setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" / "Loading weights" bars, one line each under Ray
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # another Ray layout: the line stays, nothing breaks
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
