"""The experiment spec: a strict pydantic tree read from YAML (`load_spec`), printed (`spec_to_yaml`), flattened for
MLflow params (`flatten_spec`) and exported as JSON Schema (`json_schema`).

    fotlab validate experiments/quickstart.yaml      # check a spec
    fotlab schema > spec.schema.json                 # the schema, with every field's description

Modules: `models` (the sections), `checks` (cross-field rules), `io` (files, overrides, default locations),
`sweep` (sweep specs: base spec + search space), `eval` (the `eval:` section: which evaluations run).
"""

from fotlab.errors import FotlabError, SpecError
from fotlab.spec.checks import looks_local, model_overrides, problems
from fotlab.spec.io import (
    apply_overrides,
    flatten_spec,
    json_schema,
    load_spec,
    parse_spec,
    project_root,
    read_yaml,
    resolve_artifact_root,
    resolve_storage_path,
    resolve_tracking_uri,
    spec_to_yaml,
)
from fotlab.spec.models import (
    CrossBatchSpec,
    CrossBatchSwitch,
    DataSpec,
    EvalSpec,
    ExperimentSpec,
    FailureSpec,
    MemorySpec,
    ModelSpec,
    OptimizerSpec,
    ScalingSpec,
    ScheduleSpec,
    SourceSpec,
    StorageSpec,
    TokenizerSpec,
    TrackingSpec,
    TrainSpec,
)
from fotlab.spec.sweep import ParamSpace, SchedulerSpec, SweepSpec, load_sweep, trial_spec

__all__ = [
    "FotlabError",
    "SpecError",
    "ExperimentSpec",
    "ModelSpec",
    "MemorySpec",
    "DataSpec",
    "SourceSpec",
    "TokenizerSpec",
    "TrainSpec",
    "CrossBatchSpec",
    "CrossBatchSwitch",
    "OptimizerSpec",
    "ScheduleSpec",
    "EvalSpec",
    "ScalingSpec",
    "StorageSpec",
    "FailureSpec",
    "TrackingSpec",
    "load_spec",
    "parse_spec",
    "apply_overrides",
    "spec_to_yaml",
    "flatten_spec",
    "json_schema",
    "project_root",
    "resolve_tracking_uri",
    "resolve_storage_path",
    "resolve_artifact_root",
    "model_overrides",
    "looks_local",
    "problems",
    "SweepSpec",
    "ParamSpace",
    "SchedulerSpec",
    "load_sweep",
    "trial_spec",
    "is_sweep_file",
]


def is_sweep_file(path) -> bool:
    """True when the YAML at `path` is a sweep spec (has `search_space`), not an experiment spec."""
    from pathlib import Path

    try:
        data = read_yaml(Path(path))
    except SpecError:  # unreadable: loading it as an experiment spec reports the problem
        return False
    return isinstance(data, dict) and "search_space" in data
