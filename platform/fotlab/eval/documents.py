"""Documents for evaluations: token id lists from an `EvalSourceSpec` (validation split or any text source)."""

from __future__ import annotations

from collections.abc import Sequence

from fotlab.spec.eval import EvalSourceSpec


def tokenize_texts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens (the evaluation frames documents itself)."""
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def load_documents(
    source: EvalSourceSpec, tokenizer, *, validation_docs=None, cache_dir: str | None = None, split: str = "dev"
) -> list[list[int]]:
    """Token id lists of the source's documents (at most source.max_docs, each >= source.min_doc_tokens).

    kind "validation" reads `validation_docs` (a tokenized dataset or list with "input_ids" rows, as returned by
    `fotlab.data.build_datasets`, or a plain list of token id lists); other kinds go through
    `fotlab.data.load_raw_source` (split "dev" | "test": the partition of a synthetic source, never "train";
    kind "embedded": only that split's files) and are tokenized here.
    """
    if source.kind == "validation":
        if validation_docs is None:
            raise ValueError(
                "eval source kind 'validation' needs the experiment's validation documents "
                "(pass validation_docs, or give the evaluation a source with another kind)"
            )
        docs = _rows_to_ids(validation_docs)
    else:
        from fotlab.data import load_raw_source

        ds = load_raw_source(source, cache_dir=cache_dir, split=split)
        texts = []
        for row in ds:
            texts.append(row["text"])
            if source.max_docs is not None and len(texts) >= 4 * source.max_docs:
                break  # enough candidates; the length filter below drops some
        docs = tokenize_texts(tokenizer, texts)
    docs = [d for d in docs if len(d) >= max(source.min_doc_tokens, 2)]
    if source.max_docs is not None:
        docs = docs[: source.max_docs]
    if not docs:
        raise ValueError(f"eval source (kind {source.kind!r}) gave no documents with >= {source.min_doc_tokens} tokens")
    return docs


def _rows_to_ids(rows) -> list[list[int]]:
    out = []
    for row in rows:
        ids = row["input_ids"] if isinstance(row, dict) else row
        out.append([int(t) for t in ids])
    return out
