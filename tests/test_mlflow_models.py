"""fotlab models as MLflow Models: logged-model entity, pyfunc generation with memory, registry, no pickles.

Real MLflow throughout: a sqlite store in a temp dir, and (marked slow) a real `mlflow server` on 127.0.0.1 and
MLflow's own `mlflow models serve`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from fotlab import model_refs, names, serving, tracking
from fotlab.data import byte_tokenizer
from fotlab.model import FoTForCausalLM, preset_config

pytestmark = pytest.mark.slow  # sqlite schema migrations and model saves: seconds each

# A prompt several windows long (debug preset: W = 64 tokens, 32 kept local): the prefix goes through memory.
LONG_PROMPT = "def add(a, b):\n    return a + b\n\n" * 6
N_NEW = 8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny fotlab model directory (safetensors + config + byte tokenizer), as `train()` saves it."""
    torch.manual_seed(0)
    tokenizer = byte_tokenizer()
    model = FoTForCausalLM(preset_config("debug", vocab_size=len(tokenizer))).eval()
    path = tmp_path_factory.mktemp("fot") / "model"
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def reference_completion(model_dir: Path, prompt: str, n_new: int) -> str:
    """What `FoTForCausalLM.generate` gives for the prompt (greedy), decoded: the pyfunc must match it."""
    tokenizer = byte_tokenizer()
    model = FoTForCausalLM.from_pretrained(str(model_dir)).eval()
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    assert ids.shape[1] > 2 * model.config.max_position_embeddings  # longer than the window: memory is used
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n_new, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@pytest.fixture
def store(tmp_path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # for mlflow.pyfunc.load_model (MLflow's own loader)
    return uri


def log_and_register(uri: str, model_dir: Path, name: str = "fot-tiny") -> tuple[tracking.TrackedRun, str]:
    run = tracking.start_run(uri, tracking.setup_experiment(uri, "models"), run_name="logged")
    run.log_metrics({tracking.TRAIN_LOSS: 2.0}, step=3)
    run.log_metrics({tracking.VAL_LOSS: 1.5, "eval/ppl": 4.2}, step=5)  # final step: evaluations
    model_id = run.log_model_dir(model_dir, step=5)
    version = run.register_model(name)
    run.finish()
    return run, model_id, version


def check_logged_model(uri: str, run: tracking.TrackedRun, model_id: str, version: str, name: str) -> None:
    client = MlflowClient(uri)
    experiment = client.get_experiment(run.experiment_id)
    assert experiment.tags[tracking.TAG_EXPERIMENT_KIND] == tracking.EXPERIMENT_KIND
    logged = client.get_logged_model(model_id)
    assert logged.source_run_id == run.run_id and logged.status.to_proto() == 2  # READY
    assert [o.model_id for o in client.get_run(run.run_id).outputs.model_outputs] == [model_id]
    linked = {m.key: m.value for m in logged.metrics}
    assert linked == {tracking.VAL_LOSS: 1.5, "eval/ppl": 4.2}  # the final step's metrics, not step 3's
    registered = client.get_model_version(name, version)
    assert registered.source == logged.artifact_location and registered.run_id == run.run_id


def test_logged_model_generates_like_the_model_and_loads_without_pickles(store, model_dir, monkeypatch, tmp_path):
    import pickle

    import cloudpickle
    import mlflow.pyfunc
    import pandas as pd

    run, model_id, version = log_and_register(store, model_dir)
    check_logged_model(store, run, model_id, version, "fot-tiny")

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling while loading a fotlab MLflow Model")

    for module, attr in (
        (pickle, "load"),
        (pickle, "loads"),
        (cloudpickle, "load"),
        (cloudpickle, "loads"),
        (torch, "load"),
    ):
        monkeypatch.setattr(module, attr, refuse)
    for ref in (f"models:/{model_id}", "models:/fot-tiny/latest", f"runs:/{run.run_id}/model"):
        loaded = mlflow.pyfunc.load_model(ref)
        got = loaded.predict(
            pd.DataFrame({"prompt": [LONG_PROMPT, LONG_PROMPT[:-40]]}), params={"max_new_tokens": N_NEW}
        )
        expected = [reference_completion(model_dir, p, N_NEW) for p in (LONG_PROMPT, LONG_PROMPT[:-40])]
        assert list(got[names.COMPLETION_COLUMN]) == expected, ref
    monkeypatch.undo()

    model_refs.download_model(f"models:/{model_id}", store, tmp_path / "dl")
    files = sorted(p.name for p in (tmp_path / "dl").rglob("*") if p.is_file())
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".bin", ".pt"))], files
    mlmodel = next((tmp_path / "dl").rglob("MLmodel")).read_text()
    assert "loader_module: fotlab.serving" in mlmodel and "cloudpickle" not in mlmodel
    assert "python_model" not in mlmodel and "signature:" in mlmodel and "max_new_tokens" in mlmodel


