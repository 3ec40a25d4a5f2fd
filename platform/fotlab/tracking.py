"""MLflow tracking for fotlab: the one gateway to MLflow (client factory, runs, models, registry); the metric and tag
names it writes are declared in `fotlab.names`.

    from fotlab import tracking
    exp_id = tracking.setup_experiment("sqlite:///mlflow.db", "quickstart", artifact_root=None)
    run = tracking.start_run("sqlite:///mlflow.db", exp_id, run_name="demo")
    run.log_spec(spec); run.log_metrics({tracking.TRAIN_LOSS: 2.3}, step=10); run.finish()

Design choices:
- Every MLflow call in fotlab goes through this module; `client(uri)` is the one `MlflowClient` factory.
- Only `MlflowClient` is used (no fluent "active run" state): several runs can live in one process, and a run
  created on the driver can be continued by id from rank 0 of a Ray worker (`start_run(..., run_id=...)`).
- Experiments are created on the driver with an explicit artifact location (an experiment first created inside
  a Ray worker puts its artifacts under Ray's temporary session dir).
- mlflow is imported inside functions, so importing this module (for the names) is cheap.
- Model references (`runs:/`, `models:/`, local folders) resolve to local model folders in `fotlab.model_refs`.
- Metric points are logged exactly once per (key, step); a training run sends them from a background thread that
  outlives a tracking-server outage, and a run that gives up on its server ("offline") makes no more calls to it
  and saves what it could not send for `fotlab runs deliver FILE` (`fotlab.metric_delivery`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import subprocess
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import fotlab
from fotlab.errors import FotlabError
from fotlab.errors import RemoteCodeError as RemoteCodeError  # re-exported: the MLflow Model path raises it
from fotlab.errors import check_no_remote_code as check_no_remote_code
from fotlab.metric_delivery import MetricDelivery, StepMarks, logged_steps
from fotlab.metric_delivery import server_reachable as server_reachable

# The metric and tag names live in fotlab.names (imports nothing, shared with train/eval/CLI); re-exported here.
from fotlab.names import (  # noqa: F401
    CHECKPOINT_TIME_S,
    COMPLETION_COLUMN,
    CROSSBATCH_RANGE,
    DEFAULT_MAX_NEW_TOKENS,
    EVAL_TIME_S,
    GRAD_NORM,
    LR,
    PROMPT_COLUMN,
    PYFUNC_LOADER,
    STEP_TIME_S,
    SUMMARY_METRICS,
    TAG_ERROR,
    TAG_GIT_COMMIT,
    TAG_KIND,
    TAG_NOTE,
    TAG_PARENT_RUN,
    TAG_REGISTERED_VERSION,
    TAG_SPEC_NAME,
    TAG_SWEEP,
    TAG_VERSION,
    TOKENS_PER_S,
    TOKENS_SEEN,
    TRAIN_LOSS,
    TRAIN_TIME_S,
    VAL_LOSS,
    VAL_LOSS_NO_XBATCH,
    VAL_PPL,
)
from fotlab.undelivered import Point, UndeliveredFile

# MLflow 3 picks the UI mode of an experiment from this tag. fotlab trains models, from scratch or from a LLaMA:
# "custom_model_development" is the kind the UI itself sets when a user picks "Machine learning" (the model
# training view: runs, charts, models); "finetuning" would mislabel the from-scratch runs.
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
DATASET_CONTEXT_TAG = "mlflow.data.context"  # "training" | "validation" | "evaluation" on a run's dataset input

SPEC_ARTIFACT = "spec.yaml"
MODEL_ARTIFACT_DIR = "model"
MAX_PARAMS_PER_BATCH = 100  # MLflow's log_batch limit
SEND_TIMEOUT_S = 30  # one background metrics request to a tracking server (the outbox retries)
MAX_PARAM_VALUE_LEN = 6000  # MLflow's param value limit
MAX_METRICS_PER_BATCH = 1000
MONITOR_STOP_S = 10.0  # longest wait for MLflow's system-metrics thread to stop (it may sit in HTTP retries)


class TrackingError(FotlabError):
    """A tracking problem the user can fix (unknown run, bad store, missing optional package)."""


def client(uri: str):
    """The one MlflowClient factory of fotlab: tracking and model registry in the same store (never MLflow's
    process-wide registry URI, which an earlier call may have pointed at another store)."""
    from mlflow.tracking import MlflowClient

    _create_sqlite_store_once(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@functools.cache
def _create_sqlite_store_once(uri: str) -> None:
    """Create (or migrate) a sqlite store under a file lock. MLflow builds a new sqlite store's schema in several
    migrations; two processes doing it at once (two runs started together on a fresh project) leave it broken
    ("table _alembic_tmp_... already exists", every later run fails). The first process holding
    `<db>.lock` builds it, the others wait and then find it complete."""
    from fotlab.spec.io import sqlite_db_path

    db = sqlite_db_path(uri)
    if db is None:
        return
    import fcntl

    from mlflow.tracking import MlflowClient

    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        store = MlflowClient(tracking_uri=uri, registry_uri=uri)
        store.search_experiments(max_results=1)  # builds the tracking schema
        store.search_registered_models(max_results=1)  # and the registry's


def git_commit(cwd: str | Path | None = None) -> str | None:
    """The git commit of the code (default: the checkout holding this fotlab package, wherever the command runs);
    None outside a repository or without git."""
    cwd = Path(fotlab.__file__).parent if cwd is None else cwd
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def default_tags(spec=None) -> dict[str, str]:
    """fotlab version, git commit (if any) and, given a spec, its name, description and extra tags."""
    tags = {TAG_VERSION: fotlab.__version__}
    commit = git_commit()
    if commit:
        tags[TAG_GIT_COMMIT] = commit
    if spec is not None:
        tags[TAG_SPEC_NAME] = spec.name
        if spec.description:
            tags[TAG_NOTE] = spec.description
        tags.update(spec.tags)
    return tags


def setup_experiment(uri: str, name: str, artifact_root: str | None = None) -> str:
    """Id of experiment `name`, created (on the driver) with an explicit artifact location if new.

    `artifact_root` is a directory URI (`file:///...`, `s3://...`); the experiment's artifacts go to
    `<artifact_root>/<name>`. None leaves the location to the tracking server.
    """
    from mlflow.exceptions import MlflowException

    mlflow_client = client(uri)
    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        if found.tags.get(TAG_EXPERIMENT_KIND) is None:  # made by an older fotlab, or by hand: training view
            mlflow_client.set_experiment_tag(found.experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND)
        return found.experiment_id
    location = f"{artifact_root.rstrip('/')}/{name}" if artifact_root else None
    try:
        return mlflow_client.create_experiment(
            name, artifact_location=location, tags={TAG_EXPERIMENT_KIND: EXPERIMENT_KIND}
        )
    except MlflowException:  # created meanwhile by another process
        found = mlflow_client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


@dataclasses.dataclass
class TrackedRun:
    """One MLflow run, addressed by id through the client API.

    Its metrics go through `delivery` (`fotlab.metric_delivery.MetricDelivery`): exactly once per key and step,
    from a background thread after `deliver_in_background`. Once offline (`undelivered` is set: the server was
    given up on), the metrics, tags, the model to log and the run's end go into that file instead, for
    `fotlab runs deliver FILE`, and the other logging calls do nothing.
    """

    uri: str
    run_id: str
    experiment_id: str
    model_id: str | None = None  # the MLflow Model logged by `log_model_dir`
    _monitor: Any = dataclasses.field(default=None, repr=False)
    delivery: MetricDelivery = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.delivery = MetricDelivery(self.run_id, self.uri, self._send_points, send_once=self._send_points_once)

    @property
    def client(self):
        return client(self.uri)

    @property
    def undelivered(self) -> UndeliveredFile | None:
        """The file of what the server did not get, once the run is offline; else None."""
        return self.delivery.undelivered

    def info(self):
        """The run as MLflow stores it now (`.info.status`, `.data.metrics`, `.data.tags`)."""
        return self.client.get_run(self.run_id)

    def last_step(self, metric: str) -> int:
        """The highest step at which `metric` was logged (0 when never)."""
        return max((m.step for m in self.client.get_metric_history(self.run_id, metric)), default=0)

    def delete_tag(self, key: str) -> None:
        """Remove tag `key` if the run has it (e.g. the error of an earlier attempt being repaired)."""
        if self.undelivered is None and key in self.info().data.tags:
            self.client.delete_tag(self.run_id, key)

    def log_table(self, data: Mapping[str, list], artifact_file: str) -> None:
        if self.undelivered is None:
            self.client.log_table(self.run_id, data=dict(data), artifact_file=artifact_file)

    def close(self, metrics: Mapping[str, Any], step: int, tags: Mapping[str, Any] | None = None) -> None:
        """The one way a run ends well: the final metrics not logged yet (no duplicate points), `tags`, FINISHED."""
        self.delivery.settle()
        if self.delivery.check_offline():
            self._end_offline("FINISHED", step=step, metrics=numeric_metrics(metrics), tags=tags)
            return
        logged = self.info().data.metrics
        self.log_metrics({k: v for k, v in metrics.items() if k not in logged}, step)
        self.set_tags(tags or {})
        self.finish("FINISHED")

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params in chunks under MLflow's limits (100 per request, values cut at 6000 chars)."""
        from mlflow.entities import Param

        items = [Param(str(k), str(v)[:MAX_PARAM_VALUE_LEN]) for k, v in params.items()]
        for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[start : start + MAX_PARAMS_PER_BATCH])

    def log_spec(self, spec) -> None:
        """The flattened spec as params and the full spec YAML as the `spec.yaml` artifact."""
        from fotlab.spec import flatten_spec, spec_to_yaml

        self.log_params(flatten_spec(spec))
        self.client.log_text(self.run_id, spec_to_yaml(spec), SPEC_ARTIFACT)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        if self.undelivered is not None:
            self.delivery.record(tags={str(k): str(v) for k, v in tags.items()})
            return
        items = [RunTag(str(k), str(v)) for k, v in tags.items()]
        if items:
            self.client.log_batch(self.run_id, tags=items)

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> dict[str, float]:
        """Log the finite numeric metrics at `step`, except those whose key has a point at `step` or later already
        (exactly once per key and step); returns the finite numeric metrics (logged now or before)."""
        kept = numeric_metrics(metrics)
        self.delivery.log(kept, int(step))
        return kept

    def deliver_in_background(self, output_dir: str | Path, flush_timeout_s: float) -> None:
        """From now on a background thread sends the metrics, whatever the server's state (`MetricDelivery`), from
        the steps the run holds on, and first what an earlier process of the run left unsent in `output_dir`."""
        logged = logged_steps(self.client.get_run(self.run_id))
        self.delivery.start_background(output_dir, flush_timeout_s, logged, rejected=_refused)

    def settle(self) -> UndeliveredFile | None:
        """Wait (at most `tracking.flush_timeout_s`) for the metrics logged so far; what the server has not got by
        then is saved and the run goes offline (`MetricDelivery.settle`). Returns that file, or None."""
        return self.delivery.settle()

    def end_delivery(self) -> UndeliveredFile | None:
        """`settle`, then stop the background sending (a worker's last word on its metrics)."""
        return self.delivery.end()

    def adopt_undelivered(self, path: str | Path) -> None:
        """Go offline into the file another process of this run saved (the driver, once its rank-0 worker did)."""
        self.delivery.go_offline("the run's worker could not reach the tracking server", Path(path))

    def deliver_points(self, points: list[Point]) -> int:
        """Log the points whose (key, step) the run does not hold yet, with their own timestamps; how many."""
        mlflow_client = self.client
        missing = []
        for key in sorted({p.key for p in points}):
            held = {m.step for m in mlflow_client.get_metric_history(self.run_id, key)}
            missing += [p for p in points if p.key == key and p.step not in held]
        self._send_points(missing)
        return len(missing)

    def _send_points(self, points: list[Point]) -> None:
        from mlflow.entities import Metric

        items = [Metric(p.key, p.value, p.timestamp, p.step) for p in points]
        for start in range(0, len(items), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=items[start : start + MAX_METRICS_PER_BATCH])

    def _send_points_once(self, points: list[Point]) -> None:
        """`_send_points` for the background outbox: against a server, one request per batch without MLflow's own
        HTTP retries (minutes with backoff by default, during which a returned server would wait for the next
        try); the outbox retries with its own probe and backoff. Other stores: `_send_points`."""
        if not self.uri.startswith(("http://", "https://")):
            self._send_points(points)
            return
        from mlflow.utils.rest_utils import http_request, verify_rest_response

        creds = self.client._tracking_client.store.get_host_creds()  # the store's auth (env, token, TLS settings)
        endpoint = "/api/2.0/mlflow/runs/log-batch"  # MLflow's REST API: LogBatch
        for start in range(0, len(points), MAX_METRICS_PER_BATCH):
            batch = points[start : start + MAX_METRICS_PER_BATCH]
            metrics = [{"key": p.key, "value": p.value, "timestamp": p.timestamp, "step": p.step} for p in batch]
            body = {"run_id": self.run_id, "metrics": metrics}
            response = http_request(creds, endpoint, "POST", max_retries=0, timeout=SEND_TIMEOUT_S, json=body)
            verify_rest_response(response, endpoint)

    def _end_offline(self, status: str, *, step=None, metrics=None, error=None, tags=None) -> None:
        """Offline: how the run ended goes into the undelivered file, for `fotlab runs deliver` to record."""
        self._stop_monitor(wait_s=1.0)  # its last samples cannot be sent anyway
        end = {"status": status, "step": step, "metrics": dict(metrics or {}), "error": error}
        self.delivery.record(end=end, tags={str(k): str(v) for k, v in (tags or {}).items()})

    def log_model_dir(self, model_dir: str | Path, step: int = 0, name: str = MODEL_ARTIFACT_DIR) -> str | None:
        """Log a saved model directory (HF format: config.json, *.safetensors, tokenizer files) as an MLflow Model
        (MLflow 3's logged-model entity: a pyfunc whose files are that directory, see `fotlab.serving`), an output
        of this run at `step`; the run's metrics at `step` (the final metrics and evaluations) are linked to it.
        Returns the model id (`models:/<id>`), also kept as `self.model_id` for `register_model`; offline None.
        A run that logged its model at `step` already (a worker restarted during the evaluations) keeps that one:
        one model per run."""
        import tempfile

        from mlflow.entities import LoggedModelOutput, LoggedModelStatus
        from mlflow.models import Model

        path = Path(model_dir)
        if not (path / "config.json").is_file():
            raise TrackingError(f"{path}: not a saved model directory (no config.json)")
        if self.undelivered is not None:  # `fotlab runs deliver` logs it
            self.delivery.record(model={"dir": str(path.resolve()), "step": int(step), "name": name})
            return None
        mlflow_client = self.client
        run = mlflow_client.get_run(self.run_id)
        earlier = _model_output_at(run, int(step))
        if earlier is not None:
            self.model_id = earlier
            self.link_metrics(int(step))
            return earlier
        logged = mlflow_client.create_logged_model(
            run.info.experiment_id,
            name=name,
            source_run_id=self.run_id,
            params=dict(run.data.params),
            model_type="fot-causal-lm",
        )
        try:
            with tempfile.TemporaryDirectory(prefix="fotlab-mlmodel-") as tmp:
                local = Path(tmp) / "mlmodel"
                meta = Model(artifact_path=logged.artifact_location, run_id=self.run_id, model_id=logged.model_id)
                save_mlflow_model(path, local, mlflow_model=meta)
                mlflow_client.log_model_artifacts(logged.model_id, str(local))
        except BaseException:
            mlflow_client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)  # never left PENDING
            raise
        mlflow_client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
        mlflow_client.log_outputs(self.run_id, [LoggedModelOutput(logged.model_id, step=int(step))])
        self.model_id = logged.model_id
        self.link_metrics(int(step))
        return logged.model_id

    def link_metrics(self, step: int) -> None:
        """The run's metrics logged at `step` and not linked yet, logged again with the run's model id, so the
        model's page lists them (the pipeline calls it again after the evaluations). No model, nothing to do.
        The points logged so far are settled first: the links are read from the server, and an evaluation's metric
        still queued in the background thread would otherwise be left out of the model's metrics."""
        from mlflow.entities import Metric

        if self.model_id is None or self.settle() is not None:
            return
        mlflow_client = self.client
        done = {(m.key, m.step) for m in mlflow_client.get_logged_model(self.model_id).metrics or []}
        linked = [
            Metric(m.key, m.value, m.timestamp, m.step, model_id=self.model_id, run_id=self.run_id)
            for key in mlflow_client.get_run(self.run_id).data.metrics
            for m in mlflow_client.get_metric_history(self.run_id, key)
            if m.step == step and (m.key, m.step) not in done
        ]
        for start in range(0, len(linked), MAX_METRICS_PER_BATCH):
            mlflow_client.log_batch(self.run_id, metrics=linked[start : start + MAX_METRICS_PER_BATCH])

    def register_model(self, name: str, artifact_path: str = MODEL_ARTIFACT_DIR) -> str | None:
        """Register the run's logged model as a new version of the registered model `name` (created if new) in
        this store's model registry; returns the version. Later specs can start from it with
        `model.init_from: models:/NAME/latest`; `mlflow models serve -m models:/NAME/latest` serves it."""
        from mlflow.exceptions import MlflowException

        if self.undelivered is not None:  # `fotlab runs deliver` registers the model it logs
            if self.undelivered.model is not None:
                self.delivery.record(model={**self.undelivered.model, "register_as": name})
            return None
        mlflow_client = self.client
        try:
            mlflow_client.get_registered_model(name)
        except MlflowException:
            mlflow_client.create_registered_model(name)
        earlier = mlflow_client.search_model_versions(f"name = '{name}' and run_id = '{self.run_id}'")
        if earlier:  # registered before a worker restart: one version per run
            version = max(earlier, key=lambda v: int(v.version))
            self.set_tags({TAG_REGISTERED_VERSION: f"{name}/{version.version}"})
            return str(version.version)
        model_id = self.model_id or logged_model_id(self.uri, self.run_id)
        if model_id is not None:
            # The source is the model's artifact location, not `models:/<id>`: MLflow's sqlite registry resolves a
            # `models:/` source through the process-wide tracking URI, which may name another store.
            source = mlflow_client.get_logged_model(model_id).artifact_location
            version = mlflow_client.create_model_version(name, source, run_id=self.run_id, model_id=model_id)
        else:  # a run from before MLflow Models: its raw model folder
            version = mlflow_client.create_model_version(
                name, f"runs:/{self.run_id}/{artifact_path}", run_id=self.run_id
            )
        self.set_tags({TAG_REGISTERED_VERSION: f"{name}/{version.version}"})
        return str(version.version)

    def log_datasets(self, records) -> None:
        """Record what the run read as MLflow dataset inputs (`fotlab.data.lineage.DatasetRecord`s: name, source,
        digest, document and token counts as the profile; the context -- training, validation, evaluation -- as
        the input's `mlflow.data.context` tag). The same dataset is recorded once per run and context."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = [
            DatasetInput(
                Dataset(r.name, r.digest, "fotlab", r.source, profile=r.profile()),
                tags=[InputTag(DATASET_CONTEXT_TAG, r.context)],
            )
            for r in records
        ]
        if inputs and self.undelivered is None:
            self.client.log_inputs(self.run_id, datasets=inputs)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Log a local file as a run artifact (offline: nothing; the file stays where it is)."""
        if self.undelivered is None:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def _stop_monitor(self, wait_s: float = MONITOR_STOP_S) -> None:
        """Stop the system-metrics thread, waiting at most wait_s (it may sit in MLflow's HTTP retries)."""
        if self._monitor is not None:
            stopper = threading.Thread(target=self._monitor.finish, name="fotlab-stop-system-metrics", daemon=True)
            stopper.start()
            stopper.join(wait_s)
            self._monitor = None

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with `status` (FINISHED, KILLED, FAILED); offline, in the undelivered file."""
        self.delivery.settle()
        if self.delivery.check_offline():
            self._end_offline(status)
            return
        self._stop_monitor()
        self.client.set_terminated(self.run_id, status=status)

    def fail(self, error: BaseException | str, status: str = "FAILED", tags: Mapping[str, Any] | None = None) -> None:
        """Mark the run FAILED (or KILLED) with `tags`, and keep the one-line error message as the `fotlab.error`
        tag. A server that does not answer is not waited for: all that goes into the undelivered file."""
        message = (error if isinstance(error, str) else one_line(error))[:MAX_PARAM_VALUE_LEN]
        self.delivery.settle()
        if self.delivery.check_offline():
            self._end_offline(status, error=message, tags=tags)
            return
        self.set_tags({**dict(tags or {}), TAG_ERROR: message})
        self.finish(status)


def _refused(error: BaseException) -> bool:
    """An MLflow answer that no retry changes (a 4xx other than timeout / too many requests)."""
    from mlflow.exceptions import MlflowException

    if not isinstance(error, MlflowException):
        return False
    status = error.get_http_status_code()
    return 400 <= status < 500 and status not in (408, 429)


def numeric_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """Keep finite numbers only (what MLflow and ray.train.report accept)."""
    return {
        k: float(v)
        for k, v in (metrics or {}).items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


UI_TRAINING_VIEW = "workflowType=machine_learning"  # MLflow UI's "Model training" view (not GenAI)


def ui_link(base_url: str, experiment_id: str, run_id: str | None = None) -> str:
    """The MLflow UI page of an experiment's runs (or of one run) in the model-training view. MLflow 3.17's UI
    keeps a browser-wide GenAI / Model training switch that starts on GenAI; this query parameter selects
    training for the page and the links on it, whatever the switch says."""
    page = f"#/experiments/{experiment_id}/runs" + (f"/{run_id}" if run_id else "")
    return f"{base_url.rstrip('/')}/{page}?{UI_TRAINING_VIEW}"


def save_mlflow_model(model_dir: str | Path, dst: str | Path, *, mlflow_model=None) -> None:
    """Write an MLflow Model at dst: a pyfunc loaded by `fotlab.serving` (no pickle) holding a copy of model_dir,
    with its signature (prompt -> completion; params max_new_tokens, last_context_length) and an input example."""
    import mlflow.pyfunc
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    check_no_remote_code(model_dir)
    config = json.loads((Path(model_dir) / "config.json").read_text())
    params = ParamSchema(
        [
            ParamSpec("max_new_tokens", "long", DEFAULT_MAX_NEW_TOKENS),
            ParamSpec("last_context_length", "long", int(config.get("last_context_length", 0))),
        ]
    )
    signature = ModelSignature(
        inputs=Schema([ColSpec("string", PROMPT_COLUMN)]),
        outputs=Schema([ColSpec("string", COMPLETION_COLUMN)]),
        params=params,
    )
    mlflow.pyfunc.save_model(
        str(dst),
        loader_module=PYFUNC_LOADER,
        data_path=str(model_dir),
        mlflow_model=mlflow_model,
        signature=signature,
        input_example=pd.DataFrame({PROMPT_COLUMN: ["def fibonacci(n):"]}),
        pip_requirements=[f"fotlab=={fotlab.__version__}"],  # fotlab brings torch, transformers, safetensors
    )


def swept_param_tags(params: Mapping[str, Any]) -> dict[str, str]:
    """One `fotlab.<field>` tag per swept spec field (the compare view groups and filters runs by tags)."""
    return {f"fotlab.{key}": value if isinstance(value, str) else json.dumps(value) for key, value in params.items()}


def describe_params(params: Mapping[str, Any]) -> str:
    """`optimizer.lr=0.003 memory.layers=[0,1]`: swept values for a run name (the last two parts of each field;
    values in compact JSON, so the name splits on spaces into one `field=value` per swept field)."""
    return " ".join(
        f"{'.'.join(k.split('.')[-2:])}={v if isinstance(v, str) else json.dumps(v, separators=(',', ':'))}"
        for k, v in params.items()
    )


def one_line(error: BaseException) -> str:
    """`Type: first line of the message`."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}".strip()


