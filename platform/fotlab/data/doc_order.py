"""Which documents a rank reads, in which order: the document side of `DocPacker`.

Both classes hand out documents as refs `(epoch, pos)` and give each ref its framed tokens `<bos> doc <eos>`,
a per-token loss flag (does predicting this token count?) and a document id.

- `MapDocs` (a `datasets.Dataset`): every epoch a fresh permutation of all rows (numpy PCG64 seeded by
  (seed, epoch)); rank r takes positions r, r + world_size, ... Documents are re-read by row when needed, so the
  state is just the cursor. Document id = dataset row.
- `StreamedDocs` (a `datasets.IterableDataset`, e.g. a streaming HF source): `split_dataset_by_node(rank,
  world_size)`, `shuffle(seed, buffer_size)` and `set_epoch(epoch)`; an epoch ends when the stream does. Held
  documents are kept in memory and saved in the state; the cursor is resumed by re-reading the epoch's stream
  up to the saved position (exact, costs one pass over the skipped documents). Document id =
  (documents read before on this rank) * world_size + rank, unique per rank over the run.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np


def frame(ids, mask, bos_id: int, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, loss) of `<bos> ids <eos>`: `<bos>` never carries loss; `<eos>` does for unmasked docs."""
    ids = np.asarray(ids, dtype=np.int64)
    body = np.ones(len(ids), dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    tokens = np.concatenate([[bos_id], ids, [eos_id]]).astype(np.int64)
    loss = np.concatenate([[False], body, [mask is None]])
    return tokens, loss


class MapDocs:
    """Random-access documents with a seeded per-epoch permutation, sharded by rank."""

    def __init__(self, docs, seed: int, rank: int, world_size: int, bos_id: int, eos_id: int, cache_size: int):
        self.docs, self.seed, self.rank, self.world_size = docs, seed, rank, world_size
        self.bos_id, self.eos_id = bos_id, eos_id
        self.n_docs = len(docs)
        if self.n_docs < world_size:
            raise ValueError(f"{self.n_docs} documents cannot be sharded over world_size={world_size}")
        self.has_loss_mask = "loss_mask" in docs.column_names
        self.cache_size = cache_size
        self._orders: OrderedDict[int, np.ndarray] = OrderedDict()
        self._framed: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self.cursor = (0, 0)

    def order(self, epoch: int) -> np.ndarray:
        """This rank's dataset rows for an epoch."""
        if epoch not in self._orders:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            self._orders[epoch] = rng.permutation(self.n_docs)[self.rank :: self.world_size]
            while len(self._orders) > 3:
                self._orders.popitem(last=False)
        return self._orders[epoch]

    def claim(self) -> tuple[int, int]:
        epoch, pos = self.cursor
        if pos >= len(self.order(epoch)):
            epoch, pos = epoch + 1, 0
        self.cursor = (epoch, pos + 1)
        return (epoch, pos)

    def doc_id(self, ref) -> int:
        return int(self.order(ref[0])[ref[1]])

    def framed(self, ref) -> tuple[np.ndarray, np.ndarray]:
        row = self.doc_id(ref)
        if row not in self._framed:
            item = self.docs[row]
            self._framed[row] = frame(
                item["input_ids"], item["loss_mask"] if self.has_loss_mask else None, self.bos_id, self.eos_id
            )
            while len(self._framed) > self.cache_size:
                self._framed.popitem(last=False)
        return self._framed[row]

    def release(self, ref) -> None:
        """Nothing to free: documents are re-read by row."""

    def state_dict(self) -> dict:
        return {"cursor": list(self.cursor)}

    def load_state_dict(self, state: dict) -> None:
        self.cursor = tuple(int(x) for x in state["cursor"])


class StreamedDocs:
    """Documents from an `IterableDataset`, read in a seeded shuffled order, sharded by rank."""

    def __init__(
        self, docs, seed: int, rank: int, world_size: int, bos_id: int, eos_id: int, shuffle_buffer: int = 1000
    ):
        from datasets.distributed import split_dataset_by_node

        self.docs = split_dataset_by_node(docs, rank=rank, world_size=world_size)
        if shuffle_buffer > 1:
            self.docs = self.docs.shuffle(seed=seed, buffer_size=shuffle_buffer)
        self.rank, self.world_size = rank, world_size
        self.bos_id, self.eos_id = bos_id, eos_id
        self.cursor = (0, 0)
        self.held: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, int]] = {}
        self._iter = None
        self._n_read_before_epoch = {0: 0}

    def _open(self, epoch: int, skip: int) -> None:
        self.docs.set_epoch(epoch)
        self._iter = iter(self.docs)
        for _ in range(skip):
            next(self._iter)

    def claim(self) -> tuple[int, int]:
        epoch, pos = self.cursor
        if self._iter is None:
            self._open(epoch, pos)
        item = next(self._iter, None)
        if item is None:
            if pos == 0:
                raise ValueError(f"rank {self.rank}: the streamed dataset gave no documents")
            self._n_read_before_epoch[epoch + 1] = self._n_read_before_epoch.get(epoch, 0) + pos
            epoch, pos = epoch + 1, 0
            self._open(epoch, 0)
            item = next(self._iter)
        ref = (epoch, pos)
        tokens, loss = frame(item["input_ids"], item.get("loss_mask"), self.bos_id, self.eos_id)
        n_before = self._n_read_before_epoch.get(epoch, 0) + pos
        self.held[ref] = (tokens, loss, n_before * self.world_size + self.rank)
        self.cursor = (epoch, pos + 1)
        return ref

    def doc_id(self, ref) -> int:
        return self.held[ref][2]

    def framed(self, ref) -> tuple[np.ndarray, np.ndarray]:
        tokens, loss, _ = self.held[ref]
        return tokens, loss

    def release(self, ref) -> None:
        self.held.pop(ref, None)

    def state_dict(self) -> dict:
        held = [[list(ref), ids.tolist(), mask.tolist(), d] for ref, (ids, mask, d) in self.held.items()]
        read = {str(k): v for k, v in self._n_read_before_epoch.items()}
        return {"cursor": list(self.cursor), "held": held, "n_read_before_epoch": read}

    def load_state_dict(self, state: dict) -> None:
        self.cursor = tuple(int(x) for x in state["cursor"])
        self.held = {
            (int(r[0]), int(r[1])): (np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool), int(d))
            for r, ids, mask, d in state["held"]
        }
        self._n_read_before_epoch = {int(k): int(v) for k, v in state["n_read_before_epoch"].items()}
        self._iter = None  # reopened at the cursor on the next claim
