"""DocPacker: doc-aware K-packing layout, shifted targets, loss masks, resume, sharding, determinism."""

import json

import datasets
import numpy as np
import pytest
import torch

from fotlab.data import IGNORE_INDEX, DocPacker

BOS, EOS = 1_000_000, 1_000_001


def make_docs(lengths, with_mask=False):
    """Document i holds tokens i*100 .. i*100+len-1 (so every token names its document and position)."""
    cols = {"input_ids": [[i * 100 + j for j in range(n)] for i, n in enumerate(lengths)]}
    if with_mask:
        cols["loss_mask"] = [[j % 2 for j in range(n)] for n in lengths]
    return datasets.Dataset.from_dict(cols)


LENGTHS = [5, 30, 12, 7, 40, 3, 25, 18, 9, 60, 2, 33]


def packer(docs, **kw):
    args = dict(batch_size=8, seq_len=6, packing=4, seed=3, bos_id=BOS, eos_id=EOS)
    args.update(kw)
    return DocPacker(docs, **args)


def stream_tokens(batches, group, k):
    """Concatenate the rows of one packing group over consecutive batches (the stream it carries)."""
    return np.concatenate([b["input_ids"][group * k : (group + 1) * k].reshape(-1).numpy() for b in batches])


def test_rows_of_a_group_are_consecutive_chunks_of_one_stream():
    docs = make_docs(LENGTHS)
    p = packer(docs, with_doc_ids=True)
    batches = [p.next_batch() for _ in range(12)]
    k, T = 4, 6
    for b in batches:
        assert b["input_ids"].shape == (8, T) and b["input_ids"].dtype == torch.long
        for row in range(8):
            if row % k != k - 1:  # next row of the same group continues the stream
                assert b["targets"][row, -1].item() in (b["input_ids"][row + 1, 0].item(), IGNORE_INDEX)
    for group in range(2):
        stream = stream_tokens(batches, group, k)
        # the stream is <bos> doc <eos> <bos> doc <eos> ... with every document whole and in order
        assert stream[0] == BOS
        pieces = np.split(stream, np.where(stream == BOS)[0][1:])
        for piece in pieces[:-1]:
            assert piece[0] == BOS and piece[-1] == EOS
            body = piece[1:-1]
            doc = body[0] // 100
            assert body.tolist() == docs[int(doc)]["input_ids"]
        # <eos> is always followed by <bos>
        eos_at = np.where(stream[:-1] == EOS)[0]
        assert (stream[eos_at + 1] == BOS).all() and len(eos_at) >= 2


def test_targets_are_shifted_inputs_with_bos_ignored():
    p = packer(make_docs(LENGTHS))
    b0, b1 = p.next_batch(), p.next_batch()
    x, y = b0["input_ids"], b0["targets"]
    inner = y[:, :-1]
    expect = torch.where(x[:, 1:] == BOS, torch.full_like(inner, IGNORE_INDEX), x[:, 1:])
    assert torch.equal(inner, expect)
    # the last target of a group's last row is the first token of that group's next batch
    for group in range(2):
        last = y[group * 4 + 3, -1].item()
        assert last in (b1["input_ids"][group * 4, 0].item(), IGNORE_INDEX)
    assert (y == EOS).any()  # predicting <eos> carries loss for plain text


def test_loss_mask_column_masks_targets():
    docs = make_docs(LENGTHS, with_mask=True)
    p = packer(docs, with_doc_ids=True)
    for _ in range(5):
        b = p.next_batch()
        x, y = b["input_ids"], b["targets"]
        for r in range(8):
            for t in range(5):
                nxt = x[r, t + 1].item()
                if nxt in (BOS, EOS):
                    assert y[r, t].item() == IGNORE_INDEX
                else:
                    pos = nxt % 100  # position in its document; mask is j % 2
                    assert y[r, t].item() == (nxt if pos % 2 == 1 else IGNORE_INDEX)


