"""The synthetic "repeat" source: natural-text spans with exact long-range repeats, for training and evaluation."""

from types import SimpleNamespace

import numpy as np
import pytest

from fotlab.data import build_datasets, byte_tokenizer
from fotlab.data.sources import load_raw_source
from fotlab.data.synthetic import repeat_document
from fotlab.errors import SpecError
from fotlab.eval.documents import load_documents
from fotlab.spec import parse_spec
from fotlab.spec.eval import EvalSourceSpec
from fotlab.spec.models import DataSpec, SourceSpec

TEXTS = ["".join(chr(65 + (i * 7 + j * 3) % 26) for j in range(300)) + f" text {i}" for i in range(5)]


def _spans(doc: str, n: int) -> list[str]:
    return [doc[i : i + n] for i in range(0, len(doc), n)]


def test_one_slice_repeated_through_the_document():
    doc = repeat_document(np.random.default_rng(0), TEXTS, doc_len=100, span_len=16)
    spans = _spans(doc, 16)
    assert len(doc) == 96 and len(set(spans)) == 1  # 6 copies of one slice; the 4 leftover characters dropped
    assert any(spans[0] in t for t in TEXTS)


def test_copies_come_from_at_most_max_gap_spans_back_and_cover_the_octaves():
    rng = np.random.default_rng(3)
    gaps, fresh = [], 0
    for _ in range(20):
        spans = _spans(repeat_document(rng, TEXTS, doc_len=64 * 8, span_len=8, repeat_prob=0.5, max_gap=16), 8)
        assert len(spans) == 64
        for i, s in enumerate(spans):
            back = [g for g in range(1, min(16, i) + 1) if spans[i - g] == s]
            if back:
                gaps.append(min(back))
            else:
                fresh += 1
                assert any(s in t for t in TEXTS)  # not a copy: a slice of a base text
    assert 0.35 < len(gaps) / (len(gaps) + fresh) < 0.65
    octaves = np.bincount(np.log2(gaps).astype(int), minlength=5)
    assert all(octaves[:5] > 0), octaves  # gaps 1, 2-3, 4-7, 8-15 and 16 all occur


def test_deterministic_in_seed():
    a = repeat_document(np.random.default_rng(5), TEXTS, 256, 16, 0.5, 8)
    b = repeat_document(np.random.default_rng(5), TEXTS, 256, 16, 0.5, 8)
    c = repeat_document(np.random.default_rng(6), TEXTS, 256, 16, 0.5, 8)
    assert a == b != c


def test_training_source_on_local_files_splits_and_tokenizes(tmp_path):
    for i, t in enumerate(TEXTS):
        (tmp_path / f"f{i}.txt").write_text(t)
    (tmp_path / "skip.txt").write_text("é" * 400)  # not ASCII: never a base text
    src = SourceSpec(kind="repeat", path=str(tmp_path), n_docs=30, doc_len=128, span_len=32)
    train, val = build_datasets(
        DataSpec(sources=[src], validation_docs=4, cache_dir=str(tmp_path / "cache")), byte_tokenizer(), seed=0
    )
    assert len(train) == 26 and len(val) == 4
    ids = val[0]["input_ids"]
    assert len(ids) == 128 and ids[:32] == ids[32:64] == ids[96:]  # bytes: one token per character
    assert all(t < 128 for row in train for t in row["input_ids"])


def test_eval_source_uses_max_docs_and_the_embedded_corpus(tmp_path):
    src = EvalSourceSpec(kind="repeat", max_docs=3, doc_len=512, span_len=64, repeat_prob=0.5, max_gap=4, seed=1)
    docs = load_documents(src, byte_tokenizer(), cache_dir=str(tmp_path))
    assert len(docs) == 3 and all(len(d) == 512 for d in docs)
    again = load_documents(src, byte_tokenizer(), cache_dir=str(tmp_path / "other"))
    assert docs == again


def test_bad_repeat_sources_fail_with_the_source_named(tmp_path):
    short = SimpleNamespace(kind="repeat", doc_len=32, span_len=64)  # loaders are duck-typed; the spec refuses it
    with pytest.raises(ValueError, match=r"sources\[1\] \(kind 'repeat'\).*doc_len=32 must be >= span_len=64"):
        load_raw_source(short, 1, str(tmp_path))
    (tmp_path / "a.txt").write_text("short")
    with pytest.raises(ValueError, match="no ASCII base text of >= 64 characters"):
        load_raw_source(SourceSpec(kind="repeat", path=str(tmp_path / "a.txt")), 0, str(tmp_path))
    with pytest.raises(SpecError, match=r"data\.sources\[0\]\.repeat_prob"):
        parse_spec({"name": "x", "data": {"sources": [{"kind": "repeat", "repeat_prob": 1.5}]}}, "bad.yaml")
    with pytest.raises(SpecError, match=r"data\.sources\[0\].*doc_len \(32\) must be >= span_len \(64\)"):
        parse_spec({"name": "x", "data": {"sources": [{"kind": "repeat", "doc_len": 32}]}}, "bad.yaml")


def test_glob_without_path_selects_part_of_the_embedded_corpus(tmp_path):
    from fotlab.data.sources import stdlib_root

    src = SourceSpec(kind="repeat", glob="abc.py", n_docs=6, doc_len=64, span_len=64)
    docs = load_raw_source(src, 0, str(tmp_path))["text"]
    base = (stdlib_root() / "abc.py").read_text()
    assert len(docs) == 6 and all(len(d) == 64 and d in base for d in docs)
    with pytest.raises(FileNotFoundError, match=r"sources\[2\] \(kind 'repeat'\): no base text files"):
        load_raw_source(SourceSpec(kind="repeat", glob="no_such_module_*.py"), 2, str(tmp_path))
