"""Raw document sources: each becomes a `datasets.Dataset` (or `IterableDataset` when streaming) with a "text"
column, one row per document, plus an optional "key" column (a stable identity used for the validation split).

Kinds (`SourceSpec.kind`, duck-typed: only attributes are read):
- "embedded": the Python standard library's own source files (`sysconfig` path "stdlib", `*.py`, one file = one
  document; test folders and site-packages excluded; sorted by relative path). Present offline everywhere. Its
  files are partitioned like the base files of "repeat" (`repeat_file_split`: train 80%, dev 10%, test 10%):
  training reads the train files only, an evaluation only the files of its `eval.split`.
- "local": `path` (a directory) + `glob` (default "**/*.txt"); each file is one document (`load_dataset("text",
  sample_by="document")`).
- "jsonl" / "parquet": `path` (a file, a directory, or a glob) of such files; `text_field` (default "text").
  A URL `path` (s3://, gs://, https://) is handed to `datasets` (fsspec) unchecked; local paths must exist.
- "hf": a dataset directory saved with `Dataset.save_to_disk`, or any name/path `datasets.load_dataset` accepts
  (`path` or `name`, with `config`, `data_dir`, `split`, `streaming`); hub names need network.
- "repeat": natural text with exact long-range repeats (`fotlab.data.synthetic.repeat_document`): `n_docs`
  documents of `doc_len` characters in spans of `span_len`, cut from the ASCII files of the embedded corpus (the part
  of it matching `glob` if given; or the files of `path` + `glob`), with `repeat_prob`, `max_gap` and `seed`; only
  the base files of the requested split (train for training, dev / test for evaluations; `fotlab.data.splits`).
Synthetic token-id kinds ("dictionary_lookup", "passkey") are built in `fotlab.data.build` from the run seed.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import datasets

from fotlab.data.splits import check_split
from fotlab.data.synthetic import repeat_file_split

EXCLUDED_STDLIB_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


def source_label(source, index: int | None = None) -> str:
    """A short human name for error messages: `sources[i] (kind 'jsonl', path ...)`."""
    where = f"sources[{index}]" if index is not None else "source"
    kind = getattr(source, "kind", "?")
    path = getattr(source, "path", None) or getattr(source, "name", None)
    return f"{where} (kind {kind!r}" + (f", {path!r})" if path else ")")


def stdlib_root() -> Path:
    """The directory of the running interpreter's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def embedded_files(root: Path | None = None) -> list[str]:
    """Relative posix paths of the stdlib `*.py` files used as the embedded corpus, sorted."""
    root = stdlib_root() if root is None else root
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_STDLIB_DIRS]  # prune tests, site-packages
        rel_dir = Path(dirpath).relative_to(root)
        paths += [(rel_dir / f).as_posix() for f in filenames if f.endswith(".py")]
    return sorted(paths)


def _read_stdlib_files(root: str, rel_paths: list[str]):
    """Generator for `Dataset.from_generator`: one row per file (undecodable bytes replaced)."""
    for rel in rel_paths:
        text = (Path(root) / rel).read_bytes().decode("utf-8", errors="replace")
        yield {"text": text, "key": rel}


def load_embedded(cache_dir: str | None = None, split: str | None = None) -> datasets.Dataset:
    """The embedded corpus: one row per stdlib source file, columns "text" and "key" (relative path); with
    `split`, only the files of that partition (`fotlab.data.synthetic.repeat_file_split`)."""
    root = stdlib_root()
    if not root.is_dir():
        raise FileNotFoundError(f"embedded corpus: stdlib directory {root} not found")
    rel_paths = embedded_files(root)
    if split is not None:
        check_split(split)
        rel_paths = [rel for rel in rel_paths if repeat_file_split(str(root / rel)) == split]
    features = datasets.Features({"text": datasets.Value("string"), "key": datasets.Value("string")})
    return datasets.Dataset.from_generator(
        _read_stdlib_files,
        features=features,
        gen_kwargs={"root": str(root), "rel_paths": rel_paths},
        cache_dir=cache_dir,
    )


def _existing_path(source, index: int | None) -> Path:
    path = getattr(source, "path", None)
    if not path:
        raise ValueError(f"{source_label(source, index)}: 'path' is required")
    p = Path(path).expanduser()
    if not p.exists() and not any(ch in str(p) for ch in "*?["):
        raise FileNotFoundError(f"{source_label(source, index)}: path {str(p)!r} does not exist")
    return p


