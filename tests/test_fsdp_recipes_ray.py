"""The LongLLaMA recipes end to end at toy size: `fotlab run experiments/longllama_*.yaml` with the documented
`--set` overrides (read from the recipes' header comments, so what is documented is what is tested) on 2 Ray Train
CPU workers with FSDP2: sharded checkpoints, an interrupted run resumed into the same MLflow run."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from test_orchestrate import client_for
from test_orchestrate_ray import interrupt_once_fitting

from fotlab import tracking
from fotlab.orchestrate import RunInterruptedError, run_experiment
from fotlab.spec import load_spec

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]


def documented_overrides(recipe: str) -> list[str]:
    """The `--set` overrides of the toy-size command in the recipe's header comment (what users copy)."""
    lines = [
        line[1:].strip()
        for line in (REPO / "experiments" / recipe).read_text().splitlines()
        if line.startswith("#   --set")
    ]
    words = shlex.split(" ".join(line.rstrip("\\") for line in lines))
    return [w for w in words if w != "--set"]


def _toy_spec(recipe: str, tmp_path: Path, uri: str, steps: int):
    overrides = documented_overrides(recipe)
    assert len(overrides) > 20 and "scaling.num_workers=2" in overrides
    return load_spec(
        REPO / "experiments" / recipe,
        [*overrides, f"train.steps={steps}", f"storage.path={tmp_path / 'runs'}", f"tracking.uri={uri}"],
    )


def _sharded_checkpoints(run_dir: Path) -> list[str]:
    root = run_dir / "output" / "checkpoints"
    return sorted(p.name for p in root.glob("step-*") if (p / "__1_0.distcp").is_file())


@pytest.mark.timeout(900)
def test_3b_recipe_toy_size_interrupted_and_resumed(ray_session, tmp_path, mlflow_uri):
    n_steps = 12  # the stop request is polled every 5 steps: it lands at step 5 or 10
    spec = _toy_spec("longllama_3b_finetune.yaml", tmp_path, mlflow_uri, n_steps)
    assert spec.scaling.strategy == "fsdp" and spec.scaling.num_workers == 2
    interrupt_once_fitting()  # the workers read the stop at their first poll (step 5), checkpoint and exit
    with pytest.raises(RunInterruptedError) as caught:
        run_experiment(spec, progress=False)
    run_id = caught.value.run_id
    client = client_for(mlflow_uri)
    stopped_at = max(m.step for m in client.get_metric_history(run_id, tracking.TRAIN_LOSS))
    assert stopped_at < n_steps

    outcome = run_experiment(spec, resume=run_id, progress=False)
    assert outcome.run_id == run_id and outcome.status == "FINISHED" and outcome.final_step == n_steps
    history = [m.step for m in client.get_metric_history(run_id, tracking.TRAIN_LOSS)]
    assert history == list(range(1, n_steps + 1))  # one continuous history, no step logged twice
    run_dir = tmp_path / "runs" / outcome.run_name
    assert f"step-{n_steps:08d}" in _sharded_checkpoints(run_dir)  # one DCP shard per worker
    from fotlab.model import FoTForCausalLM

    model = FoTForCausalLM.from_pretrained(outcome.model_dir)  # the gathered full model
    assert model.config.num_hidden_layers == 2 and model.config.mem_layers == [1]
    assert tracking.VAL_LOSS in client.get_run(run_id).data.metrics


@pytest.mark.timeout(600)
def test_7b_recipe_toy_size_runs_to_finished(ray_session, tmp_path, mlflow_uri):
    spec = _toy_spec("longllama_code_7b_finetune.yaml", tmp_path, mlflow_uri, 4)
    outcome = run_experiment(spec, progress=False)
    assert outcome.status == "FINISHED" and outcome.final_step == 4
    assert _sharded_checkpoints(tmp_path / "runs" / outcome.run_name) == ["step-00000002", "step-00000004"]
    assert (Path(outcome.model_dir) / "config.json").is_file()
