"""`fotlab submit`: the same run on a remote Ray cluster, through Ray Jobs.

    fotlab submit experiments/quickstart.yaml --address http://HEAD:8265 --set train.steps=200

The spec is validated here (with its --set overrides applied) and travels as one resolved YAML text in the job's
environment (`FOTLAB_JOB_SPEC`), together with this checkout's `fotlab` package (runtime_env py_modules), so the
cluster runs exactly the code and spec you have. The cluster's image provides the dependencies (torch, ray, mlflow).
The job's entrypoint, `python -m fotlab.cli_job`, writes the spec to a temporary file and runs
`fotlab run SPEC --json --no-progress`; follow it with `ray job logs --follow`.

Design choices:
- No runtime_env `working_dir`. Ray's working_dir plugin unpacks the package into the node's session folder with
  overwrite (rmtree, then unzip) on every node that sets the job's environment up; two nodes that share one session
  folder (a second `ray start --address` on the head's host, without its own --temp-dir) delete the job driver's
  current directory right after it connects (the driver then dies loading torch: "Intel oneMKL FATAL ERROR: Cannot
  load .../libtorch_cpu.so"). py_modules are unpacked without overwrite, so they are safe.
- A submitted run never writes into the job's temporary folders: its MLflow store and checkpoints come from the spec
  (`tracking.uri`, `storage.path`) or from the cluster's environment (`MLFLOW_TRACKING_URI`, `FOTLAB_STORAGE_PATH`,
  which the compose and KubeRay stacks set on every node). `submit_experiment` asks the cluster for those variables
  (a tiny probe job) and refuses, in one line, when neither gives them.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import time
from pathlib import Path
from urllib.parse import urlparse

import fotlab
from fotlab.errors import FotlabError

JOB_SPEC_ENV = "FOTLAB_JOB_SPEC"  # the resolved spec (YAML text) in the job's environment
JOB_ENTRY_MODULE = "fotlab.cli_job"  # a CLI module: it runs `fotlab run`
CLUSTER_TRACKING_ENV = "MLFLOW_TRACKING_URI"
CLUSTER_STORAGE_ENV = "FOTLAB_STORAGE_PATH"
PROBE_TIMEOUT_S = 120.0
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


def build_job(spec, *, python: str = "python") -> tuple[str, dict]:
    """(entrypoint, runtime_env) of the Ray Job that runs ``spec``; the spec travels in the job's environment.

    ``python`` is the cluster's interpreter (default: `python` on the cluster's PATH)."""
    from fotlab.spec import spec_to_yaml

    entrypoint = shlex.join([python, "-m", JOB_ENTRY_MODULE, "--json", "--no-progress"])
    runtime_env = {
        "py_modules": [str(Path(fotlab.__file__).parent)],
        "env_vars": {"RAY_USAGE_STATS_ENABLED": "0", JOB_SPEC_ENV: spec_to_yaml(spec)},
    }
    return entrypoint, runtime_env


def missing_destinations(spec, cluster_env: dict[str, str | None]) -> list[str]:
    """What a submitted run would write into the job's temporary folders: [] when the spec or the cluster's
    environment names both the MLflow store and the checkpoint storage."""
    missing = []
    if not (spec.tracking.uri or cluster_env.get(CLUSTER_TRACKING_ENV)):
        missing.append(f"tracking.uri (or {CLUSTER_TRACKING_ENV} on the cluster)")
    if not (spec.storage.path or cluster_env.get(CLUSTER_STORAGE_ENV)):
        missing.append(f"storage.path (or {CLUSTER_STORAGE_ENV} on the cluster)")
    return missing


def cluster_env(
    client, address: str, names: tuple[str, ...] = (CLUSTER_TRACKING_ENV, CLUSTER_STORAGE_ENV), python: str = "python"
) -> dict[str, str | None]:
    """The values of ``names`` in the environment the cluster gives its job drivers (a one-line probe job)."""
    from ray.job_submission import JobStatus

    code = f"import json, os; print(json.dumps({{k: os.environ.get(k) for k in {list(names)!r}}}))"
    probe_id = _submit_with_retry(
        client, address, entrypoint=shlex.join([python, "-c", code]), metadata={"fotlab.probe": "environment"}
    )
    deadline = time.monotonic() + PROBE_TIMEOUT_S
    status = client.get_job_status(probe_id)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(0.5)
        status = client.get_job_status(probe_id)
    if status != JobStatus.SUCCEEDED:
        raise SubmitError(f"could not read the cluster's environment (probe job {probe_id}: {status})")
    return json.loads(client.get_job_logs(probe_id).strip().splitlines()[-1])


def _submit_with_retry(client, address: str, **job) -> str:
    for attempt in range(SUBMIT_ATTEMPTS):
        try:
            return client.submit_job(**job)
        except RuntimeError as err:  # the head's job agent may still be starting ("try again later")
            if "try again" not in str(err) or attempt == SUBMIT_ATTEMPTS - 1:
                raise SubmitError(f"--address {address}: job submission failed ({err})") from None
            time.sleep(SUBMIT_RETRY_S)
    raise AssertionError("unreachable")


def submit_experiment(spec, address: str, *, submission_id: str | None = None, python: str = "python") -> Submission:
    """Submit ``spec`` as a Ray Job to the cluster whose dashboard is at ``address``; returns at once.

    ``python``: the interpreter on the cluster that has fotlab's dependencies (default `python`)."""
    address = check_address(address)
    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise SubmitError(f"--address {address}: cannot reach the Ray Jobs server ({err})") from None
    missing = missing_destinations(spec, cluster_env(client, address, python=python))
    if missing:
        raise SubmitError(
            f"the run would write its MLflow store and checkpoints into the job's temporary folder on {address}, "
            f"which vanishes with the cluster: set {' and '.join(missing)}, "
            "e.g. --set tracking.uri=http://MLFLOW:5000 --set storage.path=s3://BUCKET/runs"
        )
    metadata = {"fotlab.spec_name": spec.name, "fotlab.version": fotlab.__version__}
    entrypoint, runtime_env = build_job(spec, python=python)
    job_id = _submit_with_retry(
        client, address, entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id, metadata=metadata
    )
    return Submission(job_id, address, entrypoint)
