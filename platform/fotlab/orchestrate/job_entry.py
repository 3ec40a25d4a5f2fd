"""The entrypoint of a `fotlab submit` job (see fotlab.orchestrate.jobs): `fotlab run` on $FOTLAB_JOB_SPEC.

    export FOTLAB_JOB_SPEC="$(fotlab validate experiments/quickstart.yaml --print)"
    python -m fotlab.orchestrate.job_entry --json
"""

import sys

from fotlab.orchestrate.jobs import run_job_spec

if __name__ == "__main__":
    run_job_spec(sys.argv[1:])
