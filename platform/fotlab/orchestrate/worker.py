"""The Ray Train worker function: resolve this worker's environment, then call the plain `fotlab.train.train`.

Design choices:
- Everything Ray-specific about a worker lives here and stays short: rank / world size / device from
  `ray.train.get_context()`, the model wrapper from `ray.train.torch.prepare_model` (DDP, or FSDP when
  `spec.scaling.strategy == "fsdp"`), the checkpoint to resume from `ray.train.get_checkpoint()`.
- Hooks run on every rank: rank 0 logs metrics to the driver's MLflow run and pushes them to the live display;
  all ranks call `ray.train.report` together (every `report_every` steps and at each checkpoint, with the
  checkpoint attached on rank 0 only).
- A stop request from the driver (Ctrl-C) is checked every `STOP_POLL_STEPS` steps and agreed on by all ranks
  (all-reduce), so every rank stops after the same step and writes one last checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path
from typing import Any

import torch

from fotlab.tracking import TrackedRun

STOP_POLL_STEPS = 5  # should_stop() asks the driver every this many steps
DEFAULT_TRAIN_FN = "fotlab.train:train"


def load_entry_point(ref: str):
    """`"package.module:function"` -> the function (the loop a worker runs; `train`'s signature)."""
    import importlib

    module_name, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module_name), attr)


class WorkerHooks:
    """`TrainHooks` callables for one worker; built from the config dict the driver passes."""

    def __init__(self, config: dict[str, Any], rank: int, world_size: int, device: torch.device) -> None:
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.report_every: int = max(1, int(config["report_every"]))
        self.channel = config.get("channel")
        self._last_report_step = 0
        self._n_stop_polls = 0
        self.run = TrackedRun(config["tracking_uri"], config["run_id"], experiment_id="")

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        if self.rank == 0:
            self.run.log_metrics(metrics, step)
            if self.channel is not None:
                self.channel.push(step, metrics)
        if step - self._last_report_step >= self.report_every:
            import ray.train

            self._last_report_step = step
            ray.train.report(_report_metrics(step, metrics))

    def on_checkpoint(self, step: int, path: Path, metrics: dict[str, float]) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(path)) if self.rank == 0 else None
        self._last_report_step = step
        ray.train.report(_report_metrics(step, metrics), checkpoint=checkpoint, checkpoint_dir_name=Path(path).name)

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
    from fotlab.orchestrate.run_record import numeric_metrics

    return {"step": int(step), **numeric_metrics(metrics)}


def _resume_dir(config: dict[str, Any], stack: contextlib.ExitStack) -> Path | None:
    """Ray's latest checkpoint of this run; else, when resuming, the workers' own checkpoints root (the only
    copy for an in-process run, whose checkpoints Ray does not persist)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        return Path(stack.enter_context(checkpoint.as_directory()))
    own = Path(config["output_dir"]) / "checkpoints"
    if config.get("resume") and own.is_dir() and any(own.iterdir()):
        return own
    return None


def wrap_model_fn(strategy: str, n_workers: int):
    """The `Runtime.wrap_model` for a worker: Ray's prepare_model (device placement + DDP/FSDP)."""
    import ray.train.torch

    parallel = None if n_workers <= 1 else ("fsdp" if strategy == "fsdp" else "ddp")
    return functools.partial(ray.train.torch.prepare_model, parallel_strategy=parallel)


def train_worker(config: dict[str, Any]) -> dict[str, Any]:
    """`train_loop_per_worker` for the TorchTrainer: one call of `fotlab.train.train` on this worker.

    Returns (rank 0's value becomes `Result.return_value`): final_step, metrics, model_dir, stopped_early.
    """
    import ray.train
    import ray.train.torch

    from fotlab.spec import parse_spec
    from fotlab.train.runtime import Runtime, TrainHooks

    spec = parse_spec(config["spec"], "<run spec>", check_paths=False)
    if config.get("quiet"):
        quiet_worker_logs()
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    hooks = WorkerHooks(config, rank, world_size, device)
    with contextlib.ExitStack() as stack:
        resume_from = _resume_dir(config, stack)
        runtime = Runtime(
            output_dir=Path(config["output_dir"]),
            device=device,
            rank=rank,
            world_size=world_size,
            resume_from=resume_from,
            wrap_model=wrap_model_fn(spec.scaling.strategy, world_size),
        )
        train = load_entry_point(config.get("train_fn") or DEFAULT_TRAIN_FN)
        result = train(spec, runtime, TrainHooks(hooks.on_log, hooks.on_checkpoint, hooks.should_stop))
    metrics = dict(result.metrics)
    if rank == 0 and not result.stopped_early:
        hooks.run.log_datasets(result.datasets)
        metrics.update(run_evaluations(spec, result, device, hooks.run))
        if config.get("log_model", True):
            hooks.run.log_model_dir(result.model_dir, step=result.final_step)
            if spec.tracking.register_model:
                hooks.run.register_model(spec.tracking.register_model)
    return {
        "final_step": result.final_step,
        "metrics": metrics,
        "model_dir": str(result.model_dir),
        "checkpoint_dir": str(result.checkpoint_dir),
        "stopped_early": bool(result.stopped_early),
        "resumed_from": str(resume_from) if resume_from else None,
    }


def quiet_worker_logs() -> None:
    """Keep this worker's console to warnings: the driver's live display already shows step, loss and tokens/s.

    The training loop's per-step lines and transformers' save/load bars go quiet, and so does Ray Train's "Reporting training result" line, whose
    logger (Ray 2.60) is named after its source file rather than "ray.train" (so `LoggingConfig` misses it).
    """
    logging.getLogger("fotlab.train").setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" / "Loading weights" bars, one line each under Ray
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # another Ray layout: the line stays, nothing breaks
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def run_evaluations(spec, result, device: torch.device, run: TrackedRun) -> dict[str, float]:
    """The spec's evaluations on the final model (rank 0), logged into the same MLflow run; their metrics."""
    if not spec.eval.selected():
        return {}
    from fotlab.eval.cli import load_model_and_tokenizer
    from fotlab.eval.runner import run_spec_evaluations

    model, tokenizer = load_model_and_tokenizer(Path(result.model_dir), spec, device=str(device))
    output_dir = Path(result.model_dir).parent / "eval"
    results = run_spec_evaluations(spec, model, tokenizer, output_dir, run=run, step=result.final_step)
    return {key: value for r in results.values() for key, value in r.metrics.items()}
