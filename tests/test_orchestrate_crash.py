"""`fotlab run` after a crash, and with evaluations: an exception mid-run (in-process) and a SIGKILLed `fotlab run`
subprocess, each resumed with `--resume` into the same MLflow run with one metric point per step; a spec with an
`eval:` section whose metrics and plots land in the run and are linked to its logged model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_orchestrate import client_for, tiny_spec_dict

from fotlab import tracking
from fotlab.orchestrate import RunFailedError, run_experiment
from fotlab.spec import parse_spec

pytestmark = pytest.mark.slow


def checkpoints(storage: Path) -> list[Path]:
    """fotlab's checkpoints of every run under the storage folder."""
    return sorted(storage.glob("*/output/checkpoints/step-*"))


def metric_steps(client, run_id: str, key: str = tracking.TRAIN_LOSS) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


class Crash(RuntimeError):
    """What the patched training step raises (a bug, a lost device...)."""


@pytest.mark.timeout(300)
def test_exception_mid_run_fails_resumably_and_resume_logs_each_step_once(
    tiny_corpus, tmp_path, mlflow_uri, monkeypatch
):
    from fotlab.train import loop

    n_steps, crash_at = 8, 5  # checkpoint at step 3; step 4 is logged, then step 5 raises
    spec = parse_spec(tiny_spec_dict(tiny_corpus, tmp_path, mlflow_uri, steps=n_steps, checkpoint_every=3))
    real_step = loop.train_step

    def crashing_step(*args, **kwargs):
        if kwargs["step"] == crash_at:
            raise Crash(f"device lost at step {crash_at}")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", crashing_step)
    with pytest.raises(RunFailedError) as caught:
        run_experiment(spec, progress=False)
    run_id = caught.value.run_id
    assert f"--resume {run_id}" in str(caught.value) and "device lost at step 5" in str(caught.value)
    client = client_for(mlflow_uri)
    failed = client.get_run(run_id)
    assert failed.info.status == "FAILED" and failed.data.tags["fotlab.resumable"] == "true"
    assert metric_steps(client, run_id) == [1, 2, 3, 4]
    assert [p.name for p in checkpoints(tmp_path / "runs")][-1] == "step-00000003"

    monkeypatch.setattr(loop, "train_step", real_step)
    outcome = run_experiment(spec, resume=run_id, progress=False)
    assert outcome.run_id == run_id and outcome.status == "FINISHED" and outcome.final_step == n_steps
    # resumed from step 3: step 4 was trained twice but is logged once
    assert metric_steps(client, run_id) == list(range(1, n_steps + 1))
    resumed = client.get_run(run_id)
    assert resumed.info.status == "FINISHED" and tracking.TAG_ERROR not in resumed.data.tags


# `fotlab run` in a child process whose training loop parks (sleeps) in step `argv[1]` after writing the file
# `argv[2]`: the test SIGKILLs it there, with the steps before it logged and a checkpoint behind them.
PARKING_FOTLAB = """
import sys, time
from pathlib import Path
from fotlab.train import loop
park_at, parked = int(sys.argv[1]), Path(sys.argv[2])
real_step = loop.train_step
def step(*args, **kwargs):
    if kwargs["step"] == park_at:
        parked.write_text("parked")
        time.sleep(3600)
    return real_step(*args, **kwargs)
loop.train_step = step
sys.argv = ["fotlab", *sys.argv[3:]]
from fotlab.cli import entry
entry()
"""


@pytest.mark.timeout(420)
def test_sigkilled_fotlab_run_resumes_into_the_same_run(tiny_corpus, tmp_path, mlflow_uri):
    """A real `fotlab run` killed with SIGKILL mid-run (the MLflow run is left RUNNING, steps 5-6 logged after the
    checkpoint of step 4), then `fotlab run SPEC --resume RUN_ID`."""
    n_steps, park_at = 10, 7
    spec_file = tmp_path / "tiny.yaml"
    data = tiny_spec_dict(tiny_corpus, tmp_path, mlflow_uri, steps=n_steps, checkpoint_every=4)
    spec_file.write_text(yaml.safe_dump(data))
    run_args = ["run", str(spec_file), "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    parked = tmp_path / "parked"
    with (tmp_path / "killed.log").open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", PARKING_FOTLAB, str(park_at), str(parked), *run_args],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            env=env,
        )
        deadline = time.monotonic() + 300
        while not parked.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        # metrics reach MLflow from a background thread: on a loaded machine step 6 may still be on its way when
        # the run parks, so wait for it (a run killed before delivering it is another test's case)
        client = client_for(mlflow_uri)
        while parked.exists() and proc.poll() is None and time.monotonic() < deadline:
            runs = client.search_runs([client.get_experiment_by_name("orch-test").experiment_id])
            if runs and metric_steps(client, runs[0].info.run_id) == [1, 2, 3, 4, 5, 6]:
                break
            time.sleep(0.5)
        proc.kill()  # SIGKILL: no handler runs, no MLflow status update, no last checkpoint
        proc.wait(timeout=60)
    assert parked.exists(), (tmp_path / "killed.log").read_text()[-3000:]
    assert [p.name for p in checkpoints(tmp_path / "runs")] == ["step-00000004"]
    (killed,) = client.search_runs([client.get_experiment_by_name("orch-test").experiment_id])
    run_id = killed.info.run_id
    assert killed.info.status == "RUNNING"  # nothing could mark it: --resume must take it over
    assert metric_steps(client, run_id) == [1, 2, 3, 4, 5, 6]

    resumed = subprocess.run(
        [sys.executable, "-m", "fotlab.cli", *run_args, "--resume", run_id],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    result = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert result["run_id"] == run_id and result["status"] == "FINISHED" and result["final_step"] == n_steps
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and tracking.TAG_ERROR not in run.data.tags
    assert metric_steps(client, run_id) == list(range(1, n_steps + 1))  # steps 5-6 trained twice, logged once
    assert len(client.search_runs([run.info.experiment_id])) == 1  # no second run


@pytest.mark.timeout(300)
def test_evaluations_inside_run_land_in_the_run_and_its_model(tiny_corpus, tmp_path, mlflow_uri):
    data = tiny_spec_dict(tiny_corpus, tmp_path, mlflow_uri, steps=2)
    data["eval"] = {
        "perplexity": [
            {
                "name": "valppl",
                "source": {"kind": "validation"},
                "memory_sizes": [0, 32],
                "modes": ["single_doc"],
                "chunk_len": 16,
            }
        ],
        "passkey": {"lengths": [256], "depths": [0.5], "n_trials": 1},
    }
    outcome = run_experiment(parse_spec(data), progress=False)
    client = client_for(mlflow_uri)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    expected = {"eval/valppl_single_doc/mem_0", "eval/valppl_single_doc/mem_32", "eval/passkey_acc/len_256"}
    assert expected <= set(run.data.metrics), sorted(run.data.metrics)
    for key in expected:
        assert outcome.metrics[key] == pytest.approx(run.data.metrics[key])
        assert metric_steps(client, outcome.run_id, key) == [2]  # logged once, at the final step
    assert run.data.metrics["eval/valppl_single_doc/mem_0"] > 1.0
    plots = {Path(a.path).name for a in client.list_artifacts(outcome.run_id, "eval")}
    assert {"valppl_single_doc_vs_memory.png", "passkey_heatmap.png"} <= plots, plots
    (output,) = run.outputs.model_outputs
    model_metrics = {m.key: m.value for m in client.get_logged_model(output.model_id).metrics or []}
    for key in expected:
        assert model_metrics[key] == pytest.approx(run.data.metrics[key])
