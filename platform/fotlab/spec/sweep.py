"""Sweep specs: a base experiment spec + a search space over its dotted fields (for `fotlab sweep`, Ray Tune).

    name: quickstart-lr
    base: quickstart.yaml                 # relative to this file
    set: [train.steps=60]                 # fixed overrides for every trial
    search_space:
      train.optimizer.lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}
      train.crossbatch.range: {type: choice, values: [0, 1, 3]}
    metric: val/loss
    mode: min
    num_samples: 6

Design choices:
- Search-space keys are the same dotted paths as `--set`; every key is checked at load time by building the
  trials' specs at the corners of its range (one-line errors name `search_space.<key>`).
- `trial_spec(sweep, params)` is the only way a trial gets its spec, so a trial is exactly "base + set + params".
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, PrivateAttr, ValidationError, model_validator

from fotlab.errors import SpecError
from fotlab.spec.io import apply_overrides, load_spec, parse_spec, read_yaml, validation_message
from fotlab.spec.models import ExperimentSpec, StrictModel

__all__ = ["ParamSpace", "SchedulerSpec", "SweepSpec", "load_sweep", "trial_spec"]


class ParamSpace(StrictModel):
    """The values one spec field takes across trials."""

    type: Literal["uniform", "loguniform", "int", "choice", "grid"] = Field(
        ...,
        description="uniform/loguniform: a float in [low, high]; int: an integer in [low, high]; choice: one "
        "of `values` (sampled); grid: every one of `values` (search 'grid' or 'random').",
    )
    low: float | None = Field(None, description="Lower bound (uniform, loguniform, int).")
    high: float | None = Field(None, description="Upper bound, inclusive (uniform, loguniform, int).")
    values: list[Any] | None = Field(None, min_length=1, description="Candidates (choice, grid).")

    @model_validator(mode="after")
    def _bounds(self) -> ParamSpace:
        if self.type in ("choice", "grid"):
            if self.values is None:
                raise ValueError(f"values: required for type {self.type!r}")
            return self
        if self.low is None or self.high is None:
            raise ValueError(f"low and high: required for type {self.type!r}")
        if self.low > self.high:
            raise ValueError(f"low {self.low} > high {self.high}")
        if self.type == "loguniform" and self.low <= 0:
            raise ValueError("low: must be > 0 for 'loguniform'")
        return self

    def corners(self) -> list[Any]:
        """Extreme values (used to check the field accepts the whole range)."""
        if self.type in ("choice", "grid"):
            return list(self.values or [])
        if self.low is None or self.high is None:  # `_bounds` requires both; a model_construct()ed space may not
            raise ValueError(f"low and high: required for type {self.type!r}")
        if self.type == "int":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]


class SchedulerSpec(StrictModel):
    """Early stopping of poor trials (Ray Tune ASHA)."""

    name: Literal["none", "asha"] = Field(
        "none", description="none: every trial runs to the end; asha: stop poor trials early."
    )
    grace_period: int = Field(1, gt=0, description="asha: reports before a trial may be stopped.")
    reduction_factor: float = Field(3.0, gt=1, description="asha: keep 1/reduction_factor of trials per rung.")


class SweepSpec(StrictModel):
    """A hyper-parameter sweep: trials = base spec + `set` + one point of `search_space`."""

    name: str = Field(
        ...,
        min_length=1,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$",
        description="Sweep name (MLflow parent run name and the `fotlab.sweep` tag of its runs).",
    )
    base: str = Field(..., description="Experiment spec the trials start from (relative to the sweep file).")
    set: list[str] = Field(default_factory=list, description="Fixed dotted.key=value overrides for every trial.")
    search_space: dict[str, ParamSpace] = Field(..., min_length=1, description="Dotted spec field -> its values.")
    metric: str = Field("val/loss", description="Metric the search optimises (last reported value).")
    mode: Literal["min", "max"] = Field("min", description="Minimise or maximise `metric`.")
    num_samples: int = Field(
        8, gt=0, description="Number of trials (search 'grid': how many times the whole grid runs; once unless given)."
    )
    max_concurrent_trials: int | None = Field(
        None,
        gt=0,
        description="Trials running at once (None = as many as "
        "the cluster's CPUs/GPUs hold, given each trial's workers).",
    )
    search: Literal["optuna", "random", "grid"] = Field(
        "optuna", description="Search algorithm: Optuna TPE, random, or grid (every combination of grid/choice values)."
    )
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec, description="Early stopping.")
    seed: int = Field(0, ge=0, description="Seed of the search algorithm.")
    _base_spec: dict[str, Any] = PrivateAttr(default_factory=dict)  # the base spec's raw mapping (load_sweep)

    @model_validator(mode="after")
    def _grid_needs_a_grid_search(self) -> SweepSpec:
        if self.search == "optuna":
            for key, space in self.search_space.items():
                if space.type == "grid":
                    raise ValueError(
                        f"search_space.{key}: type 'grid' needs search 'grid' or 'random' "
                        "(Optuna samples; use type 'choice')"
                    )
        return self


def trial_spec(sweep: SweepSpec, params: dict[str, Any], check_paths: bool = True) -> ExperimentSpec:
    """The experiment spec of one trial: base + `sweep.set` + `params` (dotted key -> value)."""
    data = copy.deepcopy(sweep._base_spec)
    apply_overrides(data, sweep.set)
    for key, value in params.items():
        apply_overrides(
            data,
            [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip()}"]
            if not isinstance(value, str)
            else [f"{key}={value}"],
        )
    return parse_spec(data, f"sweep {sweep.name}", check_paths=check_paths)


def load_sweep(path: str | os.PathLike, check_paths: bool = True) -> SweepSpec:
    """Read and validate a sweep spec and its base spec; every problem is a one-line `SpecError`."""
    path = Path(path)
    raw = read_yaml(path, "sweep spec")
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a sweep spec must be a YAML mapping")
    try:
        sweep = SweepSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(f"{path}: {validation_message(exc, SweepSpec)}") from None
    base_path = (path.parent / sweep.base) if not Path(sweep.base).is_absolute() else Path(sweep.base)
    try:
        load_spec(base_path, sweep.set, check_paths=check_paths)  # the base (+ set) must be valid by itself
    except SpecError as exc:
        raise SpecError(f"{path}: base: {exc}") from None
    sweep._base_spec = read_yaml(base_path)
    for key, space in sweep.search_space.items():
        for value in space.corners():
            try:
                trial_spec(sweep, {key: value}, check_paths=check_paths)
            except SpecError as exc:
                detail = str(exc).removeprefix(f"sweep {sweep.name}: ")
                raise SpecError(f"{path}: search_space.{key}: value {value!r} fails: {detail}") from None
    return sweep
