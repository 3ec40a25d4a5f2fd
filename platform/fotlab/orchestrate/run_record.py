"""The MLflow side of one training run, as the driver sees it.

Design choices:
- The driver creates the experiment (with an explicit artifact location next to a sqlite store: an experiment
  first created inside a Ray worker would put its artifacts under Ray's temporary session dir) and the run, then
  hands the run id to rank 0, which logs step metrics and the final model into the same run.
- The Ray Train run name and storage path are stored as tags, so `--resume RUN` (an MLflow run id or run name)
  finds the Ray run to continue; a resumed run continues the same MLflow run id.
- Only the MLflow client API is used (no fluent "active run" state), so several runs can share one process.
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import time
from pathlib import Path
from typing import Any

import fotlab
from fotlab.errors import FotlabError

TAG_RAY_RUN_NAME = "fotlab.ray_run_name"
TAG_STORAGE_PATH = "fotlab.storage_path"
TAG_VERSION = "fotlab.version"
TAG_RESUMABLE = "fotlab.resumable"
TAG_ERROR = "fotlab.error"
TAG_GIT_COMMIT = "mlflow.source.git.commit"
SPEC_ARTIFACT = "spec.yaml"
MAX_PARAM_LEN = 6000  # MLflow's limit on a param value


class RunNotFoundError(FotlabError):
    """`--resume RUN` names no MLflow run (by id or by name)."""


def git_commit(cwd: Path | None = None) -> str | None:
    """The current git commit of the working tree, or None outside a repository."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def numeric_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Keep finite numbers only (MLflow rejects other values; NaN/inf still show in the error text)."""
    kept = {}
    for key, value in (metrics or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            kept[key] = float(value)
    return kept


def log_metrics(client, run_id: str, metrics: dict[str, Any], step: int) -> None:
    """Log a dict of metrics at one step in a single request."""
    from mlflow.entities import Metric

    now_ms = int(time.time() * 1000)
    batch = [Metric(k, v, now_ms, int(step)) for k, v in numeric_metrics(metrics).items()]
    if batch:
        client.log_batch(run_id, metrics=batch)


@dataclasses.dataclass
class RunRecord:
    """An MLflow run opened (or reopened) by the driver for one training run."""

    tracking_uri: str
    experiment_id: str
    run_id: str
    run_name: str
    ray_run_name: str
    storage_path: str
    resumed: bool = False

    @property
    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.tracking_uri)

    def finish(self, metrics: dict[str, Any], step: int) -> None:
        """Final metrics (the model artifact was logged by rank 0), status FINISHED."""
        client = self.client
        log_metrics(client, self.run_id, metrics, step)
        client.set_tag(self.run_id, TAG_RESUMABLE, "false")
        client.set_terminated(self.run_id, status="FINISHED")

    def fail(self, error: BaseException, *, status: str = "FAILED", resumable: bool = False) -> None:
        """Mark the run FAILED (or KILLED) with a one-line error; never raises (the original error matters)."""
        try:
            client = self.client
            client.set_tag(self.run_id, TAG_ERROR, one_line(error)[:MAX_PARAM_LEN])
            client.set_tag(self.run_id, TAG_RESUMABLE, "true" if resumable else "false")
            client.set_terminated(self.run_id, status=status)
        except Exception:  # noqa: BLE001 - the training error is the one to report
            pass


def one_line(error: BaseException) -> str:
    """`Type: first line of the message` for an error (Ray's wrapped worker errors included)."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".strip()


def get_or_create_experiment(client, name: str, artifact_location: str | None) -> str:
    """The id of experiment ``name``, creating it on the driver with an explicit artifact location."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException:  # created meanwhile by another driver
        return client.get_experiment_by_name(name).experiment_id


def open_run(spec, tracking_uri: str, ray_run_name: str, storage_path: str) -> RunRecord:
    """Create a new MLflow run for ``spec``: params = the flattened spec, the spec YAML, git + version tags."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    from fotlab.spec import flatten_spec, resolve_artifact_root, spec_to_yaml

    client = MlflowClient(tracking_uri)
    experiment = spec.tracking.experiment or spec.name
    experiment_id = get_or_create_experiment(client, experiment, resolve_artifact_root(spec, tracking_uri))
    tags = dict(spec.tags)
    tags.update({TAG_RAY_RUN_NAME: ray_run_name, TAG_STORAGE_PATH: storage_path, TAG_VERSION: fotlab.__version__})
    commit = git_commit()
    if commit:
        tags[TAG_GIT_COMMIT] = commit
    if spec.description:
        tags["mlflow.note.content"] = spec.description
    run_name = spec.tracking.run_name or ray_run_name
    run_id = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
    items = [Param(k, v[:MAX_PARAM_LEN]) for k, v in flatten_spec(spec).items()]
    for start in range(0, len(items), 100):  # MLflow takes at most 100 params per request
        client.log_batch(run_id, params=items[start : start + 100])
    client.log_text(run_id, spec_to_yaml(spec), SPEC_ARTIFACT)
    return RunRecord(tracking_uri, experiment_id, run_id, run_name, ray_run_name, storage_path)


def find_run(tracking_uri: str, run_ref: str):
    """The MLflow run named by ``run_ref``: a run id, or a run name (newest run of that name wins)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    try:
        return client.get_run(run_ref)
    except MlflowException:
        pass
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    quoted = run_ref.replace("'", "\\'")
    runs = client.search_runs(
        experiment_ids, filter_string=f"attributes.run_name = '{quoted}'", order_by=["attributes.start_time DESC"]
    ) if experiment_ids else []
    if not runs:
        raise RunNotFoundError(f"--resume {run_ref}: no MLflow run with that id or name in {tracking_uri}")
    return runs[0]


def reopen_run(tracking_uri: str, run_ref: str) -> RunRecord:
    """Reopen a run for resuming: same MLflow run id, same Ray run name + storage path (from its tags)."""
    run = find_run(tracking_uri, run_ref)
    tags = run.data.tags
    if TAG_RAY_RUN_NAME not in tags or TAG_STORAGE_PATH not in tags:
        raise RunNotFoundError(
            f"--resume {run_ref}: run {run.info.run_id} was not started by `fotlab run` (no {TAG_RAY_RUN_NAME} tag)"
        )
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    client.update_run(run.info.run_id, status="RUNNING")
    client.set_tag(run.info.run_id, TAG_RESUMABLE, "false")
    if TAG_ERROR in tags:
        client.delete_tag(run.info.run_id, TAG_ERROR)
    return RunRecord(
        tracking_uri,
        run.info.experiment_id,
        run.info.run_id,
        run.info.run_name,
        tags[TAG_RAY_RUN_NAME],
        tags[TAG_STORAGE_PATH],
        resumed=True,
    )
