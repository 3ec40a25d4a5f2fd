"""The handlers of `fotlab run`, `fotlab sweep` and `fotlab submit`, driven through `fotlab.cli.main([...])` (or a
real `fotlab` process) rather than the functions beneath them: what lands on stdout and stderr, and the exit code."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest
import yaml
from test_cli import fotlab_cmd
from test_orchestrate import client_for, tiny_spec_dict
from test_sweep_ray import tiny_sweep

from fotlab import cli, tracking


def write_spec(tmp_path, data: dict):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_run_prints_the_closing_summary(tiny_corpus, tmp_path, mlflow_uri, capsys):
    spec = write_spec(tmp_path, tiny_spec_dict(tiny_corpus, tmp_path, mlflow_uri, steps=2))
    assert cli.main(["run", spec, "--no-progress"]) == 0
    out = capsys.readouterr().out
    (run,) = client_for(mlflow_uri).search_runs(
        [client_for(mlflow_uri).get_experiment_by_name("orch-test").experiment_id]
    )
    run_id, name = run.info.run_id, run.info.run_name
    lines = out.strip().splitlines()
    tail = lines[lines.index(f"run {run_id} FINISHED ({name}, step 2)") :]
    assert tail[1].split() == [tracking.VAL_LOSS, f"{run.data.metrics[tracking.VAL_LOSS]:.4f}"]
    assert tail[2].split()[0] == tracking.VAL_PPL and tail[3].split()[0] == tracking.TRAIN_LOSS
    model_line = tail[4].split()
    assert model_line[0] == "model" and (tmp_path / "runs" / name / "output").as_posix() in model_line[1]
    assert tail[5] == f"browse: `fotlab runs show {run_id}`  or  `fotlab ui`"
    assert len(tail) == 6 and not out.lstrip().startswith("{")  # no JSON without --json


def test_run_with_an_invalid_spec_exits_1_with_one_line(tiny_corpus, tmp_path, capsys):
    data = tiny_spec_dict(tiny_corpus, tmp_path, "sqlite:///unused.db")
    data["train"]["crossbatch"]["range"] = 4  # must be < train.batch_size (4)
    assert cli.main(["run", write_spec(tmp_path, data), "--json"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing ran, so no JSON object either
    (line,) = captured.err.strip().splitlines()
    assert line.startswith("fotlab run: ") and "train.crossbatch.range" in line and "Traceback" not in line


def sweep_of_one_trial(tmp_path, corpus, name: str = "tiny-sweep"):
    space = {"train.optimizer.lr": {"type": "grid", "values": [1e-2]}}
    _, path = tiny_sweep(tmp_path, corpus, steps=4, search="random", num_samples=1, search_space=space, name=name)
    return str(path)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(480)
def test_sweep_json_and_resume_of_a_finished_or_unknown_sweep(ray_session, tiny_corpus, tmp_path, capsys):
    path = sweep_of_one_trial(tmp_path, tiny_corpus)
    assert cli.main(["sweep", path, "--json"]) == 0
    out = capsys.readouterr().out
    (line,) = out.strip().splitlines()  # --json: the JSON object is all there is on stdout
    result = json.loads(line)
    assert result["status"] == "FINISHED" and result["n_trials"] == 1 and len(result["leaderboard"]) == 1
    client = client_for(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(result["parent_run_id"]).info.status == "FINISHED"
    assert result["best"]["run_id"] == result["leaderboard"][0]["run_id"]
    assert yaml.safe_load(Path(result["best_spec"]).read_text())["train"]["optimizer"]["lr"] == pytest.approx(1e-2)

    assert cli.main(["sweep", path, "--resume", "--json"]) == 1
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    assert f"(run {result['parent_run_id']}) already FINISHED; nothing to resume" in line and captured.out == ""

    other = tmp_path / "other-sweep.yaml"
    other.write_text(yaml.safe_dump({**yaml.safe_load(Path(path).read_text()), "name": "never-ran"}))
    assert cli.main(["sweep", str(other), "--resume"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("fotlab sweep: --resume: no earlier run of sweep 'never-ran'")


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(480)
def test_sweep_prints_the_leaderboard_and_best_spec(ray_session, tiny_corpus, tmp_path, capsys):
    path = sweep_of_one_trial(tmp_path, tiny_corpus, name="summary-sweep")
    assert cli.main(["sweep", path]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    client = client_for(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (parent,) = client.search_runs(
        [client.get_experiment_by_name("summary-sweep").experiment_id],
        filter_string="tags.`fotlab.sweep_role` = 'parent'",
    )
    assert any("sweep summary-sweep: leaderboard (val/loss, min)" in line for line in lines)
    finished = next(line for line in lines if line.startswith("sweep summary-sweep FINISHED"))
    assert f"(parent run {parent.info.run_id}, best trial" in finished
    best_spec = next(line for line in lines if line.startswith("best spec: ")).removeprefix("best spec: ")
    assert yaml.safe_load(Path(best_spec).read_text())["name"]
    assert lines[-2:] == [
        f"  train it: fotlab run {best_spec}",
        "browse: `fotlab runs list --sweep summary-sweep`  or  `fotlab ui`",
    ]


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_submit_sends_the_default_interpreter_entrypoint(ray_jobs_address, tiny_corpus, tmp_path, mlflow_uri, capsys):
    from ray.job_submission import JobSubmissionClient

    spec = write_spec(tmp_path, tiny_spec_dict(tiny_corpus, tmp_path, mlflow_uri, steps=2))
    assert cli.main(["submit", spec, "--address", ray_jobs_address, "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # `python` on the cluster's PATH: the submitting machine's interpreter path means nothing there
    assert result["entrypoint"] == "python -m fotlab.cli_job --json --no-progress"
    client = JobSubmissionClient(ray_jobs_address)
    try:
        assert client.get_job_info(result["submission_id"]).entrypoint == result["entrypoint"]
        assert result["logs"] == f"ray job logs --address {ray_jobs_address} --follow {result['submission_id']}"
    finally:
        client.stop_job(result["submission_id"])  # the job itself is test_orchestrate_ray's business


@pytest.mark.timeout(120)
def test_submit_to_an_unreachable_dashboard_is_one_line(tmp_path):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    spec = write_spec(tmp_path, {"name": "x"})
    proc = subprocess.run(
        [*fotlab_cmd(), "submit", spec, "--address", f"http://127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        timeout=100,  # fast: a refused connection is not retried for minutes
        cwd=tmp_path,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"fotlab submit: --address http://127.0.0.1:{port}: cannot reach the Ray Jobs server")
    assert proc.stdout == ""
