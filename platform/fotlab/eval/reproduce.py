"""Train + evaluate one spec in this process (no Ray), tracked as one MLflow run: the paper-claim reproductions.

    python -m fotlab.eval.reproduce experiments/paper/dictionary_lookup.yaml
    python -m fotlab.eval.reproduce experiments/paper/lm_fot.yaml --set train.steps=50     # a quick smoke run

`fotlab run SPEC` does the same on Ray; this entry point exists so a paper claim can be checked on a laptop
CPU in one process (fastest start), with the same spec, training loop, evaluations and tracking.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def reproduce(spec_path: str, overrides: list[str] = (), *, output_dir: str | Path | None = None,
              threads: int | None = None, run_id: str | None = None, model_dir: str | Path | None = None) -> dict:
    """Train the spec's model (fotlab.train.train), run its evaluations, log both to MLflow; returns a summary.

    `model_dir` skips training and evaluates that saved model; `run_id` continues that MLflow run (e.g. one
    whose training finished but whose evaluations failed) instead of starting a new one."""
    import torch
    from rich.console import Console

    from fotlab import tracking
    from fotlab.eval.cli import load_model_and_tokenizer
    from fotlab.eval.runner import run_spec_evaluations
    from fotlab.spec import load_spec, resolve_tracking_uri
    from fotlab.train import Runtime, TrainHooks, train

    if threads:
        torch.set_num_threads(threads)
    spec = load_spec(spec_path, list(overrides))
    console = Console(file=sys.stderr)
    out = Path(output_dir or tempfile.mkdtemp(prefix=f"fotlab-{spec.name}-"))
    # a stage-2 spec may start from a model in the store (runs:/..., models:/...): trained from a local copy,
    # logged with the reference as written
    train_spec = spec if model_dir is not None else \
        tracking.with_local_init_from(spec, resolve_tracking_uri(spec), out / "init_from")
    run = tracking.start_spec_run(spec, tags={"fotlab.kind": "reproduce", "fotlab.seed": str(spec.seed)},
                                  run_id=run_id, run_name=spec.tracking.run_name or f"{spec.name}-seed{spec.seed}")
    if run_id is not None and tracking.TAG_ERROR in tracking.get_run(run.uri, run_id).data.tags:
        run.client.delete_tag(run_id, tracking.TAG_ERROR)  # the earlier failure is being repaired
    t0 = time.time()
    trained = model_dir is None
    try:
        if trained:
            hooks = TrainHooks(on_log=lambda step, metrics: (run.log_metrics(metrics, step),
                                                             console.print(f"step {step}: {_short(metrics)}")))
            result = train(train_spec, Runtime(output_dir=out, device="cpu"), hooks)
            model_dir, final_step, train_metrics = Path(result.model_dir), result.final_step, result.metrics
            run.log_datasets(result.datasets)
        else:
            model_dir, final_step, train_metrics = Path(model_dir), spec.train.steps, {}
        train_s = time.time() - t0
        model, tokenizer = load_model_and_tokenizer(model_dir, spec, device="cpu")
        results = run_spec_evaluations(spec, model, tokenizer, out / "eval", run=run, step=final_step,
                                       console=console)
        timings = {"time/eval_s": time.time() - t0 - train_s}
        if train_metrics:
            timings["time/train_s"] = train_s
        run.log_metrics(timings, step=final_step)
        if trained and spec.tracking.log_model:  # after the evaluations, so their metrics link to the model
            run.log_model_dir(model_dir, step=final_step)  # evaluate it again later: `fotlab eval SPEC --model runs:/ID`
            if spec.tracking.register_model:
                run.register_model(spec.tracking.register_model)
    except BaseException as exc:
        interrupted = isinstance(exc, (KeyboardInterrupt, Terminated))
        run.fail(exc if not isinstance(exc, Terminated) else "Terminated: SIGTERM",
                 status="KILLED" if interrupted else "FAILED")
        raise
    run.finish()
    metrics = {k: v for r in results.values() for k, v in r.metrics.items()}
    return {"run_id": run.run_id, "model_dir": str(model_dir), "train_s": round(train_s, 1),
            "total_s": round(time.time() - t0, 1), "train_metrics": train_metrics, "metrics": metrics}


class Terminated(SystemExit):
    """SIGTERM (`kill`, a scheduler's stop) as an exception, so the MLflow run is closed as KILLED."""


def _raise_terminated(signum, frame):
    raise Terminated(128 + signum)


def _short(metrics: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float) and "loss" in k)


def main(argv: list[str] | None = None) -> int:
    import json

    parser = argparse.ArgumentParser(prog="python -m fotlab.eval.reproduce", description=__doc__.splitlines()[0])
    parser.add_argument("spec")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--output-dir", help="run folder (default: a new temp dir)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--run-id", help="continue this MLflow run instead of starting a new one")
    parser.add_argument("--model-dir", help="evaluate this saved model instead of training")
    args = parser.parse_args(argv)
    import signal

    signal.signal(signal.SIGTERM, _raise_terminated)  # a killed run must not stay RUNNING in MLflow
    from fotlab.errors import FotlabError

    try:
        summary = reproduce(args.spec, args.overrides, output_dir=args.output_dir, threads=args.threads,
                            run_id=args.run_id, model_dir=args.model_dir)
    except FotlabError as exc:  # a user mistake (spec, run, model reference): one line, no traceback
        print("reproduce: " + " ".join(str(exc).splitlines()), file=sys.stderr)
        return 1
    print(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
