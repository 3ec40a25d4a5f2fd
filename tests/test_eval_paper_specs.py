"""The paper-claim specs (experiments/paper/*.yaml) load, and one runs end to end in a tiny configuration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fotlab import model_refs
from fotlab.spec import load_spec, model_overrides

PAPER = Path(__file__).resolve().parents[1] / "experiments" / "paper"


def _window(spec) -> int:
    """The window W the run will use: its preset with the spec's overrides; for `init_from: models:/NAME/...` the
    window of the paper spec that registers NAME (unless the spec overrides it)."""
    from fotlab.model import preset_config

    init_from = spec.model.init_from
    if init_from is None:
        return preset_config(spec.model.preset or "debug", **model_overrides(spec)).max_position_embeddings
    assert init_from.startswith("models:/"), init_from
    name = init_from.split("/")[1]
    stage1 = [s for s in map(load_spec, sorted(PAPER.glob("*.yaml"))) if s.tracking.register_model == name]
    assert len(stage1) == 1, f"no single paper spec registers {name!r}"
    return spec.model.max_position_embeddings or _window(stage1[0])


@pytest.mark.parametrize("path", sorted(PAPER.glob("*.yaml")), ids=lambda p: p.name)
def test_paper_spec_loads_and_has_evaluations(path):
    spec = load_spec(path)
    assert spec.eval.selected(), f"{path.name} runs no evaluation"
    assert spec.train.context_length <= _window(spec)


def test_every_claim_has_a_spec():
    names = {p.stem for p in PAPER.glob("*.yaml")}
    assert {
        "lm_fot",
        "lm_baseline",
        "retrieval_fot",
        "retrieval_baseline",
        "dictionary_lookup",
        "dictionary_lookup_baseline",
        "passkey",
        "passkey_finetune",
    } <= names


@pytest.mark.slow
def test_reproduce_dictionary_spec_smoke(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from fotlab.orchestrate.reproduce import reproduce

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    overrides = [
        "train.steps=2",
        "train.log_every=1",
        "data.sources.0.n_docs=40",
        "data.validation_docs=2",
        "eval.dictionary_lookup.memory_sizes=[16,64]",
        "eval.dictionary_lookup.n_samples=1",
        f"tracking.artifact_root={tmp_path / 'artifacts'}",
    ]
    summary = reproduce(str(PAPER / "dictionary_lookup.yaml"), overrides, output_dir=tmp_path / "run", threads=1)
    assert set(summary["metrics"]) >= {"eval/dict_lookup_acc/mem_16", "eval/dict_lookup_acc/mem_64"}
    run = MlflowClient(uri).get_run(summary["run_id"])
    assert run.info.status == "FINISHED" and "train/loss" in run.data.metrics
    assert "eval/dict_lookup_acc/mem_64" in run.data.metrics
    logged = model_refs.download_model(f"runs:/{summary['run_id']}", uri, tmp_path / "logged")  # the MLflow Model
    assert {"config.json", "model.safetensors"} <= {p.name for p in logged.iterdir()}
    assert summary["metrics"]["eval/dict_lookup_acc/mem_64"] == run.data.metrics["eval/dict_lookup_acc/mem_64"]
    assert (Path(summary["model_dir"]) / "config.json").is_file()


@pytest.mark.slow
def test_reproduce_retrieval_spec_smoke(tmp_path, monkeypatch):
    """The retrieval spec end to end on a few steps: repeat-source training data, repeat-source evaluation
    documents (single- and multi-doc perplexity) and r_d, all in one MLflow run."""
    from mlflow import MlflowClient

    from fotlab.orchestrate.reproduce import reproduce

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    overrides = [
        "train.steps=2",
        "train.log_every=1",
        "train.eval_every=0",
        "data.sources.0.n_docs=60",
        "data.validation_docs=4",
        "data.cache_dir=" + str(tmp_path / "cache"),
        "eval.perplexity.0.source.max_docs=1",
        "eval.perplexity.0.source.doc_len=1024",
        "eval.perplexity.0.memory_sizes=[0,256]",
        "eval.perplexity.1.source.max_docs=2",
        "eval.perplexity.1.source.doc_len=512",
        "eval.perplexity.1.memory_sizes=[0,256]",
        "eval.perplexity.2.source.max_docs=1",
        "eval.perplexity.2.memory_sizes=[0,256]",
        "eval.perplexity.2.max_stream_tokens=1024",
        "eval.distraction.n_contexts=[1,2]",
        "eval.distraction.n_samples=2",
        f"tracking.artifact_root={tmp_path / 'artifacts'}",
    ]
    summary = reproduce(str(PAPER / "retrieval_fot.yaml"), overrides, output_dir=tmp_path / "run", threads=1)
    expected = {
        "eval/ppl_repeats_single_doc/mem_0",
        "eval/ppl_repeats_single_doc/mem_256",
        "eval/ppl_repeats_multi_doc/mem_256",
        "eval/distraction_ratio/d_2",
        "eval/ppl_natural_single_doc/mem_256",
    }
    assert expected <= set(summary["metrics"])
    run = MlflowClient(uri).get_run(summary["run_id"])
    assert run.info.status == "FINISHED" and expected <= set(run.data.metrics)

    # stage 2 (claim d): passkey_finetune starts from the model stage 1 registered (models:/.../latest)
    (version,) = MlflowClient(uri).search_model_versions("name='paper_retrieval_fot'")
    assert version.run_id == summary["run_id"]
    stage2 = [
        "train.steps=2",
        "train.log_every=1",
        "train.eval_every=0",
        "data.sources.0.n_docs=40",
        "data.sources.1.n_docs=40",
        "data.validation_docs=4",
        "data.cache_dir=" + str(tmp_path / "cache"),
        "eval.passkey.lengths=[320]",
        "eval.passkey.depths=[0.5]",
        "eval.passkey.n_trials=1",
        f"tracking.artifact_root={tmp_path / 'artifacts'}",
    ]
    finetuned = reproduce(str(PAPER / "passkey_finetune.yaml"), stage2, output_dir=tmp_path / "run2", threads=1)
    run2 = MlflowClient(uri).get_run(finetuned["run_id"])
    assert run2.info.status == "FINISHED" and "eval/passkey_acc/len_320" in run2.data.metrics
    assert run2.data.params["model.init_from"] == "models:/paper_retrieval_fot/latest"  # logged as written
    (started_from,) = (tmp_path / "run2" / "init_from").rglob("config.json")  # the registered version, downloaded
    assert started_from.read_text() == (Path(summary["model_dir"]) / "config.json").read_text()

    # evaluation only (passkey_zeroshot): the stage-1 model named by its run, no training, one finished run
    zero_shot = [
        "eval.passkey.lengths=[320]",
        "eval.passkey.depths=[0.5]",
        "eval.passkey.n_trials=2",
        f"tracking.artifact_root={tmp_path / 'artifacts'}",
    ]
    evaluated = reproduce(
        str(PAPER / "passkey_zeroshot.yaml"),
        zero_shot,
        output_dir=tmp_path / "run3",
        threads=1,
        model_dir=f"runs:/{summary['run_id']}",
    )
    run3 = MlflowClient(uri).get_run(evaluated["run_id"])
    assert run3.info.status == "FINISHED" and run3.data.metrics["eval/passkey_acc_n/len_320"] == 2
    assert not any(k.startswith("train/") for k in run3.data.metrics)  # nothing was trained
    (evaluated_config,) = (tmp_path / "run3" / "evaluated_model").rglob("config.json")
    assert evaluated_config.read_text() == started_from.read_text()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_reproduce_killed_by_sigterm_closes_its_run_as_killed(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    cmd = [
        sys.executable,
        "-m",
        "fotlab.orchestrate.reproduce",
        str(PAPER / "retrieval_fot.yaml"),
        "--threads",
        "1",
        "--set",
        "train.steps=100000",
        "--set",
        "train.log_every=1",
        "--set",
        "data.sources.0.n_docs=60",
        "--set",
        "data.validation_docs=4",
        "--set",
        f"data.cache_dir={tmp_path / 'cache'}",
        "--set",
        f"tracking.artifact_root={tmp_path / 'artifacts'}",
    ]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    for line in proc.stderr:  # training has started once a step is logged
        if line.startswith("step "):
            break
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    proc.stderr.read()
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    (run,) = MlflowClient(uri).search_runs(
        MlflowClient(uri).get_experiment_by_name("paper_retrieval_fot").experiment_id
    )
    assert run.info.status == "KILLED" and run.data.tags["fotlab.error"].startswith("Terminated")


@pytest.mark.slow
def test_reproduce_with_a_missing_stage1_model_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    from fotlab.orchestrate.reproduce import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    code = main([str(PAPER / "passkey_finetune.yaml"), "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err  # (MLflow's own INFO lines about creating the store come first)
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith("reproduce: model.init_from: models:/paper_retrieval_fot/latest: cannot download")
    )


def test_paper_baselines_stand_side_by_side():
    """Each FoT retrieval spec has the standard transformer (no crossbatch) and the paper's d = 1 (previous context
    only, positives only) beside it, identical except for the crossbatch settings (and the stage-1 model)."""
    from fotlab.model.crossbatch import CrossBatch
    from fotlab.train.crossbatch_schedule import context_mixture

    for fot, standard, d1 in [
        ("retrieval_fot", "retrieval_baseline", "retrieval_d1"),
        ("passkey_finetune", "passkey_finetune_baseline", "passkey_finetune_d1"),
        ("dictionary_finetune", "dictionary_finetune_baseline", "dictionary_finetune_d1"),
    ]:
        specs = {name: load_spec(PAPER / f"{name}.yaml") for name in (fot, standard, d1)}
        assert specs[standard].train.crossbatch.range == 0
        cb = specs[d1].train.crossbatch
        mixture = context_mixture(specs[d1].train.batch_size, CrossBatch(cb.range, cb.packing, cb.stepping))
        assert set(mixture) == {(1, 0, 0), (2, 1, 0)}  # positives only, never a negative (without doc switches)
        strip = {"name", "description", "model", "train", "tracking"}
        dumps = [specs[n].model_dump(exclude=strip) for n in (fot, standard, d1)]
        assert dumps[0] == dumps[1] == dumps[2]
        trains = [specs[n].train.model_dump(exclude={"crossbatch"}) for n in (fot, standard, d1)]
        assert trains[0] == trains[1] == trains[2]


def test_few_shot_spec_has_a_shipped_labelled_set_made_by_its_generator():
    from fotlab.data.word_classes import word_class_examples
    from fotlab.eval.few_shot import split_examples

    spec = load_spec(PAPER / "few_shot_icl.yaml")
    (cfg,) = spec.eval.few_shot
    shipped = [json.loads(line) for line in (PAPER / "data" / "word_classes.jsonl").read_text().splitlines()]
    assert shipped == word_class_examples() and len(shipped) == 240
    cfg.source.path = str(PAPER / "data" / "word_classes.jsonl")  # independent of the working directory
    queries, demos = split_examples(cfg, spec.eval.split)
    assert len(queries) >= 20 and len({label for _, label in demos}) == 8
    assert not {t for t, _ in queries} & {t for t, _ in demos}


def test_passkey_specs_score_100_prompts_per_length():
    for name in ("passkey_finetune", "passkey_finetune_baseline", "passkey_finetune_d1", "passkey_zeroshot"):
        p = load_spec(PAPER / f"{name}.yaml").eval.passkey
        assert p.n_trials * len(p.depths) >= 100, name
