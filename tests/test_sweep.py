"""Sweep pieces that need no Ray cluster: spec validation errors, the search space Tune gets, concurrency,
the early-stopping guard for nested trainers, the leaderboard and the exported best spec."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fotlab.errors import SpecError
from fotlab.orchestrate import sweep_space
from fotlab.spec import load_spec, load_sweep, parse_spec, trial_spec

REPO = Path(__file__).resolve().parents[1]


def write_sweep(tmp_path: Path, corpus: Path, **changes) -> Path:
    """A valid sweep over a debug-preset base spec (both files in tmp_path); `changes` replace sweep keys."""
    base = {
        "name": "sweep-base",
        "model": {"preset": "debug"},
        "data": {"sources": [{"kind": "local", "path": str(corpus), "glob": "*.txt"}], "validation_docs": 2},
        "train": {
            "steps": 8,
            "batch_size": 4,
            "context_length": 32,
            "log_every": 2,
            "eval_every": 2,
            "checkpoint_every": 4,
            "eval_batches": 1,
            "crossbatch": {"range": 1, "packing": 2},
        },
        "scaling": {"num_workers": 1},
        "storage": {"path": str(tmp_path / "runs")},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "log_model": False},
    }
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    sweep = {
        "name": "tiny-sweep",
        "base": "base.yaml",
        "search_space": {
            "train.optimizer.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
            "memory.layers": {"type": "choice", "values": [[0], [1], [0, 1]]},
            "train.context_length": {"type": "choice", "values": [16, 32]},
        },
        "num_samples": 4,
    }
    sweep.update(changes)
    sweep = {key: value for key, value in sweep.items() if value is not None}  # None: leave the key out
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


@pytest.mark.parametrize(
    "changes, words",
    [
        (
            {"search_space": {"train.optimizer.lr": {"type": "loguniform", "low": 0, "high": 1}}},
            ["search_space", "train.optimizer.lr", "low"],
        ),
        (
            {"search_space": {"memory.layers": {"type": "grid", "values": [[0], [1]]}}},
            ["search_space.memory.layers", "grid"],
        ),
        (
            {"search_space": {"memory.layers": {"type": "choice", "values": [[0], "nope"]}}},
            ["search_space.memory.layers", "nope"],
        ),
        (
            {"search_space": {"train.no_such_field": {"type": "choice", "values": [1]}}},
            ["search_space.train.no_such_field"],
        ),
        ({"search_space": {"train.steps": {"type": "int", "low": 0, "high": 4}}}, ["search_space.train.steps"]),
        ({"scheduler": {"name": "hyperband"}}, ["scheduler.name"]),
        ({"max_concurrent_trials": 0}, ["max_concurrent_trials"]),
    ],
)
def test_sweep_spec_errors_name_the_field(tmp_path, tiny_corpus, changes, words):
    with pytest.raises(SpecError) as caught:
        load_sweep(write_sweep(tmp_path, tiny_corpus, **changes))
    message = str(caught.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_param_space_maps_each_type_to_tune_and_back(tmp_path, tiny_corpus):
    from ray.tune.search.sample import Categorical, Float, Integer

    sweep = load_sweep(
        write_sweep(
            tmp_path,
            tiny_corpus,
            search_space={
                "memory.layers": {"type": "choice", "values": [[0], [0, 1]]},
                "train.crossbatch.range": {"type": "grid", "values": [0, 1]},
                "train.optimizer.lr": {"type": "uniform", "low": 1e-3, "high": 2e-3},
                "train.grad_accum": {"type": "int", "low": 1, "high": 2},
            },
            search="random",
        )
    )
    space, decode = sweep_space.param_space(sweep)
    assert isinstance(space["memory.layers"], Categorical)
    assert space["memory.layers"].categories == ["[0]", "[0, 1]"]  # Optuna takes scalars only: labels
    assert space["train.crossbatch.range"] == {"grid_search": [0, 1]}
    assert isinstance(space["train.optimizer.lr"], Float)
    integer = space["train.grad_accum"]
    assert isinstance(integer, Integer) and (integer.lower, integer.upper) == (1, 3)  # upper bound inclusive
    config = {
        "memory.layers": "[0, 1]",
        "train.crossbatch.range": 1,
        "train.optimizer.lr": 1.5e-3,
        "train.grad_accum": 2,
    }
    params = sweep_space.decode_params(config, sweep.search_space, decode)
    assert params["memory.layers"] == [0, 1]
    spec = trial_spec(sweep, params)
    assert spec.memory.layers == [0, 1] and spec.train.crossbatch.range == 1 and spec.train.grad_accum == 2
    assert sweep_space.search_algorithm(sweep, 2).__class__.__name__ == "BasicVariantGenerator"


def test_grid_search_runs_every_combination_once_unless_told(tmp_path, tiny_corpus):
    from fotlab.orchestrate.sweep import n_trials

    grid = {
        "memory.layers": {"type": "choice", "values": [[0], [1], [0, 1]]},
        "train.crossbatch.range": {"type": "grid", "values": [0, 1]},
    }
    sweep = load_sweep(write_sweep(tmp_path, tiny_corpus, search_space=grid, search="grid", num_samples=None))
    space, _ = sweep_space.param_space(sweep)
    assert space["memory.layers"] == {"grid_search": ["[0]", "[1]", "[0, 1]"]}
    assert sweep_space.num_samples(sweep) == 1 and n_trials(sweep) == 6
    repeated = load_sweep(write_sweep(tmp_path, tiny_corpus, search_space=grid, search="grid", num_samples=2))
    assert n_trials(repeated) == 12


def _suggestions(sweep, n: int = 4) -> list[dict]:
    """The first n configurations the sweep's searcher suggests (before any result is reported)."""
    space, _ = sweep_space.param_space(sweep)
    searcher = sweep_space.search_algorithm(sweep, 1)
    assert searcher.set_search_properties(None, None, space)
    return [searcher.suggest(f"trial-{i}") for i in range(n)]


