"""Load a trained model (and its tokenizer) for evaluation: a local directory or an MLflow model reference.

model_dir = resolve_model_dir("runs:/<RUN_ID>", "sqlite:///mlflow.db", "/tmp/download")
model, tokenizer = load_model_and_tokenizer(model_dir, spec, device="cpu")
"""

from __future__ import annotations

from pathlib import Path

from fotlab.errors import FotlabError


class EvalError(FotlabError):
    """A user mistake in `fotlab eval` (unknown model directory or run)."""


def resolve_model_dir(ref: str, tracking_uri: str, download_root: str | Path) -> Path:
    """A local model directory for `ref`: a directory, `runs:/RUN_ID[/PATH]` (default PATH: the run's model
    artifact folder) or `models:/NAME/VERSION|latest|@ALIAS` (the model registry), downloaded into download_root."""
    from fotlab.model_refs import download_model
    from fotlab.tracking import TrackingError

    try:
        return download_model(ref, tracking_uri, download_root)
    except TrackingError as exc:
        raise EvalError(f"--model {exc}") from None


def load_model_and_tokenizer(model_dir: Path, spec, device: str | None = None):
    """FoTForCausalLM (eval mode) and its tokenizer (saved beside it, else the spec's data.tokenizer)."""
    import torch

    from fotlab.model import FoTForCausalLM

    model_dir = Path(model_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model = FoTForCausalLM.from_pretrained(str(model_dir)).to(device).eval()
    except FotlabError:
        raise
    except Exception as exc:  # noqa: BLE001 - OSError, ValueError, SafetensorError, pickle errors: one line
        raise EvalError(f"--model {model_dir}: cannot load the model: {_first_line(exc)}") from None
    if (model_dir / "tokenizer.json").is_file() or (model_dir / "tokenizer_config.json").is_file():
        from fotlab.data import load_pretrained_tokenizer

        tokenizer = load_pretrained_tokenizer(model_dir)
    else:
        from fotlab.data import build_tokenizer

        tokenizer = build_tokenizer(spec.data.tokenizer, data_spec=spec.data)
    return model, tokenizer


def _first_line(exc: BaseException) -> str:
    if "ignore_mismatched_sizes" in str(exc):  # transformers' shape mismatch: its report went to the log above
        return "the weights' shapes do not match config.json"
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"