def _start_system_metrics(uri: str, run_id: str, resume: bool, interval_s: float):
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    except ImportError as exc:
        raise TrackingError(
            f"tracking.system_metrics needs the '{exc.name}' package (pip install {exc.name})"
        ) from None
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no start/stop lines around every run
    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, resume_logging=resume, tracking_uri=uri)
    monitor.start()
    return monitor


def start_run(
    uri: str,
    experiment_id: str,
    *,
    run_name: str | None = None,
    tags: Mapping[str, str] | None = None,
    run_id: str | None = None,
    parent_run_id: str | None = None,
    system_metrics: bool = False,
    system_metrics_interval_s: float = 10.0,
) -> TrackedRun:
    """Create a run (or, with `run_id`, reopen that run as RUNNING to resume it: points at or below the highest
    step its metrics hold are not logged again); tags are added either way.

    `parent_run_id` makes it a child run (sweep trials); `system_metrics` samples CPU/memory (and GPU) metrics
    in a background thread until `finish()`.
    """
    mlflow_client = client(uri)
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags[TAG_PARENT_RUN] = parent_run_id
    if run_id is None:
        run_id = mlflow_client.create_run(experiment_id, run_name=run_name, tags=all_tags).info.run_id
        resumed = False
    else:
        existing = get_run(uri, run_id)
        experiment_id = existing.info.experiment_id
        mlflow_client.update_run(run_id, status="RUNNING")
        resumed = True
    run = TrackedRun(uri, run_id, experiment_id)
    if resumed:
        run.delivery.marks = StepMarks(logged_steps(existing))
        run.set_tags(all_tags)
    if system_metrics:
        run._monitor = _start_system_metrics(uri, run_id, resumed, system_metrics_interval_s)
    return run


