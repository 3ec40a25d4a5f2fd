"""Ray orchestration around the plain training loop: `run_experiment` (Ray Train + MLflow run) and
`submit_experiment` (Ray Jobs). Ray is imported lazily, so importing this package is cheap."""

from fotlab.orchestrate.runner import RunFailedError, RunInterruptedError, RunOutcome, run_experiment

__all__ = ["RunFailedError", "RunInterruptedError", "RunOutcome", "run_experiment"]
