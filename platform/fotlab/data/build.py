"""From a `DataSpec` to tokenized document datasets: `build_datasets(data_spec, tokenizer, seed)`.

    python -c "from fotlab.data import build_tokenizer, build_datasets; t = build_tokenizer(None); \
      print(build_datasets(None, t, 0))"

Takes the typed `fotlab.spec.DataSpec` / `SourceSpec` (its defaults are the pydantic ones, stated once there).
Pipeline per source:
1. load: text sources -> "text" rows (`fotlab.data.sources`); dictionary_lookup -> token ids + loss_mask;
   passkey -> prompt "text" + "answer" (loss only on the answer tokens).
2. tokenize with `Dataset.map` (batched, `num_proc`, cached under `cache_dir`, default ~/.cache/fotlab/datasets;
   nothing is written into the working directory). Specials are not added: the packer frames documents.
3. `min_doc_tokens` counts TOKENS after tokenization (the paper's "min 1024 tokens"); shorter documents are dropped.
4. `max_docs` caps the documents read from a source (train + validation), after the length filter.
5. validation: `validation_docs` in all, shared across sources in proportion to their weights; within a source
   the held-out documents are those with the smallest sha1 of their key (embedded: relative path; synthetic:
   row number; other sources: the text), so the split does not depend on the seed or on the other documents.
   Synthetic sources generate their documents from the run seed (and the source's index).
6. mixture: one source is used as is; several are mixed with `datasets.interleave_datasets` (probabilities =
   normalised weights, in documents, with `seed`, "all_exhausted": smaller sources repeat until every source has
   been seen once). Streaming sources stay `IterableDataset`s (lazy map/filter; the first validation documents
   are taken into memory and skipped for training); a mixture with any streaming source is an `IterableDataset`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import datasets
import numpy as np

from fotlab.data import sources as src_mod
from fotlab.data import synthetic
from fotlab.spec.models import DataSpec, SourceSpec

SYNTHETIC_KINDS = ("dictionary_lookup", "passkey")
TOKENIZE_VERSION = "fotlab-tokenize-v2"
IDS = datasets.Sequence(datasets.Value("int32"))
MASK = datasets.Sequence(datasets.Value("int8"))


def _features(with_mask: bool, with_index: bool = True) -> datasets.Features:
    """Canonical column types, so datasets from different sources can be mixed."""
    cols = {"input_ids": IDS}
    if with_mask:
        cols["loss_mask"] = MASK
    if with_index:
        cols.update(n_tokens=datasets.Value("int32"), split_hash=datasets.Value("int64"))
    return datasets.Features(cols)


def resolve_cache_dir(data_spec: DataSpec | None) -> str:
    """`data_spec.cache_dir`, else ~/.cache/fotlab/datasets."""
    cache_dir = data_spec.cache_dir if data_spec is not None else None
    path = Path(cache_dir).expanduser() if cache_dir else Path.home() / ".cache" / "fotlab" / "datasets"
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def sources_of(data_spec: DataSpec | None) -> list[SourceSpec]:
    """The spec's sources (no data spec: DataSpec's default, the embedded corpus)."""
    return list((data_spec if data_spec is not None else DataSpec()).sources)


def _split_hash(key: str) -> int:
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:7], "big")


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids without specials, straight from the `tokenizers` backend (skips per-call python overhead)."""
    return [e.ids for e in tokenizer.backend_tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)]


def _tokenize_batch(batch: dict, tokenizer) -> dict:
    """Batched map function: text (+ answer) -> input_ids (+ loss_mask), n_tokens, split_hash."""
    ids = _encode(tokenizer, batch["text"])
    keys = batch["key"] if "key" in batch else batch["text"]
    out = {"split_hash": [_split_hash(k) for k in keys]}
    if "answer" in batch:
        answers = _encode(tokenizer, batch["answer"])
        out["loss_mask"] = [[0] * len(p) + [1] * len(a) for p, a in zip(ids, answers)]
        ids = [p + a for p, a in zip(ids, answers)]
    out["input_ids"] = ids
    out["n_tokens"] = [len(x) for x in ids]
    return out


