"""Reading, overriding, printing and flattening specs; resolving default locations (project root, MLflow store).

    fotlab validate experiments/quickstart.yaml --set train.steps=10 --set data.sources.0.max_docs=5

Design choices:
- YAML is read with `yaml.safe_load` only: a spec never executes code.
- `--set a.b.c=value` parses `value` as YAML (so `3`, `1e-3`, `true`, `[6, 12]`, `null` get their types);
  numeric path parts index lists (`data.sources.0.path`); a missing list/dict on the way is created.
- Every failure is a `SpecError` with ONE line: `<file>: <dotted.field>: <what is wrong>`.
"""

from __future__ import annotations

import difflib
import json
import os
import tomllib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from fotlab.errors import SpecError
from fotlab.spec.models import ExperimentSpec

__all__ = [
    "load_spec",
    "parse_spec",
    "apply_overrides",
    "spec_to_yaml",
    "flatten_spec",
    "json_schema",
    "project_root",
    "resolve_tracking_uri",
    "sqlite_db_path",
    "resolve_storage_path",
    "resolve_artifact_root",
]


def _set_path(data: dict, parts: list[str], value: Any, key: str) -> None:
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        nxt: Any = value if last else ([] if parts[i + 1].isdigit() else {})
        if isinstance(node, list):
            if not part.isdigit():
                raise SpecError(f"--set {key}: '{part}' must be a list index here")
            idx = int(part)
            if idx > len(node):
                raise SpecError(f"--set {key}: index {idx} is past the end of a list of {len(node)}")
            if idx == len(node):
                node.append(nxt if last else {} if not parts[i + 1].isdigit() else [])
            elif last:
                node[idx] = value
            node = node[idx]
        elif isinstance(node, dict):
            if last or not isinstance(node.get(part), (dict, list)):
                node[part] = nxt
            node = node[part]
        else:
            raise SpecError(f"--set {key}: '{'.'.join(parts[:i])}' is a value, not a section")


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    """Apply `dotted.key=value` overrides to a raw spec dict in place (values parsed as YAML); returns it."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not p for p in key.split(".")):
            raise SpecError(f"--set {item!r}: expected dotted.key=value, e.g. train.steps=100")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise SpecError(f"--set {key}: value {raw!r} is not valid YAML ({_first_line(exc)})") from None
        _set_path(data, key.split("."), value, key)
    return data


def _first_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _dotted(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _model_at(loc: Sequence[Any], root: type[BaseModel]) -> type[BaseModel] | None:
    """The spec section class that `loc` (minus its last part) points into, to list its allowed keys."""
    cls: Any = root
    for part in loc[:-1]:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        if field is None:  # a list index or a dict key: stay on the item class
            continue
        cls = _section_class(field.annotation)
        if cls is None:
            return None
    return cls


def _section_class(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _section_class(arg)
        if found is not None:
            return found
    return None


def _error_line(err: ErrorDetails, root: type[BaseModel]) -> str:
    loc = [p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in ("function-after",)))]
    msg = err["msg"].removeprefix("Value error, ")
    field = _dotted(loc)
    if err["type"] == "extra_forbidden":
        cls = _model_at(loc, root)
        allowed = list(cls.model_fields) if cls is not None else []
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"{field}: unknown key{hint}; allowed: {', '.join(allowed)}"
    if err["type"] == "missing":
        return f"{field}: required field is missing"
    if not field:
        return msg  # cross-field errors already start with their field
    if "input" in err and err["type"] not in ("value_error",) and not isinstance(err["input"], (dict, list)):
        return f"{field}: {msg} (got {err['input']!r})"
    return f"{field}: {msg}"


def validation_message(exc: ValidationError, root: type[BaseModel] = ExperimentSpec) -> str:
    """One line for a pydantic error of model `root`: the first problem, plus how many more there are."""
    errors = exc.errors()
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return _error_line(errors[0], root) + more


def parse_spec(data: Any, source: str = "<spec>", check_paths: bool = True) -> ExperimentSpec:
    """Validate a raw spec dict; `source` names it in errors; `check_paths=False` skips filesystem checks."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a spec must be a YAML mapping, got {type(data).__name__}")
    try:
        return ExperimentSpec.model_validate(data, context={"check_paths": check_paths})
    except ValidationError as exc:
        raise SpecError(f"{source}: {validation_message(exc)}") from None


