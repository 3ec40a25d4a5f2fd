"""Generate docs/results.md from the MLflow runs that carry evaluation metrics (`eval/...`).

    python -m fotlab.eval.report                                   # default store, all experiments
    python -m fotlab.eval.report --experiment paper_multi_doc_ppl --out docs/results.md

A table per metric family (e.g. `ppl_multi_doc`: one row per memory size, one column per run, so FoT and its
baseline sit side by side), then per run its training summary and eval plots (downloaded next to the markdown
file, under `<out stem>/<run id>/`), then the paper's reference numbers (FOT_SPEC §3) for comparison.
Accuracies whose trial counts were logged (`F_n`, `fotlab.eval.results`) are shown with their Wilson 95%
interval, `0.945 [0.912, 0.966] n=256`, and a family's chance level (`F_chance`) is stated under its table.

Only runs that evaluated one split are read (`--split`, default `test`: the reported numbers; `dev` for the runs
that choose variants). The page opens with each spec's metrics across its seeds (`fotlab.eval.seeds`: mean ± sd,
per-seed values, pooled Wilson intervals), then the runs one by one.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from fotlab import names

PAPER_REFERENCE = """## The paper's numbers (FOT_SPEC §3)

| claim | paper |
|---|---|
| perplexity vs memory (184M, zero-shot after FoT fine-tuning; GitHub / Isabelle / arXiv / PG-19) | 2K: 6.72 / 5.63 / 8.17 / 23.74 → 64K: 5.32 / 4.44 / 6.81 / 22.65 (Memorizing Transformer 64K: 7.26 / 6.64 / 8.60 / 23.24) |
| passkey retrieval (LongLLaMA-3B) | 100% up to 16k, 94.5% at 100k, 73% at 256k; OpenLLaMA-3B 0% beyond 2k |
| distraction ratio r_d | standard transformer ≈ 1/d; FoT stays far above |
| dictionary lookup (37M, vocab 64, local 256, k = 32) | FoT > 92% at a 16M-token memory; baseline fails at 16K |
| few-shot TREC (LongLLaMA-3B) | 67.0 → 73.3 from 2K to 8K context |
"""


def _is_companion(family: str) -> bool:
    from fotlab.names import CHANCE_SUFFIX, COUNT_SUFFIX

    return family.endswith((COUNT_SUFFIX, CHANCE_SUFFIX))


def accuracy_cell(value: float, trials: float | None) -> str:
    """`0.945 [0.912, 0.966] n=256` (Wilson 95%) when the trial count is known, else the value alone."""
    from fotlab.eval.results import wilson_interval

    if not trials:
        return f"{value:.4g}"
    low, high = wilson_interval(int(round(value * trials)), int(trials))
    return f"{value:.3g} [{low:.3g}, {high:.3g}] n={int(trials)}"


def group_metrics(metrics: dict[str, float]) -> dict[str, list[tuple[str, float]]]:
    """{'eval/ppl_multi_doc/mem_256': x} -> {'ppl_multi_doc': [('mem_256', x)]}, parameters sorted numerically."""
    groups: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for name, value in metrics.items():
        parsed = names.parse_metric_name(name)
        if parsed is None:
            continue
        family, params = parsed
        label = "/".join(f"{k}_{v}" if v else k for k, v in params.items())
        groups[family].append((label or "value", value))
    return {k: sorted(v, key=lambda kv: _sort_key(kv[0])) for k, v in sorted(groups.items())}


def _sort_key(param: str):
    out = []
    for part in param.split("/"):
        name, _, value = part.rpartition("_")
        try:
            out.append((name, float(value), ""))
        except ValueError:
            out.append((part, 0.0, part))
    return out


def _run_label(run) -> str:
    name = run.data.tags.get(names.TAG_SPEC_NAME) or run.info.run_name or run.info.run_id[:12]
    return f"{name} (`{run.info.run_id[:8]}`)"


def family_tables(runs) -> str:
    """One table per metric family: a row per parameter (e.g. mem_256), a column per run that has it, so a
    FoT run and its baseline sit side by side."""
    from fotlab.names import CHANCE_SUFFIX, COUNT_SUFFIX

    per_run = [(run, group_metrics(run.data.metrics)) for run in runs]
    families = sorted({fam for _, groups in per_run for fam in groups if not _is_companion(fam)})
    lines = []
    for fam in families:
        cols = [
            (run, dict(groups[fam]), dict(groups.get(fam + COUNT_SUFFIX, [])))
            for run, groups in per_run
            if fam in groups
        ]
        params = sorted({p for _, values, _ in cols for p in values}, key=_sort_key)
        lines += [
            f"#### {fam}",
            "",
            "| " + " | ".join([fam, *[_run_label(r) for r, _, _ in cols]]) + " |",
            "|" + "---|" * (len(cols) + 1),
        ]
        for param in params:
            cells = [
                accuracy_cell(values[param], counts.get(param)) if param in values else "" for _, values, counts in cols
            ]
            lines.append("| " + " | ".join([param, *cells]) + " |")
        chance = {v for _, groups in per_run for _, v in groups.get(fam + CHANCE_SUFFIX, [])}
        if chance:
            lines += ["", f"Chance level: {', '.join(f'{c:.3g}' for c in sorted(chance))}."]
        lines.append("")
    return "\n".join(lines) + "\n"


def summary_table(runs) -> str:
    """Per run and family: the value at the smallest and at the largest parameter (memory, length, d, context):
    how each curve moves from 1x to its longest context."""
    lines = ["| run | family | first | last | change |", "|---|---|---|---|---|"]
    for run in runs:
        for fam, items in group_metrics(run.data.metrics).items():
            if _is_companion(fam):
                continue
            items = [(p, v) for p, v in items if "/" not in p and "layer_" not in p]  # curves, not sub-cells
            if len(items) < 2:
                continue
            (p0, v0), (p1, v1) = items[0], items[-1]
            change = f"{(v1 - v0) / v0:+.1%}" if v0 else f"{v1 - v0:+.4g}"
            lines.append(f"| {_run_label(run)} | {fam} | {p0}: {v0:.4g} | {p1}: {v1:.4g} | {change} |")
    return "\n".join(lines) + "\n"


def run_section(run, experiment_name: str, figure_links: list[str]) -> str:
    """Markdown of one run: header, spec name, training summary and its plots."""
    lines = [f"### {experiment_name} / {_run_label(run)}", ""]
    spec_name = run.data.tags.get(names.TAG_SPEC_NAME)
    facts = [f"spec `{spec_name}`" if spec_name else None, f"status {run.info.status}"]
    for key in (names.TRAIN_LOSS, names.VAL_LOSS, names.TRAIN_TIME_S, names.EVAL_TIME_S):
        if key in run.data.metrics:
            facts.append(f"{key} {run.data.metrics[key]:.4g}")
    lines += ["; ".join(f for f in facts if f), ""]
    lines += [f"![{Path(link).stem}]({link})" for link in figure_links]
    return "\n".join(lines) + "\n"


RUN_SCAN_LIMIT = 50_000  # MLflow's page size cap for one search_runs call


def generate_report(
    tracking_uri: str,
    out: str | Path,
    experiments: list[str] | None = None,
    max_runs: int = 50,
    run_ids: list[str] | None = None,
    notes: str | None = None,
    split: str | None = "test",
) -> Path:
    """Write the results markdown to `out` (plots beside it); returns its path. `run_ids` keeps only those runs
    (id prefixes are enough); `notes` (markdown) is placed after the header (e.g. how to read the numbers);
    `split` keeps the runs that evaluated that split (None: every run)."""
    from fotlab import tracking
    from fotlab.eval.seeds import SPLIT_PARAM

    out = Path(out).resolve()
    assets = out.parent / out.stem
    experiment_by_id = tracking.experiment_names(tracking_uri)
    runs = []
    for exp in experiments or [None]:  # named runs are looked for among all runs, not only the newest max_runs
        runs += tracking.search_runs(tracking_uri, experiment=exp, max_results=RUN_SCAN_LIMIT if run_ids else max_runs)
    runs = [r for r in runs if any(k.startswith("eval/") for k in r.data.metrics)]
    if split is not None:
        runs = [r for r in runs if r.data.params.get(SPLIT_PARAM) == split]
    if run_ids:
        runs = [r for r in runs if any(r.info.run_id.startswith(prefix) for prefix in run_ids)]
        missing = [p for p in run_ids if not any(r.info.run_id.startswith(p) for r in runs)]
        if missing:
            from fotlab.errors import FotlabError

            raise FotlabError(
                f"--run {missing[0]}: no run with evaluation metrics"
                f"{'' if split is None else f' on the {split} split'} in {tracking_uri}"
            )
    sections = []
    for run in runs:
        figures = tracking.download_artifacts(
            tracking_uri, run.info.run_id, "eval", ".png", assets / run.info.run_id[:12]
        )
        links = [str(p.relative_to(out.parent)) for p in figures]
        sections.append(run_section(run, experiment_by_id.get(run.info.experiment_id, "?"), links))
    text = [
        "# fotlab results",
        "",
        f"Generated by `python -m fotlab.eval.report` from `{tracking_uri}` ({len(runs)} runs with eval metrics"
        f"{'' if split is None else f' on the {split} split'}). "
        "Metric names: see `fotlab.eval.results`; protocols: `fotlab.eval` module docstrings.",
        "",
        *([notes.strip(), ""] if notes else []),
        "## Across seeds: mean ± sd (per-seed values) [95% interval: Wilson over pooled trials, or t over seeds]",
        "",
        _seed_section(runs, split),
        "## Summary: first vs last point of every curve",
        "",
        summary_table(runs),
        "## Metrics by family (runs side by side)",
        "",
        family_tables(runs) if runs else "(no run with eval metrics yet)\n",
        "## Runs",
        "",
        *sections,
        PAPER_REFERENCE,
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(text))
    return out


def _seed_section(runs, split: str | None) -> str:
    from fotlab.eval.seeds import seed_groups, seed_tables

    if split is None:
        return "(not grouped: runs of every split are listed, so no number here is a reported one)\n"
    return seed_tables(seed_groups(runs, split)) if runs else "(no run yet)\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The report's options (shared by `python -m fotlab.eval.report` and `fotlab results`)."""
    parser.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI or the project db)")
    parser.add_argument("--experiment", action="append", help="only this experiment (repeatable)")
    parser.add_argument("--out", default="docs/results.md", help="markdown file to write (default docs/results.md)")
    parser.add_argument("--max-runs", type=int, default=50, help="newest runs per experiment")
    parser.add_argument("--notes", help="markdown file placed after the header (commentary on the runs)")
    parser.add_argument("--run", dest="run_ids", action="append", help="only this run id or id prefix (repeatable)")
    parser.add_argument(
        "--split",
        choices=("test", "dev", "all"),
        default="test",
        help="only runs that evaluated this split (default test: the reported numbers; all: every run)",
    )


def run(args: argparse.Namespace) -> int:
    """Write the report for parsed `add_arguments` options; a missing notes file is a one-line user error."""
    from fotlab.errors import FotlabError
    from fotlab.spec import resolve_tracking_uri

    uri = args.tracking_uri or resolve_tracking_uri(None)
    if args.notes and not Path(args.notes).is_file():
        raise FotlabError(f"--notes {args.notes}: no such file")
    notes = Path(args.notes).read_text() if args.notes else None
    split = None if args.split == "all" else args.split
    path = generate_report(uri, args.out, args.experiment, args.max_runs, args.run_ids, notes, split)
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fotlab.eval.report", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
