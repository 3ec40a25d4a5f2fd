"""Offline checks of deployment files, shared by the cluster tests: Kubernetes manifests (core kinds with
kubernetes-validate, KubeRay kinds against the strict schemas in ../shared/schemas/kuberay plus the rules only
KubeRay's controller enforces) and PromQL in Grafana dashboards (parsed with promql-parser; metric names found)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# ../shared/schemas/kuberay beside the checkout (as CI lays it out); FOTLAB_KUBERAY_SCHEMAS overrides it for a
# checkout that lives elsewhere (a git worktree).
KUBERAY_SCHEMAS = Path(os.environ.get("FOTLAB_KUBERAY_SCHEMAS") or REPO.parent / "shared" / "schemas" / "kuberay")
KUBERAY_SCHEMA_FILES = {
    "RayCluster": "raycluster_v1.json",
    "RayJob": "rayjob_v1.json",
    "RayService": "rayservice_v1.json",
}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
MAX_NAME = {"RayJob": 47, "RayService": 47, "RayCluster": 53}
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
KUBERNETES_VERSION = "1.32.0"
# Kinds no offline schema covers (a CRD of the Prometheus Operator): checked field by field in the tests.
NO_SCHEMA_KINDS = {"PodMonitor"}


def kuberay_validator(kind: str):
    """A Draft 7 validator of the strict KubeRay schema for ``kind`` (skips when ../shared is absent)."""
    import jsonschema

    path = KUBERAY_SCHEMAS / KUBERAY_SCHEMA_FILES[kind]
    if not path.is_file():
        pytest.skip(f"KubeRay schemas not found at {KUBERAY_SCHEMAS} (the shared/ folder beside the checkout)")
    return jsonschema.Draft7Validator(json.loads(path.read_text()))


def kuberay_controller_problems(resource: dict) -> list[str]:
    """What KubeRay's controller would reject although the CRD schema accepts it."""
    kind, spec = resource["kind"], resource.get("spec") or {}
    name = resource["metadata"]["name"]
    problems = []
    if not DNS_1035.match(name) or len(name) > MAX_NAME[kind]:
        problems.append(f"{kind} name {name!r}: a DNS-1035 label of at most {MAX_NAME[kind]} characters")
    if kind == "RayJob":
        if spec.get("submissionMode", "K8sJobMode") not in SUBMISSION_MODES:
            problems.append(f"submissionMode {spec.get('submissionMode')!r}")
        needs_shutdown = spec.get("ttlSecondsAfterFinished", 0) > 0 or spec.get("suspend")
        if needs_shutdown and not spec.get("shutdownAfterJobFinishes"):
            problems.append("ttlSecondsAfterFinished/suspend need shutdownAfterJobFinishes: true")
    cluster = spec.get("rayClusterSpec", spec) if kind == "RayJob" else spec
    for group in cluster.get("workerGroupSpecs") or []:
        if group.get("numOfHosts", 1) > 1 and not (
            group.get("replicas") == group.get("minReplicas") == group.get("maxReplicas")
        ):
            problems.append(f"multi-host group {group['groupName']}: replicas = minReplicas = maxReplicas")
    return problems


def manifest_problems(resource: dict) -> list[str]:
    """Every problem of one manifest (empty = valid)."""
    kind = resource.get("kind")
    if resource.get("apiVersion") == "ray.io/v1":
        errors = sorted(kuberay_validator(kind).iter_errors(resource), key=lambda e: list(e.path))
        return [f"{kind}: {'/'.join(map(str, e.path))}: {e.message}" for e in errors] + kuberay_controller_problems(
            resource
        )
    if kind in NO_SCHEMA_KINDS:
        return []
    import kubernetes_validate

    try:
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        return [f"{kind} {resource['metadata'].get('name')}: {err.message}"]
    except kubernetes_validate.SchemaNotFoundError:
        return [f"no schema for {resource.get('apiVersion')} {kind}"]
    return []


# -- PromQL ----------------------------------------------------------------------------------------------------------
_VARIABLE = re.compile(r"\$\{?(\w+)(?::\w+)?\}?")
_RANGE = re.compile(r"\[[^\]]*\]")
_DURATIONS = {"__rate_interval": "1m", "__interval": "1m", "interval": "1m", "__range": "1h"}


def concrete_promql(expr: str) -> str:
    """A dashboard expression with Grafana's template variables filled in: a duration inside `[...]` (range and
    subquery windows) and for Grafana's interval variables, `.*` elsewhere (label matchers)."""
    expr = _RANGE.sub(lambda m: _VARIABLE.sub("1m", m.group(0)), expr)
    return _VARIABLE.sub(lambda m: _DURATIONS.get(m.group(1), ".*"), expr)


def dashboard_exprs(board: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel, rows' nested panels included."""
    out = []
    for panel in board.get("panels", []):
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []):
                if target.get("expr"):
                    out.append((inner.get("title", ""), target["expr"]))
    return out


def metric_names(node) -> set[str]:
    """Names of every vector selector in a promql_parser AST."""
    names: set[str] = set()
    name = getattr(node, "name", None)
    if isinstance(name, str) and type(node).__name__ == "VectorSelector":
        names.add(name)
    for attr in ("expr", "lhs", "rhs", "param", "vector_selector"):
        child = getattr(node, attr, None)
        if child is not None and not isinstance(child, (str, int, float)):
            names |= metric_names(child)
    for child in getattr(node, "args", None) or []:
        names |= metric_names(child)
    return names


def parse_promql(expr: str):
    import promql_parser

    return promql_parser.parse(concrete_promql(expr))
