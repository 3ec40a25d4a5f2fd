"""Synthetic tasks (FOT_SPEC §3): dictionary lookup documents, passkey prompts, and repeated-span text.

    python -c "from fotlab.data.synthetic import passkey_prompt; print(passkey_prompt(1234, 300, 0.5).prompt)"

Dictionary lookup (token ids, no tokenizer involved; task vocabulary of `DICT_VOCAB` = 64 ids):
- ids 0, 1, 2 are the markers `<k>`, `<v>`, `<q>`; ids 3..63 are symbols.
- a definition record is `<k> k1..k_key_len <v> v1..v_value_len`; a query is `<q> k1..k_key_len <v> v1..v_value_len`
  for a key defined earlier in the same document.
- a document holds doc_len // record_len records: the first half definitions (distinct keys), then queries
  (keys drawn uniformly, with replacement, from those definitions). loss_mask is 1 only on query value tokens.
Passkey (text; the Landmark Attention prompt used by the FoT paper):
- `passkey_prompt(key, n_filler_chars, depth)` builds the prompt; `passkey_prompt_for_tokens` picks the filler
  length for a target number of tokens. Training documents are prompt + answer with loss on the answer only.
Repeated spans (text; natural text with exact long-range repeats, for learning and measuring retrieval):
- a document is doc_len // span_len spans of span_len characters. The first is a slice of a base text; each next
  one is, with probability repeat_prob, a copy of the span `gap` spans back (gap log-uniform in 1..max_gap, so every
  octave of distance is equally common), else a fresh slice. repeat_prob 1, max_gap 1 gives one slice repeated:
  every local context of span_len tokens then has an exact copy in the previous one (cross-context copying).
Splits (`fotlab.data.splits`): every generator takes `split` ("train" for training sources, "dev" / "test" for
evaluations) and emits only items of that split, from that split's own random stream: dictionary definitions
(key, value) pairs, passkeys, and the base files repeated spans are cut from. Evaluation items therefore never
occur in training data (tests/test_leakage.py checks it over every shipped spec).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import datasets
import numpy as np

from fotlab.data.splits import DICTIONARY, PASSKEY, REPEAT, check_split, draw_in_split, item_split, split_rng

DICT_VOCAB = 64
KEY_MARK, VALUE_MARK, QUERY_MARK = 0, 1, 2
FIRST_SYMBOL = 3

PASSKEY_TASK = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_QUESTION = "What is the pass key? The pass key is"


# ---- dictionary lookup ----------------------------------------------------------------------------------
def dictionary_lookup_doc(
    rng: np.random.Generator,
    doc_len: int = 512,
    key_len: int = 4,
    value_len: int = 4,
    vocab: int = DICT_VOCAB,
    split: str = "train",
) -> tuple[list[int], list[int]]:
    """One document: (input_ids, loss_mask), at most doc_len tokens, half definitions then half queries.

    Every definition (key, value) pair is of `split` (`definition_split`): values are redrawn until it is."""
    record_len = 2 + key_len + value_len
    n_records = doc_len // record_len
    if n_records < 2:
        raise ValueError(f"dictionary_lookup: doc_len={doc_len} holds fewer than 2 records of {record_len} tokens")
    n_defs = n_records // 2
    n_symbols = vocab - FIRST_SYMBOL
    if n_symbols**key_len < n_defs:
        raise ValueError(f"dictionary_lookup: {n_symbols}^{key_len} keys cannot give {n_defs} distinct keys")
    keys: dict[tuple[int, ...], tuple[int, ...]] = {}
    while len(keys) < n_defs:
        key = tuple(int(x) for x in rng.integers(FIRST_SYMBOL, vocab, key_len))
        if key not in keys:
            keys[key] = _value_in_split(rng, key, value_len, vocab, split)
    defined = list(keys.items())
    ids: list[int] = []
    mask: list[int] = []
    for key, value in defined:
        ids += [KEY_MARK, *key, VALUE_MARK, *value]
        mask += [0] * record_len
    for j in rng.integers(0, n_defs, n_records - n_defs):
        key, value = defined[int(j)]
        ids += [QUERY_MARK, *key, VALUE_MARK, *value]
        mask += [0] * (2 + key_len) + [1] * value_len
    return ids, mask


def definition_split(key: tuple[int, ...], value: tuple[int, ...]) -> str:
    """The split a dictionary definition (key, value) belongs to."""
    return item_split("dictionary", (tuple(key), tuple(value)))


def _value_in_split(rng, key: tuple[int, ...], value_len: int, vocab: int, split: str) -> tuple[int, ...]:
    check_split(split)
    for _ in range(10_000):
        value = tuple(int(x) for x in rng.integers(FIRST_SYMBOL, vocab, value_len))
        if definition_split(key, value) == split:
            return value
    raise ValueError(f"dictionary_lookup: no value of split {split!r} for key {key}")


def dictionary_records(ids: list[int], key_len: int, value_len: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(key, value) of every definition and query record in a dictionary document's ids."""
    record_len = 2 + key_len + value_len
    out = []
    for s in range(0, len(ids) - record_len + 1, record_len):
        rec = ids[s : s + record_len]
        if rec[0] in (KEY_MARK, QUERY_MARK) and rec[1 + key_len] == VALUE_MARK:
            out.append((tuple(rec[1 : 1 + key_len]), tuple(rec[2 + key_len :])))
    return out


