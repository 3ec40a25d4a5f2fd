"""Tokenizers for fotlab, built on HF `tokenizers` and returned as `transformers.PreTrainedTokenizerFast`.

Kinds (`TokenizerSpec.kind`):
- "byte" (default): byte-level, no training. Token id == byte value for ids 0..255, then `<bos>` 256, `<eos>` 257,
  `<pad>` 258 (V = 259). Any UTF-8 text round-trips exactly.
- "bpe": a byte-level BPE trained on the corpus texts with `vocab_size` (specials included); saved to
  `TokenizerSpec.path` when given, and loaded from there on the next call instead of retraining.
- "pretrained": a tokenizer directory (e.g. next to a LLaMA checkpoint) loaded with `AutoTokenizer`.

Design choices:
- No tokenizer adds specials by itself: documents are tokenized with `add_special_tokens=False` and the packer
  frames each document as `<bos> ... <eos>`.
- bos/eos/pad are always set (pad falls back to eos for pretrained tokenizers without one).

    python -c "from fotlab.data import build_tokenizer; t = build_tokenizer(None); print(t('héllo').input_ids)"
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<bos>", "<eos>", "<pad>"
SPECIAL_TOKENS = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN]
N_BYTES = 256
BPE_MAX_DOCS_PER_SOURCE = 20_000
BPE_CACHE_VERSION = 1


def _byte_to_unicode() -> dict[int, str]:
    """The byte-level alphabet of HF `ByteLevel`: printable bytes map to themselves, the rest to chr(256 + n)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    n_extra = 0
    for b in range(N_BYTES):
        if b not in mapping:
            mapping[b] = chr(N_BYTES + n_extra)
            n_extra += 1
    return mapping


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap a raw `tokenizers.Tokenizer` as a transformers tokenizer with bos/eos/pad set."""
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer without training: ids 0..255 are the bytes, then `<bos>`, `<eos>`, `<pad>`."""
    alphabet = _byte_to_unicode()
    vocab = {alphabet[b]: b for b in range(N_BYTES)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # No merges, so splitting words first changes nothing; without the regex it encodes ~5x faster.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)  # ids 256, 257, 258
    return _wrap(tok)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` (V = vocab_size, specials included, all 256 bytes always present)."""
    if vocab_size < N_BYTES + len(SPECIAL_TOKENS):
        raise ValueError(
            f"tokenizer.vocab_size={vocab_size} is below {N_BYTES + len(SPECIAL_TOKENS)} (bytes + specials)"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return _wrap(tok)


def load_pretrained_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer directory (or hub id, needs network) with `AutoTokenizer`; make sure bos/eos/pad are set."""
    local = Path(path).expanduser()
    if not local.exists() and (str(path).startswith(("/", ".", "~")) or str(path).count("/") > 1):
        raise FileNotFoundError(f"tokenizer.path: tokenizer directory {str(local)!r} does not exist")
    tok = AutoTokenizer.from_pretrained(str(local) if local.exists() else str(path))
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise TypeError(f"tokenizer.path: {path} loads as {type(tok).__name__}, not a fast (tokenizers) tokenizer")
    if tok.bos_token is None or tok.eos_token is None:
        raise ValueError(f"tokenizer.path: tokenizer in {path} has no bos or eos token")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _has_tokenizer_files(path: Path) -> bool:
    return (path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists()


def _bpe_cache_path(tok_spec, data_spec) -> Path:
    """Where a BPE trained on data_spec's text sources is kept when `tokenizer.path` is not set."""
    from fotlab.data.build import SYNTHETIC_KINDS, resolve_cache_dir, sources_of

    fields = ("kind", "path", "glob", "text_field", "name", "config", "data_dir", "split", "max_docs")
    sources = [[str(getattr(s, f)) for f in fields] for s in sources_of(data_spec) if s.kind not in SYNTHETIC_KINDS]
    key = json.dumps({"v": BPE_CACHE_VERSION, "vocab_size": int(tok_spec.vocab_size), "sources": sources})
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    return Path(resolve_cache_dir(data_spec)) / "fotlab_tokenizers" / f"bpe-{digest}"


def _save_atomically(tok: PreTrainedTokenizerFast, path: Path) -> None:
    """save_pretrained into a temporary sibling, then rename (concurrent ranks never see half a directory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
    tok.save_pretrained(str(tmp))
    try:
        os.replace(tmp, path)
    except OSError:  # another rank got there first (or the directory exists): keep theirs
        shutil.rmtree(tmp, ignore_errors=True)


def _build_bpe(tok_spec, texts, data_spec) -> PreTrainedTokenizerFast:
    path = getattr(tok_spec, "path", None)
    if path is not None and _has_tokenizer_files(Path(path).expanduser()):
        return load_pretrained_tokenizer(path)
    if path is None and texts is None and data_spec is not None:
        path = _bpe_cache_path(tok_spec, data_spec)
        if _has_tokenizer_files(path):
            return load_pretrained_tokenizer(path)
    if texts is None and data_spec is not None:
        from fotlab.data.build import corpus_texts  # local import: build imports this module

        texts = corpus_texts(data_spec, max_docs_per_source=BPE_MAX_DOCS_PER_SOURCE)
    if texts is None:
        raise ValueError(
            "tokenizer.kind='bpe' needs texts or data_spec to train on (or tokenizer.path with a trained tokenizer)"
        )
    tok = train_bpe_tokenizer(texts, int(tok_spec.vocab_size))
    if path is not None:
        _save_atomically(tok, Path(path).expanduser())
    return tok


def build_tokenizer(tok_spec=None, texts: Iterable[str] | None = None, data_spec=None) -> PreTrainedTokenizerFast:
    """Build the tokenizer a `TokenizerSpec` describes (duck-typed: reads .kind, .path, .vocab_size).

    `tok_spec=None` gives the byte tokenizer. For "bpe", an existing `path` with tokenizer files is loaded;
    otherwise it trains on `texts` (an iterable of documents) or, when None, on the text sources of `data_spec`
    (`fotlab.data.corpus_texts`, at most BPE_MAX_DOCS_PER_SOURCE documents each) and saves the result to `path`,
    or, without a path, to a cache directory keyed by the sources and vocab_size (reused by later runs/ranks).
    """
    kind = getattr(tok_spec, "kind", "byte") if tok_spec is not None else "byte"
    if kind == "byte":
        return byte_tokenizer()
    if kind == "pretrained":
        path = getattr(tok_spec, "path", None)
        if path is None:
            raise ValueError("tokenizer.path is required for tokenizer.kind='pretrained'")
        return load_pretrained_tokenizer(path)
    if kind == "bpe":
        return _build_bpe(tok_spec, texts, data_spec)
    raise ValueError(f"tokenizer.kind: unknown kind {kind!r} (expected 'byte', 'bpe' or 'pretrained')")
