"""Live training and sweep metrics for Prometheus, through `ray.util.metrics`.

Ray's metrics agent on each node exports what a process records here on the node's `--metrics-export-port`,
prefixed `ray_` (a Gauge `fotlab_train_loss` is scraped as `ray_fotlab_train_loss`); Prometheus finds the nodes
through Ray's service-discovery file, and `dashboards/` plots the series.

Design choices:
- Gauges only (the last value of each logged metric), tagged by run id, experiment and rank; never by step (one
  series per step would grow Prometheus's index without bound). The step itself is a gauge, `fotlab_train_step`.
- Names are declared once, in `TRAIN_GAUGES` / `SWEEP_GAUGES`; `ray.util.metrics` only warns about (and drops) a
  `/` in a name, so the names are checked against Prometheus's grammar when the gauges are made.
- Recording never breaks a run: outside Ray (an in-process run) it is off, and any error is logged once, then off.
- The interface is two small classes fed from hooks: `LiveMetrics.on_log / on_checkpoint` (each training worker)
  and `SweepLiveMetrics.on_trials` (the sweep driver).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any

from fotlab import tracking

logger = logging.getLogger(__name__)

RAY_PREFIX = "ray_"  # what Ray's exporter puts before every application metric
TRAIN_TAGS = ("run_id", "experiment", "rank")
SWEEP_TAGS = ("sweep", "run_id")
# fotlab metric (as logged to MLflow) -> (Prometheus name, description).
TRAIN_GAUGES: dict[str, tuple[str, str]] = {
    tracking.TRAIN_LOSS: ("fotlab_train_loss", "Training loss (mean over the last log window)."),
    tracking.VAL_LOSS: ("fotlab_val_loss", "Validation loss with the step's crossbatch."),
    tracking.TOKENS_PER_S: ("fotlab_tokens_per_second", "Training tokens per second on this worker."),
    tracking.STEP_TIME_S: ("fotlab_step_time_seconds", "Seconds per optimizer step (mean over the log window)."),
    tracking.LR: ("fotlab_learning_rate", "Learning rate."),
    tracking.GRAD_NORM: ("fotlab_grad_norm", "Gradient norm before clipping."),
    tracking.TOKENS_SEEN: ("fotlab_tokens_seen", "Training tokens seen so far."),
}
STEP_GAUGE = ("fotlab_train_step", "Last optimizer step logged.")
CROSSBATCH_GAUGE = (
    "fotlab_crossbatch_d",
    "Crossbatch d in use: contexts an entry's memory layers see (1 positive + crossbatch range negatives).",
)
MEMORY_GAUGE = (
    "fotlab_memory_tokens",
    "Memory tokens a memory layer attends to in training (crossbatch range x context length).",
)
CHECKPOINT_GAUGE = (
    "fotlab_checkpoint_duration_seconds",
    "Seconds the last checkpoint took to write (all ranks, to the run's output folder).",
)
SWEEP_GAUGES = {
    "trials": ("fotlab_sweep_trials", "Trials of the sweep in each state."),
    "best": ("fotlab_sweep_best_metric", "Best value of the sweep metric so far."),
}
TRIAL_STATES = ("PENDING", "RUNNING", "PAUSED", "TERMINATED", "ERROR")
_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_gauges: dict[str, Any] = {}  # one Gauge object per name and process


def all_metric_names() -> list[str]:
    """Every metric fotlab exports, as Prometheus sees it (with Ray's `ray_` prefix)."""
    names = [name for name, _ in TRAIN_GAUGES.values()]
    names += [g[0] for g in (STEP_GAUGE, CROSSBATCH_GAUGE, MEMORY_GAUGE, CHECKPOINT_GAUGE)]
    names += [name for name, _ in SWEEP_GAUGES.values()]
    return [RAY_PREFIX + name for name in names]


def gauge(name: str, description: str, tag_keys: tuple[str, ...]):
    """The process's `ray.util.metrics.Gauge` called ``name`` (made once)."""
    if not _NAME.match(name):
        raise ValueError(f"metric name {name!r} is not a Prometheus name")
    if name not in _gauges:
        from ray.util.metrics import Gauge

        _gauges[name] = Gauge(name, description=description, tag_keys=tag_keys)
    return _gauges[name]


def _ray_running() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


class _Recorder:
    """Sets gauges; switches itself off (one warning) when recording fails or Ray is not running."""

    def __init__(self) -> None:
        self.enabled = _ray_running()

    def set(self, spec: tuple[str, str], tag_keys: tuple[str, ...], value: float, tags: dict[str, str]) -> None:
        if not self.enabled:
            return
        try:
            gauge(*spec, tag_keys).set(float(value), tags=tags)
        except Exception as err:  # noqa: BLE001 - live metrics must never break a run
            logger.warning("live metrics off: %s", err)
            self.enabled = False


class LiveMetrics(_Recorder):
    """A training worker's live metrics: feed it from the worker's hooks.

    live = LiveMetrics(run_id, experiment="quickstart", rank=0, context_length=128)
    live.on_log(step, {"train/loss": 2.1, ...}); live.on_checkpoint(step, seconds=0.8)
    """

    def __init__(self, run_id: str, experiment: str, rank: int, context_length: int | None = None) -> None:
        super().__init__()
        self.tags = {"run_id": run_id, "experiment": experiment, "rank": str(rank)}
        self.context_length = context_length

    @classmethod
    def for_worker(cls, config, rank: int) -> LiveMetrics:
        """From the `trainer.WorkerConfig` the driver gives each Train worker."""
        spec = config.spec
        return cls(config.run_id, spec.tracking.experiment or spec.name, rank, spec.train.context_length)

    def on_log(self, step: int, metrics: Mapping[str, float]) -> None:
        self.set(STEP_GAUGE, TRAIN_TAGS, step, self.tags)
        for key, spec in TRAIN_GAUGES.items():
            if key in metrics:
                self.set(spec, TRAIN_TAGS, metrics[key], self.tags)
        if tracking.CROSSBATCH_RANGE in metrics:
            crossbatch_range = float(metrics[tracking.CROSSBATCH_RANGE])
            self.set(CROSSBATCH_GAUGE, TRAIN_TAGS, crossbatch_range + 1, self.tags)
            if self.context_length:
                self.set(MEMORY_GAUGE, TRAIN_TAGS, crossbatch_range * self.context_length, self.tags)

    def on_checkpoint(self, step: int, seconds: float) -> None:
        self.set(CHECKPOINT_GAUGE, TRAIN_TAGS, seconds, self.tags)


class SweepLiveMetrics(_Recorder):
    """A sweep's live metrics on the driver: trials per state and the best metric so far.

    live = SweepLiveMetrics("fot_cpu", parent_run_id, metric="val/loss", mode="min"); live.on_trials(trials)
    """

    def __init__(self, sweep: str, run_id: str, metric: str, mode: str) -> None:
        super().__init__()
        self.tags = {"sweep": sweep, "run_id": run_id}
        self.metric, self.mode = metric, mode

    def on_trials(self, trials: Iterable[Any]) -> None:
        """``trials``: Ray Tune Trial objects (status, last_result)."""
        trials = list(trials)
        counts = dict.fromkeys(TRIAL_STATES, 0)
        for trial in trials:
            counts[trial.status] = counts.get(trial.status, 0) + 1
        for state, count in counts.items():
            self.set(SWEEP_GAUGES["trials"], (*SWEEP_TAGS, "state"), count, {**self.tags, "state": state})
        values = [t.last_result[self.metric] for t in trials if t.last_result and self.metric in t.last_result]
        if values:
            best = min(values) if self.mode == "min" else max(values)
            self.set(SWEEP_GAUGES["best"], (*SWEEP_TAGS, "metric"), best, {**self.tags, "metric": self.metric})
