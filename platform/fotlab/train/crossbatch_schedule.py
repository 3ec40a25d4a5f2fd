"""Crossbatch schedules: which `CrossBatch` a training step uses (FOT_SPEC §2).

The paper grows the crossbatch dimension d (contexts seen = range + 1) during training, either by switching at
given steps (start with d <= 8, later d >= 64) or by sampling d per step from a set (e.g. {2, 128}). Here both are
expressed in terms of `range` (= d - 1), matching `CrossBatchSpec` (`switch: [{at_step, range}]`, `sample_from`).

Design choices:
- A schedule is a pure function of (step, seed): resuming at step s reproduces exactly the ranges an
  uninterrupted run would have used, with no RNG state to checkpoint.
- Sampling seeds a private `random.Random` from the string "<seed>:<step>" (hashed with SHA-512 by Python, so it
  does not depend on PYTHONHASHSEED or on the process).
- Range is capped at batch_size - 1 when the batch size is given: entry b can see at most b earlier entries
  (`allowed_contexts` never wraps around the batch), so a larger range only costs memory, never adds contexts.
"""

from __future__ import annotations

import random
from collections import Counter

from fotlab.model.crossbatch import CrossBatch, allowed_contexts
from fotlab.spec.models import CrossBatchSpec

__all__ = ["crossbatch_for_step", "context_mixture", "mixture_fractions"]


def _switched_range(step: int, base_range: int, switch) -> int:
    """Range in force at `step`: the last switch with at_step <= step, else the base range."""
    current = base_range
    for sw in sorted(switch, key=lambda sw: sw.at_step):
        if sw.at_step <= step:
            current = sw.range
    return current


def _sampled_range(step: int, sample_from: list[int], rng_seed: int) -> int:
    """A range drawn uniformly from `sample_from`, deterministic in (rng_seed, step)."""
    rng = random.Random(f"fotlab-crossbatch:{rng_seed}:{step}")
    return sample_from[rng.randrange(len(sample_from))]


def crossbatch_for_step(step: int, cb: CrossBatchSpec, *, seed: int = 0, batch_size: int | None = None) -> CrossBatch:
    """The CrossBatch to use at training step `step` (0-based) under the validated `train.crossbatch` section.

    cb.packing / stepping / backend hold for every step; cb.range unless a schedule applies: `switch` (from each
    at_step on, that range) or `sample_from` (a range drawn per step, deterministic in seed and step). The rules
    on these fields (alternatives, bounds against the batch size) are the spec's (`fotlab.spec.checks`), checked
    once before anything runs. batch_size: if given, the range is capped at batch_size - 1 (see module doc).
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if cb.switch:
        new_range = _switched_range(step, cb.range, cb.switch)
    elif cb.sample_from:
        new_range = _sampled_range(step, cb.sample_from, seed)
    else:
        new_range = cb.range
    if batch_size is not None:
        new_range = min(new_range, batch_size - 1)
    return CrossBatch(range=int(new_range), packing=cb.packing, stepping=cb.stepping, backend=cb.backend)


def context_mixture(batch_size: int, crossbatch: CrossBatch, doc_ids=None) -> list[tuple[int, int, int]]:
    """Per entry b: (contexts seen, positives, negatives) under doc-aware packing.

    contexts = allowed[b] (own context included). Without doc_ids, the formula for packed spans that never switch
    document: among the extra slots c = 1 .. allowed[b]-1, slot c holds the same document when c <= b mod k (an
    earlier chunk of the same stream) and another document otherwise.
    Example (packing 4, range 3, stepping), b mod 4 = 0..3 far from the batch start: (1,0,0) (3,1,1) (4,2,1) (4,3,0).
    With doc_ids ((B, T) document id per token, `DocPacker(with_doc_ids=True)`), counted on that batch: slot c is
    a positive only if rows b - c and b each hold one single document and it is the same one; a slot whose span
    switched document (either row holds a document boundary) is not a positive, so it counts as a negative.
    """
    k = crossbatch.packing
    allowed = allowed_contexts(batch_size, crossbatch.n_contexts, k, crossbatch.stepping).tolist()
    if doc_ids is not None:
        return _counted_mixture(allowed, doc_ids)
    mixture = []
    for b, n_seen in enumerate(allowed):
        n_positives = min(n_seen - 1, b % k)
        mixture.append((n_seen, n_positives, n_seen - 1 - n_positives))
    return mixture


def _counted_mixture(allowed: list[int], doc_ids) -> list[tuple[int, int, int]]:
    rows = [sorted({int(x) for x in row}) for row in doc_ids.tolist()]
    if len(rows) != len(allowed):
        raise ValueError(f"doc_ids has {len(rows)} rows for a batch of {len(allowed)}")
    single = [row[0] if len(row) == 1 else None for row in rows]  # the row's document, None at a switch
    mixture = []
    for b, n_seen in enumerate(allowed):
        n_positives = sum(1 for c in range(1, n_seen) if single[b] is not None and single[b - c] == single[b])
        mixture.append((n_seen, n_positives, n_seen - 1 - n_positives))
    return mixture


def mixture_fractions(batch_size: int, crossbatch: CrossBatch, doc_ids=None) -> dict[tuple[int, int, int], float]:
    """Fraction of entries per (contexts, positives, negatives) triple, e.g. for logging a run's mixture."""
    counts = Counter(context_mixture(batch_size, crossbatch, doc_ids))
    return {triple: count / batch_size for triple, count in sorted(counts.items())}
