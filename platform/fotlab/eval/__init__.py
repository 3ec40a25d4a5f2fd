"""fotlab evaluations: perplexity vs memory, passkey retrieval, distraction ratio r_d, dictionary lookup, few-shot ICL.

Every evaluation is a plain function `(model, tokenizer, cfg, ...) -> EvalResult` (metrics, table rows, figure);
`run_evaluations(eval_spec, model, tokenizer, ...)` runs the ones an `EvalSpec` selects.

The `eval:` spec section lives in `fotlab.spec.eval`; model loading for evaluation in `fotlab.eval.loading`.
Exports are resolved lazily, so importing this package stays cheap (no torch or matplotlib).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "EvalSpec": "fotlab.spec.eval",
    "EvalResult": "fotlab.eval.results",
    "metric_name": "fotlab.eval.results",
    "perplexity_vs_memory": "fotlab.eval.perplexity",
    "passkey_retrieval": "fotlab.eval.passkey",
    "passkey_prompt": "fotlab.eval.passkey",
    "distraction_ratio": "fotlab.eval.distraction",
    "dictionary_lookup_accuracy": "fotlab.eval.dictionary",
    "few_shot_accuracy": "fotlab.eval.few_shot",
    "run_evaluations": "fotlab.eval.runner",
    "log_eval_result": "fotlab.eval.runner",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fotlab.eval' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
