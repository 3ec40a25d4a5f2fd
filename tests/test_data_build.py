"""build_datasets: tokenized docs, min-length filter, max_docs, validation split, mixtures, synthetic sources."""

import os

import datasets
import numpy as np
import pytest
import torch

from fotlab.data import IGNORE_INDEX, DocPacker, build_datasets, byte_tokenizer
from fotlab.spec import DataSpec, SourceSpec


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def write_corpus(root, prefix, lengths):
    """Files whose text starts with `prefix` (one letter names the source) and has the given byte lengths."""
    root.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(lengths):
        body = f"{prefix}{i:04d} " + "x" * n
        (root / f"{prefix}{i:04d}.txt").write_text(body[:n] if n >= 6 else body)
    return str(root)


def test_local_source_tokenized_filtered_and_split(tmp_path, tok):
    lengths = [10, 50, 200, 300, 400, 500, 600, 700, 800, 900, 1000, 1100]
    path = write_corpus(tmp_path / "c", "a", lengths)
    spec = DataSpec(
        sources=[SourceSpec(kind="local", path=path, glob="*.txt", min_doc_tokens=250)],
        validation_docs=2,
        cache_dir=str(tmp_path / "cache"),
    )
    train, val = build_datasets(spec, tok, seed=0)
    assert isinstance(train, datasets.Dataset) and train.column_names == ["input_ids"]
    n_tokens = [len(x) for x in train["input_ids"]] + [len(x) for x in val["input_ids"]]
    assert sorted(n_tokens) == [n for n in lengths if n >= 250]  # min_doc_tokens counts tokens
    assert len(val) == 2
    texts_train = {tok.decode(x) for x in train["input_ids"]}
    texts_val = {tok.decode(x) for x in val["input_ids"]}
    assert not texts_train & texts_val
    # the validation split does not depend on the seed
    _, val_other_seed = build_datasets(spec, tok, seed=123)
    assert val_other_seed["input_ids"] == val["input_ids"]


def test_max_docs_caps_documents(tmp_path, tok):
    path = write_corpus(tmp_path / "c", "a", [100] * 30)
    spec = DataSpec(
        sources=[SourceSpec(kind="local", path=path, glob="*.txt", max_docs=10)],
        validation_docs=3,
        cache_dir=str(tmp_path / "cache"),
    )
    train, val = build_datasets(spec, tok, seed=0)
    assert len(train) + len(val) == 10 and len(val) == 3


def test_weighted_mixture_proportions(tmp_path, tok):
    a = write_corpus(tmp_path / "a", "a", [64] * 300)
    b = write_corpus(tmp_path / "b", "b", [64] * 300)
    spec = DataSpec(
        sources=[
            SourceSpec(kind="local", path=a, glob="*.txt", weight=3.0),
            SourceSpec(kind="local", path=b, glob="*.txt", weight=1.0),
        ],
        validation_docs=8,
        cache_dir=str(tmp_path / "cache"),
    )
    train, val = build_datasets(spec, tok, seed=0)
    first = np.array([x[0] for x in train["input_ids"][:400]])
    share_a = (first == ord("a")).mean()
    assert 0.68 < share_a < 0.82  # 3:1 by documents
    val_first = [x[0] for x in val["input_ids"]]
    assert val_first.count(ord("a")) == 6 and val_first.count(ord("b")) == 2  # validation shared by weight
    again, _ = build_datasets(spec, tok, seed=0)
    other, _ = build_datasets(spec, tok, seed=1)
    assert again["input_ids"][:50] == train["input_ids"][:50]
    assert other["input_ids"][:50] != train["input_ids"][:50]


def test_synthetic_sources_mix_with_text_and_pack(tmp_path, tok):
    path = write_corpus(tmp_path / "c", "a", [300] * 20)
    spec = DataSpec(
        sources=[
            SourceSpec(kind="local", path=path, glob="*.txt"),
            SourceSpec(kind="dictionary_lookup", n_docs=20, doc_len=128),
            SourceSpec(kind="passkey", n_docs=10, doc_len=256),
        ],
        validation_docs=3,
        cache_dir=str(tmp_path / "cache"),
    )
    train, val = build_datasets(spec, tok, seed=0)
    assert train.column_names == ["input_ids", "loss_mask"] and len(val) == 3
    kinds = {"text": 0, "dict": 0, "passkey": 0}
    for ids, mask in zip(train["input_ids"], train["loss_mask"]):
        if ids[0] == ord("a"):
            kinds["text"] += 1
            assert all(mask)  # plain text: every token counts
        elif ids[0] == 0:  # <k>
            kinds["dict"] += 1
            assert 0 < sum(mask) < len(mask) and len(ids) <= 128
        else:
            kinds["passkey"] += 1
            answer = tok.decode([t for t, m in zip(ids, mask) if m])
            assert answer.strip().isdigit() and tok.decode(ids).endswith("The pass key is" + answer)
    assert all(v > 0 for v in kinds.values())
    p = DocPacker(train, batch_size=4, seq_len=64, packing=2, bos_id=tok.bos_token_id, eos_id=tok.eos_token_id)
    targets = torch.cat([p.next_batch()["targets"] for _ in range(10)])
    assert (targets == IGNORE_INDEX).any() and (targets != IGNORE_INDEX).any()


