"""Shared, lazy test fixtures: one local Ray session per test session, a sqlite MLflow store, a tiny corpus.

Nothing here starts Ray unless a test asks for `ray_session`, so the fast tests stay fast.
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models run fastest single-threaded, and on a busy 2-core box two OpenMP threads per process
    contending with other work were 10-100x slower (`make test` also exports OMP_NUM_THREADS=1)."""
    import torch

    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n_threads)


TINY_SENTENCES = [
    "the quick brown fox jumps over the lazy dog. ",
    "a focused transformer keeps a memory of keys and values. ",
    "contrastive training shows the model other documents. ",
    "long documents need long contexts and a good memory. ",
    "ray schedules workers and mlflow keeps the records. ",
]
N_TINY_DOCS = 10


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray cluster (2 CPUs, dashboard for Ray Jobs) shared by every Ray test of this session.

    Started with fotlab's local defaults (no auth, no usage stats, fast Train health checks), the same
    environment `fotlab run` uses; shut down when the session ends.
    """
    import ray

    from fotlab.orchestrate.cluster import apply_env_defaults

    apply_env_defaults(local=True)
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(num_cpus=2, namespace="fotlab", log_to_driver=True)
    yield ray.get_runtime_context().gcs_address
    if started_here:
        ray.shutdown()


@pytest.fixture(scope="session")
def ray_jobs_address(ray_session):
    """The Ray Jobs (dashboard) HTTP address of the shared local cluster, e.g. http://127.0.0.1:8265."""
    import ray

    url = ray._private.worker.get_dashboard_url()  # no public getter after ray.init() returned
    assert url, "the local Ray cluster runs without a dashboard: install ray[default] (a dependency of fotlab)"
    return f"http://{url}"


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    """A fresh sqlite MLflow store in tmp_path, also exported as MLFLOW_TRACKING_URI."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """A directory of ~10 small text documents (`doc00.txt` ...), one document per file."""
    root = tmp_path_factory.mktemp("tiny-corpus")
    for i in range(N_TINY_DOCS):
        text = TINY_SENTENCES[i % len(TINY_SENTENCES)] * (4 + i % 5)
        (root / f"doc{i:02d}.txt").write_text(text)
    return root


@pytest.fixture(scope="session")
def datasets_cache(tmp_path_factory):
    """A session-wide HF datasets cache dir, so tests do not write to ~/.cache."""
    return tmp_path_factory.mktemp("datasets-cache")


def pytest_configure(config):
    # Ray and MLflow must never phone home or ask for auth in tests.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
