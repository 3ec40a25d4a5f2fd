"""R1: a Ray Train worker SIGKILLed mid-run, at three phases (inside a training step, while a checkpoint is being
written, during the evaluations), with `failure.max_failures: 1`. Ray restarts the worker group, the run resumes
from its last complete checkpoint and finishes FINISHED in the same MLflow run, and its metric history equals an
uninterrupted run's: the same (metric, step) points, each once; one logged model, one registered version.

Each fault runs the same 2-worker DDP spec on the shared local Ray cluster (`ray_session`); the uninterrupted
reference run of that spec is the module's first run. The fault is injected by wrapping the worker function (as
`test_orchestrate_ray_restart` does): the worker process kills itself with SIGKILL at the chosen point, once per
test (a marker file), so no handler runs and Ray sees a dead process.
Run: pytest -s tests/reliability/test_worker_loss.py   (prints the `R1 measured:` lines docs/reliability.md uses)
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from test_orchestrate import client_for, tiny_spec_dict

from fotlab import names
from fotlab.orchestrate import run_experiment, runner
from fotlab.spec import parse_spec

pytestmark = [pytest.mark.ray, pytest.mark.slow]

N_STEPS, CHECKPOINT_EVERY = 8, 3  # checkpoints at steps 3, 6 and 8 (the end)
MODEL_NAME = "r1-model"


def r1_spec(corpus: Path, tmp_path: Path, uri: str):
    data = tiny_spec_dict(
        corpus, tmp_path, uri, num_workers=2, steps=N_STEPS, checkpoint_every=CHECKPOINT_EVERY, eval_every=2
    )
    data["failure"] = {"max_failures": 1}
    data["tracking"]["register_model"] = MODEL_NAME
    data["eval"] = {
        "perplexity": [
            {"name": "valppl", "source": {"kind": "validation"}, "memory_sizes": [0, 32], "chunk_len": 16},
        ],
        "passkey": {"lengths": [256], "depths": [0.5], "n_trials": 1},
    }
    return parse_spec(data)


def metric_history(uri: str, run_id: str) -> dict[str, list[int]]:
    """Every metric of the run with the steps of its points, in logged order (duplicates kept)."""
    client = client_for(uri)
    keys = client.get_run(run_id).data.metrics
    return {key: sorted(m.step for m in client.get_metric_history(run_id, key)) for key in keys}


def comparable(history: dict[str, list[int]]) -> dict[str, list[int]]:
    """The history without the metrics that measure time (their set depends on the run, e.g. time/*)."""
    return {k: v for k, v in history.items() if not k.startswith(("time/", "system/"))}


def kill_once(worker_fn, marker: str, starts: str, phase: str, rank_to_kill: int):
    """`worker_fn` wrapped so that worker `rank_to_kill` SIGKILLs itself once (the marker file) at `phase`:
    "step" (inside training step 5, after the checkpoint of step 3), "checkpoint" (writing the checkpoint of
    step 6: its files are written, its manifest not yet) or "evaluation" (the passkey evaluation, after the
    perplexity evaluation's metrics were logged). Every worker start appends `rank checkpoint unix_time` (the
    checkpoint it resumes from, or None) to the file `starts`. A closure: Ray ships it by value."""

    def worker(config):
        import os
        import signal
        import time as clock
        from pathlib import Path

        import ray.train

        from fotlab.orchestrate.worker import latest_checkpoint_in

        rank = ray.train.get_context().get_world_rank()
        latest = latest_checkpoint_in(Path(config.output_dir) / "checkpoints")
        with open(starts, "a") as log:
            log.write(f"{rank} {latest.name if latest else None} {clock.time()}\n")

        def die(where: str):
            Path(marker).write_text(f"{where} {clock.time()}")
            os.kill(os.getpid(), signal.SIGKILL)

        if rank == rank_to_kill and not os.path.exists(marker):
            if phase == "step":
                from fotlab.train import loop

                real_step = loop.train_step

                def step(*args, **kwargs):
                    if kwargs["step"] == 5:
                        die("step 5")
                    return real_step(*args, **kwargs)

                loop.train_step = step
            elif phase == "checkpoint":
                from fotlab.train import checkpoint

                real_commit = checkpoint.commit_checkpoint

                def commit(tmp_dir, final_dir, state, keep):
                    if state["step"] == 6:
                        die(f"writing {Path(final_dir).name} ({len(list(Path(tmp_dir).iterdir()))} files written)")
                    return real_commit(tmp_dir, final_dir, state, keep)

                checkpoint.commit_checkpoint = commit
            else:
                from fotlab.eval import passkey

                def passkey_retrieval(*args, **kwargs):
                    die("passkey evaluation")

                passkey.passkey_retrieval = passkey_retrieval
        return worker_fn(config)

    return worker


@pytest.fixture(scope="module")
def reference(ray_session, tiny_corpus, tmp_path_factory):
    """The uninterrupted run of the R1 spec: (its comparable metric history, its wall time in seconds)."""
    tmp_path = tmp_path_factory.mktemp("r1-reference")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    started = time.monotonic()
    outcome = run_experiment(r1_spec(tiny_corpus, tmp_path, uri), progress=False, report_every=1)
    wall = time.monotonic() - started
    assert outcome.status == "FINISHED"
    history = comparable(metric_history(uri, outcome.run_id))
    print(f"\nR1 measured: reference (no fault): {wall:.1f} s wall, {sum(map(len, history.values()))} metric points")
    return history, wall


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    ("phase", "rank_to_kill", "resumed_step", "replayed"),
    [
        ("step", 1, 3, "steps 4-5"),  # a non-zero rank: rank 0 is left waiting in the all-reduce
        ("checkpoint", 0, 3, "steps 4-6"),  # rank 0 writes checkpoints
        ("evaluation", 0, 8, "no training step (validation at step 8 again)"),  # only rank 0 evaluates
    ],
)
def test_a_killed_worker_restarts_from_its_last_checkpoint_into_the_same_run(
    reference, tiny_corpus, tmp_path, mlflow_uri, monkeypatch, phase, rank_to_kill, resumed_step, replayed
):
    reference_history, reference_wall = reference
    marker, starts = tmp_path / "died", tmp_path / "starts.txt"
    real_build = runner.build_trainer
    monkeypatch.setattr(
        runner,
        "build_trainer",
        lambda fn, config, **kw: real_build(kill_once(fn, str(marker), str(starts), phase, rank_to_kill), config, **kw),
    )
    started = time.monotonic()
    outcome = run_experiment(r1_spec(tiny_corpus, tmp_path, mlflow_uri), progress=False, report_every=1)
    wall = time.monotonic() - started

    assert marker.exists(), "the worker never died: the test exercised no restart"
    where, died_at = marker.read_text().rsplit(" ", 1)
    checkpoints = tmp_path / "runs" / outcome.run_name / "output" / "checkpoints"
    lines = [line.split() for line in starts.read_text().splitlines()]
    first, restarted = [x for x in lines if x[1] == "None"], [x for x in lines if x[1] != "None"]
    assert len(first) == 2 and len(restarted) == 2, lines  # two workers, started twice (one Ray restart)
    assert {x[1] for x in restarted} == {f"step-{resumed_step:08d}"}  # the last complete checkpoint
    restart_s = min(float(x[2]) for x in restarted) - float(died_at)
    steps = sorted(int(p.name.split("-")[1]) for p in checkpoints.glob("step-*"))
    assert not list(checkpoints.glob(".tmp-*")), "a half-written checkpoint folder was left behind"

    assert outcome.status == "FINISHED" and outcome.final_step == N_STEPS
    client = client_for(mlflow_uri)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED" and names.TAG_ERROR not in run.data.tags
    assert len(client.search_runs([run.info.experiment_id])) == 1  # the restart continued this run
    history = comparable(metric_history(mlflow_uri, outcome.run_id))
    duplicates = {k: v for k, v in history.items() if len(v) != len(set(v))}
    assert not duplicates, f"metric points logged twice: {duplicates}"
    assert history == reference_history  # the same points as the uninterrupted run, each once
    models = list(run.outputs.model_outputs)
    versions = client.search_model_versions(f"name = '{MODEL_NAME}'")
    assert len(models) == 1 and len(versions) == 1, (models, versions)  # one model, one version, not one per try
    assert versions[0].run_id == outcome.run_id
    print(
        f"\nR1 measured: {phase}: worker rank {rank_to_kill} SIGKILLed ({where}); Ray restarted the worker group "
        f"{restart_s:.1f} s later from checkpoint step {resumed_step} (replayed {replayed}); checkpoints now "
        f"{steps}; run FINISHED, same MLflow run; {sum(map(len, history.values()))} metric points over "
        f"{len(history)} metrics, none twice, equal to the uninterrupted run's; 1 logged model, 1 registered "
        f"version; wall {wall:.1f} s vs {reference_wall:.1f} s uninterrupted ({wall - reference_wall:+.1f} s)"
    )
