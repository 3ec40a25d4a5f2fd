"""Train + evaluate one spec in this process (no Ray), tracked as one MLflow run: the paper-claim reproductions.

    python -m fotlab.orchestrate.reproduce experiments/paper/dictionary_lookup.yaml
    python -m fotlab.orchestrate.reproduce experiments/paper/lm_fot.yaml --set train.steps=50     # a quick smoke run

`fotlab run SPEC` does the same on Ray; this entry point exists so a paper claim can be checked on a laptop
CPU in one process (fastest start), with the same spec and the same experiment pipeline (`pipeline.run_pipeline`:
training loop, evaluations, model logging and registration, tracking).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def reproduce(
    spec_path: str,
    overrides: list[str] = (),
    *,
    output_dir: str | Path | None = None,
    threads: int | None = None,
    run_id: str | None = None,
    model_dir: str | Path | None = None,
) -> dict:
    """The experiment pipeline (train -> evaluations -> log model -> register) in this process, as one MLflow run;
    returns a summary.

    `model_dir` skips training and evaluates that saved model (a directory, or a model in the spec's store:
    `runs:/RUN_ID`, `models:/NAME/VERSION|latest`); `run_id` continues that MLflow run (e.g. one whose training
    finished but whose evaluations failed) instead of starting a new one."""
    import torch
    from rich.console import Console

    from fotlab import model_refs, tracking
    from fotlab.orchestrate.pipeline import run_pipeline
    from fotlab.spec import load_spec, resolve_tracking_uri
    from fotlab.train import Runtime, TrainHooks

    if threads:
        torch.set_num_threads(threads)
    spec = load_spec(spec_path, list(overrides))
    console = Console(file=sys.stderr)
    out = Path(output_dir or tempfile.mkdtemp(prefix=f"fotlab-{spec.name}-"))
    if model_dir is not None and model_refs.is_model_uri(str(model_dir)):  # evaluate a model of the store
        model_dir = model_refs.download_model(str(model_dir), resolve_tracking_uri(spec), out / "evaluated_model")
    # a stage-2 spec may start from a model in the store (runs:/..., models:/...): trained from a local copy,
    # logged with the reference as written
    train_spec = (
        spec
        if model_dir is not None
        else model_refs.with_local_init_from(spec, resolve_tracking_uri(spec), out / "init_from")
    )
    run = tracking.start_spec_run(
        spec,
        tags={tracking.TAG_KIND: "reproduce", "fotlab.seed": str(spec.seed)},
        run_id=run_id,
        run_name=spec.tracking.run_name or f"{spec.name}-seed{spec.seed}",
    )
    if run_id is not None:
        run.delete_tag(tracking.TAG_ERROR)  # the earlier failure is being repaired
    t0 = time.time()
    hooks = TrainHooks(
        on_log=lambda step, metrics: (run.log_metrics(metrics, step), console.print(f"step {step}: {_short(metrics)}"))
    )
    try:
        result = run_pipeline(
            train_spec,
            run,
            Runtime(output_dir=out, device="cpu"),
            hooks,
            model_dir=None if model_dir is None else Path(model_dir),
            console=console,
        )
    except BaseException as exc:
        interrupted = isinstance(exc, (KeyboardInterrupt, Terminated))
        run.fail(
            exc if not isinstance(exc, Terminated) else "Terminated: SIGTERM",
            status="KILLED" if interrupted else "FAILED",
        )
        raise
    run.finish()
    train_metrics = {k: v for k, v in result.metrics.items() if not k.startswith(("eval/", "time/"))}
    metrics = {k: v for k, v in result.metrics.items() if k.startswith("eval/")}
    train_s = result.metrics.get(tracking.TRAIN_TIME_S, 0.0)
    return {
        "run_id": run.run_id,
        "model_dir": str(result.model_dir),
        "train_s": round(train_s, 1),
        "total_s": round(time.time() - t0, 1),
        "train_metrics": train_metrics,
        "metrics": metrics,
        "registered_version": result.registered_version,
    }


class Terminated(SystemExit):
    """SIGTERM (`kill`, a scheduler's stop) as an exception, so the MLflow run is closed as KILLED."""


def _raise_terminated(signum, frame):
    raise Terminated(128 + signum)


def _short(metrics: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float) and "loss" in k)


def main(argv: list[str] | None = None) -> int:
    import json

    parser = argparse.ArgumentParser(prog="python -m fotlab.orchestrate.reproduce", description=__doc__.splitlines()[0])
    parser.add_argument("spec")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--output-dir", help="run folder (default: a new temp dir)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--run-id", help="continue this MLflow run instead of starting a new one")
    parser.add_argument(
        "--model-dir",
        "--model",
        metavar="DIR|runs:/RUN_ID|models:/NAME/VERSION",
        help="evaluate this saved model (a directory, or a model in the spec's MLflow store) instead of training",
    )
    args = parser.parse_args(argv)
    import signal

    signal.signal(signal.SIGTERM, _raise_terminated)  # a killed run must not stay RUNNING in MLflow
    from fotlab.errors import FotlabError

    try:
        summary = reproduce(
            args.spec,
            args.overrides,
            output_dir=args.output_dir,
            threads=args.threads,
            run_id=args.run_id,
            model_dir=args.model_dir,
        )
    except FotlabError as exc:  # a user mistake (spec, run, model reference): one line, no traceback
        print("reproduce: " + " ".join(str(exc).splitlines()), file=sys.stderr)
        return 1
    print(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