def read_yaml(path: Path, what: str = "spec") -> Any:
    """`yaml.safe_load` of a file ({} when empty); a missing file or bad YAML is a one-line `SpecError`."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{path}: {what} file not found") from None
    except OSError as exc:
        raise SpecError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise SpecError(
            f"{path}: not a text (UTF-8) {what} file (byte {exc.start} is {exc.object[exc.start]:#04x})"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise SpecError(f"{path}:{where} invalid YAML ({getattr(exc, 'problem', None) or 'parse error'})") from None
    return {} if data is None else data


def load_spec(path: str | os.PathLike, overrides: Iterable[str] = (), check_paths: bool = True) -> ExperimentSpec:
    """Read a YAML spec, apply `--set` overrides, validate; any problem is a one-line `SpecError`.

    `check_paths=False` skips checks that local data/tokenizer paths exist (e.g. when submitting to a cluster
    whose paths are not on this machine).
    """
    path = Path(path)
    data = read_yaml(path)
    if isinstance(data, dict):
        try:
            apply_overrides(data, overrides)
        except SpecError as exc:
            raise SpecError(f"{path}: {exc}") from None
    return parse_spec(data, str(path), check_paths=check_paths)


def spec_to_yaml(spec: ExperimentSpec) -> str:
    """The full spec (defaults included) as YAML that `load_spec` reads back to an equal spec."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False, default_flow_style=None)


def _flatten(value: Any, prefix: str, out: dict[str, str]) -> None:
    if isinstance(value, dict) and value:
        for key, sub in value.items():
            _flatten(sub, f"{prefix}.{key}" if prefix else str(key), out)
    elif isinstance(value, list) and any(isinstance(v, dict) for v in value):
        for i, sub in enumerate(value):
            _flatten(sub, f"{prefix}.{i}", out)
    elif isinstance(value, (list, dict)):
        out[prefix] = json.dumps(value)
    else:
        out[prefix] = "None" if value is None else str(value)


def flatten_spec(spec: ExperimentSpec) -> dict[str, str]:
    """Dotted key -> string value for every leaf (MLflow params): `train.crossbatch.range` -> '3'."""
    out: dict[str, str] = {}
    _flatten(spec.model_dump(mode="json"), "", out)
    return out


def json_schema() -> dict[str, Any]:
    """JSON Schema of `ExperimentSpec` (field descriptions included)."""
    schema = ExperimentSpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


def _is_fotlab_pyproject(path: Path) -> bool:
    try:
        return tomllib.loads(path.read_text()).get("project", {}).get("name") == "fotlab"
    except (OSError, ValueError):
        return False


def project_root(start: str | os.PathLike | None = None) -> Path:
    """Nearest directory upward from `start` (default cwd) holding a fotlab pyproject.toml or a `.fotlab`
    marker; the start directory itself when none does."""
    here = Path(start or Path.cwd()).resolve()
    for candidate in (here, *here.parents):
        if (candidate / ".fotlab").exists() or _is_fotlab_pyproject(candidate / "pyproject.toml"):
            return candidate
    return here


def resolve_tracking_uri(spec: ExperimentSpec | None = None) -> str:
    """spec.tracking.uri, else $MLFLOW_TRACKING_URI, else `sqlite:///<project-or-cwd>/mlflow.db` (never the
    deprecated file store)."""
    if spec is not None and spec.tracking.uri:
        return spec.tracking.uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{project_root() / 'mlflow.db'}"


def resolve_artifact_root(spec: ExperimentSpec | None, tracking_uri: str) -> str | None:
    """Artifact location for a new MLflow experiment: spec.tracking.artifact_root, else `mlartifacts/` beside a
    sqlite db (as a file:// URI), else None (the tracking server decides)."""
    if spec is not None and spec.tracking.artifact_root:
        root = spec.tracking.artifact_root
        return root if "://" in root else Path(root).expanduser().resolve().as_uri()
    db = sqlite_db_path(tracking_uri)
    if db is not None:
        return (db.resolve().parent / "mlartifacts").as_uri()
    return None


def sqlite_db_path(tracking_uri: str) -> Path | None:
    """The database file of a `sqlite:///` tracking URI (user-expanded); None for any other store."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri.removeprefix("sqlite:///")).expanduser()


def resolve_storage_path(spec: ExperimentSpec | None = None) -> str:
    """Ray Train storage: spec.storage.path (local paths made absolute), else $FOTLAB_STORAGE_PATH (what the
    compose and KubeRay stacks set on every node), else `<project-or-cwd>/.fotlab/runs`."""
    path = (spec.storage.path if spec is not None else None) or os.environ.get("FOTLAB_STORAGE_PATH")
    if path is None:
        return str(project_root() / ".fotlab" / "runs")
    return path if "://" in path else str(Path(path).expanduser().resolve())
