"""A spec's evaluation metrics across its training seeds: the numbers a results page may report.

    from fotlab.eval.seeds import seed_groups, seed_tables
    groups = seed_groups(runs, split="test")      # {spec name: [one FINISHED run per seed]}
    markdown = seed_tables(groups)                # a table per metric family, a column per spec

Each cell is the mean over seeds and the sample standard deviation (`5.07 ± 0.12`), with the per-seed values
beside it, and a 95% interval: for an accuracy whose trial counts were logged (`F_n`, `fotlab.eval.results`) the
Wilson interval of the pooled trials (all seeds' hits over all seeds' trials), for any other metric with two or
more seeds Student's t interval of the mean over seeds (seeds as the sample). The family's chance level is stated
under its table. A perplexity-vs-memory family (`ppl_*` with a `mem_0` point) also gets a paired table: each
seed's change in percent from its own `mem_0` value, so a memory gain is judged against the seed-to-seed spread
of the gain itself, not of the perplexity.

Design choices:
- A run belongs to its spec (tag `fotlab.spec_name`) and seed (param `seed`), and counts only if it FINISHED and
  evaluated the requested split (param `eval.split`): an exploratory dev-split run never enters a reported number.
- One run per (spec, seed), the newest: a seed re-run replaces, never doubles, its earlier result.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass

from fotlab import names

SEED_PARAM = "seed"
SPLIT_PARAM = "eval.split"
MEM_0 = "mem_0"  # a perplexity family's no-memory point
MEMORY_CHANGE = " (% change from mem_0, per seed)"  # suffix of the paired table derived from a ppl family


@dataclass(frozen=True)
class SeedSummary:
    """One metric of one spec over its seeds."""

    values: tuple[float, ...]  # per seed, in seed order
    trials: tuple[float, ...] = ()  # per seed, for an accuracy whose counts were logged

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def sd(self) -> float:
        """Sample standard deviation (0 for one seed)."""
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    def pooled_interval(self) -> tuple[int, int, float, float] | None:
        """(hits, trials, low, high): the Wilson 95% interval of all seeds' trials together; None without counts."""
        from fotlab.eval.results import wilson_interval

        if len(self.trials) != len(self.values) or not all(self.trials):
            return None
        hits = sum(round(v * n) for v, n in zip(self.values, self.trials, strict=True))
        total = int(sum(self.trials))
        return (hits, total, *wilson_interval(hits, total))

    def t_interval(self) -> tuple[float, float] | None:
        """Student's t 95% interval of the mean over seeds; None for fewer than two seeds."""
        from scipy.stats import t

        n = len(self.values)
        if n < 2:
            return None
        half = float(t.ppf(0.975, n - 1)) * self.sd / math.sqrt(n)
        return self.mean - half, self.mean + half

    def cell(self) -> str:
        """`mean ± sd (v0, v1, v2)`, plus `[low, high] k/n` for an accuracy with counts, else `[low, high] t` over
        two or more seeds."""
        per_seed = ", ".join(f"{v:.4g}" for v in self.values)
        text = f"{self.mean:.4g} ± {self.sd:.2g} ({per_seed})"
        pooled = self.pooled_interval()
        if pooled is not None:
            hits, total, low, high = pooled
            text += f" [{low:.3g}, {high:.3g}] {hits}/{total}"
        elif (t95 := self.t_interval()) is not None:
            text += f" [{t95[0]:.4g}, {t95[1]:.4g}] t"
        return text


def seed_groups(runs, split: str = "test") -> dict[str, list]:
    """{spec name: runs, one per seed (the newest), in seed order} of the FINISHED runs that evaluated `split`."""
    newest: dict[tuple[str, str], object] = {}
    for run in sorted(runs, key=lambda r: r.info.start_time or 0):
        spec = run.data.tags.get(names.TAG_SPEC_NAME)
        seed = run.data.params.get(SEED_PARAM)
        if spec is None or seed is None or run.info.status != "FINISHED":
            continue
        if run.data.params.get(SPLIT_PARAM) != split:
            continue
        newest[(spec, seed)] = run
    groups: dict[str, list] = defaultdict(list)
    for (spec, _seed), run in sorted(newest.items(), key=lambda kv: (kv[0][0], _seed_key(kv[0][1]))):
        groups[spec].append(run)
    return dict(groups)


def _seeds(runs) -> str:
    return ", ".join(run.data.params[SEED_PARAM] for run in runs)


def _seed_key(seed: str):
    return (0, int(seed), "") if seed.lstrip("-").isdigit() else (1, 0, seed)


def summarize(runs) -> dict[str, dict[str, SeedSummary]]:
    """{family: {parameter label: SeedSummary}} over `runs` (one per seed); a metric missing from any run is left
    out, so every summary covers the same seeds."""
    from fotlab.eval.report import group_metrics

    per_run = [group_metrics(run.data.metrics) for run in runs]
    out: dict[str, dict[str, SeedSummary]] = {}
    for family in per_run[0] if per_run else {}:
        if family.endswith((names.COUNT_SUFFIX, names.CHANCE_SUFFIX)):
            continue
        cells = {}
        for param, _ in per_run[0][family]:
            values = [dict(groups.get(family, [])).get(param) for groups in per_run]
            if any(v is None or math.isnan(v) for v in values):
                continue
            counts = [dict(groups.get(family + names.COUNT_SUFFIX, [])).get(param) for groups in per_run]
            trials = tuple(counts) if all(c is not None for c in counts) else ()
            cells[param] = SeedSummary(tuple(values), trials)  # type: ignore[arg-type]
        if cells:
            out[family] = cells
            if family.startswith("ppl") and MEM_0 in cells:
                out[family + MEMORY_CHANGE] = {
                    param: SeedSummary(
                        tuple(100.0 * (v / v0 - 1.0) for v, v0 in zip(cell.values, cells[MEM_0].values, strict=True))
                    )
                    for param, cell in cells.items()
                    if param != MEM_0
                }
    return out


def seed_tables(groups: dict[str, list]) -> str:
    """Markdown: a table per metric family, a row per parameter, a column per spec (`name, seeds 0, 1, 2`)."""
    from fotlab.eval.report import _sort_key, group_metrics

    summaries = {spec: summarize(runs) for spec, runs in groups.items()}
    families = sorted({fam for per_family in summaries.values() for fam in per_family})
    lines = []
    for fam in families:
        specs = [spec for spec in groups if fam in summaries[spec]]
        params = sorted({p for spec in specs for p in summaries[spec][fam]}, key=_sort_key)
        header = [fam, *[f"{spec} (seeds {_seeds(groups[spec])})" for spec in specs]]
        lines += [f"#### {fam}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for param in params:
            cells = [summaries[spec][fam][param].cell() if param in summaries[spec][fam] else "" for spec in specs]
            lines.append("| " + " | ".join([param, *cells]) + " |")
        chance = {
            v
            for spec in specs
            for run in groups[spec]
            for _, v in group_metrics(run.data.metrics).get(fam + names.CHANCE_SUFFIX, [])
        }
        if chance:
            lines += ["", f"Chance level: {', '.join(f'{c:.3g}' for c in sorted(chance))}."]
        lines.append("")
    return "\n".join(lines) + "\n"
