"""The crossbatch mixture a spec's training really gives: per row of the batch, how many of the extra contexts it
sees hold its own document (positives) and how many another one (negatives), counted on packed batches of the
spec's own training data (FOT_SPEC §2: a label "d = N" has to match what the rows see).

    python -m fotlab.train.mixture experiments/paper/retrieval_fot.yaml             # 200 batches
    python -m fotlab.train.mixture experiments/paper/dictionary_finetune.yaml --batches 50

Design choices:
- The batches are the ones training packs (`fotlab.train.build.spec_packer`, rank 0 of one worker, the spec's
  seed), with each token's document id, and the counting is `context_mixture(..., doc_ids)`: a slot whose packed
  span switched document is not a positive.
- Under a crossbatch schedule (`switch`, `sample_from`) the n batches are paired with n steps spread evenly over
  the spec's `train.steps`, each with the crossbatch of its step. Packing depends only on document lengths, so
  the batches' make-up does not change over training and the pairing is fair.
- Rows are summarised by position modulo the packing (the pattern repeats every `packing` rows, apart from the
  first rows of the batch, which see fewer contexts): the table gives rows `b mod k = 0 .. k-1` over
  b >= range, then the mean over all rows.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Mixture:
    """Mean positives and negatives per row position b = 0 .. batch_size - 1, over `n_batches` batches."""

    packing: int
    crossbatch_range: int
    positives: tuple[float, ...]
    negatives: tuple[float, ...]
    n_batches: int

    def by_phase(self) -> list[tuple[float, float]]:
        """(positives, negatives) per b mod packing, over the rows b >= range (away from the batch start)."""
        first = min(self.crossbatch_range, len(self.positives) - 1)
        out = []
        for phase in range(self.packing):
            rows = [b for b in range(first, len(self.positives)) if b % self.packing == phase]
            if not rows:
                continue
            out.append(
                (
                    sum(self.positives[b] for b in rows) / len(rows),
                    sum(self.negatives[b] for b in rows) / len(rows),
                )
            )
        return out

    @property
    def mean(self) -> tuple[float, float]:
        """(positives, negatives) per row, over every row of the batch."""
        n = len(self.positives)
        return sum(self.positives) / n, sum(self.negatives) / n

    def markdown_row(self, label: str) -> str:
        phases = ", ".join(f"{p:.2f}/{n:.2f}" for p, n in self.by_phase())
        pos, neg = self.mean
        return f"| {label} | {phases} | {pos:.2f} / {neg:.2f} |"


def spec_mixture(spec, n_batches: int = 200) -> Mixture:
    """Count the mixture of `spec`'s training over its first `n_batches` packed batches (see module doc)."""
    from fotlab.data import build_datasets, build_tokenizer
    from fotlab.train.build import spec_packer
    from fotlab.train.crossbatch_schedule import context_mixture, crossbatch_for_step
    from fotlab.train.runtime import Runtime

    if n_batches < 1:
        raise ValueError(f"--batches must be >= 1, got {n_batches}")
    train = spec.train
    tokenizer = build_tokenizer(spec.data.tokenizer, data_spec=spec.data)
    train_docs, _ = build_datasets(spec.data, tokenizer, spec.seed)
    with tempfile.TemporaryDirectory(prefix="fotlab-mixture-") as tmp:  # the packer writes nothing there
        runtime = Runtime(output_dir=Path(tmp), device="cpu")
        packer = spec_packer(train_docs, spec, runtime, tokenizer, spec.seed, with_doc_ids=True)
    B = train.batch_size
    positives, negatives = [0.0] * B, [0.0] * B
    ranges = set()
    for i in range(n_batches):
        step = i * train.steps // n_batches
        crossbatch = crossbatch_for_step(step, train.crossbatch, seed=spec.seed, batch_size=B)
        ranges.add(crossbatch.range)
        for b, (_, pos, neg) in enumerate(context_mixture(B, crossbatch, packer.next_batch()["doc_ids"])):
            positives[b] += pos / n_batches
            negatives[b] += neg / n_batches
    return Mixture(train.crossbatch.packing, max(ranges), tuple(positives), tuple(negatives), n_batches)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from fotlab.errors import FotlabError
    from fotlab.spec import load_spec

    parser = argparse.ArgumentParser(prog="python -m fotlab.train.mixture", description=__doc__.splitlines()[0])
    parser.add_argument("specs", nargs="+", metavar="SPEC", help="experiment spec(s) to count")
    parser.add_argument("--batches", type=int, default=200, help="packed batches to count (default 200)")
    args = parser.parse_args(argv)
    print("| spec (crossbatch) | rows b mod k = 0 .. k-1, b >= range (positives/negatives) | mean per row |")
    print("|---|---|---|")
    for path in args.specs:
        try:
            spec = load_spec(path, check_paths=False)
            mixture = spec_mixture(spec, args.batches)
        except (FotlabError, ValueError, FileNotFoundError) as exc:  # a bad spec or source: one line
            print(f"mixture: {path}: " + " ".join(str(exc).splitlines()), file=sys.stderr)
            return 1
        cb = spec.train.crossbatch
        label = f"`{spec.name}` (range {cb.range}, packing {cb.packing}{', stepping' if cb.stepping else ''})"
        print(mixture.markdown_row(label), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
