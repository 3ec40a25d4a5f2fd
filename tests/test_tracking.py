"""fotlab.tracking against a real MLflow sqlite store in a temp dir, read back with MlflowClient."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from fotlab import model_refs, tracking
from fotlab.spec import flatten_spec, parse_spec, resolve_artifact_root

# Creating an MLflow sqlite store (schema migrations) alone takes several seconds on a small box.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{root / 'mlflow.db'}"


@pytest.fixture(scope="module")
def spec():
    return parse_spec(
        {
            "name": "track-test",
            "description": "a note",
            "tags": {"team": "fot"},
            "train": {"steps": 3, "crossbatch": {"range": 3, "packing": 4, "stepping": True}, "batch_size": 4},
        }
    )


def test_experiment_created_with_explicit_artifact_location(store):
    root = resolve_artifact_root(None, store)
    exp_id = tracking.setup_experiment(store, "located", root)
    assert tracking.setup_experiment(store, "located", root) == exp_id  # idempotent
    exp = MlflowClient(store).get_experiment(exp_id)
    assert exp.artifact_location == f"{root}/located"
    assert exp.artifact_location.startswith("file://" + str(Path(store.removeprefix("sqlite:///")).parent))


def saved_model_dir(path: Path) -> Path:
    """A folder that passes for a saved model (config.json and a weights file) for the model-logging paths."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "fot"}))
    (path / "model.safetensors").write_bytes(b"weights")
    return path


def test_spec_run_params_tags_metrics_artifacts(store, spec, tmp_path):
    run = tracking.start_spec_run(spec, uri=store, run_name="first")
    run.log_metrics({tracking.TRAIN_LOSS: 2.5, tracking.LR: 1e-3, "note": "text", "bad": float("nan")}, step=1)
    run.log_metrics({tracking.TRAIN_LOSS: 2.0}, step=2)
    model_dir = saved_model_dir(tmp_path / "model")
    run.log_model_dir(model_dir)
    run.finish()

    client = MlflowClient(store)
    got = client.get_run(run.run_id)
    assert got.info.status == "FINISHED" and got.info.run_name == "first"
    assert got.data.params == flatten_spec(spec)
    tags = got.data.tags
    assert tags[tracking.TAG_VERSION] and tags[tracking.TAG_SPEC_NAME] == "track-test"
    assert tags["team"] == "fot" and tags[tracking.TAG_NOTE] == "a note"
    assert tracking.TAG_GIT_COMMIT in tags  # the tests run inside the fotlab git repo
    history = client.get_metric_history(run.run_id, tracking.TRAIN_LOSS)
    assert [(m.step, m.value) for m in history] == [(1, 2.5), (2, 2.0)]
    assert "note" not in got.data.metrics and "bad" not in got.data.metrics
    assert {f.path for f in client.list_artifacts(run.run_id)} == {tracking.SPEC_ARTIFACT}
    (output,) = got.outputs.model_outputs  # the model is an MLflow Model of the run, not a folder of run artifacts
    local = model_refs.download_model(f"runs:/{run.run_id}", store, tmp_path / "back")
    assert {p.name for p in local.iterdir()} == {"config.json", "model.safetensors"}
    assert local.parent.parent.joinpath("MLmodel").is_file() and output.model_id == run.model_id
    spec_text = Path(client.download_artifacts(run.run_id, tracking.SPEC_ARTIFACT, str(tmp_path))).read_text()
    assert parse_spec(yaml.safe_load(spec_text)) == spec


def test_params_are_chunked_and_clipped_under_mlflow_limits(store):
    run = tracking.start_run(store, tracking.setup_experiment(store, "many-params"))
    params = {f"p{i:03d}": i for i in range(2 * tracking.MAX_PARAMS_PER_BATCH + 7)}
    params["long"] = "x" * (tracking.MAX_PARAM_VALUE_LEN + 50)
    run.log_params(params)
    run.finish()
    got = MlflowClient(store).get_run(run.run_id).data.params
    assert len(got) == len(params) and got["p206"] == "206"
    assert len(got["long"]) == tracking.MAX_PARAM_VALUE_LEN


