"""Doc-aware K-packing (FOT_SPEC §2): batches of B rows x T tokens where rows j*k .. j*k+k-1 are consecutive
T-chunks of one document stream.

    python -c "from fotlab.data import DocPacker; import datasets; \
      d = datasets.Dataset.from_dict({'input_ids': [list(range(50))] * 8}); \
      print(next(iter(DocPacker(d, batch_size=4, seq_len=8, packing=2, bos_id=256, eos_id=257))))"

Design choices:
- There are B/k streams. A stream is the concatenation `<bos> doc <eos> <bos> doc <eos> ...`: it keeps one document
  until it ends, then `<eos><bos>` and the next document continues in the same stream. Each step a stream emits
  k rows (k*T tokens, + 1 look-ahead token for the shifted targets).
- Documents are handed out from one shared cursor over this rank's document order, streams served in order
  0..B/k-1, so the batch sequence is a pure function of (docs, seed, rank, world_size, B, T, k).
- Order (`fotlab.data.doc_order`): a `datasets.Dataset` gets a fresh permutation every epoch (numpy PCG64 seeded
  by (seed, epoch)) and rank r takes positions r, r + world_size, ..., so ranks are disjoint within an epoch; an
  `IterableDataset` (streaming) is split by node and shuffled with a seeded buffer. Epochs loop forever.
- Targets are shifted: targets[b, t] is the token after input_ids[b, t], or -100 where it carries no loss:
  tokens whose "loss_mask" is 0 (if the dataset has that column), every `<bos>`, and the `<eos>` of a masked doc.
- State is small: the cursor and, per stream, the documents it holds plus the offset into the first; so
  `state_dict()` / `load_state_dict()` resume with exactly the next batch (plain python, JSON-safe).
- `with_doc_ids=True` adds "doc_ids" (B, T): the id of the document each input token belongs to (the dataset row
  for a `Dataset`; `<bos>` belongs to the document it opens, `<eos>` to the one it closes).
"""

from __future__ import annotations

import datasets
import numpy as np
import torch

from fotlab.data.doc_order import MapDocs, StreamedDocs

IGNORE_INDEX = -100


