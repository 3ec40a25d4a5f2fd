"""Model references: a local model folder for `runs:/RUN_ID`, `models:/NAME/VERSION|latest|@ALIAS`,
`models:/<logged model id>` or a plain directory, resolved in one MLflow store (its registry included).

    from fotlab import model_refs
    local = model_refs.download_model("models:/quickstart/latest", "sqlite:///mlflow.db", "/tmp/init")
    spec = model_refs.with_local_init_from(spec, uri, out / "init_from")   # model.init_from made a local folder

Design choices:
- Resolution goes through `fotlab.tracking.client(uri)`, never MLflow's process-wide registry URI: a sqlite
  registry would otherwise resolve a `models:/` source against another store.
- Both model layouts load: an MLflow Model (`MLmodel` + the HF folder as its pyfunc data, fotlab >= 0.2) and a
  run's raw `model/` artifact folder (older runs).
- Every failure is one `TrackingError` line naming the reference and the store.
"""

from __future__ import annotations

import re
from pathlib import Path

from fotlab.tracking import MODEL_ARTIFACT_DIR, TrackingError, client, logged_model_id

MODEL_URI_SCHEMES = ("runs:/", "models:/")


def is_model_uri(ref: str | None) -> bool:
    """True for an MLflow model reference: `runs:/RUN_ID[/PATH]` or `models:/NAME/VERSION|latest|@ALIAS`."""
    return bool(ref) and ref.startswith(MODEL_URI_SCHEMES)


def download_model(ref: str, uri: str, dst_dir: str | Path) -> Path:
    """The local model directory for `ref`: a directory as is, or an MLflow model reference downloaded into
    dst_dir (`runs:/RUN_ID` means the run's logged model). Raises TrackingError (one line) if the run, the
    registered model or the download is missing, or the result is not a saved model (no config.json).

    Both layouts load: an MLflow Model (`MLmodel` + the model directory as its pyfunc data, fotlab >= 0.2) and a
    run's raw `model/` artifact folder (older runs)."""
    if is_model_uri(ref):
        import mlflow.artifacts

        try:
            artifact_uri = _model_artifact_uri(ref, uri)
            Path(dst_dir).mkdir(parents=True, exist_ok=True)
            path = Path(
                mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=str(dst_dir), tracking_uri=uri)
            )
        except Exception as exc:  # noqa: BLE001 - MlflowException, OSError, ...: one line for the user
            raise TrackingError(f"{ref}: cannot download it from {uri}: {exc}".splitlines()[0]) from None
        path = model_files_dir(path)
    else:
        path = model_files_dir(Path(ref).expanduser())
    if not (path / "config.json").is_file():
        raise TrackingError(f"{ref}: {path} is not a saved model directory (no config.json)")
    return path


def model_files_dir(path: Path) -> Path:
    """The HF-format directory inside an MLflow Model folder (its pyfunc `data`), else `path` itself."""
    import yaml

    mlmodel = path / "MLmodel"
    if (path / "config.json").is_file() or not mlmodel.is_file():
        return path
    flavor = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}).get("python_function", {})
    return path / flavor["data"] if flavor.get("data") else path


LOGGED_MODEL_ID = re.compile(r"^m-[0-9a-f]{32}$")


def _model_artifact_uri(ref: str, uri: str) -> str:
    """Where the files of a model reference live, resolved in this store (its registry included, never MLflow's
    process-wide registry URI): `runs:/RUN_ID` -> the run's logged model (or, for older runs, its `model/`
    folder); `models:/<model id>` -> that logged model; `models:/NAME/VERSION`, `models:/NAME/latest` (highest
    version) and `models:/NAME@ALIAS` -> the registered version's source."""
    mlflow_client = client(uri)
    if ref.startswith("runs:/"):
        run_id, _, sub = ref[len("runs:/") :].strip("/").partition("/")
        model_id = logged_model_id(uri, run_id) if sub in ("", MODEL_ARTIFACT_DIR) else None
        if model_id is not None:
            return mlflow_client.get_logged_model(model_id).artifact_location
        return f"runs:/{run_id}/{sub or MODEL_ARTIFACT_DIR}"
    name, _, version = ref[len("models:/") :].strip("/").partition("/")
    if not version and LOGGED_MODEL_ID.match(name):
        return mlflow_client.get_logged_model(name).artifact_location
    if "@" in name:
        name, alias = name.split("@", 1)
        source = mlflow_client.get_model_version_by_alias(name, alias).source
    elif version in ("", "latest"):
        mlflow_client.get_registered_model(name)  # "not found" names the model
        versions = mlflow_client.search_model_versions(f"name = '{name}'")
        if not versions:
            raise TrackingError(f"registered model {name!r} has no versions")
        source = max(versions, key=lambda v: int(v.version)).source
    else:
        source = mlflow_client.get_model_version(name, version).source
    return _model_artifact_uri(source, uri) if source.startswith(MODEL_URI_SCHEMES) else source


def with_local_init_from(spec, uri: str, dst_dir: str | Path):
    """The spec with an MLflow `model.init_from` (runs:/..., models:/...) downloaded into dst_dir and replaced
    by that local directory (the spec itself when init_from is a path or unset). Done once on the driver, so
    workers on a shared filesystem load plain files."""
    ref = spec.model.init_from
    if not is_model_uri(ref):
        return spec
    try:
        local = download_model(ref, uri, dst_dir)
    except TrackingError as exc:
        raise TrackingError(f"model.init_from: {exc}") from None
    return spec.model_copy(update={"model": spec.model.model_copy(update={"init_from": str(local)})})