def test_log_model_dir_rejects_non_model(store, tmp_path):
    run = tracking.start_run(store, tracking.setup_experiment(store, "misc"))
    with pytest.raises(tracking.TrackingError, match="no config.json"):
        run.log_model_dir(tmp_path)
    run.finish()


def test_failed_run_keeps_error_and_resume_continues_same_run(store, spec):
    run = tracking.start_spec_run(spec, uri=store, run_name="crashy")
    run.log_metrics({tracking.TRAIN_LOSS: 3.0}, step=1)
    try:
        raise RuntimeError("worker died\nlong details")
    except RuntimeError as err:
        run.fail(err)
    client = MlflowClient(store)
    got = client.get_run(run.run_id)
    assert got.info.status == "FAILED"
    assert got.data.tags[tracking.TAG_ERROR] == "RuntimeError: worker died"

    resumed = tracking.start_spec_run(spec, uri=store, run_id=run.run_id, tags={"resumed": "yes"})
    assert resumed.run_id == run.run_id
    assert client.get_run(run.run_id).info.status == "RUNNING"
    resumed.log_metrics({tracking.TRAIN_LOSS: 1.0}, step=2)
    resumed.finish()
    got = client.get_run(run.run_id)
    assert got.info.status == "FINISHED" and got.data.tags["resumed"] == "yes"
    assert [m.step for m in client.get_metric_history(run.run_id, tracking.TRAIN_LOSS)] == [1, 2]


def test_child_runs_and_search(store, spec):
    exp_id = tracking.setup_experiment(store, "sweepy")
    parent = tracking.start_run(store, exp_id, run_name="sweep-parent", tags={tracking.TAG_SWEEP: "lr-sweep"})
    child = tracking.start_run(
        store, exp_id, run_name="trial-0", parent_run_id=parent.run_id, tags={tracking.TAG_SWEEP: "lr-sweep"}
    )
    other = tracking.start_run(store, exp_id, run_name="lonely")
    for r in (child, parent, other):
        r.finish()
    assert MlflowClient(store).get_run(child.run_id).data.tags[tracking.TAG_PARENT_RUN] == parent.run_id
    in_sweep = {r.info.run_name for r in tracking.search_runs(store, experiment="sweepy", sweep="lr-sweep")}
    assert in_sweep == {"sweep-parent", "trial-0"}
    assert tracking.get_run(store, "lonely").info.run_id == other.run_id
    assert tracking.get_run(store, other.run_id).info.run_name == "lonely"
    with pytest.raises(tracking.TrackingError, match="no run"):
        tracking.get_run(store, "no-such-run")
    with pytest.raises(tracking.TrackingError, match="no experiment"):
        tracking.search_runs(store, experiment="no-such-experiment")


@pytest.mark.timeout(300)
def test_system_metrics_are_logged(store):
    """Waits for the first system/ metric itself (a busy machine delays MLflow's sampling thread), up to 180 s."""
    import time

    run = tracking.start_run(
        store, tracking.setup_experiment(store, "sysmetrics"), system_metrics=True, system_metrics_interval_s=0.2
    )

    def system_metrics() -> list[str]:
        return [k for k in MlflowClient(store).get_run(run.run_id).data.metrics if k.startswith("system/")]

    deadline = time.monotonic() + 180
    while not system_metrics() and time.monotonic() < deadline:
        time.sleep(0.2)
    run.finish()
    assert system_metrics(), MlflowClient(store).get_run(run.run_id).data.metrics


def test_names_are_declared_once_in_a_module_without_torch_or_mlflow():
    import subprocess
    import sys

    from fotlab import names

    code = "import sys, fotlab.names; print(sorted(m for m in ('torch', 'mlflow', 'ray') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
    assert tracking.TRAIN_LOSS is names.TRAIN_LOSS and tracking.TAG_ERROR is names.TAG_ERROR
    import fotlab.train.loop as loop

    assert loop.M is names  # the training loop reports under these very names


