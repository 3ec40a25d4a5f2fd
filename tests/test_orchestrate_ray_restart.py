"""Ray Train's `failure.max_failures`: a worker process that dies mid-run is restarted by Ray, resumes from the
run's last checkpoint, and finishes the same MLflow run with one metric point per step (one local Ray session)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_orchestrate import client_for, tiny_spec_dict

from fotlab import tracking
from fotlab.orchestrate import run_experiment, runner
from fotlab.spec import parse_spec

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def die_once(worker_fn, marker: str, starts: str, kill_at: int):
    """`worker_fn` wrapped so that the worker process SIGKILLs itself at training step `kill_at` the first time
    (the marker file makes it once per test, whichever process Ray starts next), and each worker start appends
    the checkpoint it resumes from (or None) to the file `starts`. A closure: Ray ships it by value."""

    def worker(config):
        import os
        import signal
        from pathlib import Path

        from fotlab.orchestrate.worker import resume_dir
        from fotlab.train import loop

        with open(starts, "a") as log:
            log.write(f"{resume_dir(Path(config.output_dir))}\n")
        real_step = loop.train_step

        def step(*args, **kwargs):
            if kwargs["step"] == kill_at and not os.path.exists(marker):
                Path(marker).write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)
            return real_step(*args, **kwargs)

        loop.train_step = step
        return worker_fn(config)

    return worker


@pytest.mark.timeout(540)
def test_a_dead_worker_is_restarted_from_the_checkpoint_into_the_same_run(
    ray_session, tiny_corpus, tmp_path, mlflow_uri, monkeypatch
):
    n_steps, kill_at = 8, 5  # checkpoint at step 3, step 4 logged, the worker dies in step 5
    data = tiny_spec_dict(tiny_corpus, tmp_path, mlflow_uri, num_workers=1, steps=n_steps, checkpoint_every=3)
    data["failure"] = {"max_failures": 1}
    marker, starts = tmp_path / "died", tmp_path / "starts.txt"
    real_build = runner.build_trainer
    monkeypatch.setattr(
        runner,
        "build_trainer",
        lambda fn, config, **kw: real_build(die_once(fn, str(marker), str(starts), kill_at), config, **kw),
    )
    outcome = run_experiment(parse_spec(data), progress=False, report_every=1)

    assert marker.exists(), "the worker never died: the test exercised no restart"
    checkpoints = tmp_path / "runs" / outcome.run_name / "output" / "checkpoints"
    assert starts.read_text().splitlines() == ["None", str(checkpoints)]  # restarted once, from the checkpoint
    assert outcome.status == "FINISHED" and outcome.final_step == n_steps
    client = client_for(mlflow_uri)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id])) == 1  # the restart continued this run
    steps = sorted(m.step for m in client.get_metric_history(outcome.run_id, tracking.TRAIN_LOSS))
    assert steps == list(range(1, n_steps + 1))  # step 4 trained twice, logged once
    assert Path(outcome.model_dir, "config.json").is_file()