def test_optuna_search_is_seeded_tpe(tmp_path, tiny_corpus):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    sweep = load_sweep(write_sweep(tmp_path, tiny_corpus, seed=7))
    searcher = sweep_space.search_algorithm(sweep, 1)
    assert isinstance(searcher, OptunaSearch) and isinstance(searcher._sampler, optuna.samplers.TPESampler)
    assert searcher.metric == "val/loss" and searcher.mode == "min"
    first = _suggestions(sweep)
    assert _suggestions(load_sweep(write_sweep(tmp_path, tiny_corpus, seed=7))) == first  # the seed fixes them
    assert _suggestions(load_sweep(write_sweep(tmp_path, tiny_corpus, seed=8))) != first
    assert len({json.dumps(c, sort_keys=True) for c in first}) > 1  # they do vary within a sweep


def test_concurrency_follows_cluster_resources_and_trial_workers(tmp_path, tiny_corpus):
    sweep = load_sweep(write_sweep(tmp_path, tiny_corpus))
    cpu_trial = sweep_space.TrialResources(n_workers=1, cpus_per_worker=2, gpus_per_worker=0)
    gpu_trial = sweep_space.TrialResources(n_workers=2, cpus_per_worker=1, gpus_per_worker=1)
    assert sweep_space.max_concurrency(sweep, cpu_trial, {"CPU": 8}, n_trials=10) == 4
    assert sweep_space.max_concurrency(sweep, cpu_trial, {"CPU": 8}, n_trials=3) == 3
    assert sweep_space.max_concurrency(sweep, gpu_trial, {"CPU": 64, "GPU": 8}, n_trials=10) == 4
    assert sweep_space.max_concurrency(sweep, cpu_trial, {"CPU": 1}, n_trials=10) == 1  # never 0
    capped = load_sweep(write_sweep(tmp_path, tiny_corpus, max_concurrent_trials=2))
    assert sweep_space.max_concurrency(capped, cpu_trial, {"CPU": 8}, n_trials=10) == 2
    spec = load_spec(tmp_path / "base.yaml", ["scaling.num_workers=4", "scaling.use_gpu=true"])
    resources = sweep_space.trial_resources(spec)
    assert resources.nested and resources.total() == {"CPU": 4.0, "GPU": 4.0}
    assert resources.trainable()["CPU"] < 0.1  # the nested trainer's workers hold the resources
    sweep_space.check_fits(resources, {"CPU": 8, "GPU": 4})
    with pytest.raises(sweep_space.SweepSetupError, match="needs 4 GPU .* cluster has 2"):
        sweep_space.check_fits(resources, {"CPU": 8, "GPU": 2})


