"""R9: security properties as tests -- YAML loaded safely, weights only through safetensors or
torch.load(weights_only=True), no code shipped with a model ever runs, local services on 127.0.0.1, no secrets in
the compose and Kubernetes files, and `fotlab submit` ships only the resolved spec and the fotlab package.
Run: pytest tests/reliability/test_security.py
"""

from __future__ import annotations

import ast
import json
import os
import re
from pathlib import Path

import pytest
import yaml

import fotlab
from fotlab.errors import RemoteCodeError, SpecError

REPO = Path(__file__).resolve().parents[2]
PACKAGE = Path(fotlab.__file__).resolve().parent
SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _calls(name: str):
    """(file, ast.Call) for every call of `<something>.<name>(...)` or `<name>(...)` in platform/fotlab."""
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                if called == name:
                    yield path, node


def test_every_torch_load_is_weights_only():
    loads = list(_calls("load"))
    torch_loads = [(p, n) for p, n in loads if ast.unparse(n.func) == "torch.load"]
    assert torch_loads, "the scan must see fotlab's torch.load calls"
    unsafe = [
        f"{p.relative_to(PACKAGE)}:{n.lineno}"
        for p, n in torch_loads
        if not any(k.arg == "weights_only" and getattr(k.value, "value", None) is True for k in n.keywords)
    ]
    assert not unsafe, f"torch.load without weights_only=True: {unsafe}"
    pickles = [f"{p.name}:{n.lineno}" for p, n in loads + list(_calls("loads")) if "pickle" in ast.unparse(n.func)]
    assert not pickles, f"pickle loads in fotlab: {pickles}"


def test_yaml_is_loaded_safely():
    unsafe = [
        f"{p.relative_to(PACKAGE)}:{n.lineno}"
        for name in ("load", "load_all", "unsafe_load", "full_load")
        for p, n in _calls(name)
        if ast.unparse(n.func).startswith("yaml.") and name != "load" or (
            ast.unparse(n.func) == "yaml.load" and "SafeLoader" not in ast.unparse(n)
        )
    ]  # fmt: skip
    assert not unsafe, f"unsafe YAML loading: {unsafe}"
    assert list(_calls("safe_load")), "the scan must see fotlab's yaml.safe_load calls"


def test_a_spec_cannot_run_code(tmp_path):
    from fotlab.spec import load_spec

    marker = tmp_path / "pwned"
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(SpecError):
        load_spec(str(spec))
    assert not marker.exists()


@pytest.fixture
def model_dir(tmp_path):
    from fotlab.model import FoTForCausalLM, preset_config

    FoTForCausalLM(preset_config("debug")).save_pretrained(tmp_path / "model")
    return tmp_path / "model"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("key", ["auto_map", "trust_remote_code"])
def test_a_model_dir_asking_for_custom_code_is_refused(model_dir, key):
    from fotlab.model import FoTForCausalLM

    config = json.loads((model_dir / "config.json").read_text())
    config[key] = {"AutoModelForCausalLM": "modeling_evil.Evil"} if key == "auto_map" else True
    (model_dir / "config.json").write_text(json.dumps(config))
    (model_dir / "modeling_evil.py").write_text(f"open({str(model_dir / 'pwned')!r}, 'w').close()\n")
    with pytest.raises(RemoteCodeError, match=key):
        FoTForCausalLM.from_pretrained(model_dir)
    assert not (model_dir / "pwned").exists()


@pytest.mark.timeout(120)
def test_trust_remote_code_argument_is_refused(model_dir):
    from fotlab.model import FoTForCausalLM

    with pytest.raises(RemoteCodeError, match="trust_remote_code"):
        FoTForCausalLM.from_pretrained(model_dir, trust_remote_code=True)
    assert FoTForCausalLM.from_pretrained(model_dir).config.num_hidden_layers == 2  # the plain load still works


def test_ui_binds_localhost_by_default():
    from fotlab.cli import build_parser
    from fotlab.cli_runs import ui_command

    args = build_parser().parse_args(["ui"])
    assert args.host == "127.0.0.1"
    cmd = ui_command("sqlite:///x.db", args.host, args.port)
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"


def test_compose_services_publish_on_localhost_only():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    published = [p for service in compose["services"].values() for p in service.get("ports", [])]
    assert published
    for port in published:
        assert str(port).startswith("${BIND_ADDRESS:-127.0.0.1}:"), port


SECRET_KEY = re.compile(r"(password|secret|token|access_key|api_key)", re.IGNORECASE)
FROM_ENV = re.compile(r"^\$\{[A-Z0-9_]+(:[?-][^}]*)?\}$")


def _secret_values(node, where: str):
    """(where, value) for every string value under a secret-looking key."""
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(value, str) and SECRET_KEY.search(str(key)):
                yield f"{where}.{key}", value
            yield from _secret_values(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _secret_values(value, f"{where}[{i}]")


def test_no_secrets_in_compose_or_kubernetes_files():
    files = [REPO / "docker-compose.yml", *sorted((REPO / "operators").rglob("*.yaml"))]
    checked = 0
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            for where, value in _secret_values(doc, path.name):
                checked += 1
                assert FROM_ENV.match(value), f"{where}: a literal secret value ({value[:4]}...)"
        for kind_doc in yaml.safe_load_all(path.read_text()):
            if isinstance(kind_doc, dict) and kind_doc.get("kind") == "Secret":
                pytest.fail(f"{path}: a Kubernetes Secret is committed")
    assert checked >= 5, "the scan must see the compose file's credentials (taken from the environment)"
    uris = re.findall(r"postgresql\+psycopg2://[^\s]+", (REPO / "docker-compose.yml").read_text())
    assert uris and all("${POSTGRES_PASSWORD" in uri for uri in uris)


def test_submit_ships_only_the_spec_and_the_fotlab_package(tmp_path, monkeypatch):
    from fotlab.orchestrate.jobs import JOB_SPEC_ENV, build_job
    from fotlab.spec import parse_spec

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2-should-not-travel")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "also-not")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "private.txt").write_text("the user's working directory must not be uploaded")
    spec = parse_spec({"name": "ship", "model": {"preset": "debug"}})
    entrypoint, runtime_env = build_job(spec)
    assert set(runtime_env) == {"py_modules", "env_vars"}, runtime_env  # no working_dir, no pip, no excludes
    assert runtime_env["py_modules"] == [str(PACKAGE)]
    assert set(runtime_env["env_vars"]) == {"RAY_USAGE_STATS_ENABLED", JOB_SPEC_ENV}
    assert parse_spec(yaml.safe_load(runtime_env["env_vars"][JOB_SPEC_ENV])) == spec
    shipped = json.dumps(runtime_env) + entrypoint
    assert "hunter2" not in shipped and "also-not" not in shipped and "private.txt" not in shipped
    package_files = {p.suffix for p in PACKAGE.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert package_files <= {".py", ".typed", ".md"}, package_files  # sources, py.typed, READMEs
    assert not any(os.path.islink(p) for p in PACKAGE.rglob("*"))
