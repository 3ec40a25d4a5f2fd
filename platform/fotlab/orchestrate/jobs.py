"""`fotlab submit`: the same run on a remote Ray cluster, through Ray Jobs.

    fotlab submit experiments/quickstart.yaml --address http://HEAD:8265 --set train.steps=200

The spec is validated here (with its --set overrides applied) and shipped as one resolved `spec.yaml` in the
job's working_dir, together with this checkout's `fotlab` package (runtime_env py_modules), so the cluster runs
exactly the code and spec you have. The cluster's image provides the dependencies (torch, ray, mlflow, ...).
The job's entrypoint is `python -m fotlab.cli run spec.yaml --json --no-progress` (= `fotlab run`); follow it with `ray job logs --follow`.
"""

from __future__ import annotations

import dataclasses
import shlex
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import fotlab
from fotlab.errors import FotlabError

JOB_SPEC_FILE = "spec.yaml"
SUBMIT_ATTEMPTS = 10  # the job agent can answer "try again later" while it starts
SUBMIT_RETRY_S = 3.0


class SubmitError(FotlabError):
    """A `fotlab submit` that cannot be sent (bad address, unreachable cluster)."""


@dataclasses.dataclass
class Submission:
    """What `submit_experiment` sent: the job id and how to follow it."""

    submission_id: str
    address: str
    entrypoint: str

    def to_json(self) -> dict:
        return {
            "submission_id": self.submission_id,
            "address": self.address,
            "entrypoint": self.entrypoint,
            "logs": f"ray job logs --address {self.address} --follow {self.submission_id}",
            "status": f"ray job status --address {self.address} {self.submission_id}",
        }


def check_address(address: str) -> str:
    """A Ray Jobs address must be the dashboard's HTTP endpoint: `http(s)://HEAD:PORT` (usually port 8265)."""
    parsed = urlparse(address or "")
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise SubmitError(
            f"--address {address!r}: give the Ray dashboard URL, e.g. http://HEAD:8265 "
            "(ray:// and GCS addresses are for `fotlab run --address`)"
        )
    return address.rstrip("/")


def build_job(spec, staging_dir: Path, *, python: str = "python") -> tuple[str, dict]:
    """Write the resolved spec into ``staging_dir``; return (entrypoint, runtime_env) for the job.

    ``python`` is the cluster's interpreter (default: `python` on the cluster's PATH)."""
    from fotlab.spec import spec_to_yaml

    (staging_dir / JOB_SPEC_FILE).write_text(spec_to_yaml(spec))
    # `python -m fotlab.cli` == the `fotlab` console script, but needs no script on the cluster's PATH.
    entrypoint = shlex.join([python, "-m", "fotlab.cli", "run", JOB_SPEC_FILE, "--json", "--no-progress"])
    runtime_env = {
        "working_dir": str(staging_dir),
        "py_modules": [str(Path(fotlab.__file__).parent)],
        "env_vars": {"RAY_USAGE_STATS_ENABLED": "0"},
    }
    return entrypoint, runtime_env


def submit_experiment(
    spec, address: str, *, submission_id: str | None = None, python: str = "python"
) -> Submission:
    """Submit ``spec`` as a Ray Job to the cluster whose dashboard is at ``address``; returns at once.

    ``python``: the interpreter on the cluster that has fotlab's dependencies (default `python`)."""
    address = check_address(address)
    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise SubmitError(f"--address {address}: cannot reach the Ray Jobs server ({err})") from None
    metadata = {"fotlab.spec_name": spec.name, "fotlab.version": fotlab.__version__}
    with tempfile.TemporaryDirectory(prefix="fotlab-submit-") as tmp:
        entrypoint, runtime_env = build_job(spec, Path(tmp), python=python)
        for attempt in range(SUBMIT_ATTEMPTS):
            try:
                job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                                           submission_id=submission_id, metadata=metadata)
                break
            except RuntimeError as err:  # the head's job agent may still be starting ("try again later")
                if "try again" not in str(err) or attempt == SUBMIT_ATTEMPTS - 1:
                    raise SubmitError(f"--address {address}: job submission failed ({err})") from None
                time.sleep(SUBMIT_RETRY_S)
    return Submission(job_id, address, entrypoint)
