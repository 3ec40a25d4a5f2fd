"""Write the Grafana dashboards: fotlab's (training, sweeps) and Ray's own (default, Train).

    .venv/bin/python dashboards/generate.py            # rewrite dashboards/*.json (this checkout, installed Ray)
    .venv/bin/python dashboards/generate.py --check    # exit 1 when a committed dashboard differs (tests run this)

fotlab's panels are declared below (metric names come from fotlab.orchestrate.live_metrics, declared once); Ray's
dashboards come from the installed Ray's `grafana_dashboard_factory`, so they always match the Ray that exports the
metrics. Each dashboard reads the Prometheus datasource provisioned by grafana/provisioning (uid `prometheus`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RUN_FILTER = 'experiment=~"$experiment", run_id=~"$run_id"'
SWEEP_FILTER = 'sweep=~"$sweep"'

# (title, unit, PromQL, legend) per panel, in rows of two. `requires_gpu` panels show data only on GPU nodes.
TRAINING_PANELS = [
    (
        "Train loss",
        "none",
        f"max by (run_id, rank) (ray_fotlab_train_loss{{{RUN_FILTER}}})",
        "{{run_id}} rank {{rank}}",
    ),
    ("Validation loss", "none", f"max by (run_id) (ray_fotlab_val_loss{{{RUN_FILTER}}})", "{{run_id}}"),
    (
        "Tokens/s per worker",
        "none",
        f"max by (run_id, rank) (ray_fotlab_tokens_per_second{{{RUN_FILTER}}})",
        "{{run_id}} rank {{rank}}",
    ),
    (
        "Step time",
        "s",
        f"max by (run_id, rank) (ray_fotlab_step_time_seconds{{{RUN_FILTER}}})",
        "{{run_id}} rank {{rank}}",
    ),
    ("Step", "none", f"max by (run_id) (ray_fotlab_train_step{{{RUN_FILTER}}})", "{{run_id}}"),
    ("Tokens seen", "none", f"max by (run_id) (ray_fotlab_tokens_seen{{{RUN_FILTER}}})", "{{run_id}}"),
    ("Learning rate", "none", f"max by (run_id) (ray_fotlab_learning_rate{{{RUN_FILTER}}})", "{{run_id}}"),
    ("Gradient norm", "none", f"max by (run_id) (ray_fotlab_grad_norm{{{RUN_FILTER}}})", "{{run_id}}"),
    ("Crossbatch d in use", "none", f"max by (run_id) (ray_fotlab_crossbatch_d{{{RUN_FILTER}}})", "{{run_id}}"),
    ("Memory tokens (training)", "none", f"max by (run_id) (ray_fotlab_memory_tokens{{{RUN_FILTER}}})", "{{run_id}}"),
    (
        "Checkpoint duration",
        "s",
        f"max by (run_id, rank) (ray_fotlab_checkpoint_duration_seconds{{{RUN_FILTER}}})",
        "{{run_id}} rank {{rank}}",
    ),
    ("Node CPU utilisation", "percent", "avg by (instance) (ray_node_cpu_utilization)", "{{instance}}"),
    ("Node memory used", "bytes", "sum by (instance) (ray_node_mem_used)", "{{instance}}"),
    (
        "GPU utilisation (GPU nodes)",
        "percent",
        "avg by (instance, GpuIndex) (ray_node_gpus_utilization)",
        "{{instance}} GPU {{GpuIndex}}",
    ),
    (
        "GPU memory used (GPU nodes)",
        "decmbytes",
        "sum by (instance, GpuIndex) (ray_node_gram_used)",
        "{{instance}} GPU {{GpuIndex}}",
    ),
]
GPU_ONLY_METRICS = ("ray_node_gpus_utilization", "ray_node_gram_used")
SWEEP_PANELS = [
    ("Trials by state", "none", f"sum by (state) (ray_fotlab_sweep_trials{{{SWEEP_FILTER}}})", "{{state}}"),
    (
        "Best metric so far",
        "none",
        f"max by (sweep, metric) (ray_fotlab_sweep_best_metric{{{SWEEP_FILTER}}})",
        "{{sweep}} {{metric}}",
    ),
    (
        "Running trials: train loss",
        "none",
        'max by (run_id) (ray_fotlab_train_loss{experiment=~"$sweep.*"})',
        "{{run_id}}",
    ),
    (
        "Running trials: tokens/s",
        "none",
        'sum by (run_id) (ray_fotlab_tokens_per_second{experiment=~"$sweep.*"})',
        "{{run_id}}",
    ),
]


def variable(name: str, query: str) -> dict:
    return {
        "name": name,
        "label": name,
        "type": "query",
        "datasource": DATASOURCE,
        "refresh": 2,
        "query": {"query": query, "refId": name},
        "definition": query,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"selected": True, "text": "All", "value": "$__all"},
    }


def datasource_variable() -> dict:
    return {
        "name": "datasource",
        "label": "Prometheus",
        "type": "datasource",
        "query": "prometheus",
        "current": {"selected": True, "text": "Prometheus", "value": "prometheus"},
    }


def panel(index: int, title: str, unit: str, expr: str, legend: str) -> dict:
    return {
        "id": index + 1,
        "type": "timeseries",
        "title": title,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": 12, "x": 12 * (index % 2), "y": 8 * (index // 2)},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
        "targets": [{"refId": "A", "datasource": DATASOURCE, "expr": expr, "legendFormat": legend}],
    }


def dashboard(uid: str, title: str, panels: list, variables: list) -> dict:
    return {
        "uid": uid,
        "title": title,
        "tags": ["fotlab"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [datasource_variable(), *variables]},
        "panels": [panel(i, *p) for i, p in enumerate(panels)],
    }


def fotlab_dashboards() -> dict[str, dict]:
    training_vars = [
        variable("experiment", "label_values(ray_fotlab_train_step, experiment)"),
        variable("run_id", 'label_values(ray_fotlab_train_step{experiment=~"$experiment"}, run_id)'),
    ]
    sweep_vars = [variable("sweep", "label_values(ray_fotlab_sweep_trials, sweep)")]
    return {
        "fotlab_training.json": dashboard("fotlab-training", "fotlab: FoT training", TRAINING_PANELS, training_vars),
        "fotlab_sweeps.json": dashboard("fotlab-sweeps", "fotlab: sweeps", SWEEP_PANELS, sweep_vars),
    }


def ray_dashboards() -> dict[str, dict]:
    """Ray's default and Train dashboards from the installed Ray's factory."""
    from ray.dashboard.modules.metrics import grafana_dashboard_factory as factory

    out = {}
    for name, make in (
        ("default", factory.generate_default_grafana_dashboard),
        ("train", factory.generate_train_grafana_dashboard),
    ):
        content, _uid = make()
        out[f"ray/{name}_grafana_dashboard.json"] = json.loads(content)
    return out


def all_dashboards() -> dict[str, dict]:
    return {**fotlab_dashboards(), **ray_dashboards()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 on a difference")
    args = parser.parse_args(argv)
    stale = []
    for rel, board in all_dashboards().items():
        path = HERE / rel
        text = json.dumps(board, indent=2, sort_keys=True) + "\n"
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(rel)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    if stale:
        print(f"dashboards out of date (run dashboards/generate.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
