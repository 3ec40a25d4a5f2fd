"""`sweep_resume` on a real sqlite MLflow store, without Ray: a trial suggested again after a lost driver adopts
its twin's orphaned child run (one adopter per orphan, output folder carried over), a finished run's recorded
report, and the closing of child runs no trial took back. (End to end, with SIGKILLed drivers:
tests/reliability/test_driver_loss.py.)"""

from __future__ import annotations

from pathlib import Path

from fotlab import tracking
from fotlab.names import TAG_ADOPTED_FROM_TRIAL, TAG_STOPPED_EARLY, TAG_SWEEP_ROLE, TAG_TRIAL_ID
from fotlab.orchestrate import sweep_resume
from fotlab.orchestrate.sweep_space import TIME_ATTR


def child(uri: str, experiment_id: str, parent: str, trial_id: str, lr: float) -> tracking.TrackedRun:
    tags = {TAG_SWEEP_ROLE: "trial", TAG_TRIAL_ID: trial_id, **tracking.swept_param_tags({"train.optimizer.lr": lr})}
    return tracking.start_run(uri, experiment_id, run_name=trial_id, tags=tags, parent_run_id=parent)


def test_a_resuggested_trial_adopts_its_lost_twin_once(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = tracking.setup_experiment(uri, "sweep", (tmp_path / "artifacts").as_uri())
    parent = tracking.start_run(uri, experiment_id, run_name="parent").run_id
    twins = [child(uri, experiment_id, parent, f"lost{i}", 0.01) for i in range(2)]  # grid repeats: same values
    other = child(uri, experiment_id, parent, "lost-other", 0.02)
    outputs = tmp_path / "outputs"
    (outputs / "lost0" / "checkpoints" / "step-00000004").mkdir(parents=True)
    orphans = (*[(run.run_id, f"lost{i}") for i, run in enumerate(twins)], (other.run_id, "lost-other"))

    params = {"train.optimizer.lr": 0.01}
    first = sweep_resume.adopt_orphan(uri, orphans, params, "new-a", "new-a: lr=0.01", outputs)
    second = sweep_resume.adopt_orphan(uri, orphans, params, "new-b", "new-b: lr=0.01", outputs)
    third = sweep_resume.adopt_orphan(uri, orphans, params, "new-c", "new-c: lr=0.01", outputs)
    assert {first, second} == {twins[0].run_id, twins[1].run_id} and third is None  # each orphan taken once
    adopted = tracking.get_run(uri, first)
    assert adopted.data.tags[TAG_TRIAL_ID] == "new-a" and adopted.info.run_name == "new-a: lr=0.01"
    assert adopted.data.tags[TAG_ADOPTED_FROM_TRIAL] == "lost0"
    assert (outputs / "new-a" / "checkpoints" / "step-00000004").is_dir() and not (outputs / "lost0").exists()
    assert sweep_resume.adopt_orphan(uri, orphans, {"train.optimizer.lr": 0.03}, "new-d", "d", outputs) is None

    # the sweep ran every trial: the orphan nobody adopted is KILLED, the adopted ones are left to their trials
    closed = sweep_resume.close_lost_children(uri, parent, {"new-a", "new-b"})
    assert closed == [other.run_id]
    lost = tracking.get_run(uri, other.run_id)
    assert lost.info.status == "KILLED" and "lost with the sweep's driver" in lost.data.tags[tracking.TAG_ERROR]
    assert {tracking.get_run(uri, run.run_id).info.status for run in twins} == {"RUNNING"}


def test_a_finished_trial_reports_what_its_run_recorded(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = tracking.setup_experiment(uri, "sweep", Path(tmp_path / "artifacts").as_uri())
    parent = tracking.start_run(uri, experiment_id, run_name="parent").run_id
    done = child(uri, experiment_id, parent, "t1", 0.01)
    for step in (2, 4, 6):
        done.log_metrics({"val/loss": 10.0 - step, "train/loss": 11.0 - step}, step)
    done.close({}, 6, {TAG_STOPPED_EARLY: "false"})
    report = sweep_resume.recorded_report(uri, tracking.get_run(uri, done.run_id), "val/loss", 8, "steps_total")
    assert report == {"val/loss": 4.0, "train/loss": 5.0, TIME_ATTR: 8, "steps_total": 8}

    done.set_tags({TAG_STOPPED_EARLY: "true"})  # stopped by the scheduler at step 6 of 8: stays stopped early
    report = sweep_resume.recorded_report(uri, tracking.get_run(uri, done.run_id), "val/loss", 8, "steps_total")
    assert report[TIME_ATTR] == 6
