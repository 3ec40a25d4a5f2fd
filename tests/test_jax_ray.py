"""The JAX path through Ray Train: `run_experiment` with train.framework jax on a local cluster (JaxTrainer, one
CPU worker) to a FINISHED MLflow run with the PyTorch run layout; and the TPU scheduling path with fake TPU
resources (use_tpu, topology 2x4, TPU-V6E; JAX_PLATFORMS=cpu) on a separate cluster in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_orchestrate import assert_tracked_run, client_for, tiny_spec_dict

from fotlab.orchestrate import run_experiment
from fotlab.spec import parse_spec

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.mark.timeout(600)
def test_jax_run_on_local_ray_cluster_is_tracked(ray_session, tiny_corpus, tmp_path, mlflow_uri):
    spec = parse_spec(tiny_spec_dict(tiny_corpus, tmp_path, mlflow_uri, num_workers=1, framework="jax"))
    outcome = run_experiment(spec, progress=False, report_every=2)
    assert outcome.status == "FINISHED" and outcome.final_step == 4
    assert_tracked_run(mlflow_uri, outcome, n_steps=4)  # params, step metrics, spec, loadable model, val loss
    run = client_for(mlflow_uri).get_run(outcome.run_id)
    assert run.data.params["train.framework"] == "jax"
    checkpoints = sorted(p.name for p in (tmp_path / "runs").glob("*/output/checkpoints/step_*"))
    assert checkpoints == ["step_00000002", "step_00000004"]  # orbax, in the workers' output folder
    assert outcome.checkpoint is not None and outcome.checkpoint.endswith("step_00000004")


@pytest.mark.timeout(600)
def test_fake_tpu_scheduling_path(tiny_corpus, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    script = Path(__file__).with_name("jax_fake_tpu_run.py")
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path), str(tiny_corpus), uri], capture_output=True, text=True, timeout=540
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    outcome = json.loads(proc.stdout.strip().splitlines()[-1])
    assert outcome["status"] == "FINISHED" and outcome["final_step"] == 2
    run = client_for(uri).get_run(outcome["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["scaling.use_tpu"] == "True" and run.data.params["scaling.topology"] == "2x4"
    assert "val/loss" in run.data.metrics
