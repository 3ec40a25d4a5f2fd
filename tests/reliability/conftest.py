"""Helpers shared by the reliability suite: a tiny in-process run spec (num_workers 0, real loop, sqlite MLflow)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml


def write_tiny_spec(corpus: Path, tmp_path: Path, uri: str, name: str = "reliab", **train) -> Path:
    """A debug-preset spec on the tiny corpus, written to tmp_path/spec.yaml; `train` overrides train.*."""
    section = {
        "steps": 4,
        "batch_size": 2,
        "context_length": 32,
        "log_every": 1,
        "checkpoint_every": 1,
        "eval_batches": 1,
        "crossbatch": {"range": 0},
        "optimizer": {"lr": 3e-3},
    }
    section.update(train)
    spec = {
        "name": name,
        "model": {"preset": "debug"},
        "data": {
            "sources": [{"kind": "local", "path": str(corpus), "glob": "*.txt"}],
            "validation_docs": 2,
            "cache_dir": str(tmp_path / "datasets-cache"),
        },
        "train": section,
        "scaling": {"num_workers": 0},
        "storage": {"path": str(tmp_path / "runs")},
        "tracking": {"uri": uri},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture
def tiny_spec(tiny_corpus, tmp_path, mlflow_uri):
    """`tiny_spec(**train)`: write a tiny run spec into tmp_path and return its path."""

    def write(name: str = "reliab", **train) -> Path:
        return write_tiny_spec(tiny_corpus, tmp_path, mlflow_uri, name, **train)

    return write
