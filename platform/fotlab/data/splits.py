"""Train / dev / test partitions of every synthetic item, so evaluation items can never be training items.

    python -c "from fotlab.data.splits import item_split; print(item_split('passkey', 12345))"

Two mechanisms, used together by `fotlab.data.synthetic` (training sources) and `fotlab.eval` (evaluations):
- **Partitioned item spaces.** Every item an evaluation scores is assigned to exactly one split by a salted
  SHA-1 of its identity (`item_split`): a dictionary definition (key, value) pair, a passkey, the base file a
  repeated span is cut from. Training generators only emit items of the "train" split (redrawing otherwise);
  an evaluation with `eval.split: dev` only emits "dev" items, `test` only "test" items. So a test item cannot
  occur in training however many documents training draws, whatever the seeds. Shares: train 80%, dev 10%,
  test 10% of the item space (`SHARES`).
- **Separate random streams.** Each (purpose, split) pair has its own generator (`split_rng`: numpy PCG64 seeded
  by (seed, purpose tag, split index)), so the draws of one split never depend on, or repeat, another's.

The dev split is for choosing variants (learning rates, data, steps); the test split is for reported numbers
only and must never be used for choosing (eval.split in the spec; `fotlab.eval.spec.EvalSpec.split`).
"""

from __future__ import annotations

import hashlib

import numpy as np

SPLITS = ("train", "dev", "test")
SHARES = {"train": 80, "dev": 10, "test": 10}  # percent of the item space per split (buckets 0..99)
_SALT = "fotlab-split-v1"

# stream tags: one per purpose, so e.g. dictionary and passkey draws never share a stream
DICTIONARY, PASSKEY, REPEAT, FEW_SHOT = 0xD1C7, 0x9A55, 0x5EED, 0x1C1


def check_split(split: str) -> str:
    """split itself, or a ValueError naming the allowed values."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return split


def item_split(kind: str, item) -> str:
    """The split an item belongs to: a pure function of (kind, repr of the item), independent of any seed."""
    digest = hashlib.sha1(f"{_SALT}:{kind}:{item!r}".encode()).digest()
    bucket = int.from_bytes(digest[:8], "big") % 100
    if bucket < SHARES["train"]:
        return "train"
    return "dev" if bucket < SHARES["train"] + SHARES["dev"] else "test"


def split_rng(seed: int, tag: int, split: str) -> np.random.Generator:
    """The random stream of one purpose (tag) and split: PCG64 seeded by (seed, tag, split index)."""
    return np.random.Generator(np.random.PCG64([int(seed), int(tag), SPLITS.index(check_split(split))]))


def draw_in_split(rng: np.random.Generator, low: int, high: int, kind: str, split: str, max_tries: int = 10_000) -> int:
    """An integer uniform in [low, high) among those whose item_split(kind, n) is `split` (rejection sampling)."""
    for _ in range(max_tries):
        n = int(rng.integers(low, high))
        if item_split(kind, n) == split:
            return n
    raise ValueError(f"{kind}: no value of split {split!r} found in [{low}, {high}) after {max_tries} draws")
