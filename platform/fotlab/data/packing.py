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
- Order: every epoch a fresh permutation of all documents (numpy PCG64 seeded by (seed, epoch)); rank r takes
  positions r, r + world_size, ... of it, so ranks are disjoint within an epoch. Epochs loop forever.
- Targets are shifted: targets[b, t] is the token after input_ids[b, t], or -100 where it carries no loss:
  tokens whose "loss_mask" is 0 (if the dataset has that column), every `<bos>`, and the `<eos>` of a masked doc.
- State is tiny: the cursor and, per stream, the documents it holds plus the offset into the first; so
  `state_dict()` / `load_state_dict()` resume with exactly the next batch.
- `with_doc_ids=True` adds "doc_ids" (B, T): the dataset row of the document each input token belongs to
  (`<bos>` belongs to the document it opens, `<eos>` to the one it closes).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

IGNORE_INDEX = -100


class DocPacker:
    """Infinite iterator of doc-aware K-packed batches {"input_ids": (B, T), "targets": (B, T)} (torch.long)."""

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
    ):
        if packing < 1 or batch_size % packing != 0:
            raise ValueError(f"batch_size={batch_size} must be divisible by packing={packing} (B % k == 0)")
        if seq_len < 1:
            raise ValueError(f"seq_len={seq_len} must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        if bos_id is None or eos_id is None:
            raise ValueError("bos_id and eos_id are required")
        if "input_ids" not in docs.column_names:
            raise KeyError(f"docs need an 'input_ids' column (have {docs.column_names})")
        self.n_docs = len(docs)
        if self.n_docs < world_size:
            raise ValueError(f"{self.n_docs} documents cannot be sharded over world_size={world_size}")
        self.docs = docs
        self.batch_size, self.seq_len, self.packing = batch_size, seq_len, packing
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.bos_id, self.eos_id = bos_id, eos_id
        self.with_doc_ids = with_doc_ids
        self.has_loss_mask = "loss_mask" in docs.column_names
        self.n_streams = batch_size // packing
        self._orders: OrderedDict[int, np.ndarray] = OrderedDict()
        self._doc_cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._reset_state()

    # ---- document order and access ------------------------------------------------------------------
    def _reset_state(self) -> None:
        self.step = 0
        self.cursor = (0, 0)  # (epoch, position in this rank's order)
        self.streams: list[list[tuple[int, int]]] = [[] for _ in range(self.n_streams)]  # doc refs (epoch, pos)
        self.offsets = [0] * self.n_streams  # offset into the first held (framed) document

    def _order(self, epoch: int) -> np.ndarray:
        """This rank's document order (dataset row indices) for an epoch."""
        if epoch not in self._orders:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            self._orders[epoch] = rng.permutation(self.n_docs)[self.rank :: self.world_size]
            while len(self._orders) > 3:
                self._orders.popitem(last=False)
        return self._orders[epoch]

    def epoch_length(self) -> int:
        """Documents this rank reads per epoch."""
        return len(self._order(0))

    def _doc_row(self, ref: tuple[int, int]) -> int:
        epoch, pos = ref
        return int(self._order(epoch)[pos])

    def _framed(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, loss) of `<bos> doc <eos>`; loss[i] says whether predicting tokens[i] counts."""
        if row not in self._doc_cache:
            item = self.docs[row]
            ids = np.asarray(item["input_ids"], dtype=np.int64)
            if self.has_loss_mask:
                mask = np.asarray(item["loss_mask"], dtype=bool)
                eos_loss = False
            else:
                mask = np.ones(len(ids), dtype=bool)
                eos_loss = True
            tokens = np.concatenate([[self.bos_id], ids, [self.eos_id]]).astype(np.int64)
            loss = np.concatenate([[False], mask, [eos_loss]])
            self._doc_cache[row] = (tokens, loss)
            while len(self._doc_cache) > 4 * self.n_streams + 4:
                self._doc_cache.popitem(last=False)
        return self._doc_cache[row]

    def _claim_next_doc(self) -> tuple[int, int]:
        epoch, pos = self.cursor
        if pos >= len(self._order(epoch)):
            epoch, pos = epoch + 1, 0
        self.cursor = (epoch, pos + 1)
        return (epoch, pos)

    # ---- packing ------------------------------------------------------------------------------------
    def _read_stream(self, s: int, n_tokens: int):
        """Read n_tokens from stream s without consuming; claims new documents as needed."""
        held, need = self.streams[s], n_tokens
        parts_tok, parts_loss, parts_row = [], [], []
        i, start = 0, self.offsets[s]
        while need > 0:
            if i == len(held):
                held.append(self._claim_next_doc())
            row = self._doc_row(held[i])
            tokens, loss = self._framed(row)
            take = min(need, len(tokens) - start)
            parts_tok.append(tokens[start : start + take])
            parts_loss.append(loss[start : start + take])
            parts_row.append(np.full(take, row, dtype=np.int64))
            need -= take
            i, start = i + 1, 0
        return np.concatenate(parts_tok), np.concatenate(parts_loss), np.concatenate(parts_row)

    def _advance_stream(self, s: int, n_tokens: int) -> None:
        """Consume n_tokens from stream s, dropping finished documents."""
        held, offset = self.streams[s], self.offsets[s] + n_tokens
        while held:
            doc_len = len(self._framed(self._doc_row(held[0]))[0])
            if offset < doc_len:
                break
            offset -= doc_len
            held.pop(0)
        self.offsets[s] = offset

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next batch: input_ids, targets (and doc_ids) as (B, T) long tensors."""
        B, T, k = self.batch_size, self.seq_len, self.packing
        span = k * T
        input_ids = np.empty((B, T), dtype=np.int64)
        targets = np.empty((B, T), dtype=np.int64)
        doc_ids = np.empty((B, T), dtype=np.int64)
        for s in range(self.n_streams):
            tokens, loss, rows = self._read_stream(s, span + 1)
            shifted = np.where(loss[1:], tokens[1:], IGNORE_INDEX)
            rows_slice = slice(s * k, (s + 1) * k)
            input_ids[rows_slice] = tokens[:span].reshape(k, T)  # (k, T)
            targets[rows_slice] = shifted.reshape(k, T)  # (k, T)
            doc_ids[rows_slice] = rows[:span].reshape(k, T)  # (k, T)
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
        return self.cursor[0]

    # ---- resume -------------------------------------------------------------------------------------
    def _config(self) -> dict:
        return {
            "n_docs": self.n_docs, "batch_size": self.batch_size, "seq_len": self.seq_len,
            "packing": self.packing, "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
        }

    def state_dict(self) -> dict:
        """Plain-python state; `load_state_dict` on a packer built the same way continues with the next batch."""
        return {
            "config": self._config(),
            "step": self.step,
            "cursor": list(self.cursor),
            "streams": [[list(ref) for ref in held] for held in self.streams],
            "offsets": list(self.offsets),
        }

    def load_state_dict(self, state: dict) -> None:
        mismatched = {k: (v, state["config"].get(k)) for k, v in self._config().items() if state["config"].get(k) != v}
        if mismatched:
            raise ValueError(f"packer state was saved with different settings (now, saved): {mismatched}")
        self.step = int(state["step"])
        self.cursor = tuple(int(x) for x in state["cursor"])
        self.streams = [[(int(e), int(p)) for e, p in held] for held in state["streams"]]
        self.offsets = [int(x) for x in state["offsets"]]
