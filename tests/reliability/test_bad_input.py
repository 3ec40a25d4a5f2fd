"""R8: a catalogue of malformed inputs (specs, CLI arguments and usage, data, model directories, MLflow references),
each through the real CLI (`fotlab.cli.main` in process, a few through the `fotlab` console script): exit status 1, one
line on stderr naming what is wrong, no traceback, and nothing left behind (no MLflow run RUNNING, no checkpoint).
Run: pytest tests/reliability/test_bad_input.py
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from fotlab.cli import main

EVAL = {"perplexity": [{"name": "ppl", "source": {"kind": "validation", "max_docs": 1}, "memory_sizes": [0]}]}


def base_spec(corpus: Path, tmp: Path) -> dict:
    return {
        "name": "bad-input",
        "model": {"preset": "debug"},
        "data": {
            "sources": [{"kind": "local", "path": str(corpus), "glob": "*.txt"}],
            "validation_docs": 1,
            "cache_dir": str(tmp / "cache"),
        },
        "train": {"steps": 2, "batch_size": 2, "context_length": 32, "checkpoint_every": 1, "eval_batches": 1},
        "scaling": {"num_workers": 0},
        "storage": {"path": str(tmp / "runs")},
        "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}"},
        "eval": EVAL,
    }


def write(tmp: Path, spec: dict | str | bytes, name: str = "spec.yaml") -> str:
    path = tmp / name
    if isinstance(spec, bytes):
        path.write_bytes(spec)
    else:
        path.write_text(spec if isinstance(spec, str) else yaml.safe_dump(spec))
    return str(path)


def edit(spec: dict, dotted: str, value) -> dict:
    spec = copy.deepcopy(spec)
    *parents, last = dotted.split(".")
    node = spec
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[last] = value
    return spec


def saved_model(tmp: Path) -> Path:
    """A real (tiny, untrained) fotlab model directory."""
    from fotlab.model import FoTForCausalLM, preset_config

    model_dir = tmp / "model"
    FoTForCausalLM(preset_config("debug")).save_pretrained(model_dir)
    return model_dir


def data_dir(tmp: Path, files: dict[str, bytes]) -> Path:
    root = tmp / "data"
    root.mkdir(exist_ok=True)
    for name, content in files.items():
        (root / name).write_bytes(content)
    return root


def with_source(spec: dict, **source) -> dict:
    return edit(spec, "data.sources", [source])


def parquet_without_text(tmp: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp / "pq"
    root.mkdir()
    pq.write_table(pa.table({"body": ["some text"] * 8}), root / "part.parquet")
    return root


def model_case(mutate: Callable[[Path], None]) -> Callable[[Path, dict], list[str]]:
    def build(tmp: Path, spec: dict) -> list[str]:
        model_dir = saved_model(tmp)
        mutate(model_dir)
        return ["eval", write(tmp, spec), "--model", str(model_dir)]

    return build


def _config_edit(**fields) -> Callable[[Path], None]:
    def mutate(model_dir: Path) -> None:
        config = json.loads((model_dir / "config.json").read_text())
        config.update(fields)
        (model_dir / "config.json").write_text(json.dumps(config))

    return mutate


class _Payload:
    """Pickled as a call of os.getcwd: a weights file that would run code when unpickled without weights_only."""

    def __reduce__(self):
        return (os.getcwd, ())


def _pickle_only(model_dir: Path) -> None:
    (model_dir / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": _Payload()}, model_dir / "pytorch_model.bin")


def _truncate_weights(model_dir: Path) -> None:
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])


def validate(mutate: Callable[[dict], dict | str | bytes]) -> Callable[[Path, dict], list[str]]:
    return lambda tmp, spec: ["validate", write(tmp, mutate(spec))]


def run(mutate: Callable[[dict], dict], *extra: str) -> Callable[[Path, dict], list[str]]:
    return lambda tmp, spec: ["run", write(tmp, mutate(spec)), "--no-progress", *extra]


def _no_eval(spec: dict) -> dict:
    return {k: v for k, v in spec.items() if k != "eval"}


def _data_run(files: dict[str, bytes], **source) -> Callable[[Path, dict], list[str]]:
    def build(tmp: Path, spec: dict) -> list[str]:
        root = data_dir(tmp, files)
        return ["run", write(tmp, with_source(_no_eval(spec), path=str(root), **source)), "--no-progress"]

    return build


def _eval_ref(ref: str) -> Callable[[Path, dict], list[str]]:
    return lambda tmp, spec: ["eval", write(tmp, spec), "--model", ref]


# id -> (argv builder, what the one line must name)
CASES: dict[str, tuple[Callable[[Path, dict], list[str]], str]] = {
    # --- specs: files and YAML
    "spec-missing": (lambda tmp, spec: ["validate", str(tmp / "nope.yaml")], "nope.yaml"),
    "spec-is-dir": (lambda tmp, spec: ["validate", str(tmp)], ""),  # "": the line names tmp_path itself
    "spec-yaml-syntax": (validate(lambda s: "name: [unclosed\n"), "spec.yaml"),
    "spec-top-level-list": (validate(lambda s: "- a\n- b\n"), "spec.yaml"),
    "spec-empty-file": (validate(lambda s: ""), "spec.yaml"),
    "spec-non-utf8": (validate(lambda s: b"name: \xff\xfe\xfa\n"), "spec.yaml"),
    "spec-python-tag": (validate(lambda s: "name: !!python/object/apply:os.system ['true']\n"), "spec.yaml"),
    # --- specs: unknown keys, types, ranges
    "unknown-top-key": (validate(lambda s: {**s, "trainn": {}}), "trainn"),
    "unknown-nested-key": (validate(lambda s: edit(s, "train.stepz", 3)), "stepz"),
    "steps-not-int": (validate(lambda s: edit(s, "train.steps", "many")), "train.steps"),
    "steps-zero": (validate(lambda s: edit(s, "train.steps", 0)), "train.steps"),
    "lr-negative": (validate(lambda s: edit(s, "train.optimizer", {"lr": -1})), "train.optimizer.lr"),
    "precision-unknown": (validate(lambda s: edit(s, "train.precision", "fp8")), "train.precision"),
    "nonfinite-unknown": (validate(lambda s: edit(s, "train.nonfinite", "ignore")), "train.nonfinite"),
    "batch-size-float": (validate(lambda s: edit(s, "train.batch_size", 2.5)), "train.batch_size"),
    "workers-negative": (validate(lambda s: edit(s, "scaling.num_workers", -1)), "scaling.num_workers"),
    "preset-unknown": (validate(lambda s: edit(s, "model.preset", "gigantic")), "model.preset"),
    "source-kind-unknown": (validate(lambda s: edit(s, "data.sources.0.kind", "ftp")), "kind"),
    "source-weight-zero": (validate(lambda s: edit(s, "data.sources.0.weight", 0)), "weight"),
    "sources-not-list": (validate(lambda s: edit(s, "data.sources", "corpus")), "data.sources"),
    "name-not-string": (validate(lambda s: edit(s, "name", {"a": 1})), "name"),
    "context-beyond-window": (validate(lambda s: edit(s, "train.context_length", 10**6)), "context_length"),
    "fsdp-without-strategy": (validate(lambda s: edit(s, "scaling.fsdp", {"cpu_offload": False})), "fsdp"),
    # --- CLI arguments
    "set-without-equals": (run(lambda s: s, "--set", "train.steps"), "--set"),
    "set-unknown-field": (run(lambda s: s, "--set", "train.nope=1"), "nope"),
    "set-bad-value": (run(lambda s: s, "--set", "train.steps=-3"), "train.steps"),
    "resume-unknown-run": (run(lambda s: s, "--resume", "no-such-run"), "no-such-run"),
    "address-nothing-listens": (
        run(lambda s: edit(s, "scaling.num_workers", 1), "--address", "127.0.0.1:9"),
        "127.0.0.1:9",
    ),  # fmt: skip
    "cli-missing-argument": (lambda tmp, spec: ["run"], "SPEC"),
    "cli-missing-option": (lambda tmp, spec: ["eval", write(tmp, spec)], "--model"),
    "cli-unknown-flag": (run(lambda s: s, "--frobnicate"), "--frobnicate"),
    "cli-unknown-command": (lambda tmp, spec: ["frobnicate", write(tmp, spec)], "frobnicate"),
    "cli-bad-int": (lambda tmp, spec: ["runs", "list", "--limit", "many"], "--limit"),
    "runs-show-unknown": (
        lambda tmp, spec: ["runs", "show", "0123456789abcdef", "--uri", spec["tracking"]["uri"]],
        "0123456789abcdef",
    ),  # fmt: skip
    # --- data
    "data-path-missing": (validate(lambda s: edit(s, "data.sources.0.path", "/nonexistent/corpus")), "/nonexistent"),
    "data-empty-dir": (_data_run({}, kind="local", glob="*.txt"), "data"),
    "data-all-empty-files": (
        _data_run({"a.txt": b"", "b.txt": b"  \n\t\n", "c.txt": b""}, kind="local", glob="*.txt"),
        "the 3 files matching '*.txt' hold no text",
    ),  # fmt: skip
    "data-jsonl-no-text-field": (_data_run({"a.jsonl": b'{"body": "hello"}\n' * 8}, kind="jsonl"), "text"),
    "data-binary-files": (_data_run({"a.txt": bytes(range(256)) * 40}, kind="local", glob="*.txt"), "sources[0]"),
    "data-jsonl-not-json": (_data_run({"a.jsonl": b"this is not json\n" * 8}, kind="jsonl"), "sources[0]"),
    "data-parquet-no-text-field": (
        lambda tmp, spec: [
            "run",
            write(tmp, with_source(spec, kind="parquet", path=str(parquet_without_text(tmp)))),
            "--no-progress",
        ],
        "text",
    ),  # fmt: skip
    "data-broken-symlink": (
        lambda tmp, spec: (
            (data_dir(tmp, {}) / "a.txt").symlink_to(tmp / "gone.txt")
            or [
                "run",
                write(tmp, with_source(spec, kind="local", path=str(tmp / "data"), glob="*.txt")),
                "--no-progress",
            ]
        ),
        "data",
    ),  # fmt: skip
    # --- model directories
    "model-dir-missing": (_eval_ref("/nonexistent/model"), "/nonexistent/model"),
    "model-no-config": (model_case(lambda d: (d / "config.json").unlink()), "config.json"),
    "model-config-not-json": (model_case(lambda d: (d / "config.json").write_text("{not json")), "config.json"),
    "model-wrong-shapes": (model_case(_config_edit(hidden_size=96, intermediate_size=200)), "model"),
    "model-no-weights": (model_case(lambda d: (d / "model.safetensors").unlink()), "model"),
    "model-truncated-weights": (model_case(_truncate_weights), "model"),
    "model-pickle-only-weights": (model_case(_pickle_only), "model"),
    "model-remote-code": (model_case(_config_edit(auto_map={"AutoModel": "x.Y"})), "custom code"),
    "model-unknown-type": (model_case(_config_edit(model_type="gpt2")), "gpt2"),
    # --- MLflow references
    "mlflow-unknown-run": (_eval_ref("runs:/0123456789abcdef0123456789abcdef"), "runs:/0123456789abcdef"),
    "mlflow-unknown-model": (_eval_ref("models:/no-such-model/1"), "models:/no-such-model/1"),
    "mlflow-unknown-model-latest": (_eval_ref("models:/no-such-model/latest"), "models:/no-such-model/latest"),
}


def _left_behind(tmp: Path, uri: str) -> list[str]:
    problems = [str(p) for p in (tmp / "runs").rglob("*step-*")] if (tmp / "runs").exists() else []
    if (tmp / "mlflow.db").exists():
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        experiments = [e.experiment_id for e in client.search_experiments()]
        running = client.search_runs(experiments, "attributes.status = 'RUNNING'") if experiments else []
        problems += [f"run {r.info.run_id} RUNNING" for r in running]
    return problems


@pytest.mark.slow
@pytest.mark.timeout(150)
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gives_one_line_and_exit_1(case, tiny_corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = base_spec(tiny_corpus, tmp_path)
    build, named = CASES[case]
    named = named or str(tmp_path)
    argv = build(tmp_path, spec)
    if argv[0] == "validate":  # in process: validate reports its problems on stdout, one line each
        capsys.readouterr()
        code = main(argv)
        out, err = capsys.readouterr()
        lines = [line for line in (out + err).splitlines() if line.strip()]
    else:  # Ray, MLflow and transformers log on stderr beside fotlab's line: the real console script
        fotlab = Path(sys.executable).with_name("fotlab")
        done = subprocess.run([str(fotlab), *argv], capture_output=True, text=True, timeout=110, cwd=tmp_path)
        code, err = done.returncode, done.stderr
        lines = [line for line in err.splitlines() if line.startswith(("fotlab ", "fotlab:"))]
    assert code == 1, f"exit {code}: {err[-2000:]}"
    assert "Traceback" not in err, err[-3000:]
    assert len(lines) == 1, err[-3000:]
    assert named in lines[0], lines[0]
    assert not _left_behind(tmp_path, spec["tracking"]["uri"])
    print(f"R8 {case}: {lines[0]}")


def test_catalogue_size():
    assert len(CASES) >= 40


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_console_script_bad_spec_has_no_traceback(tmp_path):
    """The installed `fotlab` script, a real subprocess: a spec with a wrong type."""
    spec = write(tmp_path, {"name": "x", "train": {"steps": "many"}})
    fotlab = Path(sys.executable).with_name("fotlab")
    out = subprocess.run([str(fotlab), "validate", spec], capture_output=True, text=True, timeout=100)
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr and "train.steps" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
