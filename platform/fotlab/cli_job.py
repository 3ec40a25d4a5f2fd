"""The entrypoint of a `fotlab submit` job (see fotlab.orchestrate.jobs): `fotlab run` on $FOTLAB_JOB_SPEC.

    export FOTLAB_JOB_SPEC="$(cat experiments/quickstart.yaml)"
    python -m fotlab.cli_job --json

The spec travels in the job's environment (no runtime_env working_dir: Ray re-extracts one on every node of a
host, which deleted the driver's working directory under it); it is written to a temporary file outside any
Ray-managed folder and run as `fotlab run FILE ARGS...`.
"""

from __future__ import annotations

import os
import sys
import tempfile

from fotlab import cli
from fotlab.orchestrate.jobs import JOB_ENTRY_MODULE, JOB_SPEC_ENV


def run_job_spec(argv: list[str]) -> None:
    """`fotlab run` on the spec in $FOTLAB_JOB_SPEC, with ``argv`` as further `fotlab run` options."""
    text = os.environ.get(JOB_SPEC_ENV)
    if not text:
        sys.exit(f"{JOB_ENTRY_MODULE}: ${JOB_SPEC_ENV} is not set (this module is the entrypoint of `fotlab submit`)")
    with tempfile.NamedTemporaryFile("w", prefix="fotlab-job-", suffix=".yaml", delete=False) as out:
        out.write(text)
    sys.argv = ["fotlab", "run", out.name, *argv]
    cli.entry()


if __name__ == "__main__":
    run_job_spec(sys.argv[1:])
