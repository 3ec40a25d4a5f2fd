"""From a `SweepSpec` to Ray Tune objects: the param space, the search algorithm, the scheduler, the concurrency.

Design choices:
- A search-space key is a dotted spec field ("train.optimizer.lr"); it stays the Tune parameter name, so trial
  configs, MLflow params and the leaderboard all speak the spec's language.
- `choice` values that are not scalars (memory-layer sets such as [1, 2]) cannot go through Optuna's categorical
  distribution (scalars only). They are encoded as labels (the value's YAML flow text, "[1, 2]") and decoded in
  the trial with `decode_params`, so any value the spec accepts can be swept.
- Early stopping (ASHA) counts time in optimizer steps (`step` in every report); the spec's `grace_period` is in
  reports of the sweep metric, converted to steps with the metric's report interval (eval_every for val/*,
  log_every for train/*).
- Concurrency: `max_concurrent_trials` if given, else as many trials as the cluster's CPUs / GPUs hold, given each
  trial's workers and resources; never more than the number of trials.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import yaml

from fotlab.errors import FotlabError

SCALARS = (str, int, float, bool, type(None))
TIME_ATTR = "step"  # every trial report carries the optimizer step it was made at
NESTED_DRIVER_CPU = 0.01  # a nested trainer's Tune trainable only waits (Tune refuses an empty request)


class SweepSetupError(FotlabError):
    """The sweep cannot run as specified (one line naming the field)."""


def label(value: Any) -> str:
    """The YAML flow text of a value: the label a non-scalar choice value goes by in Tune/Optuna."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").strip()


def _needs_labels(values: list[Any]) -> bool:
    return any(not isinstance(v, SCALARS) for v in values)


def param_space(sweep) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(Tune param space keyed by dotted field, {field: {label: value}} for the choice fields given as labels)."""
    from ray import tune

    space: dict[str, Any] = {}
    decode: dict[str, dict[str, Any]] = {}
    for key, p in sweep.search_space.items():
        if p.type in ("choice", "grid"):
            values = list(p.values or [])
            if _needs_labels(values):
                decode[key] = {label(v): v for v in values}
                values = list(decode[key])
            as_grid = p.type == "grid" or sweep.search == "grid"
            space[key] = tune.grid_search(values) if as_grid else tune.choice(values)
        elif p.type == "uniform":
            space[key] = tune.uniform(p.low, p.high)
        elif p.type == "loguniform":
            space[key] = tune.loguniform(p.low, p.high)
        else:  # int: inclusive bounds
            space[key] = tune.randint(int(p.low), int(p.high) + 1)
    return space, decode


def decode_params(config: dict[str, Any], keys, decode: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The trial's spec overrides (dotted field -> value) from its Tune config."""
    params = {}
    for key in keys:
        value = config[key]
        params[key] = decode[key][value] if key in decode else _plain(value)
    return params


def _plain(value: Any) -> Any:
    """numpy scalars (from samplers) -> Python numbers."""
    return value.item() if hasattr(value, "item") else value


def search_algorithm(sweep, max_concurrent: int):
    """Optuna TPE (seeded), or Tune's basic generator for random / grid."""
    if sweep.search == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        sampler = optuna.samplers.TPESampler(seed=sweep.seed)
        return OptunaSearch(metric=sweep.metric, mode=sweep.mode, sampler=sampler)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=sweep.seed, max_concurrent=max_concurrent)


def num_samples(sweep) -> int:
    """Tune's num_samples: the trial count, or (grid search) the repeats of the grid, once unless given."""
    if sweep.search == "grid" and "num_samples" not in sweep.model_fields_set:
        return 1
    return sweep.num_samples


def report_interval(spec, metric: str) -> int:
    """Steps between two reports of `metric` in a trial of `spec`."""
    train = spec.train
    if metric.startswith("val/"):
        if not train.eval_every:
            raise SweepSetupError(f"metric: {metric!r} needs validation during training (train.eval_every > 0)")
        return train.eval_every
    return train.log_every


