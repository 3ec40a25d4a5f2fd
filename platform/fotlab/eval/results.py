"""`EvalResult`: what one evaluation returns, and binomial intervals for accuracies. The evaluation metric names
are declared in `fotlab.names`.

An accuracy family F also logs its trial counts as `F_n` (same parameters: `eval/passkey_acc_n/len_16384`) and
its chance level as `F_chance` (`eval/passkey_acc_chance`), so a report can give the Wilson interval of every
accuracy (`wilson_interval`) and state chance beside it (`fotlab.eval.report`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fotlab.names import count_metric


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (default 95%): (low, high); (0, 1) for zero trials."""
    if trials <= 0:
        return 0.0, 1.0
    if not 0 <= successes <= trials:
        raise ValueError(f"successes={successes} must lie in [0, trials={trials}]")
    p, n, z2 = successes / trials, trials, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_metrics(name: str, successes: int, trials: int) -> dict[str, float]:
    """{accuracy metric: successes / trials, its count metric: trials} (the pair a report turns into an interval)."""
    return {name: successes / trials if trials else 0.0, count_metric(name): float(trials)}


def accuracy_row(successes: int, trials: int) -> dict[str, float]:
    """Table columns for one accuracy: accuracy, Wilson 95% low / high, trials."""
    low, high = wilson_interval(successes, trials)
    return {"accuracy": successes / trials if trials else 0.0, "ci95_low": low, "ci95_high": high, "trials": trials}


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
