"""`fotlab runs list|show|compare|deliver` (rich tables over MLflow runs) and `fotlab ui` (the MLflow server).

fotlab runs list --experiment quickstart
fotlab runs show RUN_ID_OR_NAME
fotlab runs compare RUN_A RUN_B
fotlab runs deliver runs/<run>/output/undelivered_metrics.jsonl   # after a tracking-server outage
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from typing import Any

from fotlab import tracking
from fotlab.errors import FotlabError


def _console():
    import shutil

    from rich.console import Console

    # $COLUMNS or the terminal's width; 200 when piped, so tables in logs stay readable.
    return Console(width=max(100, shutil.get_terminal_size(fallback=(200, 24)).columns))


def _uri(args: argparse.Namespace) -> str:
    from fotlab.spec import resolve_tracking_uri

    return args.uri or resolve_tracking_uri(None)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _when(ms: int | None) -> str:
    if not ms:
        return ""
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).strftime("%Y-%m-%d %H:%M")


def _duration(run) -> str:
    if not run.info.end_time or not run.info.start_time:
        return ""
    return f"{(run.info.end_time - run.info.start_time) / 1000:.0f}s"


def list_runs(args: argparse.Namespace) -> int:
    from rich.table import Table

    uri = _uri(args)
    runs = tracking.search_runs(uri, experiment=args.experiment, sweep=args.sweep, max_results=args.limit)
    if not runs:
        print(f"no runs in {uri}" + (f" (experiment {args.experiment})" if args.experiment else ""))
        return 0
    names = tracking.experiment_names(uri)
    shown = [m for m in tracking.SUMMARY_METRICS if any(m in r.data.metrics for r in runs)]
    table = Table(title=f"runs in {uri}")
    for col in ("run id", "name", "experiment", "status", "started (UTC)", "time", *shown):
        table.add_column(col, no_wrap=True, overflow="fold" if col == "name" else "ellipsis")
    for run in runs:
        table.add_row(
            run.info.run_id,
            run.info.run_name,
            names.get(run.info.experiment_id, ""),
            run.info.status,
            _when(run.info.start_time),
            _duration(run),
            *[_fmt(run.data.metrics.get(m)) for m in shown],
        )
    _console().print(table)
    return 0


def show_run(args: argparse.Namespace) -> int:
    from rich.table import Table

    uri = _uri(args)
    run = tracking.get_run(uri, args.run)
    console = _console()
    info = Table(title=f"run {run.info.run_id}", show_header=False)
    info.add_column("field", style="bold")
    info.add_column("value")
    experiment = tracking.experiment_names(uri).get(run.info.experiment_id, run.info.experiment_id)
    rows = [
        ("name", run.info.run_name),
        ("experiment", experiment),
        ("status", run.info.status),
        ("started (UTC)", _when(run.info.start_time)),
        ("duration", _duration(run)),
        ("artifacts", run.info.artifact_uri),
    ]
    rows += [(k, v) for k, v in sorted(run.data.tags.items()) if not k.startswith("mlflow.log-model")]
    for key, value in rows:
        info.add_row(key, _fmt(value))
    console.print(info)
    metrics = Table(title="metrics (last value)")
    metrics.add_column("metric")
    metrics.add_column("value", justify="right")
    for key, value in sorted(run.data.metrics.items()):
        metrics.add_row(key, _fmt(value))
    console.print(metrics)
    params = Table(title="params")
    params.add_column("param")
    params.add_column("value")
    for key, value in sorted(run.data.params.items()):
        params.add_row(key, value)
    console.print(params)
    return 0


def compare_runs(args: argparse.Namespace) -> int:
    from rich.table import Table

    uri = _uri(args)
    runs = [tracking.get_run(uri, ref) for ref in args.runs]
    table = Table(title="compare")
    table.add_column("")
    for run in runs:
        table.add_column(f"{run.info.run_name}\n{run.info.run_id[:8]}")
    table.add_row("status", *[r.info.status for r in runs])
    table.add_row("duration", *[_duration(r) for r in runs])
    param_keys = sorted({k for r in runs for k in r.data.params})
    differing = [k for k in param_keys if len({r.data.params.get(k) for r in runs}) > 1]
    for key in differing:
        table.add_row(key, *[_fmt(r.data.params.get(key)) for r in runs])
    for key in sorted({k for r in runs for k in r.data.metrics}):
        table.add_row(key, *[_fmt(r.data.metrics.get(key)) for r in runs], style="cyan")
    _console().print(table)
    if not differing:
        print("(all params equal)")
    return 0


def deliver(args: argparse.Namespace) -> int:
    """`fotlab runs deliver FILE`: what a run saved while its tracking server was unreachable (`fotlab run` names
    the file), sent into that run: the metric points it lacks (those already there are skipped, so running it
    twice changes nothing), the model if the run has none, its tags, and its end (FINISHED, FAILED or KILLED with
    the final metrics and error) when the run still shows RUNNING."""
    from fotlab.undelivered import UndeliveredFile

    file = UndeliveredFile.load(args.file)
    uri = args.uri or file.tracking_uri
    if not tracking.server_reachable(uri):
        raise FotlabError(f"{args.file}: the tracking server {uri} does not answer; nothing delivered, try again later")
    found = tracking.get_run(uri, file.run_id)
    run = tracking.TrackedRun(uri, found.info.run_id, found.info.experiment_id)
    n_sent = run.deliver_points(file.points)
    done = [f"{n_sent} metric points delivered ({len(file.points) - n_sent} of the file's were there already)"]
    if file.model and tracking.logged_model_id(uri, run.run_id) is None:
        done.append(_deliver_model(run, file.model))
    if file.tags:
        run.set_tags(file.tags)
    end = file.end
    if end and found.info.status == "RUNNING":
        if end["status"] == "FINISHED":
            run.close(end.get("metrics") or {}, int(end.get("step") or 0))
        else:
            run.fail(end.get("error") or "ended while the tracking server was unreachable", status=end["status"])
        done.append(f"run marked {end['status']}")
    print(f"run {run.run_id}: " + "; ".join(done))
    return 0


def _deliver_model(run, model: dict[str, Any]) -> str:
    """Log (and register) the model folder a run could not log; what happened, for the summary line."""
    try:
        run.log_model_dir(model["dir"], step=int(model.get("step") or 0), name=model.get("name") or "model")
    except tracking.TrackingError as exc:
        return f"model not logged ({exc})"
    if not model.get("register_as"):
        return "model logged"
    return f"model logged and registered as {model['register_as']}/{run.register_model(model['register_as'])}"


def main(args: argparse.Namespace) -> int:
    """Dispatch `fotlab runs ACTION`."""
    actions = {"list": list_runs, "show": show_run, "compare": compare_runs, "deliver": deliver}
    return actions[args.runs_command](args)


def ui_command(uri: str, host: str, port: int) -> list[str]:
    """The `mlflow server` command line for the UI: one worker (small boxes), bound to `host`."""
    from fotlab.spec import resolve_artifact_root

    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        uri,
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    artifacts = resolve_artifact_root(None, uri)
    if artifacts is not None:
        cmd += ["--artifacts-destination", artifacts]
    return cmd


def _newest_run(uri: str):
    """The most recent run in the store, or None (an empty or unreachable store: the UI still starts)."""
    try:
        runs = tracking.search_runs(uri, max_results=1)
    except Exception:  # noqa: BLE001 - only a convenience link
        return None
    return runs[0] if runs else None


def serve_ui(args: argparse.Namespace) -> int:
    """Run the MLflow UI in the foreground (replaces this process)."""
    uri = _uri(args)
    if uri.startswith(("file:", "/", ".")) or "://" not in uri:
        raise FotlabError(f"tracking URI {uri!r} is a file store (deprecated); use sqlite:///path/mlflow.db")
    cmd = ui_command(uri, args.host, args.port)
    base = f"http://{args.host}:{args.port}"
    print(f"MLflow UI for {uri} at {base} (Ctrl-C to stop)", file=sys.stderr, flush=True)
    newest = _newest_run(uri)
    if newest is not None:  # MLflow's UI starts in its GenAI view; this link opens the training view
        print(
            f"newest run: {tracking.ui_link(base, newest.info.experiment_id, newest.info.run_id)}",
            file=sys.stderr,
            flush=True,
        )
    os.execv(cmd[0], cmd)
    return 0  # not reached
