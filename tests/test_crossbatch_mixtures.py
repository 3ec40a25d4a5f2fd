"""FOT_SPEC §2's context mixtures, counted on real doc-aware K-packed batches of real documents.

Documents are the embedded corpus (Python stdlib source files), byte-tokenized and packed by fotlab.data's
DocPacker with doc_ids, so the source document of every token is known. Which other entries an entry actually sees
is read off crossbatch_attention itself (an entry's output has a gradient w.r.t. exactly the keys it attends to);
a visible slot is a positive when it shares a document with the entry, a negative otherwise.
"""

import functools
import tempfile

import pytest
import torch

from fotlab import data
from fotlab.model.crossbatch import CrossBatch, crossbatch_attention
from fotlab.train.crossbatch_schedule import context_mixture

BATCH_SIZE, SEQ_LEN, PACKING = 16, 32, 4


@pytest.fixture(scope="module")
def docs():
    """40 byte-tokenized stdlib files of at least 2000 bytes, and the tokenizer."""
    tokenizer = data.byte_tokenizer()
    texts = data.load_embedded(cache_dir=tempfile.mkdtemp())
    texts = texts.filter(lambda row: len(row["text"]) >= 2000).select(range(40))
    return data.tokenize_dataset(texts, tokenizer), tokenizer


def make_packer(docs, batch_size, packing, seed):
    dataset, tokenizer = docs
    return data.DocPacker(
        dataset,
        batch_size=batch_size,
        seq_len=SEQ_LEN,
        packing=packing,
        seed=seed,
        bos_id=tokenizer.bos_token_id,
        eos_id=tokenizer.eos_token_id,
        with_doc_ids=True,
    )


@pytest.fixture(scope="module")
def packed_batches(docs):
    """Ten doc-aware packed batches (B 16, T 32, k 4) with doc_ids."""
    batches = iter(make_packer(docs, BATCH_SIZE, PACKING, seed=0))
    return [next(batches) for _ in range(10)]


@functools.cache
def visible_entries(crossbatch, batch_size, seq_len=4):
    """For each entry b, the other entries whose keys/values reach b's output in crossbatch_attention."""
    gen = torch.Generator().manual_seed(0)
    q, k_rot, k_mem, v = (torch.randn(batch_size, 2, seq_len, 8, generator=gen) for _ in range(4))
    visible = []
    for b in range(batch_size):  # one backward per entry: its output's gradient w.r.t. every entry's k_mem
        k_mem_b = k_mem.clone().requires_grad_(True)
        out = crossbatch_attention(q, k_rot, k_mem_b, v, crossbatch)
        out[b].sum().backward()
        visible.append(tuple(src for src in range(batch_size) if k_mem_b.grad[src].abs().sum() > 0))
    return tuple(visible)


def counted_mixture(batch, crossbatch):
    """Per entry (contexts seen, positives, negatives) from the documents present in each visible slot."""
    doc_sets = [set(row.tolist()) for row in batch["doc_ids"]]
    mixture = []
    for b, sources in enumerate(visible_entries(crossbatch, len(doc_sets))):
        n_positives = sum(1 for src in sources if doc_sets[src] & doc_sets[b])
        mixture.append((1 + len(sources), n_positives, len(sources) - n_positives))
    return mixture