def test_early_stopping_is_refused_for_nested_trainers(tmp_path, tiny_corpus):
    sweep = load_sweep(write_sweep(tmp_path, tiny_corpus, scheduler={"name": "asha"}))
    nested = sweep_space.TrialResources(n_workers=2, cpus_per_worker=1, gpus_per_worker=0)
    with pytest.raises(sweep_space.SweepSetupError, match="scheduler.name.*placement group"):
        sweep_space.check_stopping(sweep, nested)
    sweep_space.check_stopping(sweep, sweep_space.TrialResources(1, 1, 0))  # single worker: fine
    fifo = load_sweep(write_sweep(tmp_path, tiny_corpus, scheduler={"name": "none"}))
    sweep_space.check_stopping(fifo, nested)


def test_asha_counts_grace_in_reports_of_the_metric(tmp_path, tiny_corpus):
    sweep = load_sweep(
        write_sweep(tmp_path, tiny_corpus, scheduler={"name": "asha", "grace_period": 2, "reduction_factor": 2})
    )
    base = trial_spec(sweep, {})
    scheduler = sweep_space.scheduler(sweep, base, max_steps=base.train.steps)
    assert scheduler._time_attr == "step" and scheduler.metric == "val/loss"
    milestones = sorted(m for m, _ in scheduler._brackets[0]._rungs)
    assert milestones[0] == 4  # grace 2 reports x eval_every 2 = step 4
    no_eval = trial_spec(sweep, {}).model_copy(update={"train": base.train.model_copy(update={"eval_every": 0})})
    with pytest.raises(sweep_space.SweepSetupError, match="eval_every"):
        sweep_space.scheduler(sweep, no_eval, max_steps=8)


def test_leaderboard_and_best_spec_export(tmp_path, tiny_corpus):
    from fotlab.orchestrate import sweep_report

    sweep = load_sweep(write_sweep(tmp_path, tiny_corpus))
    rows = [
        {
            "trial_id": "a",
            "run_id": "r1",
            "status": "STOPPED EARLY",
            "step": 2,
            "train.optimizer.lr": 1e-4,
            "memory.layers": [0],
            "train.context_length": 16,
            "val/loss": 2.0,
        },
        {
            "trial_id": "b",
            "run_id": "r2",
            "status": "COMPLETED",
            "step": 8,
            "train.optimizer.lr": 3e-3,
            "memory.layers": [0, 1],
            "train.context_length": 32,
            "val/loss": 2.5,
        },
        {
            "trial_id": "c",
            "run_id": "r3",
            "status": "ERROR",
            "step": 0,
            "train.optimizer.lr": 1e-3,
            "memory.layers": [1],
            "train.context_length": 16,
            "val/loss": None,
        },
    ]
    best = sweep_report.best_row(rows, "val/loss")
    assert best["trial_id"] == "b"  # completed trials beat one that was stopped early
    csv_path = sweep_report.write_leaderboard(rows, tmp_path)
    assert "[0, 1]" in csv_path.read_text()
    plots = sweep_report.write_plots(rows, sweep, tmp_path / "plots")
    assert {p.name for p in plots} >= {"parallel_coordinates.png", "val_loss vs memory.layers.png"}
    assert all(p.stat().st_size > 1000 for p in plots)
    params = {key: best[key] for key in sweep.search_space}
    path = sweep_report.export_best_spec(sweep, params, best, tmp_path / "best.yaml")
    spec = load_spec(path)  # what `fotlab run best.yaml` does first
    assert spec.memory.layers == [0, 1] and spec.train.optimizer.lr == pytest.approx(3e-3)
    assert spec.train.context_length == 32 and spec.model.preset == "debug"
    assert parse_spec(yaml.safe_load(path.read_text())) == spec