def _data_files(p: Path, suffixes: tuple[str, ...], source, index) -> list[str]:
    """Sorted file list for a file, a directory (recursive by suffix) or a glob pattern."""
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = [f for f in p.rglob("*") if f.is_file() and f.name.endswith(suffixes)]
    else:  # a glob pattern
        anchor = Path(p.anchor or ".")
        files = [f for f in anchor.glob(str(p.relative_to(anchor))) if f.is_file()]
    if not files:
        raise FileNotFoundError(f"{source_label(source, index)}: no {'/'.join(suffixes)} files under {str(p)!r}")
    return sorted(str(f) for f in files)


def _load_builder(builder: str, files: list[str], source, cache_dir, **kwargs):
    streaming = bool(getattr(source, "streaming", False))
    return datasets.load_dataset(
        builder, data_files=files, split="train", streaming=streaming, cache_dir=cache_dir, **kwargs
    )


def _keep_text(ds, source, index, text_field: str):
    """Rename `text_field` to "text" and drop every other column."""
    columns = ds.column_names
    if columns is not None and text_field not in columns:
        raise KeyError(f"{source_label(source, index)}: no field {text_field!r} (columns: {columns})")
    if text_field != "text":
        ds = ds.rename_column(text_field, "text")
    extra = [c for c in (ds.column_names or []) if c != "text"]
    return ds.remove_columns(extra) if extra else ds


def _is_url(path) -> bool:
    return "://" in str(path or "")


def _remote_files(source, pattern: str | None = None) -> list[str]:
    """A URL path (s3://, gs://, https://, ...) handed to `datasets` (fsspec) as is, plus the glob if given."""
    path = str(source.path)
    return [path.rstrip("/") + "/" + pattern] if pattern else [path]


def load_local(source, index=None, cache_dir=None):
    """Each file under `path` matching `glob` is one document."""
    pattern = getattr(source, "glob", None) or "**/*.txt"
    if _is_url(getattr(source, "path", None)):
        ds = _load_builder("text", _remote_files(source, pattern), source, cache_dir, sample_by="document")
        return _keep_text(ds, source, index, "text")
    root = _existing_path(source, index)
    files = sorted(str(f) for f in root.glob(pattern) if f.is_file()) if root.is_dir() else [str(root)]
    if not files:
        raise FileNotFoundError(f"{source_label(source, index)}: no files match {pattern!r} under {str(root)!r}")
    ds = _load_builder("text", files, source, cache_dir, sample_by="document")
    return _keep_text(ds, source, index, "text")


def load_jsonl(source, index=None, cache_dir=None):
    """JSON-lines files (a file, a directory, a glob, or a URL) with one document per line."""
    if _is_url(getattr(source, "path", None)):
        files = _remote_files(source)
    else:
        files = _data_files(_existing_path(source, index), (".jsonl", ".json", ".jsonl.gz"), source, index)
    ds = _load_builder("json", files, source, cache_dir)
    return _keep_text(ds, source, index, getattr(source, "text_field", None) or "text")


def load_parquet(source, index=None, cache_dir=None):
    """Parquet files (a file, a directory, a glob, or a URL) with one document per row."""
    if _is_url(getattr(source, "path", None)):
        files = _remote_files(source)
    else:
        files = _data_files(_existing_path(source, index), (".parquet",), source, index)
    ds = _load_builder("parquet", files, source, cache_dir)
    return _keep_text(ds, source, index, getattr(source, "text_field", None) or "text")


def load_hf(source, index=None, cache_dir=None):
    """A `save_to_disk` directory, a local dataset folder/script, or a hub dataset name."""
    target = getattr(source, "path", None) or getattr(source, "name", None)
    if not target:
        raise ValueError(f"{source_label(source, index)}: 'path' or 'name' (the HF dataset) is required")
    split = getattr(source, "split", None) or "train"
    local = Path(str(target)).expanduser()
    looks_local = str(target).startswith(("/", ".", "~")) or local.exists()
    if looks_local and not local.exists():
        raise FileNotFoundError(f"{source_label(source, index)}: dataset directory {str(local)!r} does not exist")
    if local.is_dir() and ((local / "state.json").exists() or (local / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(local))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split]
        if getattr(source, "streaming", False):
            ds = ds.to_iterable_dataset()
    else:
        ds = datasets.load_dataset(
            str(local) if looks_local else str(target),
            getattr(source, "config", None),
            data_dir=getattr(source, "data_dir", None),
            split=split,
            streaming=bool(getattr(source, "streaming", False)),
            cache_dir=cache_dir,
        )
    return _keep_text(ds, source, index, getattr(source, "text_field", None) or "text")


