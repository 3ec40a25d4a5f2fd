"""The MLflow UI in a real browser (headless Chromium): a fotlab run opens in the model-training view with its
metric charts, its model and its data.

`fotlab ui` (a real `mlflow server`) serves a sqlite store holding a run logged through fotlab.tracking; Chromium
renders the single-page app (`--dump-dom` after the page's scripts ran) and the test reads the rendered text.
Needs Debian's `chromium` (`.ci/run` installs it).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from fotlab import tracking
from fotlab.data import byte_tokenizer
from fotlab.data.lineage import DatasetRecord
from fotlab.model import FoTForCausalLM, preset_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# The flags this machine needs for a headless run as root with no network beyond loopback.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """A run as `fotlab run` leaves it: metrics over steps, evaluation metrics, datasets, an MLflow Model."""
    root = tmp_path_factory.mktemp("ui")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    model_dir = root / "model"
    FoTForCausalLM(preset_config("debug", vocab_size=len(tokenizer))).save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    run = tracking.start_run(uri, tracking.setup_experiment(uri, "ui-check"), run_name="browser-run")
    for step in range(1, 11):
        run.log_metrics({tracking.TRAIN_LOSS: 3.0 / step, tracking.LR: 1e-3}, step=step)
    run.log_metrics({tracking.VAL_LOSS: 1.25, "eval/ppl_single_doc/mem_0": 7.5}, step=10)
    run.log_datasets([DatasetRecord("ui-check-train", "[]", "0123456789abcdef", "training", 8, 4096)])
    run.log_model_dir(model_dir, step=10)
    run.finish()
    return root, uri, run


def render(url: str, out: Path) -> str:
    """The page's visible text after its scripts ran (virtual time lets the app fetch and draw), one ' | ' per
    text node."""
    import html
    import re

    result = subprocess.run(
        [
            CHROMIUM,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={out / 'profile'}",
            "--virtual-time-budget=30000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    dom = re.sub(r"<script.*?</script>|<style.*?</style>", "", result.stdout, flags=re.S)
    return " | ".join(t.strip() for t in html.unescape(re.sub(r"<[^>]+>", "\n", dom)).split("\n") if t.strip())


def start_ui(uri: str, log: Path) -> tuple[subprocess.Popen, str]:
    """`fotlab ui` on a free port; (the process, the newest-run link it printed) once it answers."""
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    ui = subprocess.Popen(
        [str(Path(sys.executable).with_name("fotlab")), "ui", "--port", str(port)],
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while True:
        assert ui.poll() is None, log.read_text()[-2000:]
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "fotlab ui did not answer within 120 s"
            time.sleep(0.5)
    (link,) = [line.split(": ", 1)[1] for line in log.read_text().splitlines() if line.startswith("newest run: ")]
    return ui, link


GENAI_NAV = ("Sessions", "Judges", "Evaluation runs", "Playground")  # sidebar entries of MLflow's GenAI view


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_run_opens_in_the_training_view_with_charts_model_and_data(logged_run, tmp_path):
    root, uri, run = logged_run
    ui, link = start_ui(uri, tmp_path / "ui.log")
    try:
        base = link.split("/#/")[0]
        assert link == tracking.ui_link(base, run.experiment_id, run.run_id)
        runs = render(tracking.ui_link(base, run.experiment_id), tmp_path)
        assert "Model registry" in runs and not [n for n in GENAI_NAV if f"| {n} |" in runs]  # training view
        assert "browser-run" in runs and "ui-check-train (0123456789abcdef)" in runs  # the run and its data
        page = render(link, tmp_path)
        assert "Logged models (1)" in page and "| model | Ready |" in page  # the MLflow Model, READY
        assert "| val/loss | 1.25 | model |" in page  # final metrics linked to the model
        assert "| ui-check-train (0123456789abcdef) | training |" in page
        charts = render(link.replace("?", "/model-metrics?"), tmp_path)
        assert "| train | (2) |" in charts and "| val | (1) |" in charts  # a chart per metric, grouped
        assert "| eval/ppl_single_doc | (1) |" in charts  # the evaluation's metric gets its own chart section
    finally:
        os.killpg(ui.pid, 15)
        ui.wait(30)