def single_document_groups(batch):
    """Indices j of row groups j*k .. j*k+k-1 that hold one document only (no boundary inside the group)."""
    groups = batch["doc_ids"].view(BATCH_SIZE // PACKING, -1)
    return [j for j, ids in enumerate(groups) if ids.unique().numel() == 1]


def test_packer_rows_follow_doc_aware_packing(packed_batches):
    first = packed_batches[0]
    assert first["doc_ids"].shape == (BATCH_SIZE, SEQ_LEN)
    assert single_document_groups(first) == [0, 1, 2, 3]  # every stream opens a long document
    stream_docs = [first["doc_ids"][j * PACKING, 0].item() for j in range(BATCH_SIZE // PACKING)]
    assert len(set(stream_docs)) == len(stream_docs)  # different streams, different documents


@pytest.mark.parametrize(
    "crossbatch, expected",
    [
        (CrossBatch(3, PACKING, True), [(1, 0, 0), (3, 1, 1), (4, 2, 1), (4, 3, 0)]),
        (CrossBatch(6, PACKING, True), [(1, 0, 0), (4, 1, 2), (7, 2, 4), (7, 3, 3)]),
    ],
)
def test_spec_mixture_table_on_real_batch(packed_batches, crossbatch, expected):
    counted = counted_mixture(packed_batches[0], crossbatch)
    # rows far enough from the batch start that the no-wrap-around clamp (allowed[b] <= b + 1) does not bite
    assert counted[8:12] == expected and counted[12:16] == expected
    assert counted == context_mixture(BATCH_SIZE, crossbatch)  # including the clamped first rows


@pytest.mark.parametrize("crossbatch", [CrossBatch(3, PACKING, True), CrossBatch(5, PACKING, False)])
def test_mixture_on_later_batches(packed_batches, crossbatch):
    """Across batches, every entry whose visible groups hold one document each matches the doc-aware formula."""
    expected = context_mixture(BATCH_SIZE, crossbatch)
    reach = (crossbatch.range + PACKING - 1) // PACKING  # earlier groups an entry may see
    n_checked = 0
    for batch in packed_batches:
        counted = counted_mixture(batch, crossbatch)
        clean = set(single_document_groups(batch))
        for b in range(BATCH_SIZE):
            group = b // PACKING
            if all(g in clean for g in range(max(group - reach, 0), group + 1)):
                assert counted[b] == expected[b], (b, batch["doc_ids"][:, 0])
                n_checked += 1
    assert n_checked >= 100  # boundaries are rare with >= 2000-token documents and T = 32


def test_without_packing_every_extra_context_is_a_negative(docs):
    """Packing 1 (rows are independent streams): a fresh packer's first batch has only negatives."""
    batch = next(iter(make_packer(docs, 8, packing=1, seed=1)))
    counted = counted_mixture(batch, CrossBatch(3))
    assert counted == [(1, 0, 0), (2, 0, 1), (3, 0, 2)] + [(4, 0, 3)] * 5


def test_doc_switch_inside_a_packed_span_is_not_a_positive():
    """A hand-made batch (one stream, k = 4): document 7 fills rows 0-1, row 2 switches from 7 to 8, row 3 is 8."""
    doc_ids = torch.tensor([[7] * 4, [7] * 4, [7, 7, 8, 8], [8] * 4])
    crossbatch = CrossBatch(3, 4, False)
    assert context_mixture(4, crossbatch) == [(1, 0, 0), (2, 1, 0), (3, 2, 0), (4, 3, 0)]  # formula: no switch
    assert context_mixture(4, crossbatch, doc_ids) == [(1, 0, 0), (2, 1, 0), (3, 0, 2), (4, 0, 3)]


@pytest.mark.parametrize("crossbatch", [CrossBatch(3, PACKING, True), CrossBatch(1, 2, True)])
def test_counted_mixture_on_real_batches(docs, crossbatch):
    """context_mixture(doc_ids) on real packed batches: equal to the formula for rows whose span holds one
    document, fewer positives (and a negative instead) wherever a row or the slot's row holds a switch; every
    positive it counts is a slot the attention really lets the row see and that holds the same document."""
    n_switched = 0
    packer = make_packer(docs, BATCH_SIZE, crossbatch.packing, seed=2)
    for batch in [packer.next_batch() for _ in range(40)]:
        formula = context_mixture(BATCH_SIZE, crossbatch)
        counted = context_mixture(BATCH_SIZE, crossbatch, batch["doc_ids"])
        seen = counted_mixture(batch, crossbatch)  # slots that share any document with the row
        for b in range(BATCH_SIZE):
            assert counted[b][0] == formula[b][0] == seen[b][0]
            assert counted[b][1] <= min(formula[b][1], seen[b][1])
            span = batch["doc_ids"][max(b - counted[b][0] + 1, 0) : b + 1]
            if span.unique().numel() == 1:
                assert counted[b] == formula[b]
            elif counted[b] != formula[b]:
                n_switched += 1
    assert n_switched > 0  # 40 batches = 5120 tokens per stream: documents of 2000+ tokens do switch


def test_paper_d1_baseline_mixture_is_positives_only():
    """The paper's d = 1 (FOT_SPEC §2): range 1, packing 2, stepping: odd rows see the previous chunk of their own
    document (1 positive, 0 negatives), even rows nothing extra; no row has a negative unless the span switched."""
    assert context_mixture(8, CrossBatch(1, 2, True)) == [(1, 0, 0), (2, 1, 0)] * 4
    assert context_mixture(8, CrossBatch(0, 2, False)) == [(1, 0, 0)] * 8  # the standard transformer: nothing
    one_doc = torch.zeros(8, 4, dtype=torch.long) + torch.arange(4).repeat_interleave(2)[:, None]  # 4 streams
    assert context_mixture(8, CrossBatch(1, 2, True), one_doc) == [(1, 0, 0), (2, 1, 0)] * 4


# ----- `python -m fotlab.train.mixture`: the mixture a shipped spec's training really gives ---------------------
SMALL_REPEATS = "data.sources.0.n_docs=400"  # the shipped source, fewer documents: same lengths, same packing


def test_spec_mixture_of_the_paper_d1_spec():
    """The paper's d = 1 (range 1, packing 2): even rows see nothing, odd rows exactly one previous context, a
    positive unless the packed span switched document (the spec's 770-token documents switch in some rows)."""
    from fotlab.spec import load_spec
    from fotlab.train.mixture import spec_mixture

    spec = load_spec("experiments/paper/retrieval_d1.yaml", [SMALL_REPEATS])
    mixture = spec_mixture(spec, n_batches=30)
    assert mixture.positives[0::2] == mixture.negatives[0::2] == (0.0,) * 8
    assert all(p + n == pytest.approx(1.0) for p, n in zip(mixture.positives[1::2], mixture.negatives[1::2]))
    (even_pos, even_neg), (odd_pos, odd_neg) = mixture.by_phase()
    assert (even_pos, even_neg) == (0.0, 0.0) and 0.6 < odd_pos < 1.0 and odd_neg == pytest.approx(1 - odd_pos)
    assert mixture.mean == pytest.approx((odd_pos / 2, odd_neg / 2))


def test_spec_mixture_follows_a_crossbatch_schedule(capsys):
    """Under `switch` the batches are paired with steps over the whole run: half of them count with range 3."""
    from fotlab.spec import load_spec
    from fotlab.train import mixture as mix

    overrides = [SMALL_REPEATS, "train.crossbatch.packing=4", "train.crossbatch.switch=[{at_step: 5000, range: 3}]"]
    switched = mix.spec_mixture(load_spec("experiments/paper/retrieval_d1.yaml", overrides), n_batches=20)
    fixed = mix.spec_mixture(load_spec("experiments/paper/retrieval_fot.yaml", [SMALL_REPEATS]), n_batches=20)
    seen = [p + n for p, n in zip(switched.positives, switched.negatives)]
    seen_fixed = [p + n for p, n in zip(fixed.positives, fixed.negatives)]
    # extra contexts per row b mod 4 (stepping): range 1 gives 0, 1, 1, 1 and range 3 gives 0, 2, 3, 3
    assert seen_fixed[4:8] == pytest.approx([0.0, 2.0, 3.0, 3.0])
    assert switched.crossbatch_range == 3 and seen[4:8] == pytest.approx([0.0, 1.5, 2.0, 2.0])  # half of each
    assert mix.main(["experiments/paper/no_such_spec.yaml"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no_such_spec.yaml" in err
