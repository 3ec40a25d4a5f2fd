"""R6: a NaN/inf loss under `train.nonfinite: stop` (the default) and `skip`, on a real tiny in-process run.

The fault is injected through the real path: a learning rate of 1e30 (AdamW moves every weight by ~lr on the first
step), so step 1 trains on finite numbers and every later forward pass overflows to inf/NaN.
Run: pytest tests/reliability/test_nonfinite_loss.py
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from fotlab import names as M

pytestmark = pytest.mark.slow
HUGE_LR = {"lr": 1e30}


def fotlab_run(spec: Path) -> tuple[int, str]:
    """`fotlab run SPEC` as a real subprocess (the console script): (exit status, stderr)."""
    fotlab = Path(sys.executable).with_name("fotlab")
    done = subprocess.run(
        [str(fotlab), "run", str(spec), "--no-progress"], capture_output=True, text=True, timeout=250, cwd=spec.parent
    )
    return done.returncode, done.stderr


@pytest.mark.timeout(300)
def test_stop_fails_naming_the_step_and_keeps_the_last_good_checkpoint(tiny_spec, tmp_path, mlflow_uri):
    spec = tiny_spec(optimizer=HUGE_LR)
    code, err = fotlab_run(spec)
    lines = [line for line in err.splitlines() if line.startswith("fotlab run:")]
    assert code == 1 and len(lines) == 1, err[-3000:]
    assert "Traceback" not in err
    assert re.search(r"step 2: (loss|gradient norm) is (nan|inf)", lines[0]), lines[0]
    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FAILED"
    checkpoints = sorted(p.name for p in (tmp_path / "runs").rglob("step-*") if p.is_dir())
    assert checkpoints == ["step-00000001"], checkpoints  # the last good one, kept; nothing from the NaN step
    print(f"R6 stop measured: exit {code}; '{lines[0]}'; checkpoints kept {checkpoints}; run {run.info.status}")


@pytest.mark.timeout(300)
def test_skip_drops_the_updates_and_counts_them(tiny_spec, mlflow_uri):
    spec = tiny_spec(optimizer=HUGE_LR, nonfinite="skip")
    code, err = fotlab_run(spec)
    assert code == 0, err[-3000:]
    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, M.SKIPPED_STEPS)]
    assert history == [(2, 1.0), (3, 2.0), (4, 3.0)], history  # step 1 trained; steps 2-4 were dropped
    loss_steps = [m.step for m in client.get_metric_history(run.info.run_id, M.TRAIN_LOSS)]
    assert loss_steps == [1], loss_steps  # no NaN loss point logged
    print(f"R6 skip measured: exit {code}; {M.SKIPPED_STEPS} history {history}; train/loss points {loss_steps}")
