"""`run_experiment` / `fotlab run` / `fotlab submit` without a Ray cluster: the in-process path
(`scaling.num_workers=0`, the real Train V2 local mode + real training loop + real sqlite MLflow), failures,
Ctrl-C + resume, the CLI's --json contract and submit's argument checks."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from fotlab import model_refs, tracking
from fotlab.errors import FotlabError
from fotlab.orchestrate import RunFailedError, RunInterruptedError, run_experiment
from fotlab.orchestrate.jobs import (
    JOB_ENTRY_MODULE,
    JOB_SPEC_ENV,
    SubmitError,
    build_job,
    check_address,
    missing_destinations,
)
from fotlab.spec import load_spec, parse_spec


def tiny_spec_dict(corpus: Path, tmp_path: Path, uri: str, *, num_workers: int = 0, **train) -> dict:
    """A debug-preset run on the tiny corpus: a few steps, a checkpoint every 2 steps, everything under tmp."""
    train_section = {
        "steps": 4,
        "batch_size": 4,
        "context_length": 32,
        "log_every": 1,
        "checkpoint_every": 2,
        "eval_batches": 1,
        "crossbatch": {"range": 1, "packing": 2},
        "optimizer": {"lr": 3e-3},
    }
    train_section.update(train)
    return {
        "name": "orch-test",
        "model": {"preset": "debug"},
        "data": {
            "sources": [{"kind": "local", "path": str(corpus), "glob": "*.txt"}],
            "validation_docs": 2,
            "cache_dir": str(tmp_path / "datasets-cache"),
        },
        "train": train_section,
        "scaling": {"num_workers": num_workers},
        "storage": {"path": str(tmp_path / "runs")},
        "tracking": {"uri": uri},
    }


def client_for(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def assert_tracked_run(uri: str, outcome, n_steps: int) -> None:
    """The MLflow run holds params, per-step metrics, the spec, the model (loadable), and is FINISHED."""
    from fotlab.model import FoTForCausalLM

    client = client_for(uri)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == str(n_steps)
    assert run.data.params["model.preset"] == "debug"
    assert run.data.tags["fotlab.ray_run_name"] == outcome.run_name
    assert [m.step for m in client.get_metric_history(outcome.run_id, tracking.TRAIN_LOSS)] == list(
        range(1, n_steps + 1)
    )
    assert tracking.VAL_LOSS in run.data.metrics
    assert "spec.yaml" in {a.path for a in client.list_artifacts(outcome.run_id)}
    (output,) = run.outputs.model_outputs  # the model: an MLflow Model logged by the run at its last step
    assert output.step == n_steps and client.get_logged_model(output.model_id).source_run_id == outcome.run_id
    with tempfile.TemporaryDirectory() as tmp:
        logged = model_refs.download_model(f"runs:/{outcome.run_id}", uri, tmp)
        assert "config.json" in {p.name for p in logged.iterdir()}
        assert FoTForCausalLM.from_pretrained(str(logged)).config.num_hidden_layers == 2
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}  # what it read: mlflow.data.context
    assert set(inputs) == {"training", "validation"}
    assert json.loads(inputs["training"].profile)["num_documents"] == 8  # 10 tiny documents, 2 held out
    assert json.loads(inputs["validation"].profile)["num_documents"] == 2
    model = FoTForCausalLM.from_pretrained(outcome.model_dir)
    assert model.config.num_hidden_layers == 2
    assert outcome.metrics[tracking.VAL_LOSS] == pytest.approx(run.data.metrics[tracking.VAL_LOSS])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_in_process_run_is_tracked_end_to_end(tiny_corpus, tmp_path, mlflow_uri):
    spec = parse_spec(tiny_spec_dict(tiny_corpus, tmp_path, mlflow_uri))
    outcome = run_experiment(spec, progress=False)
    assert outcome.status == "FINISHED" and outcome.final_step == 4
    assert_tracked_run(mlflow_uri, outcome, n_steps=4)
    spec_artifact = client_for(mlflow_uri).download_artifacts(outcome.run_id, "spec.yaml", str(tmp_path))
    assert parse_spec(yaml.safe_load(Path(spec_artifact).read_text())) == spec


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_failure_at_runtime_marks_the_run_failed(tiny_corpus, tmp_path, mlflow_uri):
    data = tiny_spec_dict(tiny_corpus, tmp_path, mlflow_uri)
    data["data"]["sources"][0]["path"] = str(tmp_path / "vanished-corpus")  # only found missing at run time
    spec = parse_spec(data, check_paths=False)
    with pytest.raises(RunFailedError) as caught:
        run_experiment(spec, progress=False)
    run = client_for(mlflow_uri).get_run(caught.value.run_id)
    assert run.info.status == "FAILED"
    assert "vanished-corpus" in run.data.tags[tracking.TAG_ERROR]
    assert "FAILED" in str(caught.value) and caught.value.run_id in str(caught.value)


def stop_after_first_checkpoint(monkeypatch, storage: Path, signum: int) -> list[int]:
    """A deterministic stop for an in-process run (`num_workers=0`): the training loop itself sends `signum` to
    this process (as a terminal or a scheduler would) in the first step after the first checkpoint is on disk, so
    the stop lands mid-run however fast or busy the machine is. Returns the list that receives that step."""
    from fotlab.train import loop

    if signum == signal.SIGINT:
        # Python's usual Ctrl-C behaviour (KeyboardInterrupt), whatever this process inherited or an earlier test
        # left: a shell's background job starts with SIGINT ignored, and Ray Tune's fit (the sweep tests) installs
        # its own handler. Called from the main thread.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    real_step, sent_at = loop.train_step, []

    def step_then_signal(*args, **kwargs):
        stats = real_step(*args, **kwargs)
        if not sent_at and list(storage.glob("*/output/checkpoints/step-*")):
            sent_at.append(kwargs["step"])
            os.kill(os.getpid(), signum)
        return stats

    monkeypatch.setattr(loop, "train_step", step_then_signal)
    return sent_at


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_stop_signal_checkpoints_and_resume_continues_the_same_run(
    tiny_corpus, tmp_path, mlflow_uri, signum, monkeypatch
):
    n_steps = 40
    spec = parse_spec(tiny_spec_dict(tiny_corpus, tmp_path, mlflow_uri, steps=n_steps))
    sent_at = stop_after_first_checkpoint(monkeypatch, tmp_path / "runs", signum)
    with pytest.raises(RunInterruptedError) as caught:
        run_experiment(spec, progress=False)
    run_id = caught.value.run_id
    assert f"--resume {run_id}" in str(caught.value)
    client = client_for(mlflow_uri)
    stopped = client.get_run(run_id)
    assert stopped.info.status == "KILLED" and stopped.data.tags["fotlab.resumable"] == "true"
    stopped_at = max(m.step for m in client.get_metric_history(run_id, tracking.TRAIN_LOSS))
    assert 2 <= sent_at[0] <= stopped_at < n_steps

    outcome = run_experiment(spec, resume=stopped.info.run_name, progress=False)  # by run name
    assert outcome.run_id == run_id and outcome.final_step == n_steps
    steps = [m.step for m in client.get_metric_history(run_id, tracking.TRAIN_LOSS)]
    assert steps == list(range(1, n_steps + 1))  # continued after the checkpoint, no step trained twice
    assert client.get_run(run_id).info.status == "FINISHED"
    with pytest.raises(FotlabError, match=f"--resume {run_id}: run {run_id} already FINISHED") as finished:
        run_experiment(spec, resume=run_id, progress=False)
    assert "\n" not in str(finished.value)


@pytest.mark.slow  # a fresh MLflow sqlite store takes ~10 s to migrate here
def test_resume_of_an_unknown_run_is_a_one_line_error(tiny_corpus, tmp_path, mlflow_uri):
    spec = parse_spec(tiny_spec_dict(tiny_corpus, tmp_path, mlflow_uri))
    with pytest.raises(FotlabError, match="--resume no-such-run: no run with id or name 'no-such-run'") as unknown:
        run_experiment(spec, resume="no-such-run", progress=False)
    assert "\n" not in str(unknown.value)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cli_run_json_ends_with_one_json_object(tiny_corpus, tmp_path, mlflow_uri):
    spec_file = tmp_path / "tiny.yaml"
    spec_file.write_text(yaml.safe_dump(tiny_spec_dict(tiny_corpus, tmp_path, mlflow_uri, steps=2)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "fotlab.cli", "run", str(spec_file), "--set", "train.log_every=2", "--json"],
        capture_output=True,
        text=True,
        timeout=280,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout  # nothing else on stdout
    result = json.loads(lines[0])
    assert result["status"] == "FINISHED" and tracking.VAL_LOSS in result["metrics"]
    assert Path(result["model_dir"], "config.json").is_file()
    run = client_for(mlflow_uri).get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["train.log_every"] == "2"


def test_cli_run_bad_override_is_one_line(tmp_path):
    spec_file = tmp_path / "tiny.yaml"
    spec_file.write_text(yaml.safe_dump({"name": "x"}))
    proc = subprocess.run(
        [sys.executable, "-m", "fotlab.cli", "run", str(spec_file), "--set", "train.steps=-3"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) == 1 and "train.steps" in proc.stderr


@pytest.mark.parametrize("address", ["HEAD:8265", "ray://head:10001", "", "http://"])
def test_submit_rejects_non_dashboard_addresses(address):
    with pytest.raises(SubmitError, match="dashboard"):
        check_address(address)


def test_submit_job_ships_the_resolved_spec(tiny_corpus, tmp_path):
    spec = load_spec_with_overrides(tiny_corpus, tmp_path, ["train.steps=7"])
    entrypoint, runtime_env = build_job(spec)
    assert entrypoint == f"python -m {JOB_ENTRY_MODULE} --json --no-progress"
    # No working_dir: Ray re-extracts it (rmtree + unzip) on every node, under a driver that runs in it.
    assert "working_dir" not in runtime_env
    assert Path(runtime_env["py_modules"][0], "cli_job.py").is_file()
    assert parse_spec(yaml.safe_load(runtime_env["env_vars"][JOB_SPEC_ENV])) == spec and spec.train.steps == 7


def test_submit_refuses_a_run_that_would_write_into_the_job_folder(tiny_corpus, tmp_path):
    spec = load_spec_with_overrides(tiny_corpus, tmp_path, ["tracking.uri=null", "storage.path=null"])
    assert missing_destinations(spec, {}) == [
        "tracking.uri (or MLFLOW_TRACKING_URI on the cluster)",
        "storage.path (or FOTLAB_STORAGE_PATH on the cluster)",
    ]
    cluster = {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "FOTLAB_STORAGE_PATH": "s3://fotlab/runs"}
    assert missing_destinations(spec, cluster) == []
    assert missing_destinations(spec, {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}) == [
        "storage.path (or FOTLAB_STORAGE_PATH on the cluster)"
    ]
    explicit = load_spec_with_overrides(tiny_corpus, tmp_path, [])  # tracking.uri and storage.path set
    assert missing_destinations(explicit, {}) == []


def load_spec_with_overrides(corpus: Path, tmp_path: Path, overrides: list[str]):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(tiny_spec_dict(corpus, tmp_path, "sqlite:///unused.db")))
    return load_spec(path, overrides)


def test_cli_submit_bad_address_is_one_line(tmp_path):
    spec_file = tmp_path / "tiny.yaml"
    spec_file.write_text(yaml.safe_dump({"name": "x"}))
    proc = subprocess.run(
        [sys.executable, "-m", "fotlab.cli", "submit", str(spec_file), "--address", "localhost:8265"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 1 and "http://HEAD:8265" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_live_progress_follows_the_latest_records():
    import io

    from rich.console import Console

    from fotlab.orchestrate.channel import ChannelHandle
    from fotlab.orchestrate.progress import LiveProgress

    channel = ChannelHandle.create(use_ray=False)
    channel.push(10, {tracking.TRAIN_LOSS: 3.25, tracking.TOKENS_PER_S: 1234.0})
    channel.push(20, {tracking.TRAIN_LOSS: 2.5})
    channel.push(20, {tracking.VAL_LOSS: 2.75})
    console = Console(file=io.StringIO(), force_terminal=False, width=120)
    with LiveProgress(100, console=console) as display:
        display.update(channel.drain())
        assert display.task.completed == 20
        assert display.task.fields == {"loss": "2.5000", "tps": "1,234"}
        assert channel.drain() == []  # drained once
    assert "20/100" in console.file.getvalue()
    assert not channel.stop_requested()
    channel.request_stop()
    assert channel.stop_requested()


def test_trainer_configs_come_from_the_spec(tmp_path):
    from fotlab.orchestrate.channel import ChannelHandle
    from fotlab.orchestrate.run_record import RunRecord
    from fotlab.orchestrate.runner import trainer_for
    from fotlab.orchestrate.trainer import WorkerConfig

    spec = parse_spec(
        {
            "name": "cfg",
            "train": {"keep_checkpoints": 3},
            "failure": {"max_failures": 2},
            "scaling": {
                "num_workers": 4,
                "use_gpu": True,
                "accelerator_type": "H100",
                "resources_per_worker": {"CPU": 2, "GPU": 1},
            },
        },
        check_paths=False,
    )
    record = RunRecord(
        run=tracking.TrackedRun("sqlite:///unused.db", "run-1", "0"),
        run_name="cfg-1",
        ray_run_name="cfg-20260101-000000-abcdef",
        storage_path=str(tmp_path / "runs"),
    )
    trainer = trainer_for(spec, record, ChannelHandle.create(use_ray=False), report_every=7)
    scaling, run_config = trainer.scaling_config, trainer.run_config
    assert (scaling.num_workers, scaling.use_gpu, scaling.accelerator_type) == (4, True, "H100")
    assert scaling.resources_per_worker == {"CPU": 2.0, "GPU": 1.0}
    assert run_config.name == record.ray_run_name and run_config.storage_path == str(tmp_path / "runs")
    assert run_config.failure_config.max_failures == 2
    # checkpoint retention is fotlab's (train.keep_checkpoints, in the loop): Ray keeps no copies of its own
    assert run_config.checkpoint_config.num_to_keep is None
    config = trainer.train_loop_per_worker.args[0]  # the worker function gets one frozen, typed config
    assert isinstance(config, WorkerConfig) and config.run_id == "run-1" and config.report_every == 7
    assert config.output_dir == str(tmp_path / "runs" / record.ray_run_name / "output")
    assert config.spec == spec  # the validated spec itself travels: nothing re-parsed on the workers
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.run_id = "other"


def test_min_workers_makes_the_worker_group_elastic():
    from fotlab.orchestrate.trainer import scaling_config

    fixed = parse_spec({"name": "x", "scaling": {"num_workers": 4}}, check_paths=False)
    elastic = parse_spec({"name": "x", "scaling": {"num_workers": 4, "min_workers": 2}}, check_paths=False)
    assert scaling_config(fixed.scaling).num_workers == 4
    config = scaling_config(elastic.scaling)
    assert config.num_workers == (2, 4) and config.elasticity_enabled


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cli_run_json_reports_a_failed_run_too(tiny_corpus, tmp_path, mlflow_uri):
    # An absurd learning rate without clipping: the loss turns NaN at step 2 and the loop stops.
    data = tiny_spec_dict(
        tiny_corpus,
        tmp_path,
        mlflow_uri,
        steps=4,
        grad_clip=None,
        optimizer={"lr": 1e12},
        schedule={"name": "constant", "warmup_steps": 0},
    )
    spec_file = tmp_path / "tiny.yaml"
    spec_file.write_text(yaml.safe_dump(data))
    proc = subprocess.run(
        [sys.executable, "-m", "fotlab.cli", "run", str(spec_file), "--json"],
        capture_output=True,
        text=True,
        timeout=280,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["status"] == "FAILED" and "LossNotFiniteError" in result["error"]
    run = client_for(mlflow_uri).get_run(result["run_id"])
    assert run.info.status == "FAILED" and "nan" in run.data.tags[tracking.TAG_ERROR]


def test_cli_run_unreachable_ray_address_fails_fast_in_one_line(tiny_corpus, tmp_path, mlflow_uri):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    spec_file = tmp_path / "tiny.yaml"
    spec_file.write_text(yaml.safe_dump(tiny_spec_dict(tiny_corpus, tmp_path, mlflow_uri, num_workers=1)))
    proc = subprocess.run(
        [sys.executable, "-m", "fotlab.cli", "run", str(spec_file), "--address", f"127.0.0.1:{port}", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["status"] == "FAILED" and f"could not reach a Ray cluster at '127.0.0.1:{port}'" in result["error"]
    assert client_for(mlflow_uri).get_run(result["run_id"]).info.status == "FAILED"


def test_closing_summary_shows_perplexity_with_and_without_memory():
    from fotlab.orchestrate.commands import memory_effect_lines

    metrics = {
        "val/loss": 2.0,
        "eval/ppl_single_doc/mem_1024": 8.0,
        "eval/ppl_single_doc/mem_0": 10.0,
        "eval/ppl_single_doc/mem_256": 9.0,
        "eval/ppl_multi_doc/mem_0": 5.0,
        "eval/passkey_acc/len_256": 1.0,
    }
    assert memory_effect_lines(metrics) == [
        "ppl_multi_doc  no memory 5.000",
        "ppl_single_doc  no memory 10.000 | memory 256: 9.000 (-10.0%) | memory 1024: 8.000 (-20.0%)",
    ]
    assert memory_effect_lines({"val/loss": 2.0}) == []