def _dictionary_rows(seed: int, n_docs: int, doc_len: int, key_len: int, value_len: int, split: str = "train"):
    rng = split_rng(seed, DICTIONARY, split)
    for i in range(n_docs):
        ids, mask = dictionary_lookup_doc(rng, doc_len, key_len, value_len, split=split)
        yield {"input_ids": ids, "loss_mask": mask, "key": f"dictionary_lookup/{i}"}


def dictionary_lookup_dataset(
    n_docs: int, doc_len: int = 512, key_len: int = 4, value_len: int = 4, seed: int = 0, cache_dir: str | None = None
) -> datasets.Dataset:
    """n_docs dictionary lookup documents (columns input_ids, loss_mask, key), deterministic in seed."""
    features = datasets.Features(
        {
            "input_ids": datasets.Sequence(datasets.Value("int32")),
            "loss_mask": datasets.Sequence(datasets.Value("int8")),
            "key": datasets.Value("string"),
        }
    )
    kwargs = {"seed": seed, "n_docs": n_docs, "doc_len": doc_len, "key_len": key_len, "value_len": value_len}
    return datasets.Dataset.from_generator(_dictionary_rows, features=features, gen_kwargs=kwargs, cache_dir=cache_dir)


# ---- repeated spans -------------------------------------------------------------------------------------
def repeat_file_split(path: str) -> str:
    """The split of a base text file of repeated spans: by its last two path parts (e.g. 'Lib/json.py' ->
    'Lib/json.py'), so the partition does not depend on where the corpus is installed."""
    parts = str(path).replace("\\", "/").rstrip("/").split("/")
    return item_split("repeat_file", "/".join(parts[-2:]))


