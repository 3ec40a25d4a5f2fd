"""`fotlab render-job`: a KubeRay RayJob (plus a ConfigMap with the resolved spec) that runs one experiment.

    fotlab render-job experiments/longllama_3b_finetune.yaml --overlay gpu --image REGISTRY/fotlab:0.1.0-gpu > job.yaml
    kubectl apply -f job.yaml

Design choices:
- The resolved spec (with --set overrides) travels in a ConfigMap mounted on the head pod; the entrypoint is
  `python -m fotlab.cli run /fotlab/spec/spec.yaml --json --no-progress` (= `fotlab run`), run by KubeRay's submitter.
- The spec's `scaling` maps onto one worker group: CPU workers (no overlay), one `nvidia.com/gpu` per worker pod
  (`--overlay gpu`), or TPU slices (`--overlay tpu`: `numOfHosts` hosts per slice from the topology, 4 chips a
  host, replicas = min = max slices). A spec the overlay cannot serve is refused in one line.
- Every pod reads the cluster's settings from the `fotlab-env` ConfigMap and `fotlab-s3` Secret that
  operators/base creates (MLFLOW_TRACKING_URI, FOTLAB_STORAGE_PATH, AWS_*), so the run never writes into the pod.
- The job cluster goes away after the job (`shutdownAfterJobFinishes`, `ttlSecondsAfterFinished`).
"""

from __future__ import annotations

import math
import re
from typing import Any

from fotlab.errors import FotlabError

OVERLAYS = ("cpu", "gpu", "tpu")
RAY_VERSION = "2.60.0"
SPEC_MOUNT = "/fotlab/spec"
MAX_JOB_NAME = 47  # KubeRay: RayJob names are DNS-1035 labels of at most 47 characters
TTL_AFTER_FINISHED_S = 3600
METRICS_PORT = 8080
CHIPS_PER_TPU_HOST = 4
# Ray's TPU accelerator type -> GKE's cloud.google.com/gke-tpu-accelerator node label.
GKE_TPU_ACCELERATORS = {
    "TPU-V4": "tpu-v4-podslice",
    "TPU-V5P": "tpu-v5p-slice",
    "TPU-V5E": "tpu-v5-lite-podslice",
    "TPU-V5LITEPOD": "tpu-v5-lite-podslice",
    "TPU-V6E": "tpu-v6e-slice",
}
DEFAULT_WORKER_CPUS = {"cpu": 1, "gpu": 8, "tpu": 8}  # per worker pod, unless resources_per_worker says CPU
# Ray's object store lives in /dev/shm: a memory-backed volume instead of the container runtime's small default.
SHM_VOLUME = {"name": "dshm", "emptyDir": {"medium": "Memory"}}
CLUSTER_ENV_FROM = [
    {"configMapRef": {"name": "fotlab-env", "optional": True}},
    {"secretRef": {"name": "fotlab-s3", "optional": True}},
]


class RenderError(FotlabError):
    """A spec or option that cannot become a RayJob (unknown overlay, scaling the overlay cannot serve)."""


def job_name(spec_name: str) -> str:
    """A DNS-1035 label of at most 47 characters from the spec's name: `fotlab-<name>`."""
    name = re.sub(r"[^a-z0-9-]+", "-", f"fotlab-{spec_name}".lower()).strip("-")
    return name[:MAX_JOB_NAME].rstrip("-")


def worker_group(scaling, overlay: str, image: str) -> dict[str, Any]:
    """The RayJob's worker group for the spec's ``scaling`` on ``overlay`` (RenderError when it cannot map)."""
    if overlay not in OVERLAYS:
        raise RenderError(f"--overlay {overlay!r}: no such overlay (use gpu or tpu; leave it out for CPU workers)")
    if scaling.num_workers < 1:
        raise RenderError("scaling.num_workers: 0 runs the worker in the job driver; a cluster job needs >= 1")
    if scaling.use_tpu != (overlay == "tpu"):
        need = "--overlay tpu" if scaling.use_tpu else "scaling.use_tpu: true"
        raise RenderError(f"scaling.use_tpu={scaling.use_tpu} cannot run on --overlay {overlay}: use {need}")
    if scaling.use_gpu != (overlay == "gpu"):
        need = "--overlay gpu" if scaling.use_gpu else "scaling.use_gpu: true"
        raise RenderError(f"scaling.use_gpu={scaling.use_gpu} cannot run on --overlay {overlay}: use {need}")
    per_worker = dict(scaling.resources_per_worker or {})
    cpus = per_worker.get("CPU", DEFAULT_WORKER_CPUS[overlay])
    container = _container("ray-worker", image, cpus=cpus, memory_gib=4 * max(1, math.ceil(cpus)))
    pod: dict[str, Any] = {"containers": [container], "volumes": [dict(SHM_VOLUME)]}
    group: dict[str, Any] = {
        "groupName": f"{overlay}-workers",
        "replicas": scaling.num_workers,
        "minReplicas": scaling.min_workers or scaling.num_workers,  # elastic runs go on with fewer
        "maxReplicas": scaling.num_workers,
        "rayStartParams": {"metrics-export-port": str(METRICS_PORT)},
    }
    if overlay == "gpu":
        n_gpus = int(per_worker.get("GPU", 1))
        for key in ("requests", "limits"):
            container["resources"][key]["nvidia.com/gpu"] = n_gpus
        pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        pod["nodeSelector"] = {"nvidia.com/gpu.present": "true"}
    elif overlay == "tpu":
        group.update(_tpu_slices(scaling, container, pod))
    group["template"] = {"spec": pod}
    return group