def start_spec_run(
    spec,
    *,
    uri: str | None = None,
    run_name: str | None = None,
    run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    parent_run_id: str | None = None,
) -> TrackedRun:
    """Driver-side: experiment (spec.tracking.experiment or spec.name) + a run with the spec logged.

    A resumed run (`run_id`) keeps its params and spec artifact (MLflow params cannot change).
    """
    from fotlab.spec import resolve_artifact_root, resolve_tracking_uri

    uri = uri or resolve_tracking_uri(spec)
    experiment_id = setup_experiment(uri, spec.tracking.experiment or spec.name, resolve_artifact_root(spec, uri))
    run = start_run(
        uri,
        experiment_id,
        run_name=run_name or spec.tracking.run_name,
        run_id=run_id,
        tags={**default_tags(spec), **dict(tags or {})},
        parent_run_id=parent_run_id,
        system_metrics=spec.tracking.system_metrics,
    )
    if run_id is None:
        run.log_spec(spec)
    return run


def get_run(uri: str, ref: str):
    """The run with id `ref`, else the newest run named `ref`; `TrackingError` when there is none."""
    from mlflow.exceptions import MlflowException

    mlflow_client = client(uri)
    try:
        return mlflow_client.get_run(ref)
    except MlflowException:
        pass
    quoted = ref.replace("'", "\\'")
    runs = search_runs(uri, filter_string=f"attributes.run_name = '{quoted}'", max_results=1)
    if not runs:
        raise TrackingError(f"no run with id or name {ref!r} in {uri}")
    return runs[0]


