"""`run_experiment` on a real local Ray cluster (Train V2 TorchTrainer, one worker) and Ray Jobs submission.

Each test costs 30-120 s here (Ray worker start-up dominates), so there are few; all share one Ray session.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from test_orchestrate import assert_tracked_run, client_for, tiny_spec_dict

from fotlab import tracking
from fotlab.orchestrate import RunInterruptedError, run_experiment, submit_experiment
from fotlab.spec import parse_spec

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.mark.timeout(420)
def test_one_worker_ray_run_is_tracked_end_to_end(ray_session, tiny_corpus, tmp_path, mlflow_uri):
    spec = parse_spec(tiny_spec_dict(tiny_corpus, tmp_path, mlflow_uri, num_workers=1))
    outcome = run_experiment(spec, progress=False, report_every=2)
    assert outcome.status == "FINISHED" and outcome.final_step == 4
    assert_tracked_run(mlflow_uri, outcome, n_steps=4)
    # One retention policy, fotlab's: the loop's checkpoints (train.keep_checkpoints = 2) on the run's storage are
    # what a resume restores; Ray keeps no second copy under storage/<run name>/.
    run_dir = Path(tmp_path / "runs" / outcome.run_name)
    checkpoints = run_dir / "output" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-00000002", "step-00000004"]
    assert list(run_dir.glob("step-*")) == [] and list(run_dir.glob("checkpoint_*")) == []
    assert outcome.checkpoint == str(checkpoints / "step-00000004")


@pytest.mark.timeout(420)
def test_second_stage_run_starts_from_the_model_the_first_registered(ray_session, tiny_corpus, tmp_path, mlflow_uri):
    stage1 = tiny_spec_dict(tiny_corpus, tmp_path, mlflow_uri, num_workers=1, steps=2)
    stage1["tracking"]["register_model"] = "tiny_stage1"
    first = run_experiment(parse_spec(stage1), progress=False, report_every=2)
    (version,) = client_for(mlflow_uri).search_model_versions("name='tiny_stage1'")
    assert version.run_id == first.run_id  # registered by rank 0 after logging the model
    stage2 = {
        **tiny_spec_dict(tiny_corpus, tmp_path, mlflow_uri, num_workers=1, steps=2),
        "model": {"init_from": "models:/tiny_stage1/latest"},
    }
    second = run_experiment(parse_spec(stage2), progress=False, report_every=2)
    assert second.status == "FINISHED" and second.final_step == 2
    (started_from,) = (tmp_path / "runs" / second.run_name / "output" / "init_from").rglob("config.json")
    assert started_from.read_text() == (first.model_dir / "config.json").read_text()
    params = client_for(mlflow_uri).get_run(second.run_id).data.params
    assert params["model.init_from"] == "models:/tiny_stage1/latest"  # logged as written


def wait_for(condition, timeout_s: float = 240.0, poll_s: float = 0.2) -> bool:
    """Poll `condition()` until it holds (True) or timeout_s passed (False): returns as soon as the condition is
    seen, so a generous timeout costs nothing when the machine is fast and absorbs a busy one."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll_s)
    return True


@pytest.mark.timeout(540)
def test_train_coordinator_is_started_ahead_of_the_controller(ray_session):
    """start_train_coordinator() brings up Ray Train's (detached, named) autoscaling coordinator by itself."""
    import ray

    from fotlab.orchestrate.cluster import start_train_coordinator

    def coordinator():
        try:
            return ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
        except ValueError:
            return None

    if coordinator() is not None:  # left by an earlier Ray run of this session
        ray.kill(coordinator(), no_restart=True)
        assert wait_for(lambda: coordinator() is None), "the old coordinator is still alive"
    start_train_coordinator()
    assert wait_for(lambda: coordinator() is not None), "no AutoscalingCoordinator actor appeared"


def interrupt_once_fitting() -> threading.Thread:
    """Ctrl-C (SIGINT to this process) as soon as `run_experiment` is fitting (its "fotlab-fit" thread runs), i.e.
    while Ray still starts the worker: the stop request waits in the channel and the worker reads it at its first
    stop poll (step 5), then checkpoints and exits, on any machine. (A Ctrl-C sent after the first checkpoint raced
    the worker to the end of its steps.)"""
    # Python's Ctrl-C, whatever was inherited or left (see test_orchestrate.stop_after_first_checkpoint)
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def fitting() -> bool:
        return any(t.name == "fotlab-fit" for t in threading.enumerate())

    def watch() -> None:
        if wait_for(fitting, timeout_s=300, poll_s=0.01):
            time.sleep(0.2)  # the driver is inside its Ctrl-C-catching wait loop by now
            os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.timeout(600)
def test_ray_run_resumes_from_its_checkpoint_into_the_same_mlflow_run(ray_session, tiny_corpus, tmp_path, mlflow_uri):
    n_steps = 20
    spec = parse_spec(tiny_spec_dict(tiny_corpus, tmp_path, mlflow_uri, num_workers=1, steps=n_steps))
    interrupt_once_fitting()
    with pytest.raises(RunInterruptedError) as caught:
        run_experiment(spec, progress=False)
    run_id = caught.value.run_id
    client = client_for(mlflow_uri)
    assert client.get_run(run_id).info.status == "KILLED"
    stopped_at = max(m.step for m in client.get_metric_history(run_id, tracking.TRAIN_LOSS))
    assert stopped_at < n_steps
    assert list((tmp_path / "runs").glob("*/output/checkpoints/step-*"))  # the stop left a checkpoint to resume from

    outcome = run_experiment(spec, resume=run_id, progress=False)
    assert outcome.run_id == run_id and outcome.final_step == n_steps
    assert [m.step for m in client.get_metric_history(run_id, tracking.TRAIN_LOSS)] == list(range(1, n_steps + 1))
    assert client.get_run(run_id).info.status == "FINISHED"


@pytest.mark.timeout(420)
def test_submit_runs_the_spec_as_a_ray_job(ray_jobs_address, tiny_corpus, tmp_path, mlflow_uri):
    from ray.job_submission import JobStatus, JobSubmissionClient

    address = ray_jobs_address
    data = tiny_spec_dict(tiny_corpus, tmp_path, mlflow_uri, steps=2)  # num_workers=0: runs in the job driver
    spec = parse_spec(data)
    # A SubmitError fails the test: this is the only successful-submit test. (On a host where another Ray cluster
    # holds the dashboard agent's port, the cluster has no job agent and submission fails: run one cluster per
    # host, as CI and a laptop do.)
    submission = submit_experiment(spec, address, python=sys.executable)  # this cluster's interpreter
    client = JobSubmissionClient(address)
    deadline = time.time() + 380
    status = client.get_job_status(submission.submission_id)
    while status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED) and time.time() < deadline:
        time.sleep(2)
        status = client.get_job_status(submission.submission_id)
    logs = client.get_job_logs(submission.submission_id)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    result = yaml.safe_load(logs.strip().splitlines()[-1])  # the job's stdout ends with fotlab run's JSON
    assert client_for(mlflow_uri).get_run(result["run_id"]).info.status == "FINISHED"
