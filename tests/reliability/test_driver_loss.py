"""R3: the driver is lost. `fotlab run` (one Ray Train worker) and `fotlab sweep` are SIGKILLed mid-training, then
resumed with `--resume`: the run continues in the same MLflow run from its last checkpoint, with the step set (and
the losses) of an uninterrupted run; the sweep finishes every trial exactly once, with no duplicate child runs.

Faults are injected for real: the driver is a `fotlab` process whose Ray worker (or Tune trial) parks in a chosen
training step after writing a marker file; the test SIGKILLs the driver there (no handler runs, nothing is marked
in MLflow, the parked worker is left to Ray). The drivers either start their own local cluster (in a private
RAY_TMPDIR) or attach to a Ray head this module starts (`ray start --head` on free ports in a private temp dir, in
a session of its own); every process is ended by its session when the test ends (nothing stops clusters by name).
Sweep: Tune's saved experiment state may be older than the kill (it is saved every 10 s or more); both a fresh
and a stale one are tested (TUNE_GLOBAL_CHECKPOINT_S), see `fotlab.orchestrate.sweep_resume`.
Run: pytest tests/reliability/test_driver_loss.py
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from fotlab import names
from fotlab.orchestrate.cluster import LOCAL_ENV_DEFAULTS, RUN_ENV

pytestmark = [pytest.mark.slow, pytest.mark.ray]


# -- a private Ray head ------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _session_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[3])  # fields after "(comm)": state ppid pgrp session


def session_pids(sid: int) -> list[int]:
    """Live processes of session `sid` (a process started with start_new_session=True, and all it started)."""
    pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    return [pid for pid in pids if pid != os.getpid() and _session_of(pid) == sid and not _is_zombie(pid)]


def process_names(pids: list[int]) -> list[str]:
    names = []
    for pid in pids:
        with contextlib.suppress(OSError):
            names.append(Path(f"/proc/{pid}/comm").read_text().strip())
    return sorted(names)


def kill_session(sid: int, timeout_s: float = 30) -> None:
    """SIGKILL every process of session `sid` and wait until they are gone."""
    deadline = time.monotonic() + timeout_s
    while (pids := session_pids(sid)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


def ray_env(address: str | None = None) -> dict[str, str]:
    """The environment of this suite's Ray processes and fotlab drivers (fotlab's local defaults)."""
    env = {**os.environ, **LOCAL_ENV_DEFAULTS, **RUN_ENV, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    if address:
        env["RAY_ADDRESS"] = address
    return env


@contextlib.contextmanager
def private_ray_head(num_cpus: int = 2) -> Iterator[str]:
    """`ray start --head` on free ports, temp dir under a short /tmp folder, in its own session; yields its
    address. Ended by SIGKILLing that session (the head, its workers and everything they started)."""
    base = Path(tempfile.mkdtemp(prefix="fr3", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    port = _free_port()
    ports = {
        flag: _free_port()
        for flag in (
            "node-manager-port",
            "object-manager-port",
            "dashboard-port",
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "runtime-env-agent-port",
            "metrics-export-port",
            "ray-client-server-port",
        )
    }
    command = [
        str(Path(sys.executable).with_name("ray")), "start", "--head", f"--port={port}", f"--temp-dir={base / 'ray'}",
        f"--num-cpus={num_cpus}", "--disable-usage-stats", "--include-dashboard=true",
        *[f"--{flag}={value}" for flag, value in ports.items()],
    ]  # fmt: skip
    head = subprocess.Popen(
        command, env=ray_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = head.communicate(timeout=180)
        assert head.returncode == 0, out[-3000:]
        yield f"127.0.0.1:{port}"
    finally:
        kill_session(head.pid)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head() -> Iterator[str]:
    with private_ray_head() as address:
        yield address


# -- fotlab drivers --------------------------------------------------------------------------------------------
# `fotlab ARGS...` whose Ray Train worker (a Tune trial for a sweep) parks in training step `argv[1]` after writing
# its pid to the file `argv[2]`, in the `argv[3]`-th worker (or trial) to start (each start appends a line to
# `<argv[2]>.starts`). The parking wrapper is a closure of this script's __main__: Ray ships it by value.
PARKING_FOTLAB = """
import inspect, sys
park_at, parked, park_nth = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])