def search_runs(
    uri: str, experiment: str | None = None, sweep: str | None = None, filter_string: str = "", max_results: int = 100
) -> list:
    """Runs of one experiment (by name) or of all experiments, newest first; `sweep` keeps that sweep's runs."""
    mlflow_client = client(uri)
    if experiment is not None:
        found = mlflow_client.get_experiment_by_name(experiment)
        if found is None:
            raise TrackingError(f"no experiment named {experiment!r} in {uri}")
        experiment_ids = [found.experiment_id]
    else:
        experiment_ids = [e.experiment_id for e in mlflow_client.search_experiments()]
    if not experiment_ids:
        return []
    filters = [f for f in (filter_string,) if f]
    if sweep is not None:
        quoted = sweep.replace("'", "\\'")
        filters.append(f"tags.`{TAG_SWEEP}` = '{quoted}'")
    return mlflow_client.search_runs(
        experiment_ids,
        filter_string=" and ".join(filters),
        max_results=max_results,
        order_by=["attributes.start_time DESC"],
    )


def child_runs(uri: str, parent_run_id: str, tags: Mapping[str, str] | None = None) -> list:
    """The child runs of `parent_run_id` (in its experiment), optionally only those with these tag values."""
    mlflow_client = client(uri)
    experiment_id = mlflow_client.get_run(parent_run_id).info.experiment_id
    filters = [f"tags.`{TAG_PARENT_RUN}` = '{parent_run_id}'"]
    filters += [f"tags.`{key}` = '{value}'" for key, value in (tags or {}).items()]
    return mlflow_client.search_runs([experiment_id], filter_string=" and ".join(filters), max_results=10000)


