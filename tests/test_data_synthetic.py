"""Synthetic tasks: dictionary lookup format + loss masks, passkey prompt text."""

import numpy as np
import pytest

from fotlab.data import (
    byte_tokenizer,
    dictionary_lookup_doc,
    passkey_dataset,
    passkey_prompt,
    passkey_prompt_for_tokens,
)
from fotlab.data.synthetic import DICT_VOCAB, KEY_MARK, QUERY_MARK, VALUE_MARK

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


def test_dictionary_lookup_records_queries_and_loss_mask():
    ids, mask = dictionary_lookup_doc(np.random.default_rng(0), doc_len=512, key_len=4, value_len=4)
    assert len(ids) == len(mask) == 510  # 51 records of 10 tokens
    records = [ids[i : i + 10] for i in range(0, len(ids), 10)]
    masks = [mask[i : i + 10] for i in range(0, len(ids), 10)]
    defs, queries = records[:25], records[25:]
    assert all(r[0] == KEY_MARK and r[5] == VALUE_MARK for r in defs)
    assert all(r[0] == QUERY_MARK and r[5] == VALUE_MARK for r in queries) and len(queries) == 26
    table = {tuple(r[1:5]): tuple(r[6:10]) for r in defs}
    assert len(table) == 25  # distinct keys
    for q in queries:  # every query asks a defined key and gives its value
        assert table[tuple(q[1:5])] == tuple(q[6:10])
    assert all(3 <= t < DICT_VOCAB for r in records for t in r[1:5] + r[6:10])
    assert all(m == [0] * 10 for m in masks[:25])  # no loss on definitions
    assert all(m == [0] * 6 + [1] * 4 for m in masks[25:])  # loss only on query values


def test_dictionary_lookup_deterministic_in_seed_and_sized():
    a = dictionary_lookup_doc(np.random.default_rng(7), doc_len=130, key_len=2, value_len=3)
    b = dictionary_lookup_doc(np.random.default_rng(7), doc_len=130, key_len=2, value_len=3)
    c = dictionary_lookup_doc(np.random.default_rng(8), doc_len=130, key_len=2, value_len=3)
    assert a == b and a != c and len(a[0]) == 126  # 18 records of 7 tokens
    with pytest.raises(ValueError, match="fewer than 2 records"):
        dictionary_lookup_doc(np.random.default_rng(0), doc_len=12)


def test_passkey_prompt_exact_text():
    p = passkey_prompt(4242, n_filler_chars=200, depth=0.25)
    prefix = (FILLER + " " + FILLER)[:50]
    suffix = (FILLER + " " + FILLER)[:150]
    expected = (
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there.\n"
        f"{prefix}\n"
        "The pass key is 4242. Remember it. 4242 is the pass key.\n"
        f"{suffix}\n"
        "What is the pass key? The pass key is"
    )
    assert p.prompt == expected
    assert p.answer == " 4242" and p.key == 4242 and p.n_filler_chars == 200


def test_passkey_prompt_depth_places_the_key():
    early = passkey_prompt(7, 2000, 0.0).prompt
    late = passkey_prompt(7, 2000, 1.0).prompt
    assert early.index("The pass key is 7.") < 200 < late.index("The pass key is 7.")
    assert len(early) == len(late)


def test_passkey_prompt_for_tokens_fits_target():
    tok = byte_tokenizer()
    for n_tokens in (300, 1000, 4096):
        p = passkey_prompt_for_tokens(tok, n_tokens, key=31337, depth=0.5)
        n = len(tok(p.prompt)["input_ids"])
        assert n_tokens - 5 <= n <= n_tokens
    with pytest.raises(ValueError, match="below"):
        passkey_prompt_for_tokens(tok, 50, key=1)


def test_passkey_documents_keys_in_range(tmp_path):
    tok = byte_tokenizer()
    ds = passkey_dataset(tok, n_docs=20, doc_len=400, max_passkey=50000, seed=3, cache_dir=str(tmp_path))
    keys = [int(a) for a in ds["answer"]]
    assert all(1 <= k <= 50000 for k in keys) and len(set(keys)) > 15
    for row in ds:
        assert f"The pass key is {int(row['answer'])}." in row["text"]
        assert row["text"].endswith("What is the pass key? The pass key is")
        assert len(tok(row["text"] + row["answer"])["input_ids"]) <= 400
