"""fotlab models as MLflow Models: a pyfunc flavour whose files are fotlab's HF-format model directory.

    mlflow models serve -m models:/quickstart/latest --env-manager local --port 5001
    curl -s http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
         -d '{"dataframe_records": [{"prompt": "a long prompt ..."}], "params": {"max_new_tokens": 32}}'

Design choices:
- Nothing is pickled and no code is read from the artifact: the MLflow Model is saved (`fotlab.tracking.
  save_mlflow_model`) with `loader_module="fotlab.serving"` and `data_path=<model dir>`, so MLflow's pyfunc loader
  imports this module from the installed fotlab and calls `_load_pyfunc(data_path)`, which loads safetensors
  through `FoTForCausalLM.from_pretrained`. A model directory whose config asks for custom code is refused.
- `predict` is long-context generation with memory: each prompt goes through the model once (the prefix in
  windows into memory, the last `last_context_length` tokens local), then greedy decoding continues from that
  state, exactly what `FoTForCausalLM.generate` does. Params: `max_new_tokens`, `last_context_length`.
- Prompts of one request are generated one by one: they differ in length, and each keeps its own memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fotlab import names
from fotlab.tracking import check_no_remote_code


class FoTGenerator:
    """The pyfunc implementation: a loaded FoT model + tokenizer; `predict` maps prompts to completions."""

    def __init__(self, model_dir: str | Path, device: str | None = None) -> None:
        import torch

        from fotlab.data import load_pretrained_tokenizer
        from fotlab.model import FoTForCausalLM

        check_no_remote_code(model_dir)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = FoTForCausalLM.from_pretrained(str(model_dir)).to(self.device).eval()
        self.tokenizer = load_pretrained_tokenizer(model_dir)

    def generate(self, prompt: str, max_new_tokens: int, last_context_length: int | None) -> str:
        """Greedy completion of one prompt (memory-backed when the prompt is longer than the model's window)."""
        import torch

        ids = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(self.device)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        with torch.no_grad():
            out = self.model.generate(
                ids,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                last_context_length=last_context_length,
            )
        return self.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    def predict(self, model_input: Any, params: dict[str, Any] | None = None):
        """prompts (a DataFrame with a `prompt` column, a list of strings or one string) -> DataFrame `completion`."""
        import pandas as pd

        params = params or {}
        max_new_tokens = int(params.get("max_new_tokens") or names.DEFAULT_MAX_NEW_TOKENS)
        lcl = params.get("last_context_length")
        lcl = None if lcl is None or int(lcl) < 0 else int(lcl)
        prompts = _prompts(model_input)
        return pd.DataFrame({names.COMPLETION_COLUMN: [self.generate(p, max_new_tokens, lcl) for p in prompts]})


def _prompts(model_input: Any) -> list[str]:
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        column = names.PROMPT_COLUMN if names.PROMPT_COLUMN in model_input.columns else model_input.columns[0]
        return [str(p) for p in model_input[column]]
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, dict):
        value = model_input.get(names.PROMPT_COLUMN)
        return [value] if isinstance(value, str) else [str(p) for p in value]
    return [str(p) for p in model_input]


def _load_pyfunc(data_path: str, model_config: dict | None = None) -> FoTGenerator:
    """MLflow's entry point for `loader_module="fotlab.serving"`: data_path is the saved model directory."""
    return FoTGenerator(data_path)
