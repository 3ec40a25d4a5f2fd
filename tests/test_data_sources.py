"""Raw text sources: local glob, jsonl, parquet, local HF datasets, the embedded stdlib corpus."""

import json
from types import SimpleNamespace

import datasets
import pandas as pd
import pytest

from fotlab.data import embedded_files, load_embedded, load_raw_source
from fotlab.data.splits import SPLITS
from fotlab.spec import SourceSpec

TEXTS = ["first document\nwith two lines\n", "second: ünïcode 🙂", "third " * 50]


def test_local_glob_one_document_per_file(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    for i, text in enumerate(TEXTS):
        (root / ("sub" if i == 2 else ".") / f"doc{i}.txt").write_text(text)
    (root / "notes.md").write_text("not matched")
    ds = load_raw_source(SourceSpec(kind="local", path=str(root), glob="**/*.txt"), cache_dir=str(tmp_path / "c"))
    assert ds.column_names == ["text"]
    assert sorted(ds["text"]) == sorted(TEXTS)  # whole files, newlines kept
    md = load_raw_source(SourceSpec(kind="local", path=str(root), glob="*.md"), cache_dir=str(tmp_path / "c"))
    assert md["text"] == ["not matched"]


def test_jsonl_with_text_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"content": t, "id": i}) + "\n" for i, t in enumerate(TEXTS)))
    ds = load_raw_source(SourceSpec(kind="jsonl", path=str(path), text_field="content"), cache_dir=str(tmp_path / "c"))
    assert ds.column_names == ["text"] and ds["text"] == TEXTS
    with pytest.raises(KeyError, match="body"):
        load_raw_source(SourceSpec(kind="jsonl", path=str(path), text_field="body"), cache_dir=str(tmp_path / "c"))


def test_a_source_whose_documents_hold_no_text_is_an_error(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    for name, text in {"a.txt": "", "b.txt": "  \n\t\n", "c.txt": ""}.items():
        (root / name).write_text(text)
    with pytest.raises(ValueError, match=r"sources\[0\] .*: the 3 files matching '\*\.txt' hold no text"):
        load_raw_source(SourceSpec(kind="local", path=str(root), glob="*.txt"), 0, cache_dir=str(tmp_path / "c"))
    (root / "d.txt").write_text("one real document")  # a few empty files beside real ones are fine
    ds = load_raw_source(SourceSpec(kind="local", path=str(root), glob="*.txt"), 0, cache_dir=str(tmp_path / "c"))
    assert len(ds) == 4
    path = tmp_path / "blank.jsonl"
    path.write_text(json.dumps({"text": " "}) + "\n" + json.dumps({"text": None}) + "\n")
    with pytest.raises(ValueError, match=r"its 2 documents \(field 'text'\) hold no text"):
        load_raw_source(SourceSpec(kind="jsonl", path=str(path)), 0, cache_dir=str(tmp_path / "c"))


def test_parquet_directory(tmp_path):
    (tmp_path / "pq").mkdir()
    pd.DataFrame({"text": TEXTS[:2]}).to_parquet(tmp_path / "pq" / "a.parquet")
    pd.DataFrame({"text": TEXTS[2:]}).to_parquet(tmp_path / "pq" / "b.parquet")
    ds = load_raw_source(SourceSpec(kind="parquet", path=str(tmp_path / "pq")), cache_dir=str(tmp_path / "c"))
    assert ds["text"] == TEXTS


def test_hf_save_to_disk_dir_and_streaming(tmp_path):
    d = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"body": TEXTS, "n": [1, 2, 3]}),
            "validation": datasets.Dataset.from_dict({"body": ["v"], "n": [0]}),
        }
    )
    d.save_to_disk(tmp_path / "saved")
    ds = load_raw_source(SourceSpec(kind="hf", path=str(tmp_path / "saved"), text_field="body"))
    assert ds["text"] == TEXTS
    val = load_raw_source(SourceSpec(kind="hf", path=str(tmp_path / "saved"), split="validation", text_field="body"))
    assert val["text"] == ["v"]
    stream = load_raw_source(SourceSpec(kind="hf", path=str(tmp_path / "saved"), text_field="body", streaming=True))
    assert isinstance(stream, datasets.IterableDataset)
    assert [row["text"] for row in stream] == TEXTS


def test_hf_local_folder_through_load_dataset(tmp_path):
    folder = tmp_path / "hf_json"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    ds = load_raw_source(SourceSpec(kind="hf", name=str(folder)), cache_dir=str(tmp_path / "c"))
    assert ds["text"] == TEXTS


@pytest.mark.parametrize("kind", ["local", "jsonl", "parquet", "hf"])
def test_missing_path_names_the_source(tmp_path, kind):
    missing = tmp_path / "does_not_exist"
    with pytest.raises(FileNotFoundError, match=f"kind '{kind}'.*does_not_exist"):
        load_raw_source(
            SimpleNamespace(
                kind=kind,
                path=str(missing),
                name=None,
                glob="*.txt",
                text_field="text",
                split="train",
                streaming=False,
                config=None,
            ),
            index=2,
        )


def test_embedded_corpus_offline_sorted_and_long(tmp_path):
    files = embedded_files()
    assert len(files) > 300 and files == sorted(files)
    assert not any(part in ("test", "tests", "site-packages") for f in files for part in f.split("/")[:-1])
    assert "os.py" in files and "json/decoder.py" in files
    ds = load_embedded(cache_dir=str(tmp_path))
    assert len(ds) == len(files) and ds["key"] == files
    lengths = sorted(len(t) for t in ds["text"])
    assert lengths[len(lengths) // 2] > 2000  # median document is long
    assert lengths[-1] > 100_000
    assert sum(lengths) > 5_000_000


def test_embedded_corpus_trains_on_its_train_files_and_evaluates_on_the_others(tmp_path):
    """Training reads the train partition of the embedded corpus, an evaluation only its split's files: the same
    file partition as the base files of 'repeat' sources, so no evaluation file was trained on."""
    from fotlab.data.sources import stdlib_root
    from fotlab.data.synthetic import repeat_file_split

    embedded = SourceSpec(kind="embedded")
    keys = {split: list(load_raw_source(embedded, cache_dir=str(tmp_path), split=split)["key"]) for split in SPLITS}
    assert keys["train"] == list(load_raw_source(embedded, cache_dir=str(tmp_path))["key"])  # training's default
    assert sorted(keys["train"] + keys["dev"] + keys["test"]) == embedded_files()
    assert min(len(keys["dev"]), len(keys["test"])) > 30 and len(keys["train"]) > 6 * len(keys["test"])
    root = stdlib_root()
    assert all(repeat_file_split(str(root / key)) == split for split in SPLITS for key in keys[split])
    with pytest.raises(ValueError, match="split must be one of train, dev, test"):
        load_raw_source(embedded, cache_dir=str(tmp_path), split="validation")


def test_url_paths_go_to_datasets_unchecked(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    ds = load_raw_source(SourceSpec(kind="jsonl", path=path.as_uri()), cache_dir=str(tmp_path / "c"))
    assert ds["text"] == TEXTS
