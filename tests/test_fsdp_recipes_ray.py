"""The LongLLaMA recipes end to end at toy size: `fotlab run experiments/longllama_*.yaml` with the documented
`--set` overrides (TOY_OVERRIDES, the same list the recipes' header comments and the README give) on 2 Ray Train
CPU workers with FSDP2: sharded checkpoints, an interrupted run resumed into the same MLflow run."""

from __future__ import annotations

from pathlib import Path

import pytest

from fotlab import tracking
from fotlab.orchestrate import RunInterruptedError, run_experiment
from fotlab.spec import load_spec

from test_orchestrate import client_for, interrupt_after_first_checkpoint

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
# Keep in sync with the header comments of experiments/longllama_*.yaml and README.md ("LongLLaMA recipes").
TOY_OVERRIDES = [
    "model.init_from=null", "model.preset=debug", "model.max_position_embeddings=64",
    "memory.layers=[1]", "memory.last_context_length=32",
    "data.tokenizer={kind: byte}", "data.sources=[{kind: embedded, max_docs: 80}]", "data.validation_docs=4",
    "train.context_length=32", "train.grad_accum=1", "train.steps=6", "train.log_every=1", "train.eval_every=3",
    "train.eval_batches=1", "train.checkpoint_every=2", "train.precision=fp32",
    "eval.perplexity.0.memory_sizes=[0, 64]", "eval.passkey.lengths=[64]", "eval.passkey.n_trials=1",
    "scaling.num_workers=2", "scaling.use_gpu=false", "storage.filesystem=null",
]


def _toy_spec(recipe: str, tmp_path: Path, uri: str, steps: int):
    return load_spec(REPO / "experiments" / recipe, [
        *TOY_OVERRIDES, f"train.steps={steps}", f"storage.path={tmp_path / 'runs'}", f"tracking.uri={uri}"])


def _sharded_checkpoints(run_dir: Path) -> list[str]:
    root = run_dir / "output" / "checkpoints"
    return sorted(p.name for p in root.glob("step-*") if (p / "__1_0.distcp").is_file())


@pytest.mark.timeout(900)
def test_3b_recipe_toy_size_interrupted_and_resumed(ray_session, tmp_path, mlflow_uri):
    n_steps = 12  # the stop request is polled every 5 steps: it lands at step 5 or 10
    spec = _toy_spec("longllama_3b_finetune.yaml", tmp_path, mlflow_uri, n_steps)
    assert spec.scaling.strategy == "fsdp" and spec.scaling.num_workers == 2
    interrupt_after_first_checkpoint(tmp_path / "runs")
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