def test_model_references_resolve_to_the_model_directory(store, model_dir, tmp_path):
    run, model_id, _ = log_and_register(store, model_dir, name="stage1")
    expected = (model_dir / "model.safetensors").read_bytes()
    for i, ref in enumerate(
        (f"runs:/{run.run_id}", "models:/stage1/latest", "models:/stage1/1", f"models:/{model_id}")
    ):
        local = model_refs.download_model(ref, store, tmp_path / f"d{i}")
        assert (local / "model.safetensors").read_bytes() == expected, ref
        FoTForCausalLM.from_pretrained(str(local))  # what init_from and `fotlab eval --model` do with it


def test_older_runs_with_a_raw_model_folder_still_load(store, model_dir, tmp_path):
    """Runs logged before MLflow Models (the folder uploaded as run artifacts) keep working everywhere."""
    run = tracking.start_run(store, tracking.setup_experiment(store, "old"))
    run.client.log_artifacts(run.run_id, str(model_dir), tracking.MODEL_ARTIFACT_DIR)
    assert run.register_model("old-style") == "1"
    run.finish()
    for i, ref in enumerate((f"runs:/{run.run_id}", "models:/old-style/latest")):
        local = model_refs.download_model(ref, store, tmp_path / f"o{i}")
        assert (local / "config.json").read_text() == (model_dir / "config.json").read_text()


def test_a_model_asking_for_remote_code_is_refused(store, model_dir, tmp_path):
    import shutil

    remote = tmp_path / "remote"
    shutil.copytree(model_dir, remote)
    config = json.loads((remote / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (remote / "config.json").write_text(json.dumps(config))
    run = tracking.start_run(store, tracking.setup_experiment(store, "remote"))
    with pytest.raises(tracking.RemoteCodeError, match=r"config\.json: asks for custom code \(auto_map\)"):
        run.log_model_dir(remote)
    with pytest.raises(tracking.RemoteCodeError):
        serving._load_pyfunc(str(remote))  # what MLflow's loader calls
    run.finish()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, deadline_s: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, (
            f"server exited with {proc.returncode}: {Path(proc.args[-1]).name} " + Path(proc.log).read_text()[-3000:]
        )
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {deadline_s} s")


def start_server(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(args, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    proc.log = log  # what it printed, for the assertion message
    return proc


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)


@pytest.mark.timeout(300)
def test_on_a_tracking_server_and_served_by_mlflow_models_serve(model_dir, tmp_path):
    """The same layout read back from a real `mlflow server` (artifacts proxied), then the registered model
    answers a long-prompt generation request through MLflow's own serving command."""
    port = free_port()
    # MLflow's serving command execs `uvicorn` from PATH: the environment's bin folder, as in an activated venv
    env = {**os.environ, "MLFLOW_TRACKING_URI": "", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    mlflow_bin = str(Path(sys.executable).with_name("mlflow"))
    server = start_server(
        [
            mlflow_bin,
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "artifacts"),
        ],
        env,
        tmp_path / "server.log",
    )
    serve = None
    try:
        uri = f"http://127.0.0.1:{port}"
        wait_http(f"{uri}/health", 120, server)
        run, model_id, version = log_and_register(uri, model_dir, name="served")
        check_logged_model(uri, run, model_id, version, "served")
        serve_port = free_port()
        serve = start_server(
            [
                mlflow_bin,
                "models",
                "serve",
                "-m",
                "models:/served/latest",
                "--env-manager",
                "local",
                "--host",
                "127.0.0.1",
                "--port",
                str(serve_port),
            ],
            {**env, "MLFLOW_TRACKING_URI": uri},
            tmp_path / "serve.log",
        )
        wait_http(f"http://127.0.0.1:{serve_port}/ping", 180, serve)
        body = json.dumps({"dataframe_records": [{"prompt": LONG_PROMPT}], "params": {"max_new_tokens": N_NEW}})
        body = body.encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{serve_port}/invocations", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())
        assert answer["predictions"] == [{names.COMPLETION_COLUMN: reference_completion(model_dir, LONG_PROMPT, N_NEW)}]
    finally:
        for proc in (serve, server):
            if proc is not None:
                stop_server(proc)
