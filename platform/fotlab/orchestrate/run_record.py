"""The MLflow side of one training run, as the driver sees it (built on `fotlab.tracking`).

Design choices:
- The driver creates the experiment (explicit artifact location, see `fotlab.tracking.setup_experiment`) and the
  run, then hands the run id to rank 0, which logs step metrics and the final model into the same run.
- The Ray Train run name and storage path are stored as tags, so `--resume RUN` (an MLflow run id or run name)
  finds the Ray run to continue; a resumed run continues the same MLflow run id.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

from fotlab import tracking
from fotlab.errors import FotlabError
from fotlab.names import TAG_KIND, TAG_RAY_RUN_NAME, TAG_RESUMABLE, TAG_STORAGE_PATH


class RunNotFoundError(FotlabError):
    """`--resume RUN` names no MLflow run that `fotlab run` started."""


@dataclasses.dataclass
class RunRecord:
    """An MLflow run opened (or reopened) by the driver for one Ray Train run."""

    run: tracking.TrackedRun
    run_name: str
    ray_run_name: str
    storage_path: str

    @property
    def run_id(self) -> str:
        return self.run.run_id

    @property
    def tracking_uri(self) -> str:
        return self.run.uri

    def finish(self, metrics: dict[str, Any], step: int) -> None:
        """Final metrics not logged yet by rank 0 (no duplicate points), status FINISHED."""
        self.run.close(metrics, step, {TAG_RESUMABLE: "false"})

    def fail(self, error: BaseException | str, *, status: str = "FAILED", resumable: bool = False) -> None:
        """Mark the run FAILED (or KILLED) with a one-line error; never raises (the original error matters), never
        waits for a tracking server that does not answer (`TrackedRun.fail`)."""
        with contextlib.suppress(Exception):  # the training error is the one to report
            self.run.fail(error, status=status, tags={TAG_RESUMABLE: "true" if resumable else "false"})


def open_run(spec, tracking_uri: str, ray_run_name: str, storage_path: str) -> RunRecord:
    """A new MLflow run for ``spec`` (params = the flattened spec, spec YAML, git + version tags)."""
    tags = {TAG_KIND: "run", TAG_RAY_RUN_NAME: ray_run_name, TAG_STORAGE_PATH: storage_path}
    run_name = spec.tracking.run_name or ray_run_name
    run = tracking.start_spec_run(spec, uri=tracking_uri, run_name=run_name, tags=tags)
    return RunRecord(run, run_name, ray_run_name, storage_path)


def reopen_run(spec, tracking_uri: str, run_ref: str) -> RunRecord:
    """Reopen a run to resume it: same MLflow run id, same Ray run name + storage path (from its tags)."""
    try:
        found = tracking.get_run(tracking_uri, run_ref)
    except tracking.TrackingError as err:
        raise RunNotFoundError(f"--resume {run_ref}: {err}") from None
    tags = found.data.tags
    if TAG_RAY_RUN_NAME not in tags or TAG_STORAGE_PATH not in tags:
        raise RunNotFoundError(
            f"--resume {run_ref}: run {found.info.run_id} was not started by `fotlab run` (no {TAG_RAY_RUN_NAME} tag)"
        )
    if found.info.status == "FINISHED":
        raise RunNotFoundError(f"--resume {run_ref}: run {found.info.run_id} already FINISHED; nothing to resume")
    run = tracking.start_spec_run(spec, uri=tracking_uri, run_id=found.info.run_id, tags={TAG_RESUMABLE: "false"})
    run.delete_tag(tracking.TAG_ERROR)
    return RunRecord(run, found.info.run_name, tags[TAG_RAY_RUN_NAME], tags[TAG_STORAGE_PATH])
