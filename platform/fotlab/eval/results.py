"""`EvalResult` and the evaluation metric names (declared once, here).

MLflow accepts only `[/\\w.\\- :]` in metric names, so parameters are written `key_value` path parts:
`eval/ppl_single_doc/mem_4096`, `eval/passkey_acc/len_16384`, `eval/distraction_ratio/d_8`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# ----- metric names (one function per family; every evaluation builds its names through these) -----------------
PREFIX = "eval"
_VALID = re.compile(r"^[/\w.\- :]*$")


def metric_name(family: str, **params: Any) -> str:
    """`metric_name("ppl_single_doc", mem=4096)` -> "eval/ppl_single_doc/mem_4096" (valid MLflow metric name)."""
    parts = [PREFIX, family] + [f"{k}_{_fmt(v)}" for k, v in params.items()]
    name = "/".join(parts)
    if not _VALID.match(name):
        raise ValueError(f"metric name {name!r} has characters MLflow rejects")
    return name


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def ppl_metric(name: str, mode: str, memory_size: int) -> str:
    """Perplexity of evaluation `name` in `mode` ("single_doc" | "multi_doc") with memory capped at memory_size."""
    return metric_name(f"{name}_{mode}", mem=memory_size)


def passkey_metric(length: int, depth: float | None = None) -> str:
    """Passkey accuracy at prompt length (mean over depths when depth is None, else one depth in percent)."""
    if depth is None:
        return metric_name("passkey_acc", len=length)
    return metric_name("passkey_acc", len=length, depth=int(round(depth * 100)))


def distraction_metric(n_contexts: int, layer: int | None = None) -> str:
    """Distraction ratio r_d with d = n_contexts (mean over memory layers when layer is None)."""
    if layer is None:
        return metric_name("distraction_ratio", d=n_contexts)
    return metric_name("distraction_ratio", layer=layer, d=n_contexts)


def dictionary_metric(memory_size: int, per_token: bool = False) -> str:
    """Dictionary lookup accuracy (whole value exact match, or per value token) with memory_size dictionary tokens."""
    return metric_name("dict_lookup_token_acc" if per_token else "dict_lookup_acc", mem=memory_size)


def few_shot_metric(name: str, context_len: int, stat: str = "acc") -> str:
    """Few-shot accuracy (stat "acc" = mean over samplings, "acc_std" = std) at context_len tokens."""
    return metric_name(f"{name}_{stat}", ctx=context_len)


# ----- result --------------------------------------------------------------------------------------------------
@dataclass
class EvalResult:
    """What one evaluation returns: scalar metrics, table rows (first row's keys are the columns), a PNG plot."""

    name: str
    metrics: dict[str, float]
    rows: list[dict[str, Any]] = field(default_factory=list)
    figure_path: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def table(self, title: str | None = None):
        """A `rich.table.Table` of the rows."""
        from rich.table import Table

        table = Table(title=title or self.name)
        columns = list(self.rows[0]) if self.rows else []
        for col in columns:
            table.add_column(str(col), justify="right")
        for row in self.rows:
            table.add_row(*[_cell(row.get(c)) for c in columns])
        return table

    def to_json(self) -> dict[str, Any]:
        """JSON-friendly dict (figure path as a string)."""
        return {"name": self.name, "metrics": self.metrics, "rows": self.rows,
                "figure_path": None if self.figure_path is None else str(self.figure_path), "info": self.info}

    def save_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2, default=str) + "\n")
        return path


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)
