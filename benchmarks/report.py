"""`python -m benchmarks.report RESULTS.json ...`: the runs' tables as Markdown (for docs/performance.md)."""

from __future__ import annotations

import json
import sys

EXTRA = (
    "seconds",
    "prefill_rss_mib",
    "mem_bytes_per_token",
    "alloc_bytes_per_token",
    "child_cpu_seconds",
    "logits_max_abs_diff",
    "state_mib_per_rank",
    "params_mib",
    "grads_mib",
    "optim_mib",
)


def _num(x: float) -> str:
    """3 significant digits below 10, 1 decimal above."""
    return f"{x:.3g}" if abs(x) < 10 else f"{x:.1f}"


def markdown(records: list[dict]) -> str:
    """One Markdown table row per case: median of the compared metric, spread, ratio, peak RSS, extras."""
    lines = [
        "| benchmark | group | case | median | min..max | ratio | peak RSS MiB | n | also (medians) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for rec in records:
        med, metric = rec["median"], rec["metric"]
        value = f"{_num(med[metric])} {'CPU s' if metric == 'cpu_seconds' else 'wall s'}" if metric in med else "-"
        spread = f"{_num(rec['min'])}..{_num(rec['max'])}" if "min" in rec else "-"
        ratio = "-" if rec.get("ratio") is None else f"{rec['ratio']:.2f}x"
        rss = f"{med['peak_rss_mib']:.0f}" if "peak_rss_mib" in med else "-"
        extra = ", ".join(f"{k} {_num(med[k])}" for k in EXTRA if k in med and k != metric)
        if rec.get("errors"):
            extra = (extra + "; " if extra else "") + "error: " + rec["errors"][0][:80]
        lines.append(
            f"| {rec['benchmark']} | {rec['group']} | {rec['name']} | {value} | {spread} | {ratio} | {rss} "
            f"| {rec['n_ok']} | {extra} |"
        )
    return "\n".join(lines)


def main(paths: list[str]) -> None:
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        print(markdown(data["records"]), end="\n\n")


if __name__ == "__main__":
    main(sys.argv[1:])
