"""Handlers behind `fotlab run`, `fotlab eval` and `fotlab submit` (the CLI calls them with its parsed arguments).

Each takes the argparse namespace (spec, overrides, json, and the verb's options) and returns a JSON-able dict
(printed by the CLI as the final stdout line under --json) or an int exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

from rich.console import Console

from fotlab import names
from fotlab.eval.loading import EvalError, resolve_model_dir  # noqa: F401 - EvalError: what `fotlab eval` raises

EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


def run_command(args: argparse.Namespace) -> dict | int:
    """`fotlab run SPEC [--set k=v] [--json] [--resume RUN] [--address URL] [--no-progress]`."""
    from fotlab.orchestrate.runner import RunFailedError, RunInterruptedError, run_experiment
    from fotlab.spec import load_spec

    spec = load_spec(args.spec, args.overrides)
    as_json = bool(getattr(args, "json", False))
    # Under --json, everything but the final JSON object goes to stderr (Ray logs, loop prints).
    redirect = contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext()
    try:
        with redirect:
            outcome = run_experiment(
                spec,
                address=getattr(args, "address", None),
                resume=getattr(args, "resume", None),
                json_output=as_json,
                progress=getattr(args, "progress", True),
                spec_path=args.spec,
            )
    except (RunInterruptedError, RunFailedError) as err:
        status = "KILLED" if isinstance(err, RunInterruptedError) else "FAILED"
        print(f"fotlab run: {err}", file=sys.stderr)
        if as_json:  # scripts still get one JSON object
            print(
                json.dumps(
                    {"run_id": err.run_id, "status": status, "model_dir": None, "metrics": {}, "error": str(err)}
                )
            )
        return EXIT_INTERRUPTED if status == "KILLED" else EXIT_FAILED
    if outcome.undelivered is not None:  # trained, model saved, but the tracking server never came back: exit 1
        print(f"fotlab run: {outcome.undelivered_line()}", file=sys.stderr)
        if as_json:
            print(json.dumps({**outcome.to_json(), "error": outcome.undelivered_line()}))
        return EXIT_FAILED
    if not as_json:
        print_summary(outcome)
    return outcome.to_json()


def print_summary(outcome) -> None:
    """The closing lines of a run: status, key metrics, where the model is, how to browse the run."""
    from fotlab import tracking

    console = Console(soft_wrap=True)  # long paths and ids stay on one line (copy-pasteable)
    console.print(
        f"[bold green]run {outcome.run_id} {outcome.status}[/] ({outcome.run_name}, step {outcome.final_step})"
    )
    for name in (tracking.VAL_LOSS, tracking.VAL_PPL, tracking.TRAIN_LOSS):
        if name in outcome.metrics:
            console.print(f"  {name:<12} {outcome.metrics[name]:.4f}")
    for line in memory_effect_lines(outcome.metrics):
        console.print(f"  {line}")
    console.print(f"  model        {outcome.model_dir}")
    console.print(f"browse: `fotlab runs show {outcome.run_id}`  or  `fotlab ui`")


def memory_effect_lines(metrics: dict[str, float]) -> list[str]:
    """One line per perplexity evaluation: perplexity without memory, with each memory size, and the change.

    `{"eval/ppl_single_doc/mem_0": 9.1, "eval/ppl_single_doc/mem_1024": 8.2}` ->
    `["ppl_single_doc  no memory 9.100 | memory 1024: 8.200 (-9.9%)"]`.
    """
    curves: dict[str, dict[int, float]] = {}
    for name, value in metrics.items():
        parsed = names.parse_metric_name(name)
        if parsed and parsed[0].startswith("ppl") and list(parsed[1]) == ["mem"] and parsed[1]["mem"].isdigit():
            curves.setdefault(parsed[0], {})[int(parsed[1]["mem"])] = value
    lines = []
    for family, curve in sorted(curves.items()):
        base = curve.get(0)
        parts = [f"no memory {base:.3f}"] if base is not None else []
        for size in sorted(m for m in curve if m > 0):
            change = f" ({(curve[size] / base - 1) * 100:+.1f}%)" if base else ""
            parts.append(f"memory {size}: {curve[size]:.3f}{change}")
        lines.append(f"{family}  " + " | ".join(parts))
    return lines


def submit_command(args: argparse.Namespace) -> dict:
    """`fotlab submit SPEC --address http://HEAD:8265 [--set k=v] [--json]`: send the run as a Ray Job."""
    from fotlab.orchestrate.jobs import check_address, submit_experiment
    from fotlab.spec import load_spec

    address = check_address(args.address)  # before loading anything heavy
    spec = load_spec(args.spec, args.overrides, check_paths=False)  # paths are the cluster's
    submission = submit_experiment(spec, address)
    result = submission.to_json()
    if not getattr(args, "json", False):
        print(f"submitted job {submission.submission_id} to {address}")
        print(f"follow: {result['logs']}")
    return result


def eval_command(args: argparse.Namespace) -> dict:
    """`fotlab eval SPEC --model DIR|runs:/RUN_ID [--set k=v] [--json]`: the spec's evaluations on a trained model,
    tracked as one MLflow run (metrics `eval/...`, plots and JSON results under the `eval/` artifact folder);
    returns {run_id, model_dir, metrics}."""
    from fotlab import tracking
    from fotlab.orchestrate.pipeline import evaluate
    from fotlab.spec import load_spec, resolve_tracking_uri

    spec = load_spec(args.spec, getattr(args, "overrides", []) or [])
    uri = resolve_tracking_uri(spec)
    console = Console(file=sys.stderr if getattr(args, "json", False) else sys.stdout)
    with tempfile.TemporaryDirectory(prefix="fotlab-eval-") as tmp:
        model_dir = resolve_model_dir(args.model, uri, Path(tmp) / "model")
        run = tracking.start_spec_run(
            spec,
            uri=uri,
            run_name=spec.tracking.run_name or f"eval-{spec.name}",
            tags={names.TAG_KIND: "eval", names.TAG_MODEL: args.model},
        )
        try:
            metrics = evaluate(spec, model_dir, run, 0, Path(tmp) / "eval", console=console)
        except BaseException as exc:
            run.fail(exc)
            raise
        run.finish()
    if not getattr(args, "json", False):
        console.print(f"eval run {run.run_id}: {len(metrics)} metrics; browse with `fotlab runs show {run.run_id}`")
    return {"run_id": run.run_id, "model_dir": str(args.model), "metrics": metrics}
