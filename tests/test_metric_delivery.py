"""Exactly-once metric delivery (`fotlab.metric_delivery`) on a real sqlite MLflow store: a run resumed after a crash
between a step's train/loss and its val/loss logs that val/loss once; evaluations re-run after a crash add no second
points; the outbox keeps points through an outage (spilling past its memory cap into its journal) and a killed
process's queued points reach the run at its next start; an offline run's file is sent by `fotlab runs deliver`,
idempotently."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
from test_orchestrate import client_for, tiny_spec_dict
from test_tracking import saved_model_dir

from fotlab import tracking
from fotlab.cli import main as cli_main
from fotlab.metric_delivery import JOURNAL_FILE, MetricOutbox, StepMarks
from fotlab.orchestrate import RunFailedError, run_experiment
from fotlab.spec import SpecError, parse_spec
from fotlab.undelivered import UNDELIVERED_FILE, UndeliveredFile


class Crash(RuntimeError):
    """What a patched step raises (the worker dying at that moment)."""


def histories(client, run_id: str) -> dict[str, list[int]]:
    """Every metric key of the run -> the steps of its points, sorted (duplicates kept)."""
    return {
        key: sorted(m.step for m in client.get_metric_history(run_id, key))
        for key in client.get_run(run_id).data.metrics
    }


def duplicates(history: dict[str, list[int]]) -> dict[str, list[int]]:
    """key -> the steps it has more than one point at (only keys that have any)."""
    counted = {key: Counter(steps) for key, steps in history.items()}
    return {key: [s for s, n in c.items() if n > 1] for key, c in counted.items() if any(n > 1 for n in c.values())}


def new_run(uri: str, name: str = "delivery") -> tracking.TrackedRun:
    return tracking.start_run(uri, tracking.setup_experiment(uri, name))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_crash_between_train_and_val_loss_of_a_step_logs_that_val_loss_once(
    tiny_corpus, tmp_path, mlflow_uri, monkeypatch
):
    """Step 4 logs train/loss, then dies before its val/loss; the last checkpoint is step 2. One high-water mark
    taken from train/loss (the old scheme) would drop val/loss@4 for good on resume; per-key marks log it once."""
    from fotlab.train import loop

    data = tiny_spec_dict(tiny_corpus, tmp_path, mlflow_uri, steps=6, eval_every=2, checkpoint_every=2)
    spec = parse_spec(data)
    real_evaluate = loop._evaluate

    def dying_evaluate(run, crossbatch):
        if run.step == 4:
            raise Crash("worker lost between train/loss and val/loss of step 4")
        return real_evaluate(run, crossbatch)

    monkeypatch.setattr(loop, "_evaluate", dying_evaluate)
    with pytest.raises(RunFailedError) as caught:
        run_experiment(spec, progress=False)
    run_id = caught.value.run_id
    client = client_for(mlflow_uri)
    before = histories(client, run_id)
    assert before[tracking.TRAIN_LOSS] == [1, 2, 3, 4] and before[tracking.VAL_LOSS] == [2]

    monkeypatch.setattr(loop, "_evaluate", real_evaluate)
    outcome = run_experiment(spec, resume=run_id, progress=False)
    assert outcome.status == "FINISHED" and outcome.final_step == 6
    after = histories(client, run_id)
    assert after[tracking.TRAIN_LOSS] == [1, 2, 3, 4, 5, 6]  # steps 3-4 trained twice, logged once
    assert after[tracking.VAL_LOSS] == [2, 4, 6]  # val/loss@4 arrives on the resume, once
    assert after[tracking.VAL_PPL] == [2, 4, 6]
    assert duplicates(after) == {}
    output = tmp_path / "runs" / outcome.run_name / "output"
    assert not (output / JOURNAL_FILE).exists() and not (output / UNDELIVERED_FILE).exists()  # all delivered
    print(f"exactly-once measured: resumed run {run_id}: {sum(map(len, after.values()))} points, 0 duplicates")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_evaluations_rerun_after_a_crash_are_logged_once(tiny_corpus, tmp_path, mlflow_uri, monkeypatch):
    """The worker dies during the evaluations (perplexity logged, passkey not); the resumed run re-runs them all:
    each evaluation metric ends with exactly one point, at the final step."""
    from fotlab.eval import runner as eval_runner

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
    spec = parse_spec(data)
    real_log = eval_runner.log_eval_result
    n_logged = []

    def dying_log(result, run, step=0):
        if n_logged:
            raise Crash("worker lost during the evaluations")
        n_logged.append(result.name)
        return real_log(result, run, step)

    monkeypatch.setattr(eval_runner, "log_eval_result", dying_log)
    with pytest.raises(RunFailedError) as caught:
        run_experiment(spec, progress=False)
    run_id = caught.value.run_id
    client = client_for(mlflow_uri)
    first = histories(client, run_id)
    assert first["eval/valppl_single_doc/mem_0"] == [2] and "eval/passkey_acc/len_256" not in first

    monkeypatch.setattr(eval_runner, "log_eval_result", real_log)
    outcome = run_experiment(spec, resume=run_id, progress=False)
    assert outcome.status == "FINISHED"
    after = histories(client, run_id)
    for key in ("eval/valppl_single_doc/mem_0", "eval/valppl_single_doc/mem_32", "eval/passkey_acc/len_256"):
        assert after[key] == [2], (key, after[key])
    assert after[tracking.TRAIN_LOSS] == [1, 2] and after[tracking.VAL_LOSS] == [2]
    assert duplicates(after) == {}


@pytest.mark.parametrize("value", [-1, 86401, "soon"])
def test_flush_timeout_is_validated(value):
    with pytest.raises(SpecError, match="tracking.flush_timeout_s"):
        parse_spec({"name": "x", "tracking": {"flush_timeout_s": value}})


def test_step_marks_drop_points_at_or_below_each_keys_mark():
    marks = StepMarks({"train/loss": 4, "val/loss": 2})
    kept = marks.keep({"train/loss": 1.0, "val/loss": 2.0, "eval/ppl": 3.0}, step=4)
    assert [(p.key, p.step) for p in kept] == [("val/loss", 4), ("eval/ppl", 4)]
    assert marks.keep({"val/loss": 2.5, "eval/ppl": 3.5}, step=4) == []  # the same step again: nothing
    assert [p.key for p in marks.keep({"train/loss": 0.9}, step=5)] == ["train/loss"]


@pytest.mark.timeout(120)
def test_outbox_keeps_points_through_an_outage_and_spills_past_its_cap(tmp_path, mlflow_uri):
    """The "server" answers only while `up` is set (the reachability probe is the fault switch); the sends are
    real `log_batch` calls into sqlite. 300 points with room for 50 in memory: the rest wait in the journal."""
    run = new_run(mlflow_uri)
    up = threading.Event()
    journal = tmp_path / JOURNAL_FILE
    outbox = MetricOutbox(run._send_points, journal, reachable=up.is_set, max_pending=50, backoff_s=(0.05, 0.2))
    marks = StepMarks()
    keys = [f"m{i}" for i in range(10)]
    for step in range(1, 31):
        outbox.submit(marks.keep({k: float(step) for k in keys}, step))
    assert not outbox.flush(timeout_s=0.5)  # down: nothing can arrive
    queued = outbox.undelivered()
    assert [(p.key, p.step) for p in queued] == [(k, s) for s in range(1, 31) for k in keys]  # all, in order
    assert outbox.down_since is not None and len(journal.read_text().splitlines()) == 300
    up.set()
    assert outbox.flush(timeout_s=60)
    client = client_for(mlflow_uri)
    assert histories(client, run.run_id) == {k: list(range(1, 31)) for k in keys}
    assert journal.stat().st_size == 0 and outbox.undelivered() == []  # drained: the journal is emptied
    outbox.stop()


# A process whose metrics cannot leave it (its tracking server is a closed port), killed with points queued.
KILLED_WITH_QUEUED_POINTS = """
import os, signal, sys
from fotlab.metric_delivery import MetricDelivery
run_id, out, port = sys.argv[1], sys.argv[2], sys.argv[3]
delivery = MetricDelivery(run_id, f"http://127.0.0.1:{port}", send=None)
delivery.start_background(out, flush_timeout_s=60, logged={})
for step in range(1, 6):
    delivery.log({"train/loss": 10.0 - step}, step)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.timeout(120)
