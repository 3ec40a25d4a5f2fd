"""R5 tracking outage: a real `mlflow server` on 127.0.0.1 (sqlite store, local artifact folder, its own process
group) is SIGKILLed in the middle of a real `fotlab run` (a subprocess whose training step sleeps a little, so
the run spans the outage).

(a) The server comes back 60 s later on the same port and store: training never stopped, the metrics logged
    meanwhile arrive afterwards, the run ends FINISHED with one train/loss point per step, exit 0.
(b) The server never comes back: the run ends within a bound with one line naming the undelivered points and their
    file, exit 1; the MLflow run stays RUNNING (nothing could reach it). After a restart of the server,
    `fotlab runs deliver FILE` sends the file: one point per step, the model logged, the run FINISHED.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import write_tiny_spec

from fotlab import tracking
from fotlab.undelivered import UndeliveredFile

pytestmark = pytest.mark.slow

OUTAGE_S = 60

# `fotlab run` whose training step sleeps `argv[1]` seconds and appends "<step> <time>" to the file `argv[2]`.
STEPPING_FOTLAB = """
import sys, time
from fotlab.train import loop
delay, progress = float(sys.argv[1]), sys.argv[2]
real_step = loop.train_step
def step(*args, **kwargs):
    time.sleep(delay)
    stats = real_step(*args, **kwargs)
    with open(progress, "a") as out:
        out.write(f"{kwargs['step']} {time.time()}\\n")
    return stats
loop.train_step = step
sys.argv = ["fotlab", *sys.argv[3:]]
from fotlab.cli import entry
entry()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """`mlflow server` on 127.0.0.1:port over one sqlite store and artifact folder; start, SIGKILL, start again."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 90) -> float:
        """Start it and wait until /health answers; returns the time it answered."""
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}"]
        cmd += ["--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), "--workers", "1"]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner processes
        with (self.root / "server.log").open("a") as log:
            self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-3000:]
            if tracking.server_reachable(self.uri, timeout_s=1):
                return time.time()
            time.sleep(0.2)
        raise AssertionError(f"mlflow server did not start in {timeout_s} s")

    def kill(self) -> float:
        """SIGKILL its whole process group (no graceful shutdown); returns the time."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        return time.time()


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "mlflow-server"
    root.mkdir()
    srv = MlflowServer(root)
    srv.start()
    yield srv
    srv.kill()


def start_fotlab_run(spec: Path, tmp_path: Path, delay_s: float) -> tuple[subprocess.Popen, Path]:
    progress = tmp_path / "progress.txt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", STEPPING_FOTLAB, str(delay_s), str(progress), "run", str(spec), "--json"],
        stdout=(tmp_path / "run.out").open("w"),
        stderr=(tmp_path / "run.err").open("w"),
        cwd=tmp_path,
        env=env,
    )
    return proc, progress


def steps_done(progress: Path) -> list[tuple[int, float]]:
    """(step, time it ended) of every training step so far (a resume would repeat steps: none here)."""
    if not progress.exists():
        return []
    return [(int(s), float(t)) for s, t in (line.split() for line in progress.read_text().splitlines() if line)]


def wait_for_step(proc: subprocess.Popen, progress: Path, step: int, tmp_path: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done = steps_done(progress)
        if done and done[-1][0] >= step:
            return
        assert proc.poll() is None, (tmp_path / "run.err").read_text()[-3000:]
        time.sleep(0.1)
    raise AssertionError(f"the run did not reach step {step}: " + (tmp_path / "run.err").read_text()[-3000:])


def the_run(uri: str):
    client = tracking.client(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("reliab").experiment_id])
    return client, run


def point_sets(client, run_id: str) -> dict[str, list[int]]:
    return {
        key: sorted(m.step for m in client.get_metric_history(run_id, key))
        for key in client.get_run(run_id).data.metrics
    }


