"""Ray Train for the JAX path: a `ray.train.v2.jax.JaxTrainer` built from the spec's scaling.

    fotlab run experiments/quickstart.yaml --set train.framework=jax

Design choices:
- The workers run fotlab's own Ray worker function (`orchestrate.worker.train_worker`: MLflow hooks, Ray reports
  and checkpoints, evaluations, model logging and registration) with the loop entry point
  `fotlab.jax.train:train`, so a JAX run has the same MLflow layout as a PyTorch run (params, step metrics,
  model, evals). Evaluations run in PyTorch on the saved `model/` directory.
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

    from fotlab.orchestrate.worker import train_worker

    config = dict(train_loop_config)
    config["train_fn"] = config.get("train_fn") or JAX_TRAIN_FN
    return JaxTrainer(train_worker, train_loop_config=config, scaling_config=ScalingConfig(**jax_scaling_kwargs(spec)),
                      run_config=run_config)