def download_artifacts(uri: str, run_id: str, folder: str, suffix: str, dest: str | Path) -> list[Path]:
    """The run's artifacts `folder/*suffix` downloaded into dest ([] when the run or its artifact store has none)."""
    mlflow_client = client(uri)
    try:
        entries = mlflow_client.list_artifacts(run_id, folder)
    except Exception:  # noqa: BLE001 - a run without artifacts or an unreachable artifact store: nothing
        return []
    paths = []
    for entry in entries:
        if entry.path.endswith(suffix):
            Path(dest).mkdir(parents=True, exist_ok=True)
            paths.append(Path(mlflow_client.download_artifacts(run_id, entry.path, str(dest))))
    return paths


def experiment_names(uri: str) -> dict[str, str]:
    """experiment id -> name for every experiment in the store."""
    return {e.experiment_id: e.name for e in client(uri).search_experiments()}


def logged_model_id(uri: str, run_id: str) -> str | None:
    """The id of the MLflow Model a run logged last (its newest model output), or None (runs before 0.2)."""
    outputs = client(uri).get_run(run_id).outputs
    models = list(outputs.model_outputs) if outputs is not None and outputs.model_outputs else []
    return models[-1].model_id if models else None


def _model_output_at(run, step: int) -> str | None:
    """The id of the MLflow Model `run` (an MLflow Run) logged as an output at `step`, or None."""
    outputs = run.outputs.model_outputs if run.outputs is not None and run.outputs.model_outputs else []
    return next((o.model_id for o in reversed(outputs) if o.step == step), None)