def _tokenize_fingerprint(ds, tokenizer) -> str | None:
    base = getattr(ds, "_fingerprint", None)
    if base is None:
        return None
    h = hashlib.sha1(f"{TOKENIZE_VERSION}:{base}".encode())
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    return h.hexdigest()


def tokenize_dataset(ds, tokenizer, num_proc: int = 1):
    """Tokenize a "text" (+ "answer", "key") dataset; columns input_ids (+ loss_mask), n_tokens, split_hash."""
    remove = [c for c in ds.column_names or [] if c not in ("input_ids", "loss_mask")]
    with_mask = "answer" in (ds.column_names or [])
    kwargs = {
        "batched": True,
        "fn_kwargs": {"tokenizer": tokenizer},
        "remove_columns": remove,
        "features": _features(with_mask),
    }
    if isinstance(ds, datasets.IterableDataset):
        return ds.map(_tokenize_batch, **kwargs)
    n_proc = num_proc if num_proc > 1 and len(ds) >= 64 * num_proc else None
    return ds.map(
        _tokenize_batch,
        num_proc=n_proc,
        new_fingerprint=_tokenize_fingerprint(ds, tokenizer),
        desc="tokenize",
        **kwargs,
    )


def _ids_dataset(ds):
    """Already-tokenized rows (synthetic dictionary lookup): add n_tokens and split_hash."""

    def add(batch):
        return {"n_tokens": [len(x) for x in batch["input_ids"]], "split_hash": [_split_hash(k) for k in batch["key"]]}

    return ds.map(add, batched=True, remove_columns=["key"], features=_features(True), desc="index")


def load_source(source: SourceSpec, index: int, tokenizer, seed: int, cache_dir: str, num_proc: int = 1):
    """One source as a tokenized dataset (input_ids [+ loss_mask], n_tokens, split_hash)."""
    kind, n_docs, doc_len = source.kind, source.n_docs, source.doc_len
    syn_seed = seed * 1000 + index
    if kind == "dictionary_lookup":
        if len(tokenizer) < synthetic.DICT_VOCAB:
            raise ValueError(
                f"{src_mod.source_label(source, index)}: tokenizer has {len(tokenizer)} ids, "
                f"fewer than the {synthetic.DICT_VOCAB} the task uses"
            )
        ds = synthetic.dictionary_lookup_dataset(n_docs, doc_len, source.key_len, source.value_len, syn_seed, cache_dir)
        return _ids_dataset(ds)
    if kind == "passkey":
        ds = synthetic.passkey_dataset(tokenizer, n_docs, doc_len, source.max_passkey, syn_seed, cache_dir)
        return tokenize_dataset(ds, tokenizer, num_proc)
    raw = src_mod.load_raw_source(source, index, cache_dir)
    if source.max_docs and not source.min_doc_tokens and isinstance(raw, datasets.Dataset):
        raw = raw.select(range(min(source.max_docs, len(raw))))  # cap before tokenizing when no filter needs all
    return tokenize_dataset(raw, tokenizer, num_proc)


def filter_and_split(ds, source: SourceSpec, n_val: int):
    """Apply min_doc_tokens and max_docs, then hold out n_val documents (smallest split_hash)."""
    min_tokens, max_docs = source.min_doc_tokens, source.max_docs
    if min_tokens > 0:
        ds = ds.filter(lambda n: n >= min_tokens, input_columns="n_tokens")
    if isinstance(ds, datasets.IterableDataset):
        if max_docs:
            ds = ds.take(max_docs)
        ds = ds.remove_columns(["n_tokens", "split_hash"])
        return ds.skip(n_val), _materialize(ds.take(n_val))
    if max_docs:
        ds = ds.select(range(min(max_docs, len(ds))))
    if n_val >= len(ds) and n_val > 0:
        raise ValueError(
            f"{src_mod.source_label(source)}: {len(ds)} documents left cannot give {n_val} validation "
            "documents and a training set"
        )
    order = np.argsort(np.asarray(ds["split_hash"], dtype=np.int64), kind="stable")
    val_rows = np.sort(order[:n_val])
    train_rows = np.sort(order[n_val:])
    ds = ds.remove_columns(["n_tokens", "split_hash"])
    return ds.select(train_rows), ds.select(val_rows)


