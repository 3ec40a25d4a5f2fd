"""The deployment files, checked offline: docker-compose.yml (compose specification, pinned images, healthchecks,
loopback ports), the Dockerfile's pinned bases, operators/ (every manifest and every `kubectl kustomize` overlay),
`fotlab render-job` for every shipped spec, and the Grafana dashboards' PromQL."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cluster_checks import (
    NO_SCHEMA_KINDS,
    REPO,
    dashboard_exprs,
    manifest_problems,
    metric_names,
    parse_promql,
)

COMPOSE = REPO / "docker-compose.yml"
ONE_SHOT_SERVICES = {"create-buckets"}  # runs once and exits: `service_completed_successfully`, no healthcheck
SHIPPED_SPECS = sorted(
    p for p in (REPO / "experiments").rglob("*.yaml") if "sweep" not in p.name and p.parent.name != "sweeps"
)
OVERLAY_DIRS = ["operators/base", "operators/overlays/gpu", "operators/overlays/tpu"]


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_file_validates_against_the_compose_specification():
    checker = Path(sys.executable).with_name("check-jsonschema")
    proc = subprocess.run(
        [str(checker), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_images_are_pinned_and_ports_bind_loopback():
    services = compose()["services"]
    assert {
        "ray-head",
        "ray-worker",
        "ray-worker-gpu",
        "mlflow",
        "postgres",
        "storage",
        "create-buckets",
        "prometheus",
        "grafana",
    } <= set(services)
    for name, service in services.items():
        image = service["image"]
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag != "latest" and "$" not in tag, f"{name}: image {image!r} is not pinned"
        for port in service.get("ports", []):
            assert port.startswith("${BIND_ADDRESS:-127.0.0.1}:"), f"{name}: port {port} not bound to loopback"
    assert services["mlflow"]["image"].endswith("-full")  # psycopg2 + boto3
    head_env = services["ray-head"]["environment"]
    for key in (
        "RAY_GRAFANA_HOST",
        "RAY_PROMETHEUS_HOST",
        "RAY_GRAFANA_IFRAME_HOST",
        "RAY_AUTH_MODE",
        "MLFLOW_TRACKING_URI",
        "FOTLAB_STORAGE_PATH",
    ):
        assert key in head_env, key
    assert "--metrics-export-port=8080" in services["ray-head"]["command"]  # outside 10002-19999 (worker ports)
    assert "mlflow:5000" in services["mlflow"]["command"]  # --allowed-hosts names the compose host


def test_compose_services_have_healthchecks_dependencies_and_named_volumes():
    spec = compose()
    services = spec["services"]
    for name, service in services.items():
        if name not in ONE_SHOT_SERVICES:
            assert service.get("healthcheck", {}).get("test"), f"{name}: no healthcheck"
        for dependency, rule in (service.get("depends_on") or {}).items():
            expected = "service_completed_successfully" if dependency in ONE_SHOT_SERVICES else "service_healthy"
            assert rule == {"condition": expected}, f"{name} -> {dependency}: {rule}"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source.startswith("./") or source in spec["volumes"], f"{name}: volume {source} not declared"
    assert "/tmp/ray" in " ".join(services["prometheus"]["volumes"])  # Ray's discovery file, same path
    env_example = (REPO / ".env.example").read_text()
    for key in ("POSTGRES_PASSWORD", "S3_ACCESS_KEY", "S3_SECRET_KEY", "GRAFANA_ADMIN_PASSWORD"):
        assert f"{key}=" in env_example


def test_dockerfile_bases_are_pinned_ray_2_60_py311_images():
    text = (REPO / "Dockerfile").read_text()
    assert "ARG RAY_IMAGE=rayproject/ray:2.60.0-py311\n" in text
    froms = [line.split()[1] for line in text.splitlines() if line.startswith("FROM ")]
    assert froms == ["${RAY_IMAGE}-cpu", "${RAY_IMAGE}-gpu", "${RAY_IMAGE}-cpu", "base-${VARIANT}"]  # cpu, gpu, tpu
    assert ":latest" not in text and "TORCH_VERSION=2.13.0" in text


def load_manifests(text: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def assert_valid(resources: list[dict], where: str) -> None:
    problems = [f"{where}: {p}" for r in resources for p in manifest_problems(r)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "path",
    sorted(
        p.relative_to(REPO).as_posix() for p in (REPO / "operators").rglob("*.yaml") if p.name != "kustomization.yaml"
    ),
)
def test_every_operator_manifest_validates(path):
    resources = load_manifests((REPO / path).read_text())
    assert resources
    assert_valid(resources, path)
    for resource in resources:
        if resource["kind"] in NO_SCHEMA_KINDS:  # PodMonitor: the fields Prometheus Operator needs
            assert resource["apiVersion"] == "monitoring.coreos.com/v1"
            assert resource["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
            assert resource["spec"]["selector"]["matchLabels"]


@pytest.mark.parametrize("overlay", OVERLAY_DIRS)
def test_kustomize_build_of_each_overlay_validates(overlay):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not on PATH")
    proc = subprocess.run([kubectl, "kustomize", str(REPO / overlay)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    resources = load_manifests(proc.stdout)
    assert {r["kind"] for r in resources} == {"Namespace", "ConfigMap", "Deployment", "Service", "RayCluster"}
    assert_valid(resources, overlay)
    (cluster,) = [r for r in resources if r["kind"] == "RayCluster"]
    workers = cluster["spec"]["workerGroupSpecs"][0]
    limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    if overlay.endswith("gpu"):
        assert limits["nvidia.com/gpu"] == 1 and workers["template"]["spec"]["tolerations"]
    if overlay.endswith("tpu"):
        assert limits["google.com/tpu"] == 4 and workers["numOfHosts"] == 2
        assert workers["template"]["spec"]["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == "2x4"


def render(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fotlab.cli", "render-job", *args], capture_output=True, text=True, timeout=120, cwd=REPO
    )


def natural_overlay(spec_path: Path) -> list[str]:
    scaling = yaml.safe_load(spec_path.read_text()).get("scaling") or {}
    if scaling.get("use_tpu"):
        return ["--overlay", "tpu"]
    return ["--overlay", "gpu"] if scaling.get("use_gpu") else []


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_render_job_output_validates_for_every_shipped_spec():
    from fotlab.orchestrate.kuberay import render_job
    from fotlab.spec import load_spec

    for path in SHIPPED_SPECS:
        args = natural_overlay(path)
        overlay = args[1] if args else "cpu"
        spec = load_spec(path, check_paths=False)
        resources = json.loads(json.dumps(render_job(spec, overlay=overlay, image="fotlab:0.1.0-" + overlay)))
        assert [r["kind"] for r in resources] == ["ConfigMap", "RayJob"], path
        assert_valid(resources, str(path.relative_to(REPO)))
        job = resources[1]["spec"]
        assert job["shutdownAfterJobFinishes"] and job["ttlSecondsAfterFinished"] > 0
        workers = job["rayClusterSpec"]["workerGroupSpecs"][0]
        assert workers["replicas"] * workers.get("numOfHosts", 1) == spec.scaling.num_workers
        assert load_spec_text(resources[0]["data"]["spec.yaml"]) == spec


def load_spec_text(text: str):
    from fotlab.spec import parse_spec

    return parse_spec(yaml.safe_load(text), "<configmap>", check_paths=False)


def test_render_job_cli_for_the_3b_recipe_on_gpu_validates():
    proc = render("experiments/longllama_3b_finetune.yaml", "--overlay", "gpu", "--image", "reg.example/fotlab:1-gpu")
    assert proc.returncode == 0, proc.stderr
    resources = load_manifests(proc.stdout)
    assert_valid(resources, "render-job 3b --overlay gpu")
    workers = resources[1]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    container = workers["template"]["spec"]["containers"][0]
    assert workers["replicas"] == 8 and container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"] == "reg.example/fotlab:1-gpu"


def test_render_job_tpu_maps_topology_onto_slices():
    tpu = [
        "--set",
        "scaling.use_tpu=true",
        "--set",
        "train.framework=jax",
        "--set",
        "scaling.topology=2x4",
        "--set",
        "scaling.accelerator_type=TPU-V6E",
        "--set",
        "scaling.num_workers=4",
    ]
    proc = render("experiments/quickstart.yaml", "--overlay", "tpu", *tpu)
    assert proc.returncode == 0, proc.stderr
    resources = load_manifests(proc.stdout)
    assert_valid(resources, "render-job tpu")
    workers = resources[1]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert (workers["numOfHosts"], workers["replicas"], workers["minReplicas"], workers["maxReplicas"]) == (2, 2, 2, 2)
    selector = workers["template"]["spec"]["nodeSelector"]
    assert selector == {
        "cloud.google.com/gke-tpu-accelerator": "tpu-v6e-slice",
        "cloud.google.com/gke-tpu-topology": "2x4",
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["experiments/quickstart.yaml", "--overlay", "xpu"], "--overlay 'xpu': no such overlay"),
        (
            [
                "experiments/quickstart.yaml",
                "--overlay",
                "gpu",
                "--set",
                "scaling.use_tpu=true",
                "--set",
                "train.framework=jax",
                "--set",
                "scaling.topology=2x4",
            ],
            "scaling.use_tpu=True cannot run on --overlay gpu",
        ),
        (["experiments/longllama_3b_finetune.yaml"], "scaling.use_gpu=True cannot run on --overlay cpu"),
        (
            [
                "experiments/quickstart.yaml",
                "--overlay",
                "tpu",
                "--set",
                "scaling.use_tpu=true",
                "--set",
                "train.framework=jax",
                "--set",
                "scaling.topology=2x4",
                "--set",
                "scaling.accelerator_type=TPU-V6E",
                "--set",
                "scaling.num_workers=3",
            ],
            "use a multiple of 2",
        ),
    ],
)
def test_render_job_bad_input_is_one_line(args, message):
    proc = render(*args)
    assert proc.returncode == 1 and proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("fotlab render-job: ") and message in line


def test_shipped_rayjob_sample_is_render_job_output():
    sample = (REPO / "operators" / "samples" / "rayjob-quickstart.yaml").read_text()
    proc = render("experiments/quickstart.yaml")
    assert proc.returncode == 0, proc.stderr
    assert sample.split("\n", 1)[1] == proc.stdout  # after the comment line


# -- dashboards ------------------------------------------------------------------------------------------------------
def dashboards() -> dict[str, dict]:
    return {
        p.relative_to(REPO / "dashboards").as_posix(): json.loads(p.read_text())
        for p in sorted((REPO / "dashboards").rglob("*.json"))
    }


def test_dashboards_are_current_with_the_generator_and_installed_ray():
    proc = subprocess.run(
        [sys.executable, str(REPO / "dashboards" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr


def test_every_dashboard_query_parses_and_names_exported_metrics():
    from fotlab.orchestrate.live_metrics import all_metric_names

    boards = dashboards()
    assert {
        "fotlab_training.json",
        "fotlab_sweeps.json",
        "ray/default_grafana_dashboard.json",
        "ray/train_grafana_dashboard.json",
    } <= set(boards)
    ray_names: set[str] = set()  # what Ray's own generated dashboards query: Ray's declared exports
    for rel, board in boards.items():
        exprs = dashboard_exprs(board)
        assert exprs, rel
        for title, expr in exprs:
            names = metric_names(parse_promql(expr))  # raises on a PromQL syntax error
            if rel.startswith("ray/"):
                ray_names |= names  # (Ray's own panels include constants, such as a 100% line)
            else:
                assert names, f"{rel} / {title}: no metric in {expr}"
    fotlab_names = set(all_metric_names())
    for rel in ("fotlab_training.json", "fotlab_sweeps.json"):
        for title, expr in dashboard_exprs(boards[rel]):
            unknown = metric_names(parse_promql(expr)) - fotlab_names - ray_names
            assert not unknown, f"{rel} / {title}: {unknown} is exported by neither fotlab nor Ray"


def test_live_metric_names_are_prometheus_names_declared_once():
    from fotlab.orchestrate.live_metrics import _NAME, all_metric_names

    names = all_metric_names()
    assert len(names) == len(set(names))
    assert all(_NAME.match(n) and n.startswith("ray_fotlab_") for n in names)


def test_storage_path_comes_from_the_cluster_environment_when_the_spec_has_none(monkeypatch, tmp_path):
    from fotlab.spec import parse_spec, resolve_storage_path

    spec = parse_spec({"name": "x"})
    monkeypatch.setenv("FOTLAB_STORAGE_PATH", "s3://fotlab/runs")
    assert resolve_storage_path(spec) == "s3://fotlab/runs"
    explicit = parse_spec({"name": "x", "storage": {"path": str(tmp_path)}})
    assert resolve_storage_path(explicit) == str(tmp_path)  # the spec wins


def test_live_metrics_stay_off_outside_ray():
    import ray

    from fotlab.orchestrate.live_metrics import LiveMetrics

    if ray.is_initialized():
        pytest.skip("a Ray session is open in this process")
    live = LiveMetrics("run", "exp", rank=0, context_length=128)
    live.on_log(1, {"train/loss": 1.0, "train/crossbatch_range": 3.0})  # records nothing, raises nothing
    live.on_checkpoint(1, 0.5)
    assert not live.enabled
