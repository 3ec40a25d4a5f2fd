"""`run_experiment`: one spec -> one Ray Train run -> one MLflow run.

    fotlab run experiments/quickstart.yaml                  # CLI
    run_experiment(load_spec("experiments/quickstart.yaml", ["scaling.num_workers=0"]))  # in-process, CPU-fast

Steps (setup -> build -> fit -> close):
1. driver: resolve the tracking URI, create/reopen the MLflow run (params, spec YAML, tags);
2. start/attach Ray (skipped for `num_workers=0`, which runs the worker function in this process);
3. build the Ray trainer (`trainer.build_trainer`) around `worker.train_worker` (which runs the experiment
   pipeline: train -> evaluations -> log model -> register) and fit it in a background thread while this
   thread draws progress and turns the first Ctrl-C (or a SIGTERM) into a graceful stop (checkpoint, then exit
   resumable);
4. close the MLflow run: FINISHED with final metrics, KILLED (resumable) when stopped, FAILED with the error.
   A tracking server that stayed unreachable to the end: the run's end, like the metrics it could not send, is
   saved in `<output>/undelivered_metrics.jsonl`; the outcome names that file (`RunOutcome.undelivered`), the
   MLflow run stays RUNNING until `fotlab runs deliver FILE` and `fotlab run` exits 1 (see `commands.run_command`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from fotlab import model_refs, tracking
from fotlab.errors import DiskFullError, FotlabError
from fotlab.orchestrate import run_record
from fotlab.orchestrate.channel import ChannelHandle
from fotlab.orchestrate.progress import LiveProgress
from fotlab.orchestrate.trainer import WorkerConfig, build_trainer, output_dir_for

logger = logging.getLogger(__name__)
DEFAULT_REPORT_EVERY = 50  # ray.train.report every this many steps between checkpoints


class RunFailedError(FotlabError):
    """Training failed; the MLflow run is marked FAILED and the message says why (and how to resume)."""

    def __init__(self, message: str, run_id: str) -> None:
        super().__init__(message)
        self.run_id = run_id


class RunInterruptedError(FotlabError):
    """Training was stopped (Ctrl-C); the MLflow run is KILLED and resumable with `--resume RUN_ID`."""

    def __init__(self, message: str, run_id: str) -> None:
        super().__init__(message)
        self.run_id = run_id


@dataclasses.dataclass
class RunOutcome:
    """What a finished run produced."""

    run_id: str
    status: str
    model_dir: Path | None
    metrics: dict[str, float]
    checkpoint: str | None = None
    run_name: str | None = None
    final_step: int | None = None
    undelivered: tracking.UndeliveredFile | None = None  # what the tracking server never got (None: all arrived)

    def undelivered_line(self) -> str:
        """The one line saying what the tracking server did not get, where it is saved and how to send it later."""
        file = self.undelivered
        if file is None:
            return ""
        missing = (
            f"{file.summary()} and the run's end ({self.status})" if file.points else f"the run's end ({self.status})"
        )
        return (
            f"run {self.run_id} finished training (step {self.final_step}; model in {self.model_dir}) but the tracking "
            f"server {file.tracking_uri} is unreachable: {missing} saved to {file.path}; the MLflow run stays RUNNING "
            f"until `fotlab runs deliver {file.path}` once the server is back"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "status": self.status,
            "model_dir": str(self.model_dir) if self.model_dir else None,
            "metrics": self.metrics,
            "checkpoint": self.checkpoint,
            "run_name": self.run_name,
            "final_step": self.final_step,
            "undelivered": str(self.undelivered.path) if self.undelivered is not None else None,
        }


def new_run_name(spec_name: str) -> str:
    """A unique, sortable Ray/MLflow run name: `<spec name>-<UTC time>-<short id>`."""
    return f"{spec_name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"


def open_record(spec, resume: str | None) -> run_record.RunRecord:
    """Create the MLflow run for a fresh run, or reopen the one ``resume`` names."""
    from fotlab.spec import resolve_storage_path, resolve_tracking_uri

    uri = resolve_tracking_uri(spec)
    if not tracking.server_reachable(uri):  # else MLflow's own retries hold the start for minutes, then a traceback
        raise tracking.TrackingError(f"the tracking server {uri} does not answer: start it, or set tracking.uri")
    if resume:
        return run_record.reopen_run(spec, uri, resume)
    return run_record.open_run(spec, uri, new_run_name(spec.name), resolve_storage_path(spec))


def trainer_for(
    spec, record: run_record.RunRecord, channel: ChannelHandle | None, report_every: int, quiet: bool = False
):
    """The Ray trainer of this run (`trainer.build_trainer` around `worker.train_worker`).

    quiet: the driver draws the live display, so workers and the Ray Train controller keep their console output
    to warnings (per-step lines, "Reporting training result" and worker-group chatter would interleave with it).
    """
    from fotlab.orchestrate.worker import train_worker

    output_dir = output_dir_for(record.storage_path, record.ray_run_name)
    spec = model_refs.with_local_init_from(spec, record.tracking_uri, output_dir / "init_from")  # runs:/, models:/
    config = WorkerConfig(
        spec=spec,
        run_id=record.run_id,
        tracking_uri=record.tracking_uri,
        output_dir=str(output_dir),
        report_every=report_every,
        channel=channel,
        quiet=quiet,
    )
    return build_trainer(train_worker, config, run_name=record.ray_run_name, storage_path=record.storage_path)


def run_experiment(
    spec,
    *,
    address: str | None = None,
    resume: str | None = None,
    json_output: bool = False,
    progress: bool = True,
    report_every: int = DEFAULT_REPORT_EVERY,
    spec_path: str | None = None,
) -> RunOutcome:
    """Train ``spec`` on Ray Train (or in-process for ``scaling.num_workers == 0``) as one MLflow run.

    ``resume`` (an MLflow run id or run name) continues that run: same Ray run (latest checkpoint), same MLflow
    run id.
    Raises `RunFailedError` (run FAILED) or `RunInterruptedError` (run KILLED, resumable).
    """
    from fotlab.orchestrate.cluster import apply_env_defaults, ensure_ray

    in_process = spec.scaling.num_workers == 0
    ray_error = None
    if resume or in_process:
        record = open_record(spec, resume)  # a bad --resume is a user error: say so before starting anything
    else:
        record, ray_error = _open_record_while_ray_starts(spec, address)
    record.run.delivery.output_dir = output_dir_for(record.storage_path, record.ray_run_name)  # undelivered file: here
    if address and record.tracking_uri.startswith("sqlite:"):
        logger.warning(
            "a sqlite MLflow store is only reachable from this host; workers on other nodes cannot "
            "log to it: set tracking.uri (or MLFLOW_TRACKING_URI) to an MLflow server"
        )
    resume_hint = f"resume with `fotlab run {spec_path or 'SPEC'} --resume {record.run_id}`"
    channel = None
    try:
        if in_process:
            apply_env_defaults(local=True)
        elif ray_error is not None:
            raise ray_error
        else:
            ensure_ray(address)  # returns at once when Ray already started beside the MLflow run
        channel = ChannelHandle.create(use_ray=not in_process)
        show = progress and not json_output
        trainer = trainer_for(spec, record, channel, report_every, quiet=show)
        display = LiveProgress(spec.train.steps, enabled=show, description=spec.name)
        result = _fit_with_progress(trainer, channel, display)
    except KeyboardInterrupt as err:
        record.fail(err, status="KILLED", resumable=True)
        raise RunInterruptedError(f"run {record.run_id} aborted; {resume_hint}", record.run_id) from err
    except BaseException as err:
        cause = root_error(err)
        resumable = has_checkpoint(record, spec.train.framework)
        record.fail(cause, resumable=resumable)
        hint = f"; {resume_hint}" if resumable else ""
        if resumable and isinstance(cause, DiskFullError):
            hint = f"; once space is freed, {resume_hint}"
        hint += _undelivered_note(record)
        raise RunFailedError(
            f"run {record.run_id} FAILED: {tracking.one_line(cause)} "
            f"(details: `fotlab runs show {record.run_id}`){hint}",
            record.run_id,
        ) from err
    finally:
        if channel is not None:
            channel.close()
    return close_run(record, result, resume_hint, spec.train.framework)


def _open_record_while_ray_starts(spec, address: str | None):
    """Create the MLflow run, and import what `trainer_for` needs (Ray Train's torch trainer imports torch), in
    threads while Ray starts here: `ray.init` mostly waits for Ray's processes to come up, so a new sqlite store's
    schema migrations (~5 s) and those imports (~2 s) overlap it instead of adding to it. Returns (record, the
    error Ray's start raised or None)."""
    from concurrent.futures import ThreadPoolExecutor

    from fotlab.orchestrate.cluster import ensure_ray, start_train_coordinator

    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="fotlab-setup") as pool:
        pending = pool.submit(open_record, spec, None)
        pool.submit(_import_trainer_modules)  # an import error resurfaces in trainer_for, where it belongs
        try:
            ensure_ray(address)
        except Exception as err:  # noqa: BLE001 - reported through the run (FAILED) by the caller
            return pending.result(), err
        start_train_coordinator()
        return pending.result(), None


def _import_trainer_modules() -> None:
    import ray.train.torch  # noqa: F401

    import fotlab.orchestrate.worker  # noqa: F401


def _fit_with_progress(trainer, channel: ChannelHandle, display: LiveProgress):
    """Fit in a background thread; draw progress here; first Ctrl-C asks the workers to stop gracefully."""
    box: dict[str, Any] = {}
    done = threading.Event()  # not Thread.join: a Ctrl-C inside join() can leave is_alive() wrong

    def fit() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as err:  # noqa: BLE001 - re-raised in the calling thread
            box["error"] = err
        finally:
            done.set()

    threading.Thread(target=fit, name="fotlab-fit", daemon=True).start()
    stopping = False
    with display, _stop_on_sigterm(channel):
        while not done.is_set():
            try:
                done.wait(0.25)
                display.update(_drain(channel))
            except KeyboardInterrupt:
                if stopping:
                    raise
                stopping = True
                channel.request_stop()
                display.note("Stopping: the workers save a checkpoint and exit (Ctrl-C again to abort now).")
        display.update(_drain(channel))
    if "error" in box:
        raise box["error"]
    return box["result"]


@contextlib.contextmanager
def _stop_on_sigterm(channel: ChannelHandle):
    """SIGTERM (`ray job stop`, a pod being evicted) asks for the same graceful stop as Ctrl-C, while fitting."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: channel.request_stop())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _drain(channel: ChannelHandle) -> list:
    try:
        return channel.drain()
    except Exception:  # noqa: BLE001 - the display must never break the run
        return []


def root_error(err: BaseException) -> BaseException:
    """The worker's own exception inside Ray Train's wrappers (lowest failing rank)."""
    failures = getattr(err, "worker_failures", None)
    if failures:
        err = failures[min(failures)]
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, BaseException) else err


def has_checkpoint(record: run_record.RunRecord, framework: str = "torch") -> bool:
    """True when the run left a checkpoint to resume from (fotlab's checkpoints in the workers' output folder)."""
    from fotlab.orchestrate.worker import resume_dir

    return resume_dir(output_dir_for(record.storage_path, record.ray_run_name), framework) is not None


def close_run(record: run_record.RunRecord, result, resume_hint: str, framework: str = "torch") -> RunOutcome:
    """Log final metrics and mark the MLflow run FINISHED (or KILLED when the workers stopped early)."""
    value = result.return_value or {}
    metrics = tracking.numeric_metrics(value.get("metrics") or result.metrics or {})
    final_step = int(value.get("final_step") or metrics.get("step") or 0)
    if value.get("undelivered"):  # rank 0 gave up on the tracking server: so does the driver
        record.run.adopt_undelivered(value["undelivered"])
    if value.get("stopped_early"):
        record.fail(f"stopped on request at step {final_step}", status="KILLED", resumable=True)
        raise RunInterruptedError(
            f"run {record.run_id} stopped at step {final_step} after saving a checkpoint; {resume_hint}"
            + _undelivered_note(record),
            record.run_id,
        )
    record.finish(metrics, final_step)
    checkpoint = _latest_checkpoint(value.get("checkpoint_dir"), framework)
    model_dir = Path(value["model_dir"]) if value.get("model_dir") else None
    return RunOutcome(
        record.run_id,
        "FINISHED",
        model_dir,
        metrics,
        checkpoint,
        record.run_name,
        final_step,
        undelivered=record.run.undelivered,
    )


def _undelivered_note(record: run_record.RunRecord) -> str:
    """`; tracking server unreachable: ... saved to FILE (...)` for a run that went offline, else ""."""
    file = record.run.undelivered
    if file is None:
        return ""
    return (
        f"; tracking server unreachable: {file.summary()} and the run's end saved to {file.path} "
        f"(send them with `fotlab runs deliver {file.path}`)"
    )


def _latest_checkpoint(checkpoint_dir: str | None, framework: str) -> str | None:
    from fotlab.orchestrate.worker import latest_checkpoint_in

    latest = latest_checkpoint_in(Path(checkpoint_dir), framework) if checkpoint_dir else None
    return str(latest) if latest is not None else None