def no_duplicates(history: dict[str, list[int]]) -> bool:
    return all(max(Counter(steps).values()) == 1 for steps in history.values())


@pytest.mark.timeout(300)
def test_server_down_60s_mid_run_metrics_arrive_afterwards(server, tiny_corpus, tmp_path):
    n_steps = 160
    spec = write_tiny_spec(tiny_corpus, tmp_path, server.uri, steps=n_steps, checkpoint_every=20)
    proc, progress = start_fotlab_run(spec, tmp_path, delay_s=0.5)
    wait_for_step(proc, progress, 5, tmp_path)
    down_at = server.kill()
    step_at_down = steps_done(progress)[-1][0]
    time.sleep(OUTAGE_S)
    assert proc.poll() is None, "the run ended while the server was down: " + (tmp_path / "run.err").read_text()[-2000:]
    server.start()
    up_at = time.time()
    trained_while_down = [s for s, t in steps_done(progress) if down_at < t <= up_at]
    step_at_up = steps_done(progress)[-1][0]

    # The backlog (every train/loss point up to the step reached when the server came back) arrives: how fast?
    client, run = the_run(server.uri)
    backlog_in_at = None
    while backlog_in_at is None and proc.poll() is None:
        logged = {m.step for m in client.get_metric_history(run.info.run_id, tracking.TRAIN_LOSS)}
        if set(range(1, step_at_up + 1)) <= logged:
            backlog_in_at = time.time()
        else:
            time.sleep(0.25)
    rc = proc.wait(timeout=240)
    err = (tmp_path / "run.err").read_text()
    assert rc == 0, err[-3000:]
    assert "Traceback" not in err
    # The outbox sends without MLflow's own HTTP retries, so even a batch in flight when the server died fails at
    # once: the outage is reported, and the backlog goes out on the outbox's next try after the server is back.
    assert "metrics cannot reach the tracking server" in err and "tracking server answers again" in err
    result = json.loads((tmp_path / "run.out").read_text().strip().splitlines()[-1])
    assert result["status"] == "FINISHED" and result["undelivered"] is None

    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    history = point_sets(client, run.info.run_id)
    assert history[tracking.TRAIN_LOSS] == list(range(1, n_steps + 1))  # one point per step, none lost
    assert no_duplicates(history)
    assert len(trained_while_down) >= OUTAGE_S // 2  # training went on (~2 steps/s) while the server was down
    late = [
        m
        for key in history
        if not key.startswith("system/")
        for m in client.get_metric_history(run.info.run_id, key)
        if down_at * 1000 < m.timestamp <= up_at * 1000
    ]
    assert len(late) >= 7 * (len(trained_while_down) - 2)  # the 7 train/* metrics of the steps trained meanwhile
    assert not (Path(result["model_dir"]).parent / "undelivered_metrics.jsonl").exists()
    delivered_after_s = (backlog_in_at - up_at) if backlog_in_at else float("nan")
    print(
        f"R5 measured: server SIGKILLed at step {step_at_down}, down {up_at - down_at:.0f} s (restart included); "
        f"{len(trained_while_down)} steps trained while it was down (steps {trained_while_down[0]}-"
        f"{trained_while_down[-1]}); backlog delivered {delivered_after_s:.1f} s after it answered again; "
        f"{len(late)} metric points logged during the outage delivered late; the outage and the server's return "
        "reported on stderr"
    )
    print(
        f"R5 measured: run {run.info.status}, exit {rc}; train/loss {len(history[tracking.TRAIN_LOSS])} points for "
        f"{n_steps} steps; {sum(map(len, history.values()))} points over {len(history)} keys, 0 duplicates"
    )