def test_doc_ids_name_the_document_of_each_token():
    docs = make_docs(LENGTHS)
    p = packer(docs, with_doc_ids=True)
    for _ in range(6):
        b = p.next_batch()
        x, d = b["input_ids"], b["doc_ids"]
        plain = (x != BOS) & (x != EOS)
        assert torch.equal(d[plain], x[plain] // 100)


def test_batch_must_be_divisible_by_packing():
    with pytest.raises(ValueError, match="divisible"):
        packer(make_docs(LENGTHS), batch_size=6, packing=4)


def test_resume_continues_with_identical_batches():
    docs = make_docs(LENGTHS)
    ref = packer(docs, with_doc_ids=True)
    for _ in range(7):
        ref.next_batch()
    state = json.loads(json.dumps(ref.state_dict()))  # must survive a JSON round trip
    expected = [ref.next_batch() for _ in range(20)]  # crosses epoch boundaries
    resumed = packer(docs, with_doc_ids=True)
    resumed.load_state_dict(state)
    for want in expected:
        got = resumed.next_batch()
        for key in want:
            assert torch.equal(got[key], want[key])
    assert resumed.step == ref.step


def test_resume_refuses_other_settings():
    docs = make_docs(LENGTHS)
    state = packer(docs).state_dict()
    with pytest.raises(ValueError, match="seq_len"):
        packer(docs, seq_len=7).load_state_dict(state)


def test_deterministic_in_seed():
    docs = make_docs(LENGTHS)
    a = [packer(docs, seed=5).next_batch()["input_ids"] for _ in range(2)]
    assert torch.equal(a[0], a[1])
    assert not torch.equal(
        packer(docs, seed=5).next_batch()["input_ids"], packer(docs, seed=6).next_batch()["input_ids"]
    )


def epoch_docs(p, epoch=0):
    return {int(x) for x in p.source.order(epoch)}


def test_ranks_read_disjoint_documents():
    docs = make_docs(LENGTHS * 3)
    world = 3
    packers = [packer(docs, rank=r, world_size=world, with_doc_ids=True, batch_size=4, packing=2) for r in range(world)]
    seen = []
    for p in packers:
        ids = set()
        n_steps = 0
        while p.epoch == 0 and n_steps < 500:  # read through this rank's first epoch
            ids |= set(p.next_batch()["doc_ids"].unique().tolist())
            n_steps += 1
        seen.append(ids)
        assert ids >= epoch_docs(p, 0)  # every document of this rank's epoch was read
    first_epoch = [epoch_docs(p, 0) for p in packers]
    assert set().union(*first_epoch) == set(range(len(docs)))
    for i in range(world):
        for j in range(i + 1, world):
            assert not first_epoch[i] & first_epoch[j]


def test_epochs_reshuffle():
    p = packer(make_docs(LENGTHS), batch_size=2, packing=2)
    assert not np.array_equal(p.source.order(0), p.source.order(1))
    for _ in range(100):
        p.next_batch()
    assert p.epoch >= 1


def test_streamed_docs_pack_resume_and_shard():
    docs = make_docs(LENGTHS * 2).to_iterable_dataset(num_shards=4)
    ref = packer(docs, with_doc_ids=True, batch_size=4, packing=2, shuffle_buffer=8)
    first = [ref.next_batch() for _ in range(6)]
    stream = stream_tokens(first, 0, 2)
    assert stream[0] == BOS and (stream == EOS).sum() >= 1
    state = json.loads(json.dumps(ref.state_dict()))
    expected = [ref.next_batch() for _ in range(25)]  # crosses epoch boundaries
    assert ref.epoch >= 1
    resumed = packer(docs, with_doc_ids=True, batch_size=4, packing=2, shuffle_buffer=8)
    resumed.load_state_dict(state)
    for want in expected:
        got = resumed.next_batch()
        assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(got["targets"], want["targets"])
    # two ranks read disjoint documents (tokens name their document: token // 100)
    seen = []
    for rank in range(2):
        p = packer(docs, rank=rank, world_size=2, batch_size=2, packing=2, shuffle_buffer=8)
        tokens = torch.cat([p.next_batch()["input_ids"].flatten() for _ in range(8)])
        seen.append({int(t) // 100 for t in tokens if t < BOS})
    assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_plain_lists_pack_like_a_dataset():
    lists = [[i * 100 + j for j in range(n)] for i, n in enumerate(LENGTHS)]
    a, b = packer(lists), packer(make_docs(LENGTHS))
    for _ in range(4):
        assert torch.equal(a.next_batch()["input_ids"], b.next_batch()["input_ids"])