def _tpu_slices(scaling, container: dict, pod: dict) -> dict[str, Any]:
    """TPU slice shape: hosts per slice from the topology, `google.com/tpu` chips per host, GKE selectors."""
    if not scaling.topology:
        raise RenderError("scaling.topology: a TPU job needs the slice topology, e.g. '2x4'")
    accelerator = GKE_TPU_ACCELERATORS.get((scaling.accelerator_type or "").upper())
    if accelerator is None:
        raise RenderError(
            f"scaling.accelerator_type {scaling.accelerator_type!r}: not a TPU type GKE schedules "
            f"(use one of {', '.join(GKE_TPU_ACCELERATORS)})"
        )
    n_chips = math.prod(int(d) for d in scaling.topology.lower().split("x"))
    chips_per_host = min(n_chips, CHIPS_PER_TPU_HOST)
    n_hosts = n_chips // chips_per_host
    if scaling.num_workers % n_hosts:
        raise RenderError(
            f"scaling.num_workers={scaling.num_workers}: a {scaling.topology} slice has {n_hosts} "
            f"hosts; use a multiple of {n_hosts} (one worker per host)"
        )
    n_slices = scaling.num_workers // n_hosts
    for key in ("requests", "limits"):
        container["resources"][key]["google.com/tpu"] = chips_per_host
    pod["nodeSelector"] = {
        "cloud.google.com/gke-tpu-accelerator": accelerator,
        "cloud.google.com/gke-tpu-topology": scaling.topology,
    }
    return {"replicas": n_slices, "minReplicas": n_slices, "maxReplicas": n_slices, "numOfHosts": n_hosts}


def _container(name: str, image: str, *, cpus: float, memory_gib: int) -> dict[str, Any]:
    resources = {"cpu": _quantity(cpus), "memory": f"{memory_gib}Gi"}
    return {
        "name": name,
        "image": image,
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "env": [{"name": "RAY_USAGE_STATS_ENABLED", "value": "0"}],
        "envFrom": [dict(ref) for ref in CLUSTER_ENV_FROM],
        "ports": [{"name": "metrics", "containerPort": METRICS_PORT}],
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }


def _quantity(cpus: float) -> str | int:
    return int(cpus) if float(cpus).is_integer() else f"{int(cpus * 1000)}m"


def head_group(image: str, config_map: str) -> dict[str, Any]:
    container = _container("ray-head", image, cpus=2, memory_gib=8)
    container["ports"] += [
        {"name": "gcs", "containerPort": 6379},
        {"name": "dashboard", "containerPort": 8265},
        {"name": "client", "containerPort": 10001},
    ]
    container["volumeMounts"].append({"name": "fotlab-spec", "mountPath": SPEC_MOUNT, "readOnly": True})
    return {
        # num-cpus 0: the head schedules no training work; the driver runs there.
        "rayStartParams": {
            "dashboard-host": "0.0.0.0",  # noqa: S104 - inside the pod; the head Service decides what is exposed
            "metrics-export-port": str(METRICS_PORT),
            "num-cpus": "0",
        },
        "template": {
            "spec": {
                "containers": [container],
                "volumes": [dict(SHM_VOLUME), {"name": "fotlab-spec", "configMap": {"name": config_map}}],
            }
        },
    }


def render_job(spec, *, overlay: str = "cpu", image: str) -> list[dict[str, Any]]:
    """[ConfigMap with the resolved spec, RayJob] for ``spec`` on ``overlay``."""
    from fotlab.spec import spec_to_yaml

    workers = worker_group(spec.scaling, overlay, image)  # first: a spec that cannot map fails before anything
    name = job_name(spec.name)
    labels = {"app.kubernetes.io/part-of": "fotlab", "fotlab/spec": job_name(spec.name)[len("fotlab-") :] or "spec"}
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{name}-spec", "labels": labels},
        "data": {"spec.yaml": spec_to_yaml(spec)},
    }
    entrypoint = f"python -m fotlab.cli run {SPEC_MOUNT}/spec.yaml --json --no-progress"
    ray_job = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "entrypoint": entrypoint,
            "submissionMode": "K8sJobMode",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": TTL_AFTER_FINISHED_S,
            "backoffLimit": 0,
            "rayClusterSpec": {
                "rayVersion": RAY_VERSION,
                "headGroupSpec": head_group(image, f"{name}-spec"),
                "workerGroupSpecs": [workers],
            },
        },
    }
    return [config_map, ray_job]


def default_image(overlay: str) -> str:
    """The image `docker build --build-arg VARIANT=<cpu|gpu|tpu> -t fotlab:<version>-<variant> .` makes."""
    import fotlab

    return f"fotlab:{fotlab.__version__}-{overlay}"


def render_job_command(args) -> int:
    """`fotlab render-job SPEC [--overlay gpu|tpu] [--image IMAGE] [--set k=v]`: the manifests on stdout."""
    import yaml

    from fotlab.spec import load_spec

    overlay = args.overlay or "cpu"
    if overlay not in OVERLAYS:  # before loading the spec: the overlay is the first thing that is wrong
        worker_group(None, overlay, "")
    spec = load_spec(args.spec, args.overrides, check_paths=False)  # paths are the cluster's
    documents = render_job(spec, overlay=overlay, image=args.image or default_image(overlay))
    print(yaml.dump_all(documents, Dumper=_manifest_dumper(), sort_keys=False), end="")
    return 0


def _manifest_dumper():
    import yaml

    class ManifestDumper(yaml.SafeDumper):
        """Plain YAML for kubectl: no anchors/aliases, multi-line strings (the spec) as literal blocks."""

        def ignore_aliases(self, data) -> bool:
            return True

    def text(dumper, value: str):
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    ManifestDumper.add_representer(str, text)
    return ManifestDumper
