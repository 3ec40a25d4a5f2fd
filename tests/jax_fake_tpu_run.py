"""Helper for test_jax_ray.py (run as a script, never collected): one `run_experiment` with train.framework jax,
scaling.use_tpu, topology 2x4, accelerator TPU-V6E on its own local Ray cluster whose single node advertises
fake TPU resources (8 chips, a v6e-8 slice head); JAX_PLATFORMS=cpu, so the workers compute on CPU.

    python tests/jax_fake_tpu_run.py TMP_DIR CORPUS_DIR MLFLOW_URI   # prints one JSON line with the outcome
"""

import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.update(JAX_PLATFORMS="cpu", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")


def main(tmp: Path, corpus: Path, uri: str) -> None:
    import ray
    from test_orchestrate import tiny_spec_dict

    from fotlab.orchestrate import run_experiment
    from fotlab.spec import parse_spec

    raw = tiny_spec_dict(corpus, tmp, uri, num_workers=1, framework="jax", steps=2)
    raw["scaling"].update(use_tpu=True, topology="2x4", accelerator_type="TPU-V6E")
    ray.init(
        num_cpus=2,
        namespace="fotlab",
        include_dashboard=False,
        _temp_dir=tempfile.mkdtemp(prefix="ftpu", dir="/tmp"),
        resources={"TPU": 8, "accelerator_type:TPU-V6E": 1, "TPU-v6e-8-head": 1},
        labels={"ray.io/tpu-slice-name": "slice-a", "ray.io/tpu-worker-id": "0", "ray.io/tpu-pod-type": "v6e-8"},
    )
    try:
        outcome = run_experiment(parse_spec(raw), progress=False, report_every=1)
        print(
            json.dumps(
                {
                    "status": outcome.status,
                    "final_step": outcome.final_step,
                    "run_id": outcome.run_id,
                    "model_dir": str(outcome.model_dir),
                    "metrics": outcome.metrics,
                }
            )
        )
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
