"""fotlab.spec: shipped specs validate, strictness, cross-field rules, --set overrides, YAML/params/schema output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from fotlab.spec import (
    ExperimentSpec,
    SpecError,
    apply_overrides,
    flatten_spec,
    is_sweep_file,
    json_schema,
    load_spec,
    model_overrides,
    parse_spec,
    project_root,
    resolve_artifact_root,
    resolve_storage_path,
    resolve_tracking_uri,
    spec_to_yaml,
)

REPO = Path(__file__).resolve().parents[1]
SWEEP_KEYS = {"search_space", "base"}  # sweep specs (fotlab.spec.sweep) are checked by test_sweep_spec


def _shipped_experiment_specs() -> list[Path]:
    """Every experiment spec under experiments/ (recursively), sweep specs excluded."""
    paths = sorted((REPO / "experiments").rglob("*.yaml")) + sorted((REPO / "experiments").rglob("*.yml"))
    return [p for p in paths if not SWEEP_KEYS & set(yaml.safe_load(p.read_text()) or {})]


SHIPPED = _shipped_experiment_specs()


def _write(tmp_path: Path, data: dict, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def _error(tmp_path: Path, data: dict, overrides=()) -> str:
    path = _write(tmp_path, data)
    with pytest.raises(SpecError) as info:
        load_spec(path, overrides)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path)), message
    return message


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(REPO / "experiments")) for p in SHIPPED])
def test_every_shipped_spec_validates(path):
    spec = load_spec(path)
    assert spec.name
    assert load_spec(path) == spec


def test_shipped_specs_include_the_recipes():
    names = {p.stem for p in SHIPPED}
    assert {"quickstart", "paper_184m", "longllama_3b_finetune", "longllama_code_7b_finetune"} <= names
    quick = load_spec(REPO / "experiments" / "quickstart.yaml")
    assert quick.train.crossbatch.range == 3 and quick.train.crossbatch.packing == 4 and quick.scaling.num_workers == 1
    three_b = load_spec(REPO / "experiments" / "longllama_3b_finetune.yaml")
    assert three_b.memory.layers == [6, 12, 18] and three_b.train.optimizer.lr == 2e-5
    assert three_b.train.context_length * three_b.train.crossbatch.packing == 8192
    seven_b = load_spec(REPO / "experiments" / "longllama_code_7b_finetune.yaml")
    assert seven_b.memory.layers == [8, 16, 24] and seven_b.train.optimizer.weight_decay == 0.01


def test_minimal_spec_is_just_a_name(tmp_path):
    spec = load_spec(_write(tmp_path, {"name": "x"}))
    assert spec.model.preset is None and spec.data.sources[0].kind == "embedded"
    assert spec.data.tokenizer.kind == "byte" and spec.train.crossbatch.range == 0
    assert model_overrides(spec) == {}


def test_every_field_has_a_description():
    def walk(cls: type[BaseModel], seen: set) -> None:
        if cls in seen:
            return
        seen.add(cls)
        for name, field in cls.model_fields.items():
            assert field.description, f"{cls.__name__}.{name} has no description"
            for sub in _models_in(field.annotation):
                walk(sub, seen)

    walk(ExperimentSpec, set())


def _models_in(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in getattr(annotation, "__args__", ()) or () for m in _models_in(arg)]


@pytest.mark.parametrize(
    "data, field, words",
    [
        ({"name": "x", "trian": {}}, "trian", "did you mean 'train'"),
        ({"name": "x", "train": {"crossbatch": {"rnage": 2}}}, "train.crossbatch.rnage", "unknown key"),
        ({"name": "x", "train": {"steps": "many"}}, "train.steps", "valid integer"),
        ({"name": "x", "train": {"optimizer": {"lr": -1}}}, "train.optimizer.lr", "greater than 0"),
        ({"name": "x", "memory": {"retrieval": "knn"}}, "memory.retrieval", "'dense'"),
        ({"name": "x", "model": {"preset": "tiny"}, "memory": {"layers": [1, 4]}}, "memory.layers[1]", "4 layers"),
        (
            {"name": "x", "train": {"batch_size": 4, "crossbatch": {"range": 4, "packing": 4}}},
            "train.crossbatch.range",
            "< train.batch_size",
        ),
        ({"name": "x", "train": {"batch_size": 6, "crossbatch": {"packing": 4}}}, "train.batch_size", "multiple"),
        ({"name": "x", "train": {"context_length": 65}}, "train.context_length", "window"),
        ({"name": "x", "model": {"preset": "huge"}}, "model.preset", "unknown preset"),
        ({"name": "x", "memory": {"retrieval": "topk"}}, "memory.topk", "required"),
        (
            {"name": "x", "data": {"sources": [{"kind": "embedded"}, {"kind": "local", "path": "/no/such/dir"}]}},
            "data.sources[1].path",
            "does not exist",
        ),
        ({"name": "x", "data": {"sources": [{"kind": "jsonl"}]}}, "data.sources[0].path", "required"),
        ({"name": "x", "data": {"tokenizer": {"kind": "pretrained"}}}, "data.tokenizer.path", "required"),
        ({"name": "x", "model": {"init_from": "./no-such-model"}}, "model.init_from", "does not exist"),
        (
            {"name": "x", "tracking": {"register_model": "m", "log_model": False}},
            "tracking.register_model",
            "log_model is false",
        ),
        (
            {"name": "x", "train": {"batch_size": 8, "crossbatch": {"switch": [{"at_step": 5, "range": 8}]}}},
            "train.crossbatch.switch[0].range",
            "< train.batch_size",
        ),
        (
            {"name": "x", "model": {"preset": "debug", "init_from": "org/some-checkpoint"}},
            "model.preset",
            "drop preset",
        ),
        (
            {"name": "x", "model": {"hidden_size": 100, "num_attention_heads": 3}},
            "model.num_attention_heads",
            "not divisible by 3 heads",
        ),
        ({"name": "x", "model": {"num_key_value_heads": 3}}, "model.num_key_value_heads", "not divisible by 3 kv"),
        ({"name": "x", "memory": {"topk": 8}}, "memory.topk", "'dense'"),
        (
            {
                "name": "x",
                "train": {
                    "batch_size": 8,
                    "crossbatch": {"switch": [{"at_step": 5, "range": 2}], "sample_from": [1, 3]},
                },
            },
            "train.crossbatch.sample_from",
            "either switch or sample_from",
        ),
        (
            {"name": "x", "train": {"batch_size": 8, "crossbatch": {"sample_from": [1, 8]}}},
            "train.crossbatch.sample_from[1]",
            "0..7",
        ),
        (
            {"name": "x", "train": {"steps": 10, "crossbatch": {"switch": [{"at_step": 10, "range": 1}]}}},
            "train.crossbatch.switch[0].at_step",
            "past the last step (10)",
        ),
        (
            {"name": "x", "train": {"context_length": 64, "crossbatch": {"backend": "flex"}}},
            "train.crossbatch.backend",
            "context_length % 128 == 0 (got 64)",
        ),
        ({"name": "x", "scaling": {"use_gpu": True, "use_tpu": True}}, "scaling.use_tpu", "pick one"),
        ({"name": "x", "scaling": {"topology": "4x4"}}, "scaling.topology", "use_tpu: true"),
        ({"name": "x", "scaling": {"num_workers": 2, "min_workers": 3}}, "scaling.min_workers", "between 1 and"),
        ({"name": "x", "scaling": {"num_workers": 2, "min_workers": 0}}, "scaling.min_workers", "greater than"),
        (
            {"name": "x", "eval": {"perplexity": [{"source": {"kind": "local", "path": "/no/such/eval-dir"}}]}},
            "eval.perplexity[0].source.path",
            "'/no/such/eval-dir' does not exist",
        ),
        (
            {"name": "x", "eval": {"distraction": {"source": {"kind": "hf"}}}},
            "eval.distraction.source.name",
            "required for kind 'hf'",
        ),
        (
            {"name": "x", "eval": {"few_shot": [{"source": {"kind": "hf", "path": "./no-such-trec"}}]}},
            "eval.few_shot[0].source.path",
            "'./no-such-trec' does not exist",
        ),
        ({"name": "bad name!"}, "name", "pattern"),
        ({"seed": 1}, "name", "missing"),
    ],
)
def test_bad_specs_give_one_line_naming_the_field(tmp_path, data, field, words):
    message = _error(tmp_path, data)
    assert f": {field}: " in message, message
    assert words in message, message


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(SpecError, match="spec file not found"):
        load_spec(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntrain: [unclosed\n")
    with pytest.raises(SpecError, match="invalid YAML"):
        load_spec(bad)
    binary = tmp_path / "model.yaml"
    binary.write_bytes(b"name: x\n\x00\xd0\x9f\xff\xfe")  # e.g. a weights file passed by mistake
    with pytest.raises(SpecError, match=r"not a text \(UTF-8\) spec file"):
        load_spec(binary)
    assert not is_sweep_file(binary)
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(SpecError, match="must be a YAML mapping"):
        load_spec(tmp_path / "list.yaml")


def test_yaml_never_executes_code(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(SpecError, match="invalid YAML"):
        load_spec(path)


def test_set_overrides_coerce_types(tmp_path):
    data_dir = tmp_path / "docs"
    data_dir.mkdir()
    path = _write(tmp_path, {"name": "x", "model": {"preset": "tiny"}})
    spec = load_spec(
        path,
        [
            "train.steps=7",
            "train.optimizer.lr=3e-4",
            "train.crossbatch.stepping=true",
            "memory.layers=[1, 3]",
            "model.rope_theta=1e6",
            "tracking.uri=null",
            "data.sources.0.kind=local",
            f"data.sources.0.path={data_dir}",
            "data.sources.1.kind=embedded",
            "data.sources.1.weight=0.5",
        ],
    )
    assert spec.train.steps == 7 and spec.train.optimizer.lr == pytest.approx(3e-4)
    assert spec.train.crossbatch.stepping is True and spec.memory.layers == [1, 3]
    assert spec.model.rope_theta == 1e6 and spec.tracking.uri is None
    assert spec.data.sources[0].path == str(data_dir) and spec.data.sources[1].weight == 0.5
    assert model_overrides(spec) == {"rope_theta": 1e6, "mem_layers": [1, 3]}


def test_set_override_errors_are_one_line(tmp_path):
    path = _write(tmp_path, {"name": "x"})
    assert "expected dotted.key=value" in _error(tmp_path, {"name": "x"}, ["train.steps"])
    assert "past the end" in _error(tmp_path, {"name": "x"}, ["data.sources.5.kind=local"])
    with pytest.raises(SpecError, match=r"train\.stpes: unknown key"):
        load_spec(path, ["train.stpes=3"])
    with pytest.raises(SpecError, match=r"train\.steps: Input should be greater than 0"):
        load_spec(path, ["train.steps=-3"])


def test_apply_overrides_creates_sections():
    data = apply_overrides({"name": "x"}, ["eval.perplexity.0.memory_sizes=[0, 64]"])
    assert data["eval"] == {"perplexity": [{"memory_sizes": [0, 64]}]}


def test_check_paths_off_accepts_missing_local_data(tmp_path):
    data = {"name": "x", "data": {"sources": [{"kind": "local", "path": "/cluster/only/data"}]}}
    spec = load_spec(_write(tmp_path, data), check_paths=False)
    assert spec.data.sources[0].path == "/cluster/only/data"


def test_remote_init_from_is_not_checked_but_local_config_is(tmp_path):
    remote = {
        "name": "x",
        "model": {"init_from": "org/some-llama"},
        "memory": {"layers": [40]},
        "data": {"tokenizer": {"kind": "pretrained", "path": "org/some-llama"}},
    }
    assert load_spec(_write(tmp_path, remote)).memory.layers == [40]  # shape unknown: not guessed
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "num_hidden_layers": 6,
                "max_position_embeddings": 128,
                "hidden_size": 64,
                "num_attention_heads": 4,
            }
        )
    )
    local = {**remote, "model": {"init_from": str(ckpt)}}
    assert "6 layers" in _error(tmp_path, local)
    local["memory"] = {"layers": [5]}
    local["train"] = {"context_length": 256}
    assert "window W = max_position_embeddings = 128" in _error(tmp_path, local)


def test_byte_tokenizer_feeds_only_byte_level_checkpoints(tmp_path):
    from fotlab.data import byte_tokenizer
    from fotlab.spec.checks import BYTE_VOCAB_SIZE

    assert len(byte_tokenizer()) == BYTE_VOCAB_SIZE
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    config = {"model_type": "fot", "num_hidden_layers": 4, "max_position_embeddings": 64, "vocab_size": 259}
    (ckpt / "config.json").write_text(json.dumps(config))
    data = {
        "name": "x",
        "model": {"init_from": str(ckpt)},
        "memory": {"layers": [2]},
        "train": {"context_length": 64},
        "data": {"tokenizer": {"kind": "byte"}},
    }
    assert load_spec(_write(tmp_path, data)).model.init_from == str(ckpt)  # a fotlab byte-level model: fine
    (ckpt / "config.json").write_text(json.dumps({**config, "vocab_size": 32000}))
    assert "data.tokenizer.kind: 'byte' cannot feed checkpoint" in _error(tmp_path, data)
    stage2 = {**data, "model": {"init_from": "models:/paper_retrieval_fot/latest"}}  # resolved at training time
    assert load_spec(_write(tmp_path, stage2)).model.init_from == "models:/paper_retrieval_fot/latest"


def test_yaml_round_trip_and_flat_params(tmp_path):
    spec = load_spec(REPO / "experiments" / "quickstart.yaml")
    again = load_spec(_write(tmp_path, yaml.safe_load(spec_to_yaml(spec))))
    assert again == spec
    flat = flatten_spec(spec)
    assert flat["train.crossbatch.range"] == "3" and flat["memory.layers"] == "[2]"
    assert flat["data.sources.0.kind"] == "embedded" and flat["model.preset"] == "tiny"
    assert all(isinstance(v, str) for v in flat.values())


def test_json_schema_is_valid_and_described():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    text = json.dumps(schema)
    assert "Extra contexts per entry" in text and schema["additionalProperties"] is False
    validator = jsonschema.Draft202012Validator(schema)
    assert not list(validator.iter_errors({"name": "x", "train": {"steps": 3}}))
    assert list(validator.iter_errors({"name": "x", "trian": {}}))


def test_default_locations(tmp_path, monkeypatch):
    project = tmp_path / "proj"
    (project / "sub").mkdir(parents=True)
    (project / "pyproject.toml").write_text('[project]\nname = "fotlab"\n')
    monkeypatch.chdir(project / "sub")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert project_root() == project.resolve()
    spec = parse_spec({"name": "x"})
    uri = resolve_tracking_uri(spec)
    assert uri == f"sqlite:///{project.resolve()}/mlflow.db"
    assert resolve_artifact_root(spec, uri) == (project.resolve() / "mlartifacts").as_uri()
    assert resolve_storage_path(spec) == str(project.resolve() / ".fotlab" / "runs")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri(spec) == "http://127.0.0.1:5000"
    assert resolve_artifact_root(spec, "http://127.0.0.1:5000") is None
    spec = parse_spec({"name": "x", "tracking": {"uri": "sqlite:////tmp/a.db"}})
    assert resolve_tracking_uri(spec) == "sqlite:////tmp/a.db"
    lonely = tmp_path / "elsewhere"
    lonely.mkdir()
    monkeypatch.chdir(lonely)
    assert project_root() == lonely.resolve()


SWEEPS = sorted(
    p for p in (REPO / "experiments").rglob("*.yaml") if SWEEP_KEYS & set(yaml.safe_load(p.read_text()) or {})
)


@pytest.mark.parametrize("path", SWEEPS, ids=[p.name for p in SWEEPS])
def test_sweep_spec_shipped_sweeps_validate(path):
    from fotlab.spec import load_sweep, trial_spec

    sweep = load_sweep(path)
    trial = trial_spec(sweep, {key: space.corners()[0] for key, space in sweep.search_space.items()})
    assert isinstance(trial, ExperimentSpec)


def _sweep_file(tmp_path: Path, **changes) -> Path:
    _write(tmp_path, {"name": "base", "train": {"batch_size": 4, "crossbatch": {"packing": 4}}}, "base.yaml")
    data = {
        "name": "sw",
        "base": "base.yaml",
        "set": ["train.steps=9"],
        "search_space": {
            "train.optimizer.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
            "train.crossbatch.range": {"type": "choice", "values": [0, 3]},
        },
    }
    data.update(changes)
    return _write(tmp_path, data, "sweep.yaml")


def test_sweep_spec_trials_are_base_plus_set_plus_params(tmp_path):
    import pickle

    from fotlab.spec import load_sweep, trial_spec

    sweep = pickle.loads(pickle.dumps(load_sweep(_sweep_file(tmp_path))))  # trials are built inside Ray workers
    trial = trial_spec(sweep, {"train.optimizer.lr": 3e-3, "train.crossbatch.range": 3})
    assert trial.name == "base" and trial.train.steps == 9
    assert trial.train.optimizer.lr == 3e-3 and trial.train.crossbatch.range == 3


@pytest.mark.parametrize(
    "changes, words",
    [
        (
            {"search_space": {"train.crossbatch.range": {"type": "choice", "values": [0, 4]}}},
            "search_space.train.crossbatch.range: value 4 fails: train.crossbatch.range: 4 must be < train.batch_size",
        ),
        (
            {"search_space": {"train.lr": {"type": "uniform", "low": 0, "high": 1}}},
            "search_space.train.lr: value 0.0 fails: train.lr: unknown key",
        ),
        ({"search_space": {"seed": {"type": "int", "low": 3}}}, "search_space.seed: low and high: required"),
        (
            {"search_space": {"seed": {"type": "int", "low": 1, "high": 2, "stepp": 1}}},
            "search_space.seed.stepp: unknown key",
        ),
        ({"base": "missing.yaml"}, "base: "),
        ({"mode": "lowest"}, "mode: Input should be 'min' or 'max'"),
    ],
)
def test_sweep_spec_errors_name_the_field(tmp_path, changes, words):
    from fotlab.spec import load_sweep

    path = _sweep_file(tmp_path, **changes)
    with pytest.raises(SpecError) as info:
        load_sweep(path)
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)
    assert words in str(info.value), str(info.value)


def test_check_paths_off_also_skips_init_from(tmp_path):
    data = {
        "name": "x",
        "model": {"init_from": "/cluster/models/llama"},
        "data": {"tokenizer": {"kind": "pretrained", "path": "/cluster/models/llama"}},
    }
    assert "model.init_from" in _error(tmp_path, data)
    assert load_spec(_write(tmp_path, data), check_paths=False).model.init_from == "/cluster/models/llama"