@pytest.mark.timeout(300)
def test_server_never_returns_run_ends_with_saved_metrics_delivered_later(server, tiny_corpus, tmp_path):
    n_steps, flush_timeout_s = 30, 15
    spec = write_tiny_spec(tiny_corpus, tmp_path, server.uri, steps=n_steps, checkpoint_every=10)
    data = yaml.safe_load(spec.read_text())
    data["tracking"]["flush_timeout_s"] = flush_timeout_s
    spec.write_text(yaml.safe_dump(data))
    proc, progress = start_fotlab_run(spec, tmp_path, delay_s=0.3)
    wait_for_step(proc, progress, 5, tmp_path)
    client, run = the_run(server.uri)
    run_id = run.info.run_id
    down_at = server.kill()
    step_at_down = steps_done(progress)[-1][0]
    rc = proc.wait(timeout=200)
    ended_at = time.time()
    last_step_at = steps_done(progress)[-1][1]
    out, err = (tmp_path / "run.out").read_text(), (tmp_path / "run.err").read_text()
    assert rc == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert "metrics cannot reach the tracking server" in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"fotlab run: run {run_id} finished training (step {n_steps}"), line
    result = json.loads(out.strip().splitlines()[-1])
    file = UndeliveredFile.load(result["undelivered"])
    assert str(file.path) in line and f"fotlab runs deliver {file.path}" in line and file.summary() in line
    assert file.path.parent == Path(result["model_dir"]).parent  # the run's output folder, beside the model
    assert (Path(result["model_dir"]) / "config.json").is_file() and result["checkpoint"]  # kept on disk
    assert file.end["status"] == "FINISHED" and file.model["dir"] == str(Path(result["model_dir"]).resolve())
    took_s = ended_at - last_step_at
    assert took_s < flush_timeout_s + 60  # the end waited for the server, within its bound

    server.start()
    assert client.get_run(run_id).info.status == "RUNNING"  # nothing could mark it; `runs deliver` will
    before = {(key, s) for key, steps in point_sets(client, run_id).items() for s in steps}
    saved = {(p.key, p.step) for p in file.points}
    assert len(saved) == len(file.points) and not (saved & before)  # the file holds only what did not arrive
    for key in (tracking.TRAIN_LOSS, tracking.LR, tracking.TOKENS_SEEN):  # logged at every step: both halves
        assert sorted(s for k, s in saved | before if k == key) == list(range(1, n_steps + 1)), key
    assert {k for k, _ in saved} >= {tracking.TRAIN_LOSS, tracking.VAL_LOSS, tracking.TRAIN_TIME_S}

    deliver = subprocess.run(
        [sys.executable, "-m", "fotlab.cli", "runs", "deliver", str(file.path)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert deliver.returncode == 0, deliver.stderr[-3000:]
    run = client.get_run(run_id)
    history = point_sets(client, run_id)
    assert run.info.status == "FINISHED"
    assert history[tracking.TRAIN_LOSS] == list(range(1, n_steps + 1)) and no_duplicates(history)
    assert len(run.outputs.model_outputs) == 1
    again = subprocess.run(
        [sys.executable, "-m", "fotlab.cli", "runs", "deliver", str(file.path)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert again.returncode == 0 and "0 metric points delivered" in again.stdout, again.stderr[-2000:]
    assert point_sets(client, run_id) == history  # idempotent
    print(
        f"R5 measured: server SIGKILLed for good at step {step_at_down}; the run ended {ended_at - down_at:.0f} s "
        f"later, {took_s:.1f} s after its last step (tracking.flush_timeout_s={flush_timeout_s}), exit {rc}, MLflow "
        f"status RUNNING until delivered; "
        f"{len(file.points)} undelivered points saved ({len(before)} had arrived before the kill)"
    )
    print(f"R5 measured: the one line: {line}")
    print(
        f"R5 measured: after the server's restart `fotlab runs deliver` -> {deliver.stdout.strip().splitlines()[-1]}; "
        f"train/loss {len(history[tracking.TRAIN_LOSS])} points for {n_steps} steps, 0 duplicates, status "
        f"{run.info.status}; a second deliver -> {again.stdout.strip().splitlines()[-1]}"
    )