def test_default_embedded_corpus_builds_without_writing_to_cwd(tmp_path, tok, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "cache"
    spec = DataSpec(
        sources=[SourceSpec(kind="embedded", max_docs=40, min_doc_tokens=0)], validation_docs=4, cache_dir=str(cache)
    )
    train, val = build_datasets(spec, tok, seed=0)
    assert len(train) == 36 and len(val) == 4
    assert os.listdir(tmp_path) == ["cache"] and any(cache.rglob("*.arrow"))
    text = tok.decode(train[0]["input_ids"])
    assert len(text) > 0 and tok(text, add_special_tokens=False)["input_ids"] == train[0]["input_ids"]


def test_streaming_source_stays_lazy(tmp_path, tok):
    d = datasets.Dataset.from_dict({"text": [f"doc {i} " * (i + 1) for i in range(20)]})
    d.save_to_disk(tmp_path / "saved")
    spec = DataSpec(
        sources=[SourceSpec(kind="hf", path=str(tmp_path / "saved"), streaming=True, min_doc_tokens=30)],
        validation_docs=2,
        cache_dir=str(tmp_path / "cache"),
    )
    train, val = build_datasets(spec, tok, seed=0)
    assert isinstance(train, datasets.IterableDataset)
    rows = [r["input_ids"] for r in train]
    assert isinstance(val, datasets.Dataset) and len(val) == 2  # validation is small and materialised
    assert all(len(r) >= 30 for r in rows) and len(rows) + 2 == 16
    p = DocPacker(train, batch_size=2, seq_len=16, packing=2, bos_id=tok.bos_token_id, eos_id=tok.eos_token_id)
    assert p.next_batch()["input_ids"].shape == (2, 16)


def test_num_proc_gives_the_same_tokens_and_reuses_the_cache(tmp_path, tok):
    path = write_corpus(tmp_path / "c", "a", [50 + i for i in range(160)])
    runs = {}
    for num_proc in (1, 2):
        spec = DataSpec(
            sources=[SourceSpec(kind="local", path=path, glob="*.txt")],
            validation_docs=4,
            num_proc=num_proc,
            cache_dir=str(tmp_path / f"cache{num_proc}"),
        )
        runs[num_proc] = build_datasets(spec, tok, seed=0)
    assert runs[1][0]["input_ids"] == runs[2][0]["input_ids"] and runs[1][1]["input_ids"] == runs[2][1]["input_ids"]
    cache_files = sorted(p.name for p in (tmp_path / "cache1").rglob("*.arrow"))
    again = build_datasets(
        DataSpec(
            sources=[SourceSpec(kind="local", path=path, glob="*.txt")],
            validation_docs=4,
            cache_dir=str(tmp_path / "cache1"),
        ),
        tok,
        seed=0,
    )
    assert again[0]["input_ids"] == runs[1][0]["input_ids"]
    assert sorted(p.name for p in (tmp_path / "cache1").rglob("*.arrow")) == cache_files  # cached, not redone


def _one_line_build_error(error_type, spec, tok) -> str:
    with pytest.raises(error_type) as info:
        build_datasets(spec, tok, seed=0)
    message = str(info.value).strip("'\"")  # KeyError quotes its message
    assert "\n" not in message, message
    return message


def test_build_errors_name_the_source_and_what_is_wrong(tmp_path, tok):
    path = write_corpus(tmp_path / "c", "a", [100] * 6)
    fine = SourceSpec(kind="local", path=write_corpus(tmp_path / "fine", "b", [100] * 6), glob="*.txt")
    cache = str(tmp_path / "cache")

    def spec(validation_docs=0, **fields):
        return DataSpec(
            sources=[fine, SourceSpec(path=path, **fields)], validation_docs=validation_docs, cache_dir=cache
        )

    message = _one_line_build_error(FileNotFoundError, spec(kind="local", glob="*.md"), tok)
    assert f"sources[1] (kind 'local', {path!r})" in message and "no files match '*.md'" in message
    message = _one_line_build_error(ValueError, spec(kind="local", glob="*.txt", min_doc_tokens=10**6), tok)
    assert message == f"sources[1] (kind 'local', {path!r}): no training documents left after filtering"
    message = _one_line_build_error(ValueError, spec(4, kind="local", glob="*.txt", min_doc_tokens=10**6), tok)
    assert f"(kind 'local', {path!r})" in message and "0 documents left cannot give 2 validation" in message
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"body": "no text field here"}\n')
    bad_field = DataSpec(sources=[SourceSpec(kind="jsonl", path=str(jsonl))], validation_docs=0, cache_dir=cache)
    message = _one_line_build_error(KeyError, bad_field, tok)
    assert f"sources[0] (kind 'jsonl', {str(jsonl)!r}): no field 'text'" in message and "body" in message
