"""The cluster stack with real processes on 127.0.0.1: a Ray head with metrics export plus a second Ray node
(`ray start --address`, sharing the head's temporary folder as a second node on one host does by default), an
`mlflow server` on a throwaway PostgreSQL cluster, and Prometheus scraping Ray's service-discovery file.

`fotlab submit` of the quickstart: refused in one line while no storage is named anywhere; then (tracking URI from
the cluster's environment, storage from the spec) the job succeeds, the run is FINISHED on the Postgres-backed
server with metrics and the model artifact, and every fotlab dashboard panel's query returns data from Prometheus.
Everything started here is ended by process group in the `finally`.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest
from cluster_checks import REPO, concrete_promql, dashboard_exprs, metric_names, parse_promql
from live_stack import BIN, Stack, http_get, pg_bin

pytestmark = [pytest.mark.ray, pytest.mark.slow]
JOB_TIMEOUT_S = 600
GPU_ONLY = {"ray_node_gpus_utilization", "ray_node_gram_used"}  # no data on a CPU-only cluster
QUICK = [
    "--set",
    "train.steps=12",
    "--set",
    "train.log_every=2",
    "--set",
    "train.eval_every=6",
    "--set",
    "train.eval_batches=1",
    "--set",
    "data.validation_docs=2",
    "--set",
    "eval.perplexity=[]",
]


def fotlab(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fotlab.cli", *args], capture_output=True, text=True, timeout=300, cwd=REPO, env=env
    )


def wait_for_job(address: str, submission_id: str):
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    status = client.get_job_status(submission_id)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(2)
        status = client.get_job_status(submission_id)
    return status, client.get_job_logs(submission_id)


def prometheus_range(prometheus: str, expr: str, start: float) -> list:
    query = urllib.parse.urlencode(
        {"query": concrete_promql(expr), "start": f"{start:.0f}", "end": f"{time.time():.0f}", "step": "2"}
    )
    answer = json.loads(http_get(f"{prometheus}/api/v1/query_range?{query}"))
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def record_sweep_gauges(address: str, env: dict[str, str]) -> None:
    """A driver on the cluster feeds `SweepLiveMetrics` trial records (status, last result) as the sweep monitor
    does from Tune's loop, and stays up for a few scrapes."""
    code = (
        "import time, types, ray; ray.init(); from fotlab.orchestrate.live_metrics import SweepLiveMetrics; "
        "T = types.SimpleNamespace; live = SweepLiveMetrics('stack-sweep', 'parent-run', 'val/loss', 'min'); "
        "trials = [T(status='RUNNING', last_result={'val/loss': 2.5}), T(status='TERMINATED', "
        "last_result={'val/loss': 2.25}), T(status='PENDING', last_result={})]\n"
        "for _ in range(12): live.on_trials(trials); time.sleep(1)"
    )
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    job = client.submit_job(
        entrypoint=shlex.join([sys.executable, "-c", code]),
        runtime_env={"py_modules": [str(REPO / "platform" / "fotlab")]},
    )
    status, logs = wait_for_job(address, job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]


@pytest.mark.timeout(1200)
def test_submit_to_a_two_node_stack_tracks_to_postgres_and_exports_live_metrics(tmp_path):
    from mlflow.tracking import MlflowClient
    from ray.job_submission import JobStatus

    for tool in ("prometheus", "initdb", "postgres", "runuser"):
        if (pg_bin(tool) if tool in ("initdb", "postgres") else shutil.which(tool)) is None:
            pytest.skip(f"{tool} is not installed (Debian packages prometheus and postgresql; .ci/run installs them)")
    started = time.time()
    stack = Stack(tmp_path)
    try:
        mlflow_url = stack.mlflow_server(stack.postgres())
        cluster_env = {
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "MLFLOW_TRACKING_URI": mlflow_url,
            "RAY_metrics_report_interval_ms": "1000",
        }  # worker -> metrics agent every second
        head = stack.ray_head(cluster_env)
        stack.ray_node(head, cluster_env, own_temp_dir=False)  # the known failure: same host, same temp dir
        prometheus = stack.prometheus(head, REPO / "dashboards" / "prometheus" / "prometheus.yml")
        client_env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "FOTLAB_STORAGE_PATH")}
        spec = "experiments/quickstart.yaml"

        refused = fotlab("submit", spec, "--address", head.dashboard_url, *QUICK, env=client_env)
        assert refused.returncode == 1, refused.stderr
        (line,) = refused.stderr.strip().splitlines()
        assert "storage.path (or FOTLAB_STORAGE_PATH on the cluster)" in line and "tracking.uri (or" not in line

        sent = fotlab(
            "submit",
            spec,
            "--address",
            head.dashboard_url,
            "--json",
            *QUICK,
            "--set",
            f"storage.path={tmp_path / 'runs'}",
            env=client_env,
        )
        assert sent.returncode == 0, sent.stderr
        submission = json.loads(sent.stdout.strip().splitlines()[-1])
        status, logs = wait_for_job(head.dashboard_url, submission["submission_id"])
        assert status == JobStatus.SUCCEEDED, logs[-4000:]
        assert "oneMKL" not in logs
        result = json.loads(logs.strip().splitlines()[-1])  # fotlab run --json's closing object

        client = MlflowClient(mlflow_url)
        run = client.get_run(result["run_id"])
        assert run.info.status == "FINISHED" and run.data.metrics["train/loss"] > 0
        assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 6  # steps 2, 4, ..., 12
        (output,) = run.outputs.model_outputs  # the MLflow Model, its files behind the server's artifact proxy
        assert client.get_logged_model(output.model_id).status.to_proto() == 2  # READY
        assert Path(result["model_dir"]).is_relative_to(tmp_path / "runs")  # never the job's temporary folder

        record_sweep_gauges(head.dashboard_url, client_env)
        time.sleep(6)  # a last scrape
        for board in ("fotlab_training.json", "fotlab_sweeps.json"):
            for title, expr in dashboard_exprs(json.loads((REPO / "dashboards" / board).read_text())):
                if metric_names(parse_promql(expr)) & GPU_ONLY:
                    continue
                series = prometheus_range(prometheus, expr, started)
                assert series, f"{board} / {title}: no data for {expr}"
        (loss,) = prometheus_range(prometheus, f'ray_fotlab_train_loss{{run_id="{result["run_id"]}"}}', started)
        assert loss["metric"]["experiment"] == "quickstart" and loss["metric"]["rank"] == "0"
    finally:
        stack.close()
