"""What a finished sweep leaves in its MLflow parent run: the leaderboard, plots and the best trial's spec.

- `leaderboard(...)`: one row per trial (trial id, child run id, status, stopped early, last step, swept values,
  the metric), best first; logged as `leaderboard.csv` and as an MLflow table (`leaderboard.json`).
- plots (PNG, matplotlib Agg): the metric against each swept field (`plots/<metric> vs <field>.png`) and a
  parallel-coordinates plot of every trial (`plots/parallel_coordinates.png`), lines coloured by the metric.
- `export_best_spec(...)`: the best trial's complete experiment spec (base + set + its values) as YAML that
  `fotlab run` accepts.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from fotlab.orchestrate.sweep_monitor import short_value, stopped_early
from fotlab.orchestrate.sweep_space import TIME_ATTR, decode_params, label

LEADERBOARD_CSV = "leaderboard.csv"
LEADERBOARD_TABLE = "leaderboard.json"
BEST_SPEC = "best_spec.yaml"
PLOTS_DIR = "plots"


def leaderboard(results, sweep, decode: dict, child_runs: dict[str, str]) -> list[dict[str, Any]]:
    """Rows for every trial of a Tune `ResultGrid`, best value of `sweep.metric` first (no value: last)."""
    rows = []
    for result in results:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name
        params = decode_params(result.config, sweep.search_space, decode) if result.config else {}
        value = metrics.get(sweep.metric)
        rows.append(
            {
                "trial_id": trial_id,
                "run_id": child_runs.get(trial_id, ""),
                "status": "ERROR" if result.error else ("STOPPED EARLY" if stopped_early(metrics) else "COMPLETED"),
                "step": int(metrics.get(TIME_ATTR, 0)),
                **{key: params.get(key) for key in sweep.search_space},
                sweep.metric: float(value) if isinstance(value, (int, float)) else None,
            }
        )

    def order(row: dict[str, Any]) -> tuple[int, float]:
        value = row[sweep.metric]
        if value is None or not math.isfinite(value):
            return (1, 0.0)
        return (0, value if sweep.mode == "min" else -value)

    return sorted(rows, key=order)


def best_row(rows: list[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    """The best completed trial (rows are sorted best first); a stopped-early one only if none completed."""
    scored = [r for r in rows if r[metric] is not None and r["status"] != "ERROR"]
    completed = [r for r in scored if r["status"] == "COMPLETED"]
    return (completed or scored or [None])[0]


def write_leaderboard(rows: list[dict[str, Any]], out_dir: Path) -> Path:
    path = out_dir / LEADERBOARD_CSV
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["trial_id"])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: label(v) if isinstance(v, (list, dict)) else v for k, v in row.items()})
    return path


def _axis_values(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[str] | None]:
    """Numbers to plot for one field: the value itself, or the index of its label for categorical values."""
    values = [r[key] for r in rows]
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return [float(v) for v in values], None
    labels = sorted({short_value(label(v) if isinstance(v, (list, dict)) else v) for v in values})
    index = {name: i for i, name in enumerate(labels)}
    return [float(index[short_value(label(v) if isinstance(v, (list, dict)) else v)]) for v in values], labels


def write_plots(rows: list[dict[str, Any]], sweep, out_dir: Path) -> list[Path]:
    """The metric against each swept field, and a parallel-coordinates plot; returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in rows if r[sweep.metric] is not None and math.isfinite(r[sweep.metric])]
    if not scored:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    metric_values = [r[sweep.metric] for r in scored]
    paths = []
    for key in sweep.search_space:
        xs, labels = _axis_values(scored, key)
        fig, ax = plt.subplots(figsize=(5, 3.5))
        colors = ["tab:orange" if r["status"] == "STOPPED EARLY" else "tab:blue" for r in scored]
        ax.scatter(xs, metric_values, c=colors)
        if labels is not None:
            ax.set_xticks(range(len(labels)), labels, rotation=20)
        elif sweep.search_space[key].type == "loguniform":
            ax.set_xscale("log")
        ax.set(xlabel=key, ylabel=sweep.metric, title=f"{sweep.name}: {sweep.metric} vs {key}\n(orange: stopped early)")
        fig.tight_layout()
        paths.append(out_dir / f"{sweep.metric.replace('/', '_')} vs {key}.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    paths.append(_parallel_coordinates(scored, sweep, out_dir, plt))
    return paths


def _parallel_coordinates(rows: list[dict[str, Any]], sweep, out_dir: Path, plt) -> Path:
    """One polyline per trial across the swept fields and the metric, each axis scaled to [0, 1]."""
    keys = [*sweep.search_space, sweep.metric]
    columns = []
    for key in keys:
        values, labels = _axis_values(rows, key)
        space = sweep.search_space.get(key)
        log_axis = labels is None and space is not None and space.type == "loguniform"
        scaled = [math.log10(v) for v in values] if log_axis else values
        low, high = min(scaled), max(scaled)
        span = (high - low) or 1.0
        columns.append(([(v - low) / span if high > low else 0.5 for v in scaled], labels, min(values), max(values)))
    metric_scaled = columns[-1][0]
    fig, ax = plt.subplots(figsize=(2.4 * len(keys) + 1, 4))
    cmap = plt.get_cmap("viridis_r" if sweep.mode == "min" else "viridis")
    for i in range(len(rows)):
        ax.plot(range(len(keys)), [col[0][i] for col in columns], color=cmap(metric_scaled[i]), alpha=0.8)
    ax.set_xticks(range(len(keys)), keys, rotation=10)
    for x, (_, labels, low, high) in enumerate(columns):
        ax.axvline(x, color="grey", lw=0.5)
        if labels:  # categorical axis: each value at its level
            for level, name in enumerate(labels):
                y = level / (len(labels) - 1) if len(labels) > 1 else 0.5
                ax.annotate(name, (x, y), xytext=(3, 0), textcoords="offset points", fontsize=7, va="center")
        else:
            ax.annotate(f"{low:.3g}", (x, 0), xytext=(3, -8), textcoords="offset points", fontsize=7)
            ax.annotate(f"{high:.3g}", (x, 1), xytext=(3, 4), textcoords="offset points", fontsize=7)
    ax.set_yticks([])
    ax.set_title(
        f"{sweep.name}: trials (colour: {sweep.metric}, {'lighter' if sweep.mode == 'min' else 'darker'} is better)"
    )
    fig.tight_layout()
    path = out_dir / "parallel_coordinates.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def export_best_spec(sweep, params: dict[str, Any], row: dict[str, Any], path: Path) -> Path:
    """Write the best trial's complete experiment spec (validated by parsing it back) to `path`."""
    import yaml

    from fotlab.spec import parse_spec, spec_to_yaml, trial_spec

    spec = trial_spec(sweep, params, check_paths=False)
    note = f"best trial {row['trial_id']} of sweep {sweep.name} ({sweep.metric} {row[sweep.metric]:.4g})"
    spec = spec.model_copy(update={"description": f"{spec.description} [{note}]".strip()})
    text = spec_to_yaml(spec)
    parse_spec(yaml.safe_load(text), str(path), check_paths=False)  # what `fotlab run` will do
    header = f"# {note}\n#   fotlab run {path}\n"
    path.write_text(header + text)
    return path


def log_report(run, rows: list[dict[str, Any]], sweep, out_dir: Path) -> list[Path]:
    """Leaderboard (CSV + MLflow table) and plots into the parent run; returns the written files."""
    files = [write_leaderboard(rows, out_dir)]
    run.log_artifact(files[0])
    table = {
        key: [label(r[key]) if isinstance(r[key], (list, dict)) else r[key] for r in rows]
        for key in (rows[0] if rows else {})
    }
    if table:
        run.log_table(table, LEADERBOARD_TABLE)
    for plot in write_plots(rows, sweep, out_dir / PLOTS_DIR):
        run.log_artifact(plot, PLOTS_DIR)
        files.append(plot)
    return files