def _materialize(ds) -> datasets.Dataset:
    """A small IterableDataset (the streamed validation documents) as an in-memory Dataset."""
    rows = list(ds)
    features = ds.features or _features("loss_mask" in (rows[0] if rows else {}), with_index=False)
    if not rows:
        return datasets.Dataset.from_dict({name: [] for name in features}, features=features)
    return datasets.Dataset.from_list(rows, features=features)


def allocate_validation(n_val: int, weights: list[float]) -> list[int]:
    """Split n_val validation documents across sources in proportion to weights (largest remainder)."""
    w = np.asarray(weights, dtype=float) / sum(weights)
    exact = w * n_val
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: n_val - counts.sum()]:
        counts[i] += 1
    return [int(c) for c in counts]


def _with_loss_mask(ds):
    """Add an all-ones loss_mask to a source without one (so sources can be mixed)."""
    if "loss_mask" in (ds.column_names or []):
        return ds
    return ds.map(
        lambda b: {"loss_mask": [[1] * len(x) for x in b["input_ids"]]},
        batched=True,
        features=_features(True, with_index=False),
    )


def mix_sources(parts: list, weights: list[float], seed: int):
    """Weighted interleaving of several tokenized sources (single source: returned unchanged)."""
    if len(parts) == 1:
        return parts[0]
    if any("loss_mask" in (p.column_names or []) for p in parts):
        parts = [_with_loss_mask(p) for p in parts]
    probabilities = [w / sum(weights) for w in weights]
    if any(isinstance(p, datasets.IterableDataset) for p in parts):
        parts = [p if isinstance(p, datasets.IterableDataset) else p.to_iterable_dataset() for p in parts]
    return datasets.interleave_datasets(
        parts, probabilities=probabilities, seed=seed, stopping_strategy="all_exhausted"
    )


def _concat_validation(parts: list):
    nonempty = [p for p in parts if isinstance(p, datasets.IterableDataset) or len(p) > 0]
    if any("loss_mask" in (p.column_names or []) for p in nonempty):
        nonempty = [_with_loss_mask(p) for p in nonempty]
    if not nonempty:
        return parts[0]
    if any(isinstance(p, datasets.IterableDataset) for p in nonempty):
        nonempty = [p if isinstance(p, datasets.IterableDataset) else p.to_iterable_dataset() for p in nonempty]
    return datasets.concatenate_datasets(nonempty)


def build_datasets(data_spec: DataSpec | None, tokenizer, seed: int = 0):
    """(train_docs, val_docs): tokenized document datasets with "input_ids" (+ "loss_mask").

    `data_spec=None` means `DataSpec()`: the embedded corpus, 8 validation documents.
    """
    data_spec = data_spec if data_spec is not None else DataSpec()
    sources = data_spec.sources
    cache_dir = resolve_cache_dir(data_spec)
    num_proc = data_spec.num_proc
    if num_proc > 1:  # map workers fork after the tokenizer may have used its thread pool
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    weights = [s.weight for s in sources]
    n_vals = allocate_validation(data_spec.validation_docs, weights)
    trains, vals = [], []
    for i, (source, n_val) in enumerate(zip(sources, n_vals)):
        ds = load_source(source, i, tokenizer, seed, cache_dir, num_proc)
        train, val = filter_and_split(ds, source, n_val)
        if isinstance(train, datasets.Dataset) and len(train) == 0:
            raise ValueError(f"{src_mod.source_label(source, i)}: no training documents left after filtering")
        trains.append(train)
        vals.append(val)
    return mix_sources(trains, weights, seed), _concat_validation(vals)


def corpus_texts(data_spec: DataSpec | None, max_docs_per_source: int | None = None):
    """Raw training texts of the text sources (for training a BPE tokenizer): an iterator of str."""
    cache_dir = resolve_cache_dir(data_spec)
    for i, source in enumerate(sources_of(data_spec)):
        if source.kind in SYNTHETIC_KINDS:
            continue
        raw = src_mod.load_raw_source(source, i, cache_dir)
        caps = [c for c in (max_docs_per_source, source.max_docs) if c]
        for j, row in enumerate(raw):
            if caps and j >= min(caps):
                break
            yield row["text"]
