"""The paper-claim specs (experiments/paper/*.yaml) load, and one runs end to end in a tiny configuration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fotlab.spec import load_spec

PAPER = Path(__file__).resolve().parents[1] / "experiments" / "paper"


@pytest.mark.parametrize("path", sorted(PAPER.glob("*.yaml")), ids=lambda p: p.name)
def test_paper_spec_loads_and_has_evaluations(path):
    spec = load_spec(path)
    assert spec.eval.selected(), f"{path.name} runs no evaluation"
    assert spec.train.context_length <= (spec.model.max_position_embeddings or 10**9)


def test_every_claim_has_a_spec():
    names = {p.stem for p in PAPER.glob("*.yaml")}
    assert {"lm_fot", "lm_baseline", "dictionary_lookup", "passkey"} <= names


@pytest.mark.slow
def test_reproduce_dictionary_spec_smoke(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from fotlab.eval.reproduce import reproduce

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    overrides = ["train.steps=2", "train.log_every=1", "data.sources.0.n_docs=40", "data.validation_docs=2",
                 "eval.dictionary_lookup.memory_sizes=[16,64]", "eval.dictionary_lookup.n_samples=1",
                 f"tracking.artifact_root={tmp_path / 'artifacts'}"]
    summary = reproduce(str(PAPER / "dictionary_lookup.yaml"), overrides, output_dir=tmp_path / "run", threads=1)
    assert set(summary["metrics"]) >= {"eval/dict_lookup_acc/mem_16", "eval/dict_lookup_acc/mem_64"}
    run = MlflowClient(uri).get_run(summary["run_id"])
    assert run.info.status == "FINISHED" and "train/loss" in run.data.metrics
    assert "eval/dict_lookup_acc/mem_64" in run.data.metrics
    json.dumps(summary, default=str)
