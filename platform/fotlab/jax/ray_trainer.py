"""Ray Train for the JAX path: a `ray.train.v2.jax.JaxTrainer` built from the spec's scaling.

    fotlab run experiments/quickstart.yaml --set train.framework=jax

Design choices:
- The workers run `jax_train_worker`: fotlab's Ray worker pieces (`orchestrate.worker`: MLflow hooks, Ray
  reports and checkpoints, evaluations, model logging and registration) around the loop entry point
  `fotlab.jax.train:train`, so a JAX run has the same MLflow layout as a PyTorch run (params, step metrics,
  model, evals). It differs from the torch worker only in never asking Ray for a torch device (on a TPU worker
  that would need torch_tpu): the torch side (data pipeline, evaluations on the saved `model/`) runs on CPU.
- TPU: `ScalingConfig(use_tpu=True, topology=..., accelerator_type=...)`; Ray reserves the slice, sets
  JAX_PLATFORMS=tpu (unless already set) and calls `jax.distributed.initialize` on every worker (one per TPU
  host). Without TPU (CPU) Ray does not initialise jax.distributed, so a CPU JAX run uses one worker.
- The run config (storage, failures, checkpoint retention, logging) is the caller's, shared with TorchTrainer.
"""

from __future__ import annotations

from typing import Any

from fotlab.errors import FotlabError

JAX_TRAIN_FN = "fotlab.jax.train:train"


def jax_scaling_kwargs(spec) -> dict[str, Any]:
    """ScalingConfig arguments for a JAX run from `spec.scaling`."""
    scaling = spec.scaling
    if scaling.use_gpu:
        raise FotlabError("scaling.use_gpu: the JAX path runs on TPU or CPU here; use train.framework: torch for GPUs")
    n_workers = scaling.num_workers  # 0 = in the driver process (Ray Train local mode)
    if not scaling.use_tpu and n_workers > 1:
        raise FotlabError(f"scaling.num_workers: {n_workers} CPU workers with train.framework jax (Ray initialises "
                          "jax.distributed only on TPU); use 1 worker, or scaling.use_tpu")
    kwargs: dict[str, Any] = dict(num_workers=n_workers, use_tpu=scaling.use_tpu)
    if scaling.use_tpu:
        kwargs["topology"] = scaling.topology
    if scaling.accelerator_type:
        kwargs["accelerator_type"] = scaling.accelerator_type
    if scaling.resources_per_worker:
        kwargs["resources_per_worker"] = dict(scaling.resources_per_worker)
    return kwargs


def build_jax_trainer(spec, train_loop_config: dict[str, Any], run_config):
    """A JaxTrainer running fotlab's worker function with the JAX loop (see module docstring)."""
    from ray.train import ScalingConfig
    from ray.train.v2.jax import JaxTrainer

    config = dict(train_loop_config)
    config["train_fn"] = config.get("train_fn") or JAX_TRAIN_FN
    return JaxTrainer(jax_train_worker, train_loop_config=config,
                      scaling_config=ScalingConfig(**jax_scaling_kwargs(spec)), run_config=run_config)


def jax_train_worker(config: dict[str, Any]) -> dict[str, Any]:
    """`train_loop_per_worker` of the JaxTrainer: one call of the JAX loop; returns what the torch worker returns."""
    import contextlib
    from pathlib import Path

    import ray.train
    import torch

    from fotlab.orchestrate import worker as W
    from fotlab.spec import parse_spec
    from fotlab.train.runtime import Runtime, TrainHooks

    spec = parse_spec(config["spec"], "<run spec>", check_paths=False)
    if config.get("quiet"):
        W.quiet_worker_logs()
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = torch.device("cpu")  # the torch side only; JAX picks its own devices
    hooks = W.WorkerHooks(config, rank, world_size, device)
    with contextlib.ExitStack() as stack:
        resume_from = W._resume_dir(config, stack)
        runtime = Runtime(output_dir=Path(config["output_dir"]), device=device, rank=rank, world_size=world_size,
                          resume_from=resume_from, barrier=lambda: None)
        train = W.load_entry_point(config["train_fn"])
        result = train(spec, runtime, TrainHooks(hooks.on_log, hooks.on_checkpoint, hooks.should_stop))
    metrics = dict(result.metrics)
    if rank == 0 and not result.stopped_early:
        metrics.update(W.run_evaluations(spec, result, device, hooks.run))
        if config.get("log_model", True):
            hooks.run.log_model_dir(result.model_dir)
            if spec.tracking.register_model:
                hooks.run.register_model(spec.tracking.register_model)
    return {"final_step": result.final_step, "metrics": metrics, "model_dir": str(result.model_dir),
            "checkpoint_dir": str(result.checkpoint_dir), "stopped_early": bool(result.stopped_early),
            "resumed_from": str(resume_from) if resume_from else None}
