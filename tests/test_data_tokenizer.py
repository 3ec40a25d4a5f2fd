"""Tokenizers: byte-level round trip, trained BPE, pretrained directories via AutoTokenizer."""

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from fotlab.data import build_tokenizer, byte_tokenizer
from fotlab.spec import DataSpec, SourceSpec, TokenizerSpec

SAMPLES = [
    "héllo wörld",
    "tabs\tand\nnewlines\r\n",
    "日本語 🙂 emoji",
    "\x00 nul and ctrl \x7f",
    "  leading spaces",
    "def f(x):\n    return x ** 2  # ünïcode",
]
CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x):\n        self.x = x\n",
    "import os\nprint(os.path.join('a', 'b'))\n",
] * 40


def test_byte_tokenizer_is_lossless_and_ids_are_bytes():
    tok = build_tokenizer(TokenizerSpec(kind="byte"))
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert len(tok) == 259
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (256, 257, 258)
    for text in SAMPLES:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text
    assert tok("abc")["input_ids"] == [97, 98, 99]  # adds no specials by itself


def test_byte_tokenizer_saves_and_loads_with_autotokenizer(tmp_path):
    tok = byte_tokenizer()
    tok.save_pretrained(tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded.bos_token == "<bos>" and loaded.eos_token_id == 257 and loaded.pad_token_id == 258
    for text in SAMPLES:
        assert loaded(text, add_special_tokens=False)["input_ids"] == list(text.encode("utf-8"))


def test_bpe_trains_saves_and_reloads(tmp_path):
    path = tmp_path / "bpe"
    spec = TokenizerSpec(kind="bpe", vocab_size=300, path=str(path))
    tok = build_tokenizer(spec, texts=iter(CORPUS))
    assert 259 < len(tok) <= 300
    assert tok.bos_token_id is not None and tok.eos_token_id is not None and tok.pad_token_id is not None
    for text in SAMPLES + CORPUS[:3]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    code = CORPUS[0]
    assert len(tok(code)["input_ids"]) < 0.6 * len(code.encode())  # merges learnt from the corpus
    # saved: a second build loads instead of training (no texts needed), AutoTokenizer reads the dir
    again = build_tokenizer(spec)
    auto = AutoTokenizer.from_pretrained(path)
    assert again(code)["input_ids"] == tok(code)["input_ids"] == auto(code)["input_ids"]


def test_bpe_without_texts_is_an_error():
    with pytest.raises(ValueError, match="texts"):
        build_tokenizer(TokenizerSpec(kind="bpe", vocab_size=300))


def test_bpe_trains_on_data_spec_sources(tmp_path):
    (tmp_path / "docs").mkdir()
    for i, text in enumerate(CORPUS[:3]):
        (tmp_path / "docs" / f"{i}.txt").write_text(text * 20)
    data = DataSpec(
        sources=[SourceSpec(kind="local", path=str(tmp_path / "docs"), glob="*.txt")], cache_dir=str(tmp_path / "cache")
    )
    tok = build_tokenizer(TokenizerSpec(kind="bpe", vocab_size=280), data_spec=data)
    assert len(tok(CORPUS[1])["input_ids"]) < 0.6 * len(CORPUS[1].encode())


def test_pretrained_dir_roundtrip(tmp_path):
    trained = build_tokenizer(TokenizerSpec(kind="bpe", vocab_size=290), texts=CORPUS)
    trained.save_pretrained(tmp_path / "llama_dir")
    tok = build_tokenizer(TokenizerSpec(kind="pretrained", path=str(tmp_path / "llama_dir")))
    assert isinstance(tok, PreTrainedTokenizerFast)
    for text in SAMPLES:
        assert tok(text)["input_ids"] == trained(text)["input_ids"]
        assert tok.decode(tok(text)["input_ids"]) == text


def test_pretrained_missing_dir_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        build_tokenizer(TokenizerSpec(kind="pretrained", path=str(tmp_path / "nope")))


def test_bpe_from_data_spec_is_cached_by_sources(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text(CORPUS[0] * 30)
    data = DataSpec(
        sources=[SourceSpec(kind="local", path=str(tmp_path / "docs"), glob="*.txt")],
        cache_dir=str(tmp_path / "cache" / "datasets"),
    )
    spec = TokenizerSpec(kind="bpe", vocab_size=270)
    first = build_tokenizer(spec, data_spec=data)
    saved = list((tmp_path / "cache" / "datasets" / "fotlab_tokenizers").glob("bpe-*/tokenizer.json"))
    assert len(saved) == 1
    (tmp_path / "docs" / "a.txt").write_text("completely different text " * 30)  # cached: not retrained
    assert build_tokenizer(spec, data_spec=data)(CORPUS[0])["input_ids"] == first(CORPUS[0])["input_ids"]
