"""What a run read, as plain records: name, source, digest, document and token counts (MLflow dataset inputs).

    record = describe_dataset(train_docs, name="quickstart-train", source=data_spec_json, context="training")

- The digest identifies the content that was read: a HF dataset's own fingerprint (it hashes the data files and
  every transform applied, so the same spec on the same files gives the same digest), else a SHA-256 of the
  token ids. A streamed (iterable) dataset is not read ahead to count it: its counts are None and its digest
  hashes the source description.
- Plain data only (no MLflow import): `fotlab.tracking.TrackedRun.log_datasets` turns records into MLflow inputs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from typing import Any

DIGEST_LEN = 16  # hex characters kept (MLflow shows digests as short ids)


@dataclasses.dataclass(frozen=True)
class DatasetRecord:
    """One dataset a run trained or was evaluated on."""

    name: str
    source: str  # what it was built from (JSON of the source specs, or a path/kind)
    digest: str
    context: str  # "training" | "validation" | "evaluation"
    n_docs: int | None = None
    n_tokens: int | None = None

    def profile(self) -> str:
        """The counts as MLflow's dataset `profile` (a JSON string)."""
        return json.dumps({"num_documents": self.n_docs, "num_tokens": self.n_tokens})


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:DIGEST_LEN]


def describe_dataset(ds: Any, *, name: str, source: str, context: str) -> DatasetRecord:
    """A record of a tokenized HF dataset ("input_ids" rows), or of a streamed one (no counts)."""
    import datasets
    import pyarrow.compute as pc

    if isinstance(ds, datasets.IterableDataset) or ds is None:
        return DatasetRecord(name, source, _sha(f"{name}\n{source}\nstreamed"), context)
    lengths = pc.list_value_length(ds.with_format("arrow")[:]["input_ids"])  # rows of a select(): its own rows
    n_tokens = int(pc.sum(lengths).as_py() or 0)
    return DatasetRecord(name, source, ds._fingerprint[:DIGEST_LEN], context, len(ds), n_tokens)


def describe_documents(docs: Sequence[Sequence[int]], *, name: str, source: str, context: str) -> DatasetRecord:
    """A record of token-id documents (an evaluation's documents): digest over the ids themselves."""
    hasher = hashlib.sha256()
    for doc in docs:
        hasher.update(b"\x00".join(str(int(t)).encode() for t in doc))
        hasher.update(b"\xff")
    n_tokens = sum(len(doc) for doc in docs)
    return DatasetRecord(name, source, hasher.hexdigest()[:DIGEST_LEN], context, len(docs), n_tokens)


def sources_json(sources: Sequence[Any]) -> str:
    """The source specs (pydantic models) as compact JSON: the dataset's `source` field."""
    return json.dumps([s.model_dump(mode="json", exclude_defaults=True) for s in sources], sort_keys=True)
