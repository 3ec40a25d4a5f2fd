"""PNG plots for evaluations (matplotlib, Agg backend, no global pyplot state: one Figure object per plot)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def _figure(width: float = 6.0, height: float = 4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def line_plot(
    path: str | Path,
    x: Sequence[float],
    series: dict[str, Sequence[float]],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    logx: bool = False,
    dashed: Sequence[str] = (),
) -> Path:
    """One line per series (label -> y values at x); series named in `dashed` are drawn dashed. Returns path."""
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    for label, ys in series.items():
        ax.plot(list(x), list(ys), "--" if label in dashed else "-o", label=label, markersize=4)
    if logx and all(v > 0 for v in x):
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if len(series) > 1:
        ax.legend()
    return _save(fig, path)


def heatmap(
    path: str | Path,
    values: Sequence[Sequence[float]],
    *,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    xlabel: str,
    ylabel: str,
    title: str,
    vmin: float = 0.0,
    vmax: float = 1.0,
) -> Path:
    """values[i][j] coloured in [vmin, vmax] and written in each cell; rows = y axis, columns = x axis."""
    fig = _figure(1.5 + 0.8 * max(len(col_labels), 3), 1.5 + 0.5 * max(len(row_labels), 3))
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(values, vmin=vmin, vmax=vmax, cmap="RdYlGn", aspect="auto", origin="lower")
    ax.set_xticks(range(len(col_labels)), labels=list(col_labels))
    ax.set_yticks(range(len(row_labels)), labels=list(row_labels))
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.colorbar(image, ax=ax)
    return _save(fig, path)