class DocPacker:
    """Infinite iterator of doc-aware K-packed batches {"input_ids": (B, T), "targets": (B, T)} (torch.long).

    docs: a `datasets.Dataset` / `IterableDataset` with "input_ids" (+ "loss_mask"), or a list of token id lists.
    """

    def __init__(
        self,
        docs,
        batch_size: int,
        seq_len: int,
        packing: int = 1,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        bos_id: int | None = None,
        eos_id: int | None = None,
        with_doc_ids: bool = False,
        shuffle_buffer: int = 1000,
    ):
        if packing < 1 or batch_size % packing != 0:
            raise ValueError(f"batch_size={batch_size} must be divisible by packing={packing} (B % k == 0)")
        if seq_len < 1:
            raise ValueError(f"seq_len={seq_len} must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        if bos_id is None or eos_id is None:
            raise ValueError("bos_id and eos_id are required")
        if isinstance(docs, (list, tuple)):  # plain token id lists (tests, evals)
            docs = datasets.Dataset.from_dict({"input_ids": [list(map(int, d)) for d in docs]})
        if docs.column_names is not None and "input_ids" not in docs.column_names:
            raise KeyError(f"docs need an 'input_ids' column (have {docs.column_names})")
        self.batch_size, self.seq_len, self.packing = batch_size, seq_len, packing
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.with_doc_ids = with_doc_ids
        self.n_streams = batch_size // packing
        if isinstance(docs, datasets.IterableDataset):
            self.source = StreamedDocs(docs, seed, rank, world_size, bos_id, eos_id, shuffle_buffer)
            self.n_docs = None
        else:
            self.source = MapDocs(docs, seed, rank, world_size, bos_id, eos_id, cache_size=4 * self.n_streams + 4)
            self.n_docs = self.source.n_docs
        self.step = 0
        self.streams: list[list[tuple[int, int]]] = [[] for _ in range(self.n_streams)]  # held doc refs
        self.offsets = [0] * self.n_streams  # offset into the first held (framed) document

    # ---- packing ------------------------------------------------------------------------------------
    def _read_stream(self, s: int, n_tokens: int):
        """Read n_tokens from stream s without consuming; claims new documents as needed."""
        held, need = self.streams[s], n_tokens
        parts_tok, parts_loss, parts_doc = [], [], []
        i, start = 0, self.offsets[s]
        while need > 0:
            if i == len(held):
                held.append(self.source.claim())
            tokens, loss = self.source.framed(held[i])
            take = min(need, len(tokens) - start)
            parts_tok.append(tokens[start : start + take])
            parts_loss.append(loss[start : start + take])
            parts_doc.append(np.full(take, self.source.doc_id(held[i]), dtype=np.int64))
            need -= take
            i, start = i + 1, 0
        return np.concatenate(parts_tok), np.concatenate(parts_loss), np.concatenate(parts_doc)

    def _advance_stream(self, s: int, n_tokens: int) -> None:
        """Consume n_tokens from stream s, dropping finished documents."""
        held, offset = self.streams[s], self.offsets[s] + n_tokens
        while held:
            doc_len = len(self.source.framed(held[0])[0])
            if offset < doc_len:
                break
            offset -= doc_len
            self.source.release(held.pop(0))
        self.offsets[s] = offset

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next batch: input_ids, targets (and doc_ids) as (B, T) long tensors."""
        B, T, k = self.batch_size, self.seq_len, self.packing
        span = k * T
        input_ids = np.empty((B, T), dtype=np.int64)
        targets = np.empty((B, T), dtype=np.int64)
        doc_ids = np.empty((B, T), dtype=np.int64)
        for s in range(self.n_streams):
            tokens, loss, docs = self._read_stream(s, span + 1)
            shifted = np.where(loss[1:], tokens[1:], IGNORE_INDEX)
            rows = slice(s * k, (s + 1) * k)
            input_ids[rows] = tokens[:span].reshape(k, T)  # (k, T)
            targets[rows] = shifted.reshape(k, T)  # (k, T)
            doc_ids[rows] = docs[:span].reshape(k, T)  # (k, T)
            self._advance_stream(s, span)
        self.step += 1
        batch = {"input_ids": torch.from_numpy(input_ids), "targets": torch.from_numpy(targets)}
        if self.with_doc_ids:
            batch["doc_ids"] = torch.from_numpy(doc_ids)
        return batch

    def __iter__(self):
        while True:
            yield self.next_batch()

    def __next__(self):
        return self.next_batch()

    @property
    def epoch(self) -> int:
        """The epoch the document cursor is in."""
        return self.source.cursor[0]

    # ---- resume -------------------------------------------------------------------------------------
    def _config(self) -> dict:
        return {
            "n_docs": self.n_docs,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "packing": self.packing,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
        }

    def state_dict(self) -> dict:
        """Plain-python state; `load_state_dict` on a packer built the same way continues with the next batch."""
        return {
            "config": self._config(),
            "step": self.step,
            "source": self.source.state_dict(),
            "streams": [[list(ref) for ref in held] for held in self.streams],
            "offsets": list(self.offsets),
        }

    def load_state_dict(self, state: dict) -> None:
        saved = state["config"]
        mismatched = {k: (v, saved.get(k)) for k, v in self._config().items() if saved.get(k) != v}
        if mismatched:
            raise ValueError(f"packer state was saved with different settings (now, saved): {mismatched}")
        self.step = int(state["step"])
        self.source.load_state_dict(state["source"])
        self.streams = [[(int(e), int(p)) for e, p in held] for held in state["streams"]]
        self.offsets = [int(x) for x in state["offsets"]]
