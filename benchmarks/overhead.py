"""Platform overhead: `fotlab run` of the quickstart against calling `train()` directly on the same spec.

Both cases run the quickstart spec with `train.steps` lowered and evaluations off (the same work: build data and
model, train, save the model) as a fresh command, timed end to end (interpreter start to exit). Wall time is the
compared metric here: the platform's cost is mostly waiting for Ray, which CPU time would hide; the commands' CPU
time is reported too. The difference is what the platform adds: Ray start, the Train controller and worker,
MLflow tracking, reporting. Storage and the MLflow store go to a temporary directory. A third case runs
`fotlab run` with `scaling.num_workers=0` (Ray Train runs the training function in the driver process: no worker
actor).
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.runner import REPO_ROOT, Case

SPEC = REPO_ROOT / "experiments" / "quickstart.yaml"
STEPS = {"full": 20, "tiny": 2}
DIRECT = """
import sys
from pathlib import Path
from fotlab.spec import load_spec
from fotlab.train import Runtime, train
spec = load_spec(sys.argv[1], sys.argv[3:])
result = train(spec, Runtime(output_dir=Path(sys.argv[2])))
print("final step", result.final_step)
"""


def cases(size: str) -> list[Case]:
    params = {"steps": STEPS[size]}
    return [
        Case(
            "overhead",
            f"quickstart {params['steps']} steps",
            name,
            {**params, "impl": name},
            metric="seconds",
            timeout_s=900,
        )
        for name in ("train-direct", "fotlab-run", "fotlab-run-inprocess")
    ]


def overrides(steps: int, tmp: Path) -> list[str]:
    return [f"train.steps={steps}", "eval.enabled=false", f"storage.path={tmp / 'runs'}"]


def command(impl: str, steps: int, tmp: Path) -> list[str]:
    sets = overrides(steps, tmp)
    if impl == "train-direct":
        return [sys.executable, "-c", DIRECT, str(SPEC), str(tmp / "direct"), *sets]
    if impl == "fotlab-run-inprocess":  # Ray Train's in-process mode: no worker actor (no checkpoint persistence)
        sets = [*sets, "scaling.num_workers=0"]
    fotlab = str(Path(sys.executable).with_name("fotlab"))
    return [fotlab, "run", str(SPEC), *[arg for s in sets for arg in ("--set", s)], "--json"]


def run(params: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix="fotlab-bench-") as tmp:
        tmp = Path(tmp)
        env = {
            **os.environ,
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
            "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        t0 = time.perf_counter()
        proc = subprocess.run(
            command(params["impl"], params["steps"], tmp), capture_output=True, text=True, cwd=tmp, env=env, timeout=850
        )
        seconds = time.perf_counter() - t0
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{params['impl']} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return {"seconds": seconds, "child_cpu_seconds": usage.ru_utime + usage.ru_stime}
