"""The one builder of the Ray Train trainer: a spec + a frozen `WorkerConfig` -> a Train V2 `TorchTrainer` (or a
`JaxTrainer` for `train.framework: jax`).

    config = WorkerConfig(spec=spec, run_id=run.run_id, tracking_uri=run.uri, output_dir="runs/x/output")
    trainer = build_trainer(train_worker, config, run_name="x", storage_path="runs")

`fotlab run` (`runner`) and multi-worker sweep trials (`sweep_trial`) both build their trainer here, so every
`scaling`, `storage` and `failure` field of a spec means the same in both. The trainer kind is one branch in
`build_trainer` on `train.framework` (`_torch_trainer`, `_jax_trainer`); the worker function and its typed config
stay the caller's (`worker.train_worker` serves both frameworks).
JAX: on TPU (`scaling.use_tpu`, `topology`, `accelerator_type`) Ray reserves the slice, sets JAX_PLATFORMS=tpu
and calls `jax.distributed.initialize` on every worker (one per TPU host); on CPU it does not, so a CPU JAX run
has one worker (the spec checks refuse more, `fotlab.spec.checks`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fotlab.errors import FotlabError


@dataclasses.dataclass(frozen=True)
class WorkerConfig:
    """Everything a Ray Train worker needs besides Ray's own context (picklable, sent once to every worker).

    spec: the validated `ExperimentSpec` itself (typed values travel to the model; nothing is re-parsed).
    run_id / tracking_uri: the MLflow run rank 0 logs into (created on the driver).
    output_dir: where the loop writes checkpoints and the final model (shared between ranks on one host).
    report_every: `ray.train.report` every this many steps between checkpoints.
    (A worker resumes whenever output_dir holds a checkpoint: a `--resume`, a restored sweep trial, or Ray
    restarting failed workers; see `worker.resume_dir`.)
    channel: the driver's live-progress / stop channel (None: no live display, no graceful stop).
    quiet: workers keep their console to warnings (the driver draws the live display).
    """

    spec: Any  # fotlab.spec.ExperimentSpec
    run_id: str
    tracking_uri: str
    output_dir: str
    report_every: int = 50
    channel: Any = None  # fotlab.orchestrate.channel.ChannelHandle | None
    quiet: bool = False


def output_dir_for(storage: str, ray_run_name: str) -> Path:
    """Where the workers write checkpoints and the final model (shared local folder on one host)."""
    if "://" in storage:
        return Path(tempfile.gettempdir()) / "fotlab" / ray_run_name / "output"
    return Path(storage) / ray_run_name / "output"


def storage_filesystem(kind: str | None):
    """A pyarrow filesystem for `storage.filesystem` ("s3" honours AWS_ENDPOINT_URL, e.g. MinIO; "gcs"), or None."""
    if kind is None:
        return None
    import pyarrow.fs

    if kind == "s3":
        return pyarrow.fs.S3FileSystem(endpoint_override=os.environ.get("AWS_ENDPOINT_URL"))
    if kind in ("gcs", "gs"):
        return pyarrow.fs.GcsFileSystem()
    if kind == "local":
        return pyarrow.fs.LocalFileSystem()
    raise FotlabError(f"storage.filesystem: unknown filesystem {kind!r} (use s3, gcs or local)")


def scaling_config(scaling):
    """`ray.train.ScalingConfig` from the spec's `scaling` section (workers, elastic range, GPU, TPU slice,
    accelerator)."""
    from ray.train import ScalingConfig

    workers: int | tuple[int, int] = scaling.num_workers
    if scaling.min_workers is not None and scaling.min_workers < scaling.num_workers:
        workers = (scaling.min_workers, scaling.num_workers)  # Ray Train's elastic worker group
    kwargs: dict[str, Any] = dict(num_workers=workers, use_gpu=scaling.use_gpu)
    if scaling.resources_per_worker:
        kwargs["resources_per_worker"] = dict(scaling.resources_per_worker)
    if scaling.use_tpu:
        kwargs.update(use_tpu=True, topology=scaling.topology)
    if scaling.accelerator_type:
        kwargs["accelerator_type"] = scaling.accelerator_type
    return ScalingConfig(**kwargs)


def run_config(spec, run_name: str, storage_path: str, callbacks: Sequence = (), quiet: bool = False):
    """`ray.train.RunConfig` from the spec's `storage` and `failure` sections (checkpoint retention is fotlab's:
    see `fotlab.train.checkpoint`)."""
    from ray.train import FailureConfig, LoggingConfig, RunConfig

    # the cluster's default (compose / KubeRay set FOTLAB_STORAGE_FILESYSTEM beside FOTLAB_STORAGE_PATH)
    filesystem = storage_filesystem(spec.storage.filesystem or os.environ.get("FOTLAB_STORAGE_FILESYSTEM"))
    if filesystem is not None and "://" in storage_path:
        storage_path = storage_path.split("://", 1)[1]  # Ray wants `bucket/path` beside a custom filesystem
    return RunConfig(
        name=run_name,
        storage_path=storage_path,
        storage_filesystem=filesystem,
        failure_config=FailureConfig(max_failures=spec.failure.max_failures),
        logging_config=LoggingConfig(log_level="WARNING" if quiet else "INFO"),
        callbacks=list(callbacks) or None,
    )


def build_trainer(
    worker_fn: Callable[[WorkerConfig], Any],
    config: WorkerConfig,
    *,
    run_name: str,
    storage_path: str,
    callbacks: Sequence = (),
):
    """The Ray trainer whose workers each call `worker_fn(config)`; Ray run `run_name` under `storage_path`
    (rerunning with the same two continues that Ray run). `callbacks`: Ray Train callbacks (a sweep trial's
    `TuneReportCallback`)."""
    spec = config.spec
    scaling = scaling_config(spec.scaling)
    run = run_config(spec, run_name, storage_path, callbacks, quiet=config.quiet)
    if spec.train.framework == "jax":
        return _jax_trainer(worker_fn, config, scaling, run)
    return _torch_trainer(worker_fn, config, scaling, run)


def _torch_trainer(worker_fn, config: WorkerConfig, scaling, run):
    from ray.train.torch import TorchConfig, TorchTrainer

    return TorchTrainer(
        functools.partial(worker_fn, config),  # a frozen dataclass, not Ray's dict of string keys
        scaling_config=scaling,
        run_config=run,
        torch_config=TorchConfig(backend="nccl" if config.spec.scaling.use_gpu else "gloo"),
    )


def _jax_trainer(worker_fn, config: WorkerConfig, scaling, run):
    from ray.train.v2.jax import JaxTrainer

    return JaxTrainer(functools.partial(worker_fn, config), scaling_config=scaling, run_config=run)