def scheduler(sweep, spec, max_steps: int):
    """ASHA on `sweep.metric` with time in steps, or FIFO (every trial runs to its end)."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if sweep.scheduler.name == "none":
        return FIFOScheduler()
    interval = report_interval(spec, sweep.metric)
    return ASHAScheduler(
        time_attr=TIME_ATTR,
        metric=sweep.metric,
        mode=sweep.mode,
        max_t=max_steps,
        grace_period=min(max_steps, sweep.scheduler.grace_period * interval),
        reduction_factor=sweep.scheduler.reduction_factor,
    )


@dataclasses.dataclass(frozen=True)
class TrialResources:
    """What one trial holds: its Tune trainable's resources and those of its Train workers (if any)."""

    n_workers: int  # 1 = train() inside the Tune trainable; > 1 = a nested TorchTrainer
    cpus_per_worker: float
    gpus_per_worker: float

    @property
    def nested(self) -> bool:
        return self.n_workers > 1

    def trainable(self) -> dict[str, float]:
        """Resources for `tune.with_resources`: the worker itself, or a CPU-free driver of a nested trainer."""
        if self.nested:
            return {"CPU": NESTED_DRIVER_CPU}
        return {"CPU": self.cpus_per_worker, "GPU": self.gpus_per_worker}

    def total(self) -> dict[str, float]:
        return {"CPU": self.n_workers * self.cpus_per_worker, "GPU": self.n_workers * self.gpus_per_worker}


def trial_resources(spec) -> TrialResources:
    """Per-trial resources from `spec.scaling` (num_workers 0 or 1 both mean one in-trial worker)."""
    scaling = spec.scaling
    extra = dict(scaling.resources_per_worker or {})
    cpus = float(extra.get("CPU", 1.0))
    gpus = float(extra.get("GPU", 1.0 if scaling.use_gpu else 0.0))
    return TrialResources(max(1, scaling.num_workers), cpus, gpus)


def check_fits(resources: TrialResources, cluster: dict[str, float]) -> None:
    """Refuse a trial bigger than the whole cluster (it would wait forever for its workers)."""
    trial = {**resources.total(), "CPU": resources.total()["CPU"] + resources.trainable()["CPU"] * resources.nested}
    for kind, amount in trial.items():
        if amount > cluster.get(kind, 0.0):
            raise SweepSetupError(
                f"scaling: one trial needs {amount:g} {kind} ({resources.n_workers} worker(s) x "
                f"{resources.cpus_per_worker:g} CPU, {resources.gpus_per_worker:g} GPU) but the cluster has "
                f"{cluster.get(kind, 0.0):g}; lower scaling.num_workers / resources_per_worker or use a bigger cluster"
            )


def max_concurrency(sweep, resources: TrialResources, cluster: dict[str, float], n_trials: int) -> int:
    """Trials at once: the spec's `max_concurrent_trials`, else what the cluster holds; at least 1."""
    if sweep.max_concurrent_trials is not None:
        return max(1, min(sweep.max_concurrent_trials, n_trials))
    need = resources.total()
    fits = [math.floor(cluster.get(kind, 0.0) / amount) for kind, amount in need.items() if amount > 0]
    return max(1, min([n_trials, *fits]))


def check_stopping(sweep, resources: TrialResources) -> None:
    """Refuse early stopping of nested Train V2 trials: Ray 2.60 leaks the placement group and the sweep hangs."""
    if resources.nested and sweep.scheduler.name != "none":
        raise SweepSetupError(
            f"scheduler.name: {sweep.scheduler.name!r} cannot stop multi-worker trials safely "
            f"(scaling.num_workers={resources.n_workers}): on Ray 2.60 a scheduler stopping a trial that runs a "
            "nested Train V2 trainer leaks its placement group and the sweep hangs. Use scheduler 'none' "
            "or one worker per trial."
        )