def test_points_queued_in_a_killed_process_reach_the_run_at_its_next_start(tmp_path, mlflow_uri):
    run = new_run(mlflow_uri)
    run.log_metrics({tracking.TRAIN_LOSS: 9.0}, step=1)  # steps 1-2 arrived before the kill
    run.log_metrics({tracking.TRAIN_LOSS: 8.0}, step=2)
    out = tmp_path / "output"
    with socket.socket() as sock:  # a port nothing listens on: the process's server is down
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_WITH_QUEUED_POINTS, run.run_id, str(out), str(port)],
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert len((out / JOURNAL_FILE).read_text().splitlines()) == 5

    restarted = tracking.TrackedRun(mlflow_uri, run.run_id, run.experiment_id)
    restarted.deliver_in_background(out, flush_timeout_s=30)
    assert restarted.settle() is None
    history = client_for(mlflow_uri).get_metric_history(run.run_id, tracking.TRAIN_LOSS)
    assert sorted((m.step, m.value) for m in history) == [(s, 10.0 - s) for s in range(1, 6)]


@pytest.mark.timeout(180)
def test_an_offline_runs_file_is_delivered_once_by_fotlab_runs_deliver(tmp_path, mlflow_uri, capsys):
    run = new_run(mlflow_uri, "offline")
    out = tmp_path / "output"
    run.deliver_in_background(out, flush_timeout_s=30)
    run.log_metrics({tracking.TRAIN_LOSS: 3.0}, step=1)
    assert run.settle() is None
    run.delivery.go_offline("the server was given up on (test)")  # what settle does when a flush times out
    run.log_metrics({tracking.TRAIN_LOSS: 2.0, tracking.VAL_LOSS: 2.5}, step=2)
    run.log_metrics({tracking.TRAIN_LOSS: 9.9}, step=2)  # the same step again: not a second point
    model_dir = saved_model_dir(tmp_path / "model")
    assert run.log_model_dir(model_dir, step=2) is None
    run.close({tracking.TRAIN_LOSS: 2.0, "time/train_s": 12.0}, step=2, tags={"fotlab.resumable": "false"})

    file = UndeliveredFile.load(out / UNDELIVERED_FILE)
    assert sorted((p.key, p.step, p.value) for p in file.points) == [
        (tracking.TRAIN_LOSS, 2, 2.0),
        (tracking.VAL_LOSS, 2, 2.5),
    ]
    assert file.end["status"] == "FINISHED" and file.model["step"] == 2 and file.tags == {"fotlab.resumable": "false"}
    client = client_for(mlflow_uri)
    assert client.get_run(run.run_id).info.status == "RUNNING"  # nothing reached the store

    assert cli_main(["runs", "deliver", str(file.path)]) == 0
    said = capsys.readouterr().out
    assert "2 metric points delivered" in said and "model logged" in said and "run marked FINISHED" in said
    got = client.get_run(run.run_id)
    assert got.info.status == "FINISHED" and got.data.tags["fotlab.resumable"] == "false"
    assert got.data.metrics["time/train_s"] == 12.0  # a final metric the run never logged: close() semantics
    assert histories(client, run.run_id) == {tracking.TRAIN_LOSS: [1, 2], tracking.VAL_LOSS: [2], "time/train_s": [2]}
    assert len(got.outputs.model_outputs) == 1

    assert cli_main(["runs", "deliver", str(file.path)]) == 0  # again: nothing new
    assert "0 metric points delivered" in capsys.readouterr().out
    assert histories(client, run.run_id)[tracking.TRAIN_LOSS] == [1, 2]

    bad = tmp_path / "not-a-delivery.jsonl"
    bad.write_text('{"key": "x"}\n')
    assert cli_main(["runs", "deliver", str(bad)]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("fotlab runs: ") and "not an undelivered-metrics file" in line


class SlowServerRun(tracking.TrackedRun):
    """A run whose background sending takes a while per batch, like a busy tracking server."""

    def _send_points_once(self, points):
        time.sleep(1.0)
        super()._send_points_once(points)


@pytest.mark.timeout(120)
def test_a_models_metrics_include_those_still_on_their_way_to_the_server(tmp_path, mlflow_uri):
    """The pipeline links the evaluations' metrics to the logged model right after logging them; the links are read
    from the server, so the points still queued are settled first (the race once seen in
    test_evaluations_inside_run_land_in_the_run_and_its_model)."""
    started = new_run(mlflow_uri, "slow-server")
    run = SlowServerRun(mlflow_uri, started.run_id, started.experiment_id)
    run.deliver_in_background(tmp_path / "output", flush_timeout_s=30)
    run.log_metrics({tracking.TRAIN_LOSS: 2.0}, step=2)
    model_dir = saved_model_dir(tmp_path / "model")
    model_id = run.log_model_dir(model_dir, step=2)
    run.log_metrics({"eval/passkey_acc/len_256": 1.0}, step=2)  # an evaluation, then the pipeline links it
    run.link_metrics(2)
    linked = {(m.key, m.step, m.value) for m in client_for(mlflow_uri).get_logged_model(model_id).metrics or []}
    assert linked == {(tracking.TRAIN_LOSS, 2, 2.0), ("eval/passkey_acc/len_256", 2, 1.0)}
    run.close({}, step=2)
