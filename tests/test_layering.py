"""The import graph of platform/fotlab, read from the source (ast), keeps its layers (top to bottom):

    cli, cli_runs  ->  orchestrate  ->  eval, train  ->  model, data  (beside them: spec, tracking + metric_delivery +
    undelivered, names, errors)

(jax, the JAX training loop, sits between orchestrate and train: it reuses train's data and model set-up.)

No arrow runs back up: nothing below the CLI imports a CLI module, nothing below orchestrate imports orchestrate,
eval and train do not import each other, spec imports nothing from eval, model imports no fotlab layer above it.
Imports inside functions count the same as module-level ones.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "platform" / "fotlab"
CLI = {"cli", "cli_runs", "cli_job"}
# part of fotlab -> the parts it may import (besides itself and the `fotlab` package root, for __version__)
ALLOWED = {
    "names": set(),
    "errors": set(),
    "presets": set(),
    "spec": {"errors", "presets", "names"},
    "model": {"errors", "presets"},
    "data": {"errors", "presets", "spec"},
    "undelivered": {"errors"},
    "metric_delivery": {"undelivered"},
    "tracking": {"errors", "names", "spec", "metric_delivery", "undelivered"},
    "model_refs": {"tracking"},  # runs:/ and models:/ references -> local model folders
    "train": {"errors", "presets", "names", "spec", "model", "data"},
    "eval": {"errors", "presets", "names", "spec", "model", "data", "tracking", "model_refs"},
    "jax": {"names", "model", "train"},  # the JAX loop reuses fotlab's data, model build and weights format
    "orchestrate": {
        "errors",
        "presets",
        "names",
        "spec",
        "model",
        "data",
        "tracking",
        "model_refs",
        "train",
        "eval",
        "jax",
    },
    "cli_runs": {"errors", "names", "spec", "tracking", "undelivered"},
    "serving": {"errors", "names", "model", "data", "tracking"},  # MLflow's pyfunc loader of a fotlab model
}


def _part(module: str) -> str:
    """`fotlab.eval.runner` -> "eval"; `fotlab.cli` -> "cli"; `fotlab` -> "fotlab"."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "fotlab"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.parts[-1] == "__init__" else rel.parts
    return ".".join(parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str | None:
    """The absolute module of `from X import ...` (relative imports resolved against `module`)."""
    if node.level == 0:
        return node.module
    parts = module.split(".") if is_package else module.split(".")[:-1]
    base = parts[: len(parts) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def fotlab_imports(path: Path) -> set[str]:
    """Every fotlab module `path` imports (`from fotlab.x import y` counts as fotlab.x and fotlab.x.y)."""
    module = _module_name(path)
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, path.name == "__init__.py", node)
            if source:
                found.add(source)
                found.update(f"{source}.{alias.name}" for alias in node.names)
    return {name for name in found if name == "fotlab" or name.startswith("fotlab.")}


def import_graph() -> dict[str, set[str]]:
    return {_module_name(p): fotlab_imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    """'importer -> imported (rule)' for every import that breaks the layers."""
    out = []
    for importer, imported in graph.items():
        part = _part(importer)
        for name in sorted(imported):
            target = _part(name)
            if target in ("fotlab", part):
                continue
            if target in CLI and part not in CLI:
                out.append(f"{importer} -> {name} (only cli*.py import a CLI module)")
            elif name.rsplit(".", 1)[-1] == "cli" and part not in CLI:
                out.append(f"{importer} -> {name} (a library module imports a CLI module)")
            elif part in ALLOWED and target not in ALLOWED[part]:
                out.append(f"{importer} -> {name} ({part} may import only {sorted(ALLOWED[part])})")
            elif part not in ALLOWED and part not in CLI and target in CLI | {"orchestrate"}:
                out.append(f"{importer} -> {name} ({part} is below orchestrate)")
    return out


def test_the_import_graph_has_no_arrow_back_up():
    graph = import_graph()
    assert "fotlab.orchestrate.pipeline" in graph["fotlab.orchestrate.worker"]  # the graph is read at all
    assert layering_violations(graph) == []


def test_no_library_module_is_a_cli_module():
    cli_modules = [m for m in import_graph() if m.rsplit(".", 1)[-1].startswith("cli") and _part(m) not in CLI]
    assert cli_modules == []  # handlers live in orchestrate.commands; model loading in eval.loading


@pytest.mark.parametrize(
    "bad_edge, rule",
    [
        (("fotlab.eval.runner", "fotlab.orchestrate.pipeline"), "eval may import only"),
        (("fotlab.spec.models", "fotlab.eval.results"), "spec may import only"),
        (("fotlab.train.loop", "fotlab.eval.runner"), "train may import only"),
        (("fotlab.orchestrate.worker", "fotlab.cli"), "only cli*.py import a CLI module"),
        (("fotlab.model.layers", "fotlab.tracking"), "model may import only"),
        (("fotlab.jax.train", "fotlab.orchestrate.trainer"), "jax may import only"),
        (("fotlab.jax.train", "fotlab.eval.runner"), "jax may import only"),
    ],
)
def test_the_check_catches_an_arrow_back_up(bad_edge, rule):
    importer, imported = bad_edge
    graph = {importer: {imported}}
    found = layering_violations(graph)
    assert len(found) == 1 and rule in found[0]


def test_relative_and_function_level_imports_are_seen(tmp_path, monkeypatch):
    pkg = tmp_path / "fotlab" / "eval"
    pkg.mkdir(parents=True)
    source = pkg / "x.py"
    source.write_text("def f():\n    from fotlab.orchestrate import pipeline\n\nfrom ..train import loop\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "fotlab")
    assert {"fotlab.orchestrate", "fotlab.orchestrate.pipeline", "fotlab.train", "fotlab.train.loop"} <= fotlab_imports(
        source
    )