def parking(fn):
    def parked_fn(*args, **kwargs):
        import os, time
        from pathlib import Path
        from fotlab.train import loop
        with open(parked + ".starts", "a") as starts:
            starts.write(f"{os.getpid()}\\n")
        if len(Path(parked + ".starts").read_text().splitlines()) != park_nth:
            return fn(*args, **kwargs)
        real_step = loop.train_step
        def step(*a, **kw):
            if kw["step"] == park_at:
                Path(parked).write_text(str(os.getpid()))
                time.sleep(3600)
            return real_step(*a, **kw)
        loop.train_step = step
        return fn(*args, **kwargs)
    # Ray reads the signature (what to pass) and Tune the name (trial names); the module stays __main__, so the
    # wrapper travels by value (functools.wraps would make cloudpickle send a reference to the real function)
    parked_fn.__name__, parked_fn.__signature__ = fn.__name__, inspect.signature(fn)
    return parked_fn

from fotlab.orchestrate import runner, sweep_trial
real_build = runner.build_trainer
runner.build_trainer = lambda fn, config, **kw: real_build(parking(fn), config, **kw)
sweep_trial.run_trial = parking(sweep_trial.run_trial)
sys.argv = ["fotlab", *sys.argv[4:]]
from fotlab.cli import entry
entry()
"""


def fotlab(
    args: list[str], cwd: Path, env: dict[str, str], timeout_s: float, count_starts: Path | None = None
) -> subprocess.CompletedProcess:
    """`fotlab ARGS` to the end (its own session; whatever it leaves behind is killed with that session).
    count_starts: each worker / trial start appends a line to `<count_starts>.starts` (nothing parks)."""
    command = [str(Path(sys.executable).with_name("fotlab")), *args]
    if count_starts is not None:
        command = [sys.executable, "-c", PARKING_FOTLAB, "0", str(count_starts), "0", *args]
    proc = subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    finally:
        kill_session(proc.pid)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture
def sessions() -> Iterator[list[int]]:
    """Session ids to SIGKILL when the test ends (what a killed driver's session still holds)."""
    started: list[int] = []
    yield started
    for sid in started:
        kill_session(sid)


def kill_parked_driver(
    args: list[str], park: tuple[int, int], cwd: Path, env: dict[str, str], timeout_s: float, sessions: list[int]
) -> int:
    """Start `fotlab ARGS` with the park[1]-th worker (or trial) parking in step park[0], SIGKILL the driver once
    the worker parked; returns the parked worker's pid. The driver's session (a local cluster it started, if any)
    is left to Ray, and killed when the test ends (`sessions`)."""
    marker = cwd / "parked"
    marker.unlink(missing_ok=True)
    log_path = cwd / "killed-driver.log"
    with log_path.open("w") as log:
        driver = subprocess.Popen(
            [sys.executable, "-c", PARKING_FOTLAB, str(park[0]), str(marker), str(park[1]), *args],
            cwd=cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        sessions.append(driver.pid)
        deadline = time.monotonic() + timeout_s
        while not marker.exists() and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        driver.kill()  # SIGKILL: no handler, no MLflow status update, no last checkpoint, no Tune state save
        driver.wait(timeout=60)
    assert marker.exists(), f"the worker never parked:\n{log_path.read_text()[-4000:]}"
    return int(marker.read_text())


def wait_gone(pid: int, timeout_s: float) -> float | None:
    """Seconds until process `pid` is gone (None: still alive after timeout_s)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if not Path(f"/proc/{pid}").exists() or _is_zombie(pid):
            return time.monotonic() - start
        time.sleep(0.2)
    return None


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def history(client: MlflowClient, run_id: str, key: str = names.TRAIN_LOSS) -> list[tuple[int, float, int]]:
    """(step, value, timestamp ms) of every point of `key`, by step."""
    return sorted((m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, key))


# -- R3a: `fotlab run` ----------------------------------------------------------------------------------------------
def run_spec(corpus: Path, tmp_path: Path, uri: str, n_steps: int, checkpoint_every: int) -> Path:
    """A debug-preset run on one Ray Train worker, every step logged, checkpoints every `checkpoint_every` steps."""
    spec = {
        "name": "r3-run",
        "model": {"preset": "debug"},
        "data": {
            "sources": [{"kind": "local", "path": str(corpus), "glob": "*.txt"}],
            "validation_docs": 2,
            "cache_dir": str(tmp_path / "datasets-cache"),
        },
        "train": {
            "steps": n_steps,
            "batch_size": 2,
            "context_length": 32,
            "log_every": 1,
            "checkpoint_every": checkpoint_every,
            "eval_batches": 1,
            "crossbatch": {"range": 0},
            "optimizer": {"lr": 3e-3},
        },
        "scaling": {"num_workers": 1},
        "storage": {"path": str(tmp_path / "runs")},
        "tracking": {"uri": uri, "log_model": False},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture
def own_ray_tmpdir() -> Iterator[Path]:
    """A private RAY_TMPDIR (short: Ray's socket paths must fit 107 bytes): a driver's own local cluster lives
    there, and no cluster `ray start` recorded elsewhere on the host is attached to."""
    path = Path(tempfile.mkdtemp(prefix="fr3o", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


# "own": each driver starts its own local cluster (plain `fotlab run` on a laptop), which dies with it;
# "attached": the drivers attach to a running head (`ray start --head`, RAY_ADDRESS), which outlives them.
@pytest.mark.timeout(600)
@pytest.mark.parametrize("cluster", ["own", "attached"])  # own first: no other cluster on the host yet
def test_sigkilled_run_driver_resumes_into_the_same_run_with_an_uninterrupted_step_set(
    cluster, tiny_corpus, tmp_path, sessions, request
):
    n_steps, checkpoint_every, park_at = 10, 4, 7  # checkpoint at step 4; steps 5-6 logged; killed in step 7
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = run_spec(tiny_corpus, tmp_path, uri, n_steps, checkpoint_every)
    if cluster == "attached":
        env = {**ray_env(request.getfixturevalue("ray_head")), "MLFLOW_TRACKING_URI": uri}
    else:
        env = {**ray_env(), "MLFLOW_TRACKING_URI": uri, "RAY_TMPDIR": str(request.getfixturevalue("own_ray_tmpdir"))}
    client = MlflowClient(uri)

    plain = fotlab(["run", str(spec), "--json"], tmp_path, env, timeout_s=300)
    assert plain.returncode == 0, plain.stderr[-3000:]
    reference = json.loads(plain.stdout.strip().splitlines()[-1])
    reference_points = history(client, reference["run_id"])

    worker_pid = kill_parked_driver(["run", str(spec), "--json"], (park_at, 1), tmp_path, env, 300, sessions)
    worker_gone_s = wait_gone(worker_pid, timeout_s=120)
    assert worker_gone_s is not None, f"Ray left the killed driver's worker {worker_pid} running"
    left_at_kill = process_names(session_pids(sessions[-1]))
    experiment_id = client.get_experiment_by_name("r3-run").experiment_id
    (killed,) = [r for r in client.search_runs([experiment_id]) if r.info.run_id != reference["run_id"]]
    run_id = killed.info.run_id
    assert killed.info.status == "RUNNING"  # nothing could mark it: --resume takes it over
    assert [p[0] for p in history(client, run_id)] == list(range(1, park_at))
    ray_run = killed.data.tags[names.TAG_RAY_RUN_NAME]
    checkpoints = sorted(p.name for p in (tmp_path / "runs" / ray_run / "output" / "checkpoints").glob("step-*"))
    assert checkpoints[-1] == f"step-{checkpoint_every:08d}", checkpoints

    resume_start = time.time()
    resumed = fotlab(["run", str(spec), "--json", "--resume", run_id], tmp_path, env, timeout_s=300)
    resume_wall_s = time.time() - resume_start
    left_after_resume = process_names(session_pids(sessions[-1]))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    result = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert result["run_id"] == run_id and result["status"] == "FINISHED" and result["final_step"] == n_steps
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and names.TAG_ERROR not in run.data.tags
    assert len(client.search_runs([experiment_id])) == 2  # the uninterrupted run and this one: no third run

    points = history(client, run_id)
    steps = [p[0] for p in points]
    assert steps == list(range(1, n_steps + 1)), steps  # one point per step: steps 5-6 re-trained, logged once
    assert steps == [p[0] for p in reference_points]
    # the resume restores weights, optimizer, RNG and data position: the losses are the uninterrupted run's
    assert [p[1] for p in points] == pytest.approx([p[1] for p in reference_points], rel=1e-5)
    kill_step_again_s = points[park_at - 1][2] / 1000 - resume_start
    replayed = park_at - 1 - checkpoint_every
    print(
        f"R3 measured: fotlab run (1 Ray worker, {cluster} cluster) SIGKILLed in step {park_at} (checkpoint at step "
        f"{checkpoint_every}, steps 1-{park_at - 1} logged); Ray ended the orphaned worker {worker_gone_s:.1f}s after "
        f"the kill (the killed driver's processes still alive then: {left_at_kill or 'none'}; once the resume "
        f"finished: {left_after_resume or 'none'}); "
        f"--resume reached step {park_at} again {kill_step_again_s:.1f}s after it started and finished in "
        f"{resume_wall_s:.1f}s; steps replayed {replayed} (+ the step in flight); same run id, "
        f"{run.info.status}; train/loss steps {steps[0]}..{steps[-1]} ({len(steps)} points, no duplicates) == the "
        f"uninterrupted run's, losses equal"
    )


# -- R3b: `fotlab sweep` --------------------------------------------------------------------------------------------
def sweep_spec(corpus: Path, tmp_path: Path, uri: str, n_steps: int, n_trials: int) -> Path:
    """An Optuna sweep of `n_trials` one-worker trials, one at a time, no early stopping; each trial logs every
    step, reports val/loss every 2 steps and checkpoints every 4."""
    base = {
        "name": "r3-sweep-base",
        "model": {"preset": "debug"},
        "data": {
            "sources": [{"kind": "local", "path": str(corpus), "glob": "*.txt"}],
            "validation_docs": 2,
            "cache_dir": str(tmp_path / "datasets-cache"),
        },
        "train": {
            "steps": n_steps,
            "batch_size": 2,
            "context_length": 32,
            "log_every": 1,
            "eval_every": 2,
            "checkpoint_every": 4,
            "eval_batches": 1,
            "crossbatch": {"range": 0},
            "schedule": {"name": "constant", "warmup_steps": 0},
        },
        "scaling": {"num_workers": 1},
        "storage": {"path": str(tmp_path / "runs")},
        "tracking": {"uri": uri, "log_model": False},
    }
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    sweep = {
        "name": "r3-sweep",
        "base": "base.yaml",
        "search_space": {"train.optimizer.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}},
        "metric": "val/loss",
        "mode": "min",
        "num_samples": n_trials,
        "search": "optuna",
        "seed": 0,
        "max_concurrent_trials": 1,
        "scheduler": {"name": "none"},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def sweep_children(client: MlflowClient, parent_run_id: str) -> list:
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    return client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


def saved_trials(sweep_dir: Path) -> dict[str, str]:
    """{trial id: status} in the Tune experiment state saved in `sweep_dir` (what `Tuner.restore` starts from)."""
    from ray.tune import ExperimentAnalysis

    return {trial.trial_id: trial.status for trial in ExperimentAnalysis(str(sweep_dir)).trials}


# Tune saves its experiment state (trials, searcher) every TUNE_GLOBAL_CHECKPOINT_S seconds (default "auto": 10 s
# or more). "fresh": every second, so the state at the kill knows the running trial; "stale": only the first
# snapshot (trial 1 pending, trial 2 not created yet), what a kill soon after a trial started leaves.
@pytest.mark.timeout(900)
@pytest.mark.parametrize("tune_state, save_period_s", [("fresh", "1"), ("stale", "3600")])
def test_sigkilled_sweep_driver_resumes_every_trial_exactly_once(
    ray_head, tiny_corpus, tmp_path, sessions, tune_state, save_period_s
):
    n_steps, n_trials, park_at = 12, 3, 7  # trial 2 is killed in step 7, after its checkpoint at step 4
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = sweep_spec(tiny_corpus, tmp_path, uri, n_steps, n_trials)
    env = {**ray_env(ray_head), "MLFLOW_TRACKING_URI": uri}
    client = MlflowClient(uri)

    killed_env = {**env, "TUNE_GLOBAL_CHECKPOINT_S": save_period_s}
    trial_pid = kill_parked_driver(["sweep", str(spec), "--json"], (park_at, 2), tmp_path, killed_env, 480, sessions)
    trial_gone_s = wait_gone(trial_pid, timeout_s=120)
    assert trial_gone_s is not None, f"Ray left the killed sweep's trial {trial_pid} running"
    (parent,) = client.search_runs(
        [client.get_experiment_by_name("r3-sweep").experiment_id],
        filter_string=f"tags.`{names.TAG_SWEEP_ROLE}` = 'parent'",
    )
    assert parent.info.status == "RUNNING"
    before = {c.info.run_id: c for c in sweep_children(client, parent.info.run_id)}
    (killed,) = [c for c in before.values() if c.info.status != "FINISHED"]
    assert sorted(c.info.status for c in before.values()) == ["FINISHED", "RUNNING"]  # trial 1 done, 2 killed
    killed_trial = killed.data.tags[names.TAG_TRIAL_ID]
    saved = saved_trials(Path(parent.data.tags[names.TAG_SWEEP_DIR]))
    if tune_state == "fresh":
        assert saved.get(killed_trial) in ("PENDING", "RUNNING"), saved  # Tune may not have saved it RUNNING
    else:
        assert killed_trial not in saved and len(saved) == 1, saved

    (tmp_path / "parked.starts").unlink()
    resume_start = time.time()
    resumed = fotlab(["sweep", str(spec), "--json", "--resume"], tmp_path, env, 480, count_starts=tmp_path / "parked")
    resume_wall_s = time.time() - resume_start
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    trial_starts = len((tmp_path / "parked.starts").read_text().splitlines())
    outcome = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert outcome["parent_run_id"] == parent.info.run_id and outcome["status"] == "FINISHED"
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"

    children = {c.info.run_id: c for c in sweep_children(client, parent.info.run_id)}
    trial_ids = sorted(c.data.tags[names.TAG_TRIAL_ID] for c in children.values())
    assert len(children) == n_trials and trial_ids == sorted(r["trial_id"] for r in outcome["leaderboard"])
    assert set(before) <= set(children)  # both runs carried on: no second run for the killed trial's values
    for run_id, child in children.items():
        assert child.info.status == "FINISHED", (run_id, child.data.tags.get(names.TAG_ERROR))
        steps = [p[0] for p in history(client, run_id)]
        assert steps == list(range(1, n_steps + 1)), (run_id, steps)
        val_steps = [p[0] for p in history(client, run_id, names.VAL_LOSS)]
        assert val_steps == list(range(2, n_steps + 1, 2)), (run_id, val_steps)
    finished_before = [run_id for run_id, c in before.items() if c.info.status == "FINISHED"]
    for run_id in finished_before:  # completed once: not reopened, not re-trained
        assert children[run_id].info.end_time == before[run_id].info.end_time, run_id
    continued = children[killed.info.run_id].data.tags
    assert continued[names.TAG_RESUMED_FROM].endswith("step-00000004"), continued
    adopted = continued.get(names.TAG_ADOPTED_FROM_TRIAL)
    assert (adopted == killed_trial) if tune_state == "stale" else (adopted is None), continued
    rows = {r["trial_id"]: r for r in outcome["leaderboard"]}
    assert all(r["status"] == "COMPLETED" for r in rows.values())
    for run_id, child in children.items():
        row = rows[child.data.tags[names.TAG_TRIAL_ID]]
        assert row["run_id"] == run_id and row["val/loss"] == pytest.approx(child.data.metrics[names.VAL_LOSS])
    best = min(children.values(), key=lambda c: c.data.metrics[names.VAL_LOSS])
    assert outcome["best"]["run_id"] == best.info.run_id
    n_duplicates = len(children) - len({c.data.tags["fotlab.train.optimizer.lr"] for c in children.values()})
    n_running = sum(c.info.status == "RUNNING" for c in children.values())
    n_retrained = sum(children[r].info.end_time != before[r].info.end_time for r in finished_before)
    how = "adopted by its re-suggested twin" if adopted else "same trial id"
    print(
        f"R3 measured: fotlab sweep ({n_trials} Optuna trials, one at a time, {n_steps} steps each) SIGKILLed in "
        f"step {park_at} of trial 2 (checkpoint at step 4), Tune state {tune_state} ({len(saved)} trial(s) saved: "
        f"{sorted(saved.values())}); trials finished before the kill {len(finished_before)}; Ray ended the orphaned "
        f"trial {trial_gone_s:.1f}s after the kill; after --resume: {trial_starts} trial starts, finished trials "
        f"re-trained {n_retrained}, the killed trial resumed from step 4 in its own run ({how}), "
        f"{n_trials - len(before)} new; child runs {len(children)} for {n_trials} trials (duplicates {n_duplicates}, "
        f"left RUNNING {n_running}); parent FINISHED; sweep finished {resume_wall_s:.1f}s after --resume started"
    )