def load_repeat(source, index=None, cache_dir=None, split: str = "train"):
    """Repeated-span documents cut from the embedded corpus, or from the files under `path` matching `glob`
    (only the files of `split`)."""
    from fotlab.data.synthetic import repeat_dataset

    if getattr(source, "path", None):
        root = _existing_path(source, index)
        pattern = getattr(source, "glob", None) or "**/*.txt"
        files = [str(f) for f in root.glob(pattern) if f.is_file()] if root.is_dir() else [str(root)]
    else:  # the embedded corpus, or the part of it matching `glob`
        root = stdlib_root()
        rel_paths = embedded_files(root)
        pattern = getattr(source, "glob", None)
        if pattern:
            matching = {f.relative_to(root).as_posix() for f in root.glob(pattern)}
            rel_paths = [rel for rel in rel_paths if rel in matching]
        files = [str(root / rel) for rel in rel_paths]
    if not files:
        raise FileNotFoundError(f"{source_label(source, index)}: no base text files for the repeated spans")
    n_docs = getattr(source, "n_docs", None) or getattr(source, "max_docs", None) or 64
    try:
        return repeat_dataset(
            files,
            int(n_docs),
            int(getattr(source, "doc_len", 768)),
            int(getattr(source, "span_len", 64)),
            float(getattr(source, "repeat_prob", 1.0)),
            int(getattr(source, "max_gap", 1)),
            int(getattr(source, "seed", 0)),
            cache_dir,
            split=split,
        )
    except ValueError as exc:
        raise ValueError(f"{source_label(source, index)}: {exc}") from None


RAW_LOADERS = {"local": load_local, "jsonl": load_jsonl, "parquet": load_parquet, "hf": load_hf, "repeat": load_repeat}


def load_raw_source(source, index: int | None = None, cache_dir: str | None = None, split: str = "train"):
    """Load one text source as a dataset with a "text" column (and "key" for the embedded corpus).

    split ("train" | "dev" | "test") selects the partition of the embedded corpus and of a synthetic source
    (repeat); other natural-text sources have no partition of their own (hold documents out with
    data.validation_docs)."""
    kind = getattr(source, "kind", "embedded")
    if kind == "embedded":
        return load_embedded(cache_dir, split=split)
    if kind not in RAW_LOADERS:
        raise ValueError(f"{source_label(source, index)}: unknown text source kind {kind!r}")
    if kind == "repeat":
        return load_repeat(source, index, cache_dir, split)
    try:
        ds = RAW_LOADERS[kind](source, index, cache_dir)
    except datasets.exceptions.DatasetGenerationError as exc:  # a file `datasets` cannot parse (bad JSON, ...)
        cause = exc.__cause__ or exc
        detail = next((line.strip() for line in str(cause).splitlines() if line.strip()), type(cause).__name__)
        raise ValueError(f"{source_label(source, index)}: cannot read it: {detail}") from None
    _check_has_text(ds, source, index)
    return ds


def _check_has_text(ds, source, index: int | None) -> None:
    """Raise when no document of a loaded source holds any text (every file or row empty or whitespace only): a
    corpus of nothing would otherwise train on end-of-document tokens alone. Reads up to the first document with
    text; a streamed source is not read ahead (its documents come later)."""
    if not isinstance(ds, datasets.Dataset):
        return
    for batch in ds.select_columns(["text"]).iter(batch_size=1024):
        if any(text and not text.isspace() for text in batch["text"]):
            return
    kind = getattr(source, "kind", None)
    if len(ds) == 0:
        raise ValueError(f"{source_label(source, index)}: holds no documents")
    if kind == "local":
        what = f"the {len(ds)} files matching {getattr(source, 'glob', None) or '**/*.txt'!r}"
    else:
        what = f"its {len(ds)} documents (field {getattr(source, 'text_field', None) or 'text'!r})"
    raise ValueError(f"{source_label(source, index)}: {what} hold no text (empty or whitespace only)")
