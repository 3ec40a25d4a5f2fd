"""The `fotlab` command: one-line user errors through the real console script, validate/schema, runs browsing
on a real MLflow sqlite store, and the UI server bound to localhost."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from fotlab import cli

REPO = Path(__file__).resolve().parents[1]


def fotlab_cmd() -> list[str]:
    """The installed console script (falls back to `python -m fotlab.cli`)."""
    script = Path(sys.executable).parent / "fotlab"
    if script.exists():
        return [str(script)]
    found = shutil.which("fotlab")
    return [found] if found else [sys.executable, "-m", "fotlab.cli"]


def run_fotlab(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([*fotlab_cmd(), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def _write(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


BAD_SPECS = {
    "unknown_key.yaml": ({"name": "x", "train": {"stesp": 3}}, "train.stesp", "unknown key"),
    "wrong_type.yaml": ({"name": "x", "train": {"batch_size": "eight"}}, "train.batch_size", "integer"),
    "mem_layer.yaml": (
        {"name": "x", "model": {"preset": "tiny"}, "memory": {"layers": [4]}},
        "memory.layers[0]",
        "4 layers",
    ),
    "crossbatch.yaml": (
        {"name": "x", "train": {"batch_size": 4, "crossbatch": {"range": 5}}},
        "train.crossbatch.range",
        "< train.batch_size",
    ),
    "missing_data.yaml": (
        {"name": "x", "data": {"sources": [{"kind": "local", "path": "no/such/dir"}]}},
        "data.sources[0].path",
        "does not exist",
    ),
}


@pytest.mark.slow
def test_validate_reports_one_line_per_bad_spec(tmp_path):
    paths = [_write(tmp_path / name, data) for name, (data, _, _) in BAD_SPECS.items()]
    good = REPO / "experiments" / "quickstart.yaml"
    proc = run_fotlab("validate", str(good), *map(str, paths), cwd=tmp_path)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == len(BAD_SPECS), proc.stderr
    for line, (name, (_, field, words)) in zip(lines, BAD_SPECS.items()):
        assert name in line and f": {field}: " in line and words in line, line
    assert f"{good}: ok (quickstart)" in proc.stdout


def test_console_entry_runs_exit_handlers_and_keeps_the_exit_code(tmp_path):
    """`fotlab` ends with os._exit after the command: output flushed, exit handlers run, exit code kept, and idle
    thread-pool workers (MLflow, `fotlab results`) do not keep it waiting."""
    code = (
        "import atexit, sys, concurrent.futures; atexit.register(print, 'exit handler ran'); "
        "pool = concurrent.futures.ThreadPoolExecutor(1); pool.submit(int).result(); "  # an idle worker thread
        "sys.argv = ['fotlab', 'validate', sys.argv[1]]; from fotlab.cli import entry; entry()"
    )
    good = subprocess.run(
        [sys.executable, "-c", code, str(REPO / "experiments" / "quickstart.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert good.returncode == 0, good.stderr
    assert good.stdout.splitlines() == [
        f"{REPO / 'experiments' / 'quickstart.yaml'}: ok (quickstart)",
        "exit handler ran",
    ]
    bad = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "missing.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert bad.returncode == 1 and "missing.yaml" in bad.stderr and bad.stdout == "exit handler ran\n"


@pytest.mark.slow
def test_run_with_a_bad_spec_is_one_line_without_traceback(tmp_path):
    bad = _write(tmp_path / "bad.yaml", BAD_SPECS["crossbatch.yaml"][0])
    for args in (["run", str(bad)], ["run", str(tmp_path / "missing.yaml")], ["validate", str(bad), "--set", "oops"]):
        proc = run_fotlab(*args, cwd=tmp_path)
        assert proc.returncode != 0, args
        assert "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "expected dotted.key=value" in proc.stderr


def test_validate_print_applies_set(capsys):
    code = cli.main(
        [
            "validate",
            str(REPO / "experiments" / "quickstart.yaml"),
            "--print",
            "--set",
            "train.steps=5",
            "--set",
            "memory.layers=[1, 3]",
        ]
    )
    assert code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["steps"] == 5 and printed["memory"]["layers"] == [1, 3]


def test_validate_no_check_paths(tmp_path, capsys):
    spec = _write(tmp_path / "remote.yaml", BAD_SPECS["missing_data.yaml"][0])
    assert cli.main(["validate", str(spec)]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["validate", "--no-check-paths", str(spec)]) == 0


def test_schema_prints_json_schema_with_descriptions(capsys):
    jsonschema = pytest.importorskip("jsonschema")
    assert cli.main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["properties"]["train"]
    assert "Local context T" in json.dumps(schema)


def test_unexpected_errors_keep_their_traceback(monkeypatch):
    from fotlab import spec as spec_module

    def broken():
        raise RuntimeError("a bug")

    monkeypatch.setattr(spec_module, "json_schema", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["schema"])


@pytest.fixture(scope="module")
def populated_store(tmp_path_factory) -> tuple[str, dict[str, str]]:
    from fotlab import tracking
    from fotlab.spec import parse_spec

    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    ids = {}
    for name, lr, loss in (("alpha", 1e-3, 2.25), ("beta", 3e-3, 1.75)):
        spec = parse_spec({"name": "cli-test", "train": {"optimizer": {"lr": lr}}})
        run = tracking.start_spec_run(spec, uri=uri, run_name=name, tags={tracking.TAG_SWEEP: "lr-sweep"})
        run.log_metrics({tracking.TRAIN_LOSS: loss, tracking.VAL_LOSS: loss + 0.5}, step=10)
        run.finish()
        ids[name] = run.run_id
    failed = tracking.start_spec_run(parse_spec({"name": "other-exp"}), uri=uri, run_name="gamma")
    failed.fail(RuntimeError("boom"))
    ids["gamma"] = failed.run_id
    return uri, ids


@pytest.mark.slow
def test_runs_list_show_compare(populated_store, tmp_path):
    uri, ids = populated_store
    proc = run_fotlab("runs", "--uri", uri, "list", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for name in ("alpha", "beta", "gamma"):
        assert ids[name] in proc.stdout and name in proc.stdout
    assert "FAILED" in proc.stdout and "2.25" in proc.stdout and "train/loss" in proc.stdout

    proc = run_fotlab("runs", "--uri", uri, "show", "gamma", cwd=tmp_path)
    assert proc.returncode == 0 and ids["gamma"] in proc.stdout
    assert "RuntimeError: boom" in proc.stdout and "train.steps" in proc.stdout

    proc = run_fotlab("runs", "--uri", uri, "compare", ids["alpha"], "beta", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "train.optimizer.lr" in proc.stdout and "0.001" in proc.stdout and "0.003" in proc.stdout
    assert "1.75" in proc.stdout and "train.steps" not in proc.stdout  # equal params are left out

    proc = run_fotlab("runs", "--uri", uri, "show", "no-such-run", cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"fotlab runs: no run with id or name 'no-such-run' in {uri}"


@pytest.mark.slow
def test_runs_list_filters_by_experiment_and_sweep(populated_store, capsys, monkeypatch):
    uri, _ = populated_store
    monkeypatch.setenv("COLUMNS", "200")
    assert cli.main(["runs", "list", "--experiment", "cli-test", "--sweep", "lr-sweep", "--uri", uri]) == 0
    out = capsys.readouterr().out
    assert "alpha" in out and "beta" in out and "gamma" not in out
    assert cli.main(["runs", "--uri", uri, "list", "--experiment", "nope"]) == 1
    assert capsys.readouterr().err.strip() == f"fotlab runs: no experiment named 'nope' in {uri}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert cli.main(["runs"]) == 0  # bare `fotlab runs` lists the configured store
    assert "gamma" in capsys.readouterr().out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_ui_serves_the_store_on_localhost(populated_store, tmp_path):
    uri, _ = populated_store
    port = _free_port()
    proc = subprocess.Popen(
        [*fotlab_cmd(), "ui", "--uri", uri, "--port", str(port)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline, body = time.time() + 200, None
        while time.time() < deadline and body is None and proc.poll() is None:
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=10", timeout=5
                ) as resp:
                    body = json.loads(resp.read())
            except OSError:
                time.sleep(1)
        assert body is not None, proc.stdout.read().decode() if proc.poll() is not None else "server never came up"
        assert {"cli-test", "other-exp"} <= {e["name"] for e in body["experiments"]}
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["run"], "fotlab run: error: the following arguments are required: SPEC"),
        (["run", "spec.yaml", "--frob"], "fotlab run: error: unrecognized arguments: --frob"),
        (["frob"], "fotlab: error: argument COMMAND: invalid choice: 'frob'"),
        ([], "fotlab: error: the following arguments are required: COMMAND"),
    ],
)
def test_usage_mistakes_are_one_line_and_exit_1(argv, named, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 1 and err.count("\n") == 1 and err.startswith(named), err
    assert "--help`" in err  # says where the usage is


def test_help_and_version_still_exit_0(capsys):
    for argv in (["--help"], ["run", "--help"], ["--version"]):
        with pytest.raises(SystemExit) as exited:
            cli.main(argv)
        assert exited.value.code == 0, argv
    assert "SPEC" in capsys.readouterr().out