def test_shipped_sweeps_validate():
    paths = sorted((REPO / "experiments" / "sweeps").glob("*.yaml"))
    assert len(paths) >= 2
    for path in paths:
        sweep = load_sweep(path, check_paths=False)
        assert sweep.scheduler.name == "asha" and sweep.num_samples >= 4
        assert {"memory.layers", "train.crossbatch.range", "train.context_length"} <= set(sweep.search_space)


def test_a_sweep_trials_trainer_carries_the_scaling_storage_and_failure_of_its_spec(tmp_path, tiny_corpus):
    """Runs and multi-worker sweep trials build their Ray trainer in one place (`trainer.build_trainer`): a trial
    gets every `scaling` (TPU slice, accelerator, resources), `storage.filesystem` and `failure` field of its spec,
    exactly as `fotlab run` would."""
    from pyarrow.fs import LocalFileSystem

    from fotlab import tracking
    from fotlab.orchestrate.run_record import RunRecord
    from fotlab.orchestrate.runner import trainer_for
    from fotlab.orchestrate.sweep_trial import TrialContext, spec_for, trial_trainer
    from fotlab.orchestrate.trainer import WorkerConfig
    from fotlab.orchestrate.worker import train_worker

    path = write_sweep(
        tmp_path,
        tiny_corpus,
        set=[
            "scaling.num_workers=4",
            "scaling.use_tpu=true",
            "train.framework=jax",  # TPU training runs the JAX path
            "scaling.topology=2x2",
            "scaling.accelerator_type=TPU-V6E",
            "scaling.resources_per_worker={TPU: 1}",
            "storage.filesystem=local",
            "failure.max_failures=3",
        ],
    )
    sweep = load_sweep(path)
    resources = sweep_space.trial_resources(trial_spec(sweep, {}, check_paths=False))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    context = TrialContext(sweep, {}, uri, "exp", "parent-1", str(tmp_path / "sweep"), resources)
    spec = spec_for(context, {"train.optimizer.lr": 1e-3})
    run = tracking.TrackedRun(uri, "trial-run-1", "0")
    trial = trial_trainer(spec, context, run, tmp_path / "sweep" / "outputs" / "t1", "t1")
    record = RunRecord(run=run, run_name="r", ray_run_name="r-1", storage_path=str(tmp_path / "runs"))
    single = trainer_for(spec, record, None, report_every=10)
    for trainer in (trial, single):
        scaling, run_config = trainer.scaling_config, trainer.run_config
        assert (scaling.num_workers, scaling.use_tpu, scaling.topology, scaling.accelerator_type) == (
            4,
            True,
            "2x2",
            "TPU-V6E",
        )
        assert scaling.resources_per_worker == {"TPU": 1.0}
        assert isinstance(run_config.storage_filesystem, LocalFileSystem)
        assert run_config.failure_config.max_failures == 3
        assert trainer.train_loop_per_worker.func is train_worker
        assert isinstance(trainer.train_loop_per_worker.args[0], WorkerConfig)
    config = trial.train_loop_per_worker.args[0]
    assert config.spec == spec and config.run_id == "trial-run-1"
    assert config.output_dir == str(tmp_path / "sweep" / "outputs" / "t1")  # a restored trial resumes from here
    assert trial.run_config.name == "train-t1" and trial.run_config.storage_path == str(tmp_path / "sweep" / "nested")
