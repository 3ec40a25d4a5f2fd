"""`EvalResult`: what one evaluation returns. The evaluation metric names are declared in `fotlab.names` (re-exported
here for the evaluations)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# re-exported: the eval modules import their metric names from here (the lint pass had dropped them)
from fotlab.names import EVAL_PREFIX as PREFIX  # noqa: F401
from fotlab.names import (  # noqa: F401
    dictionary_metric,
    distraction_metric,
    few_shot_metric,
    metric_name,
    passkey_metric,
    ppl_metric,
)


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
        return {
            "name": self.name,
            "metrics": self.metrics,
            "rows": self.rows,
            "figure_path": None if self.figure_path is None else str(self.figure_path),
            "info": self.info,
        }

    def save_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2, default=str) + "\n")
        return path


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)
