"""Ray orchestration around the plain training loop.

- `run_experiment(spec)`: one Ray Train (V2) run of `fotlab.train.train` tracked as one MLflow run.
- `submit_experiment(spec, address)`: the same run on a remote cluster through Ray Jobs.
- `run_command`, `submit_command`, `eval_command`, `sweep_command`: the handlers behind
  `fotlab run / submit / eval / sweep`.

Ray and MLflow are imported lazily, so importing this package is cheap.
"""

from fotlab.orchestrate.commands import eval_command, run_command, submit_command
from fotlab.orchestrate.jobs import Submission, SubmitError, submit_experiment
from fotlab.orchestrate.runner import RunFailedError, RunInterruptedError, RunOutcome, run_experiment
from fotlab.orchestrate.sweep import sweep_command

__all__ = [
    "RunFailedError", "RunInterruptedError", "RunOutcome", "Submission", "SubmitError", "eval_command",
    "run_command", "run_experiment", "submit_command", "submit_experiment", "sweep_command",
]
