"""`fotlab eval SPEC --model DIR|runs:/RUN_ID [--set k=v] [--json]`: the spec's evaluations on a trained model,
tracked as one MLflow run (metrics `eval/...`, plots and JSON results under the `eval/` artifact folder).

    fotlab eval experiments/quickstart.yaml --model runs:/<RUN_ID> --set eval.passkey.lengths=[256]

`eval_command(args)` is the handler (args: spec, overrides, model, json); it returns a JSON-able dict.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from fotlab.errors import FotlabError


class EvalError(FotlabError):
    """A user mistake in `fotlab eval` (unknown model directory or run)."""


def resolve_model_dir(ref: str, tracking_uri: str, download_root: str | Path) -> Path:
    """A local model directory for `ref`: a directory, `runs:/RUN_ID[/PATH]` (default PATH: the run's model
    artifact folder) or `models:/NAME/VERSION|latest|@ALIAS` (the model registry), downloaded into download_root."""
    from fotlab.tracking import TrackingError, download_model

    try:
        return download_model(ref, tracking_uri, download_root)
    except TrackingError as exc:
        raise EvalError(f"--model {exc}") from None


def load_model_and_tokenizer(model_dir: Path, spec, device: str | None = None):
    """FoTForCausalLM (eval mode) and its tokenizer (saved beside it, else the spec's data.tokenizer)."""
    import torch

    from fotlab.model import FoTForCausalLM

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = FoTForCausalLM.from_pretrained(str(model_dir)).to(device).eval()
    if (model_dir / "tokenizer.json").is_file() or (model_dir / "tokenizer_config.json").is_file():
        from fotlab.data import load_pretrained_tokenizer

        tokenizer = load_pretrained_tokenizer(model_dir)
    else:
        from fotlab.data import build_tokenizer

        tokenizer = build_tokenizer(spec.data.tokenizer, data_spec=spec.data)
    return model, tokenizer


def eval_command(args: argparse.Namespace) -> dict:
    """Load the spec and model, run + log the evaluations as one MLflow run; returns {run_id, model_dir, metrics}."""
    import sys

    from rich.console import Console

    from fotlab import tracking
    from fotlab.eval.runner import run_spec_evaluations
    from fotlab.spec import load_spec, resolve_tracking_uri

    spec = load_spec(args.spec, getattr(args, "overrides", []) or [])
    uri = resolve_tracking_uri(spec)
    console = Console(file=sys.stderr if getattr(args, "json", False) else sys.stdout)
    with tempfile.TemporaryDirectory(prefix="fotlab-eval-") as tmp:
        model_dir = resolve_model_dir(args.model, uri, Path(tmp) / "model")
        model, tokenizer = load_model_and_tokenizer(model_dir, spec)
        run = tracking.start_spec_run(spec, uri=uri, run_name=spec.tracking.run_name or f"eval-{spec.name}",
                                      tags={"fotlab.kind": "eval", "fotlab.model": args.model})
        try:
            results = run_spec_evaluations(spec, model, tokenizer, Path(tmp) / "eval", run=run, console=console)
        except BaseException as exc:
            run.fail(exc)
            raise
        run.finish()
    metrics = {k: v for r in results.values() for k, v in r.metrics.items()}
    if not getattr(args, "json", False):
        console.print(f"eval run {run.run_id}: {len(metrics)} metrics; browse with `fotlab runs show {run.run_id}`")
    return {"run_id": run.run_id, "model_dir": str(args.model), "metrics": metrics}