def repeat_document(
    rng: np.random.Generator,
    texts: list[str],
    doc_len: int,
    span_len: int = 64,
    repeat_prob: float = 1.0,
    max_gap: int = 1,
) -> str:
    """One document of doc_len // span_len spans (at least 1) cut from `texts` (each >= span_len characters)."""
    if span_len <= 0 or doc_len < span_len:
        raise ValueError(f"repeat: doc_len={doc_len} must be >= span_len={span_len} > 0")
    spans: list[str] = []
    for i in range(doc_len // span_len):
        if i > 0 and rng.random() < repeat_prob:
            top = min(max_gap, i)
            gap = min(int(np.exp(rng.uniform(0.0, np.log(top + 1)))), top)  # log-uniform on 1..top
            spans.append(spans[i - gap])
        else:
            text = texts[int(rng.integers(len(texts)))]
            start = int(rng.integers(0, len(text) - span_len + 1))
            spans.append(text[start : start + span_len])
    return "".join(spans)


def _repeat_rows(
    paths: str,
    seed: int,
    n_docs: int,
    doc_len: int,
    span_len: int,
    repeat_prob: float,
    max_gap: int,
    stamp: str = "",
    split: str = "train",
):  # stamp: files' sizes and mtimes (cache key)
    texts = [t for t in (_read_text(p) for p in paths.split("\n")) if len(t) >= span_len and t.isascii()]
    rng = split_rng(seed, REPEAT, split)
    for i in range(n_docs):
        yield {
            "text": repeat_document(rng, texts, doc_len, span_len, repeat_prob, max_gap),
            "key": f"repeat/{seed}/{i}",
        }


def _read_text(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode("utf-8", errors="replace")


def repeat_base_files(paths: list[str], span_len: int, split: str = "train") -> list[str]:
    """The sorted ASCII files of >= span_len characters among `paths` whose repeat_file_split is `split`."""
    check_split(split)
    return sorted(
        p for p in paths if repeat_file_split(p) == split and os.stat(p).st_size >= span_len and _read_text(p).isascii()
    )


def repeat_dataset(
    paths: list[str],
    n_docs: int,
    doc_len: int = 768,
    span_len: int = 64,
    repeat_prob: float = 1.0,
    max_gap: int = 1,
    seed: int = 0,
    cache_dir: str | None = None,
    split: str = "train",
) -> datasets.Dataset:
    """n_docs repeated-span documents (columns text, key) cut from the ASCII files among `paths` that belong to
    `split` (repeat_file_split); deterministic in (files, seed, split)."""
    features = datasets.Features({"text": datasets.Value("string"), "key": datasets.Value("string")})
    if span_len <= 0 or doc_len < span_len:
        raise ValueError(f"repeat: doc_len={doc_len} must be >= span_len={span_len} > 0")
    n_given = len(paths)
    paths = repeat_base_files(paths, span_len, split)
    if not paths:
        raise ValueError(
            f"repeat: no ASCII base text of >= {span_len} characters in split {split!r} among "
            f"{n_given} files (each file belongs to one split: fotlab.data.splits)"
        )
    stamp = hashlib.sha1(repr([(p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths]).encode()).hexdigest()
    kwargs = {
        "paths": "\n".join(paths),
        "stamp": stamp,
        "seed": seed,
        "n_docs": n_docs,
        "doc_len": doc_len,
        "span_len": span_len,
        "repeat_prob": repeat_prob,
        "max_gap": max_gap,
        "split": split,
    }  # paths as one string: lists are sharded
    return datasets.Dataset.from_generator(_repeat_rows, features=features, gen_kwargs=kwargs, cache_dir=cache_dir)


# ---- passkey --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PasskeyPrompt:
    """A passkey prompt; the expected completion is `answer` (" {key}")."""

    prompt: str
    answer: str
    key: int
    n_filler_chars: int
    depth: float


def _filler(n_chars: int) -> str:
    """The first n_chars characters of the filler sentence repeated (space separated)."""
    n_repeats = n_chars // (len(PASSKEY_FILLER) + 1) + 1
    return " ".join([PASSKEY_FILLER] * n_repeats)[:n_chars]


def passkey_prompt(key: int, n_filler_chars: int, depth: float = 0.5) -> PasskeyPrompt:
    """The passkey prompt with n_filler_chars of filler in all; the key line sits after depth * n_filler_chars.

    Lines (joined by "\\n"): task sentence, filler prefix, "The pass key is {K}. Remember it. {K} is the pass
    key.", filler suffix, "What is the pass key? The pass key is".
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must be in [0, 1]")
    n_prefix = int(round(n_filler_chars * depth))
    info = f"The pass key is {key}. Remember it. {key} is the pass key."
    lines = [PASSKEY_TASK, _filler(n_prefix), info, _filler(n_filler_chars - n_prefix), PASSKEY_QUESTION]
    return PasskeyPrompt("\n".join(lines), f" {key}", key, n_filler_chars, depth)


def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def filler_chars_per_token(tokenizer) -> float:
    """Characters per token of the filler text (an estimate used to size prompts)."""
    sample_chars = 4000
    return sample_chars / max(_n_tokens(tokenizer, _filler(sample_chars)), 1)


def passkey_prompt_for_tokens(
    tokenizer, n_tokens: int, key: int, depth: float = 0.5, chars_per_token: float | None = None
) -> PasskeyPrompt:
    """The longest passkey prompt (by filler) whose prompt tokens (no specials) fit in n_tokens
    (chars_per_token: `filler_chars_per_token(tokenizer)`, computed when not given)."""
    base = _n_tokens(tokenizer, passkey_prompt(key, 0, depth).prompt)
    if base > n_tokens:
        raise ValueError(f"passkey: n_tokens={n_tokens} is below the {base} tokens of a prompt without filler")
    chars_per_token = chars_per_token or filler_chars_per_token(tokenizer)
    n_chars = int((n_tokens - base) * chars_per_token)
    for _ in range(32):  # shrink until it fits (the estimate is close, so this ends in a few rounds)
        excess = _n_tokens(tokenizer, passkey_prompt(key, n_chars, depth).prompt) - n_tokens
        if excess <= 0:
            break
        n_chars = max(n_chars - int(excess * chars_per_token) - 1, 0)
    return passkey_prompt(key, n_chars, depth)


def draw_passkey(rng: np.random.Generator, max_passkey: int, split: str = "train") -> int:
    """A passkey uniform in [1, max_passkey] among the keys of `split` (item_split("passkey", key))."""
    return draw_in_split(rng, 1, max_passkey + 1, "passkey", split)


def _passkey_rows(tokenizer, seed: int, n_docs: int, doc_len: int, max_passkey: int):
    rng = split_rng(seed, PASSKEY, "train")
    chars_per_token = filler_chars_per_token(tokenizer)
    for i in range(n_docs):
        key = draw_passkey(rng, max_passkey, "train")
        depth = float(rng.uniform(0.0, 1.0))
        answer_len = _n_tokens(tokenizer, f" {key}")
        p = passkey_prompt_for_tokens(tokenizer, max(doc_len - answer_len, 1), key, depth, chars_per_token)
        yield {"text": p.prompt, "answer": p.answer, "key": f"passkey/{i}"}


def passkey_dataset(
    tokenizer, n_docs: int, doc_len: int = 512, max_passkey: int = 50000, seed: int = 0, cache_dir: str | None = None
) -> datasets.Dataset:
    """n_docs passkey documents (columns text = prompt, answer, key) of about doc_len tokens each."""
    features = datasets.Features({k: datasets.Value("string") for k in ("text", "answer", "key")})
    kwargs = {"tokenizer": tokenizer, "seed": seed, "n_docs": n_docs, "doc_len": doc_len, "max_passkey": max_passkey}
    return datasets.Dataset.from_generator(_passkey_rows, features=features, gen_kwargs=kwargs, cache_dir=cache_dir)