def test_metric_names_parse_back_to_what_built_them():
    from fotlab import names

    built = {
        names.ppl_metric("ppl", "single_doc", 4096): ("ppl_single_doc", {"mem": "4096"}),
        names.passkey_metric(16384, 0.5): ("passkey_acc", {"len": "16384", "depth": "50"}),
        names.distraction_metric(8, layer=2): ("distraction_ratio", {"layer": "2", "d": "8"}),
        names.dictionary_metric(256, per_token=True): ("dict_lookup_token_acc", {"mem": "256"}),
        names.few_shot_metric("trec", 2048, "acc_std"): ("trec_acc_std", {"ctx": "2048"}),
    }
    for name, expected in built.items():
        assert names.parse_metric_name(name) == expected, name
    assert names.parse_metric_name(names.TRAIN_LOSS) is None and names.parse_metric_name("eval") is None


def _model_run(store: str, spec, root: Path, marker: str) -> tracking.TrackedRun:
    model_dir = root / marker
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text(json.dumps({"marker": marker}))
    run = tracking.start_spec_run(spec, uri=store)
    run.log_model_dir(model_dir)
    run.finish()
    return run


def test_registered_models_and_run_models_download_by_reference(store, spec, tmp_path, monkeypatch):
    import mlflow

    # MLflow's process-wide registry URI (set by anything else in the process) must not redirect the registry
    monkeypatch.setattr(mlflow.tracking._model_registry.utils, "_registry_uri", f"sqlite:///{tmp_path / 'other.db'}")
    first = _model_run(store, spec, tmp_path / "src", "first")
    assert first.register_model("stage1") == "1"
    second = _model_run(store, spec, tmp_path / "src2", "second")
    assert second.register_model("stage1") == "2"  # a new version of the same registered model

    def marker(ref: str, dst: str) -> str:
        return json.loads((model_refs.download_model(ref, store, tmp_path / dst) / "config.json").read_text())["marker"]

    assert marker("models:/stage1/latest", "a") == "second"
    assert not (tmp_path / "other.db").exists()
    assert marker("models:/stage1/1", "b") == "first"
    assert marker(f"runs:/{first.run_id}", "c") == "first"
    with pytest.raises(tracking.TrackingError, match=r"^models:/nope/latest: cannot download") as err:
        model_refs.download_model("models:/nope/latest", store, tmp_path / "d")
    assert "\n" not in str(err.value)
    with pytest.raises(tracking.TrackingError, match="not a saved model directory"):
        model_refs.download_model(str(tmp_path), store, tmp_path / "e")


def test_init_from_reference_is_downloaded_once_and_replaced_by_the_local_copy(store, spec, tmp_path):
    run = _model_run(store, spec, tmp_path / "src", "stage1")
    stage2 = spec.model_copy(update={"model": spec.model.model_copy(update={"init_from": f"runs:/{run.run_id}"})})
    local = model_refs.with_local_init_from(stage2, store, tmp_path / "init")
    assert Path(local.model.init_from).is_relative_to(tmp_path / "init")
    assert json.loads((Path(local.model.init_from) / "config.json").read_text())["marker"] == "stage1"
    assert stage2.model.init_from == f"runs:/{run.run_id}"  # the spec as written is left alone
    assert model_refs.with_local_init_from(spec, store, tmp_path / "none") is spec  # nothing to download
    missing = stage2.model_copy(update={"model": stage2.model.model_copy(update={"init_from": "models:/gone/3"})})
    with pytest.raises(tracking.TrackingError, match=r"^model\.init_from: models:/gone/3: cannot download"):
        model_refs.with_local_init_from(missing, store, tmp_path / "missing")


def test_processes_starting_together_on_a_new_sqlite_store_all_get_it(tmp_path):
    """Four processes creating one new sqlite store at the same moment (runs started together on a fresh
    project): without the lock in `tracking.client`, MLflow's schema migrations race and leave the store broken
    for every later run; with it each process gets its experiment and the store works afterwards."""
    import subprocess
    import sys
    import time

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = (
        "import sys, time; from fotlab import tracking; "
        "time.sleep(max(0.0, float(sys.argv[2]) - time.time())); "  # start the store at the same instant
        "print(tracking.setup_experiment(sys.argv[1], 'exp' + sys.argv[3]))"
    )
    start = time.time() + 8.0  # after every interpreter has imported fotlab and mlflow
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, uri, str(start), str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err[-400:] for _, err in results]
    ids = {out.strip() for out, _ in results}
    assert len(ids) == 4
    assert {e.name for e in MlflowClient(uri).search_experiments()} >= {"exp0", "exp1", "exp2", "exp3"}
