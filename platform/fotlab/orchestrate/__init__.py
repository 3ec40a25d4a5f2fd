"""Orchestration: every way of running an experiment, each a thin shell around one pipeline.

- `pipeline.run_pipeline(spec, run, runtime, hooks)`: train -> log the model -> register it -> the spec's
  evaluations, on a `tracking.TrackedRun`. Called by each Ray Train worker (`worker.train_worker`), each
  single-worker sweep trial (`sweep_trial`) and the paper reproductions (`reproduce`).
- `trainer.build_trainer(worker_fn, WorkerConfig(...), run_name=, storage_path=)`: the one builder of the Ray
  trainer from a spec's `scaling`, `storage` and `failure` sections; `fotlab run` (`runner`) and multi-worker
  sweep trials use it.
- `run_experiment(spec)`: one Ray Train (V2) run tracked as one MLflow run (`runner`, `run_record`).
- `run_sweep(sweep)`: Ray Tune + Optuna, one parent MLflow run and a child per trial (`sweep*`).
- `submit_experiment(spec, address)`: the same run on a remote cluster through Ray Jobs (`jobs`).
- `run_command`, `submit_command`, `eval_command`, `sweep_command`: the handlers behind
  `fotlab run / submit / eval / sweep` (`commands`, `sweep`).

Ray and MLflow are imported lazily, so importing this package is cheap.
"""

from fotlab.orchestrate.commands import eval_command, run_command, submit_command
from fotlab.orchestrate.jobs import Submission, SubmitError, submit_experiment
from fotlab.orchestrate.runner import RunFailedError, RunInterruptedError, RunOutcome, run_experiment
from fotlab.orchestrate.sweep import sweep_command

__all__ = [
    "RunFailedError",
    "RunInterruptedError",
    "RunOutcome",
    "Submission",
    "SubmitError",
    "eval_command",
    "run_command",
    "run_experiment",
    "submit_command",
    "submit_experiment",
    "sweep_command",
]
