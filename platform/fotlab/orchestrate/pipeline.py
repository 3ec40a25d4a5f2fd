"""The one experiment pipeline: train -> log the model -> register it -> the spec's evaluations, on a `TrackedRun`.

    result = run_pipeline(spec, run, Runtime(output_dir=Path("out")), TrainHooks(on_log=...))

Every entry point calls it: each Ray Train worker of `fotlab run` and of a multi-worker sweep trial
(`worker.train_worker`), a single-worker sweep trial (`sweep_trial`), and the paper reproductions
(`reproduce`). So a run's MLflow layout (params and tags from `tracking.start_spec_run`, train/val metrics, eval
metrics and plots, `time/*`, the dataset inputs, the MLflow Model, the registered version) is the same whichever
started it.
Only rank 0 evaluates, logs and registers; the other ranks return after training. Opening and closing the run
stay with the caller (the driver owns them). The model is logged before the evaluations run, so an evaluation
that fails still leaves the trained model in the run (`fotlab eval SPEC --model runs:/ID` re-runs them).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from fotlab import names
from fotlab.errors import DiskFullError
from fotlab.tracking import TrackedRun, numeric_metrics


@dataclasses.dataclass
class PipelineResult:
    """What one pipeline produced (rank 0 has the evaluation metrics; other ranks only the training part)."""

    final_step: int
    metrics: dict[str, float]  # training (train/*, val/*) + evaluations (eval/*) + time/*
    model_dir: Path
    checkpoint_dir: Path | None = None
    stopped_early: bool = False
    registered_version: str | None = None


def run_pipeline(
    spec, run: TrackedRun, runtime, hooks=None, *, model_dir: Path | None = None, console=None
) -> PipelineResult:
    """Train `spec` (its framework's loop, `train_function`, with `runtime` and `hooks`), then on rank 0: the model
    logged into `run` (`tracking.log_model`) and registered (`tracking.register_model`), and the spec's evaluations
    logged.

    `model_dir` skips training and evaluates that saved model (a reproduction's evaluations repaired later).
    A run stopped early (a stop request) skips the rest: it resumes later and finishes then.
    """
    t0 = time.time()
    datasets = []
    if model_dir is None:
        trained = train_function(spec)(spec, runtime, hooks)
        result = PipelineResult(
            trained.final_step,
            numeric_metrics(trained.metrics),
            Path(trained.model_dir),
            Path(trained.checkpoint_dir),
            bool(trained.stopped_early),
        )
        timings = {names.TRAIN_TIME_S: time.time() - t0}
        datasets = trained.datasets
    else:
        result = PipelineResult(spec.train.steps, {}, Path(model_dir))
        timings = {}
    if runtime.rank != 0 or result.stopped_early:
        return result
    # What training logged has reached the tracking server (a bounded wait), or the run goes offline: the steps
    # below then keep their metrics and the model folder for `fotlab runs deliver` and skip the server.
    run.settle()
    run.log_datasets(datasets)  # what training read (dataset inputs: digest, documents, tokens)
    if spec.tracking.log_model and model_dir is None:
        _log_model(run, result)  # an MLflow Model, linked to the final metrics
        if spec.tracking.register_model:
            result.registered_version = run.register_model(spec.tracking.register_model)
    t1 = time.time()
    result.metrics.update(
        evaluate(
            spec,
            result.model_dir,
            run,
            result.final_step,
            Path(runtime.output_dir) / "eval",
            device=runtime.device,
            console=console,
        )
    )
    if spec.eval.selected():
        timings[names.EVAL_TIME_S] = time.time() - t1
    result.metrics.update(run.log_metrics(timings, step=result.final_step))
    run.link_metrics(result.final_step)  # the evaluations' metrics belong to the logged model too
    return result


def _log_model(run: TrackedRun, result: PipelineResult) -> None:
    """`run.log_model_dir` of the trained model; an artifact store that is full becomes one `DiskFullError` naming
    what is kept (the saved model, the last checkpoint), so the run fails resumable like a full checkpoint disk."""
    from fotlab.train.checkpoint import intact_note
    from fotlab.train.disk_full import is_disk_full, no_space

    try:
        run.log_model_dir(result.model_dir, step=result.final_step)
    except Exception as err:
        if not is_disk_full(err):
            raise
        store = _local_artifact_dir(run)
        where = f" ({store}): {no_space(store)}" if store else ": no space left on device"
        kept = f"; {intact_note(result.checkpoint_dir, 'the last checkpoint')}" if result.checkpoint_dir else ""
        raise DiskFullError(
            f"the model could not be copied into the MLflow artifact store{where}; it is saved in {result.model_dir}"
            f"{kept}"
        ) from err


def _local_artifact_dir(run: TrackedRun) -> Path | None:
    """The run's artifact folder when the artifact store is a local folder (file://), else None."""
    from urllib.parse import urlparse

    try:
        uri = urlparse(run.info().info.artifact_uri)
    except Exception:  # noqa: BLE001 - only the message's detail depends on it
        return None
    return Path(uri.path) if uri.scheme in ("", "file") else None


def train_function(spec):
    """The training loop of `spec.train.framework`: `fotlab.train.train` (PyTorch) or `fotlab.jax.train.train`
    (JAX; same Runtime / TrainHooks / TrainResult contract, so everything after training is shared)."""
    if spec.train.framework == "jax":
        from fotlab.jax.train import train as jax_train

        return jax_train
    from fotlab.train import train

    return train


def evaluate(
    spec, model_dir: Path, run: TrackedRun, step: int, output_dir: Path, device=None, console=None
) -> dict[str, float]:
    """The spec's evaluations on the saved model in `model_dir`, logged into `run` at `step` (plots and JSON
    results written under `output_dir` first); their metrics."""
    if not spec.eval.selected():
        return {}
    from fotlab.eval.loading import load_model_and_tokenizer
    from fotlab.eval.runner import run_spec_evaluations

    model, tokenizer = load_model_and_tokenizer(Path(model_dir), spec, device=None if device is None else str(device))
    results = run_spec_evaluations(spec, model, tokenizer, output_dir, run=run, step=step, console=console)
    return {key: value for r in results.values() for key, value in r.metrics.items()}
