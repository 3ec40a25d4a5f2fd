"""`run_sweep` on the real local Ray cluster (shared session): Tune + ASHA + MLflow parent/child runs, and an
interrupted sweep resumed with `Tuner.restore`. Each trial costs ~20-40 s here (actor start-up dominates)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import yaml
from test_sweep import write_sweep

from fotlab import tracking
from fotlab.orchestrate.sweep import SweepInterruptedError, run_sweep
from fotlab.orchestrate.sweep_trial import TAG_RESUMED_FROM, TAG_STOPPED_EARLY, TAG_SWEEP_ROLE, TAG_TRIAL_ID
from fotlab.spec import load_spec, load_sweep

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def client_for(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def child_runs(uri: str, parent_run_id: str) -> list:
    client = client_for(uri)
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    return client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


def tiny_sweep(tmp_path: Path, corpus: Path, steps: int = 8, **changes):
    """Base: debug preset, `steps` steps, val/loss every 2 steps, checkpoints every 4; `changes` go into the sweep."""
    path = write_sweep(tmp_path, corpus, **changes)
    base = yaml.safe_load((tmp_path / "base.yaml").read_text())
    base["train"].update(
        schedule={"name": "constant", "warmup_steps": 0}, crossbatch={"range": 0, "packing": 1}, steps=steps
    )
    base["data"]["cache_dir"] = str(tmp_path / "datasets-cache")
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    return load_sweep(path), path


def assert_no_placement_group_left() -> None:
    """Every trial's placement group was removed: nothing leaked (the Ray bug that hangs sweeps). Removal is
    asynchronous and slow on a busy machine: waits for it up to 240 s (returns as soon as it is seen)."""
    from ray.util import placement_group_table

    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        alive = [pg for pg in placement_group_table().values() if pg["state"] not in ("REMOVED",)]
        if not alive:
            return
        time.sleep(1)
    raise AssertionError(f"placement groups left: {alive}")


@pytest.mark.timeout(480)
def test_sweep_with_early_stopping_is_one_parent_with_a_child_per_trial(ray_session, tiny_corpus, tmp_path):
    # lr 1e-2 learns in 2 steps, lr 1e-6 does not: ASHA (rung at step 2) must stop at least one 1e-6 trial.
    sweep, path = tiny_sweep(
        tmp_path,
        tiny_corpus,
        search="random",
        num_samples=1,
        max_concurrent_trials=2,
        search_space={
            "train.optimizer.lr": {"type": "grid", "values": [1e-2, 1e-6, 1e-6]},
            "memory.layers": {"type": "choice", "values": [[0], [1], [0, 1]]},
        },
        scheduler={"name": "asha", "grace_period": 1, "reduction_factor": 2},
    )
    outcome = run_sweep(sweep, progress=False, sweep_path=str(path))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = client_for(uri)

    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED"
    kind = client.get_experiment(parent.info.experiment_id).tags[tracking.TAG_EXPERIMENT_KIND]
    assert kind == tracking.EXPERIMENT_KIND  # MLflow's model-training view
    assert parent.data.tags[tracking.TAG_SWEEP] == "tiny-sweep" and parent.data.tags[TAG_SWEEP_ROLE] == "parent"
    assert parent.data.metrics["n_trials"] == 3 and parent.data.metrics["n_stopped_early"] >= 1
    artifacts = {a.path for a in client.list_artifacts(outcome.parent_run_id)}
    assert {"leaderboard.csv", "leaderboard.json", "best_spec.yaml", "sweep.yaml", "plots"} <= artifacts
    plots = {Path(a.path).name for a in client.list_artifacts(outcome.parent_run_id, "plots")}
    assert {"parallel_coordinates.png", "val_loss vs train.optimizer.lr.png"} <= plots

    children = child_runs(uri, outcome.parent_run_id)
    assert len(children) == 3 and len({c.data.tags[TAG_TRIAL_ID] for c in children}) == 3
    for child in children:
        assert child.info.status == "FINISHED", child.data.tags.get(tracking.TAG_ERROR)
        assert child.data.tags[tracking.TAG_SWEEP] == "tiny-sweep" and child.data.tags[TAG_SWEEP_ROLE] == "trial"
        assert child.info.experiment_id == parent.info.experiment_id
        assert "sweep/train.optimizer.lr" in child.data.params and "train.steps" in child.data.params
        # compare view: what varies is in the run name and in one fotlab.<field> tag per swept field
        lr, layers = child.data.tags["fotlab.train.optimizer.lr"], child.data.tags["fotlab.memory.layers"]
        assert float(lr) == float(child.data.params["sweep/train.optimizer.lr"]) and layers in ("[0]", "[1]", "[0, 1]")
        trial_name, _, varies = child.info.run_name.partition(": ")
        compact = layers.replace(" ", "")
        assert trial_name and set(varies.split(" ")) == {f"optimizer.lr={lr}", f"memory.layers={compact}"}
        assert tracking.VAL_LOSS in child.data.metrics and tracking.TRAIN_LOSS in child.data.metrics
    stopped = [c for c in children if c.data.tags[TAG_STOPPED_EARLY] == "true"]
    completed = [c for c in children if c.data.tags[TAG_STOPPED_EARLY] == "false"]
    assert stopped and all(float(c.data.params["sweep/train.optimizer.lr"]) == 1e-6 for c in stopped)
    assert all(max(m.step for m in client.get_metric_history(c.info.run_id, tracking.TRAIN_LOSS)) < 8 for c in stopped)
    assert any(float(c.data.params["sweep/train.optimizer.lr"]) == 1e-2 for c in completed)

    # The best trial (lr 1e-2) is exported as a spec `fotlab run` accepts; `runs list --sweep` sees 1 + 3 runs.
    best = load_spec(outcome.best_spec)
    assert best.train.optimizer.lr == pytest.approx(1e-2)
    assert outcome.best["status"] == "COMPLETED" and outcome.best["run_id"] in {c.info.run_id for c in children}
    assert len(tracking.search_runs(uri, sweep="tiny-sweep")) == 4
    assert_no_placement_group_left()


def interrupt_after_first_trial(uri: str, outputs: Path) -> threading.Thread:
    """Ctrl-C (SIGINT to this process, as a terminal would) once one trial finished and the next has checkpointed."""

    def finished_children() -> int:
        try:
            return len(
                tracking.search_runs(
                    uri, filter_string=f"attributes.status = 'FINISHED' and tags.`{TAG_SWEEP_ROLE}` = 'trial'"
                )
            )
        except Exception:  # noqa: BLE001 - the store may not exist yet
            return 0

    def watch() -> None:
        deadline = time.time() + 300
        while time.time() < deadline:
            trials_with_checkpoints = {p.parent.parent.name for p in outputs.glob("*/outputs/*/checkpoints/step-*")}
            if finished_children() >= 1 and len(trials_with_checkpoints) >= 2:
                break
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.timeout(600)
def test_interrupted_sweep_resumes_and_runs_every_trial_once(ray_session, tiny_corpus, tmp_path):
    n_steps = 40  # long enough for the interrupt to land mid-trial
    sweep, path = tiny_sweep(
        tmp_path,
        tiny_corpus,
        steps=n_steps,
        search="grid",
        max_concurrent_trials=1,
        num_samples=None,
        search_space={"train.optimizer.lr": {"type": "grid", "values": [3e-3, 1e-2, 5e-3]}},
        scheduler={"name": "none"},
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    interrupt_after_first_trial(uri, tmp_path / "runs" / "sweeps")
    with pytest.raises(SweepInterruptedError) as caught:
        run_sweep(sweep, progress=False, sweep_path=str(path))
    parent_id = caught.value.run_id
    client = client_for(uri)
    assert client.get_run(parent_id).info.status == "KILLED"
    before = child_runs(uri, parent_id)
    assert 1 <= len(before) < 3 and all(c.info.status in ("FINISHED", "KILLED") for c in before)
    interrupted = [c.info.run_id for c in before if c.info.status == "KILLED"]
    assert interrupted  # the trial running at Ctrl-C (it had checkpointed; see interrupt_after_first_trial)

    outcome = run_sweep(sweep, resume=True, progress=False, sweep_path=str(path))
    assert outcome.parent_run_id == parent_id
    assert client.get_run(parent_id).info.status == "FINISHED"
    children = child_runs(uri, parent_id)
    assert len(children) == 3  # no duplicate child run for the trial that was running at the interrupt
    assert sorted(c.data.tags[TAG_TRIAL_ID] for c in children) == sorted(r["trial_id"] for r in outcome.rows)
    assert [r["status"] for r in outcome.rows] == ["COMPLETED"] * 3
    for child in children:
        assert child.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(child.info.run_id, tracking.TRAIN_LOSS)]
        assert steps == list(range(2, n_steps + 1, 2))  # each step logged once, also after a resume
    reused = {c.info.run_id for c in before} & {c.info.run_id for c in children}
    assert reused == {c.info.run_id for c in before}
    resumed = client.get_run(interrupted[0]).data.tags[TAG_RESUMED_FROM]
    assert Path(resumed).name.startswith("step-") and Path(resumed).name != f"step-{n_steps:08d}"
    assert_no_placement_group_left()


@pytest.mark.timeout(480)
def test_multi_worker_trial_runs_a_nested_trainer_without_early_stopping(ray_session, tiny_corpus, tmp_path):
    sweep, path = tiny_sweep(
        tmp_path,
        tiny_corpus,
        steps=4,
        search="grid",
        num_samples=None,
        search_space={"train.optimizer.lr": {"type": "grid", "values": [1e-2]}},
        scheduler={"name": "none"},
    )
    base = yaml.safe_load((tmp_path / "base.yaml").read_text())
    # DDP over 2 workers (half a CPU each: the shared session has 2): a nested Train V2 TorchTrainer per trial
    base["scaling"] = {"num_workers": 2, "resources_per_worker": {"CPU": 0.5}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    sweep = load_sweep(path)
    outcome = run_sweep(sweep, progress=False, sweep_path=str(path))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (child,) = child_runs(uri, outcome.parent_run_id)
    assert child.info.status == "FINISHED" and child.data.tags[TAG_STOPPED_EARLY] == "false"
    history = client_for(uri).get_metric_history(child.info.run_id, tracking.TRAIN_LOSS)
    assert [m.step for m in history] == [2, 4]  # logged by rank 0 of the nested trainer into the child run
    assert outcome.rows[0]["status"] == "COMPLETED" and outcome.rows[0]["val/loss"] is not None
    assert_no_placement_group_left()


@pytest.mark.timeout(600)
def test_a_sweep_trial_and_fotlab_run_leave_the_same_mlflow_run_layout(ray_session, tiny_corpus, tmp_path):
    """Both go through one pipeline (train -> log model -> register -> evaluations): same params (besides the
    trial's `sweep/*`), the same fotlab tags (besides each one's own bookkeeping), the same metrics, artifacts and
    a registered model version."""
    from fotlab.orchestrate import run_experiment

    sweep, path = tiny_sweep(
        tmp_path,
        tiny_corpus,
        steps=4,
        search="grid",
        num_samples=None,
        search_space={"train.optimizer.lr": {"type": "grid", "values": [1e-2]}},
        scheduler={"name": "none"},
    )
    base = yaml.safe_load((tmp_path / "base.yaml").read_text())
    base["tracking"].update(log_model=True, register_model="layout_model")
    base["eval"] = {"perplexity": [{"name": "ppl", "memory_sizes": [0, 32], "chunk_len": 16, "max_stream_tokens": 64}]}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    outcome = run_sweep(load_sweep(path), progress=False, sweep_path=str(path))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (trial,) = child_runs(uri, outcome.parent_run_id)
    # the same experiment as `fotlab run` of the trial's exported spec, in-process
    spec = load_spec(outcome.best_spec, ["scaling.num_workers=0"])
    run = client_for(uri).get_run(run_experiment(spec, progress=False).run_id)

    client = client_for(uri)
    assert trial.info.status == run.info.status == "FINISHED"
    assert {k for k in trial.data.params if not k.startswith("sweep/")} == set(run.data.params)
    own = {
        tracking.TAG_PARENT_RUN,
        TAG_SWEEP_ROLE,
        TAG_TRIAL_ID,
        TAG_STOPPED_EARLY,
        tracking.TAG_SWEEP,
        "fotlab.ray_run_name",
        "fotlab.storage_path",
        "fotlab.resumable",
    }
    own |= {f"fotlab.{k.removeprefix('sweep/')}" for k in trial.data.params if k.startswith("sweep/")}  # swept fields
    fotlab_tags = [{k for k in r.data.tags if k.startswith("fotlab.") and k not in own} for r in (trial, run)]
    assert fotlab_tags[0] == fotlab_tags[1] and tracking.TAG_REGISTERED_VERSION in fotlab_tags[0]
    assert (trial.data.tags[tracking.TAG_KIND], run.data.tags[tracking.TAG_KIND]) == ("trial", "run")
    assert set(trial.data.metrics) == set(run.data.metrics)
    assert {"eval/ppl_single_doc/mem_32", tracking.TRAIN_TIME_S, tracking.EVAL_TIME_S} <= set(run.data.metrics)
    for r in (trial, run):
        top = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert {"spec.yaml", "eval"} <= top, top
        (output,) = r.outputs.model_outputs  # the model: an MLflow Model of the run, linked to its final metrics
        assert client.get_logged_model(output.model_id).metrics
    versions = client.search_model_versions("name='layout_model'")
    assert {v.run_id for v in versions} == {trial.info.run_id, run.info.run_id}
