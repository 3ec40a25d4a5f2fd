"""Shared pieces of the evaluations: chunked streaming through FoT memory, token scoring, documents, progress.

Streaming contract (fotlab.model): `out = model(chunk, memory=mem, last_context_length=0)` runs every token of
`chunk` through windows and returns the memory with the chunk's (k, v) appended as `out.memory`.

Dimension letters: B batch, T chunk (local context) tokens, V vocab.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def window_len(model) -> int:
    """W: the model's window (max_position_embeddings)."""
    return int(model.config.max_position_embeddings)


def resolve_chunk_len(model, chunk_len: int | None, context_length: int | None = None) -> int:
    """Chunk (local context) length: explicit value, else the training context length, else the window W."""
    return int(chunk_len or context_length or window_len(model))


def empty_memory(model, capacity: int | None = None):
    """An empty FoTMemory in the model's memory dtype, capped at `capacity` slots per layer (FIFO) or unbounded."""
    from fotlab.model import FoTMemory

    return FoTMemory.empty(model.config.mem_dtype, capacity)


@torch.no_grad()
def stream_to_memory(model, ids: torch.Tensor, memory, chunk_len: int):
    """Send ids (B, L) through the model chunk by chunk into memory; returns the memory. Logits are not computed
    beyond one position per call (logits_to_keep=1)."""
    for s in range(0, ids.shape[1], chunk_len):
        out = model(ids[:, s : s + chunk_len], memory=memory, last_context_length=0, use_cache=False, logits_to_keep=1)
        memory = out.memory
    return memory


@dataclass
class TokenScores:
    """Sums over scored target tokens: negative log-likelihood, correct greedy predictions, count."""

    nll: float = 0.0
    n_correct: int = 0
    n_tokens: int = 0

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """logits (..., V), targets (...) with -100 = not scored."""
        flat_logits = logits.reshape(-1, logits.shape[-1]).float()  # (N, V)
        flat_targets = targets.reshape(-1).to(flat_logits.device)  # (N,)
        keep = flat_targets != -100
        if not bool(keep.any()):
            return
        self.nll += float(F.cross_entropy(flat_logits[keep], flat_targets[keep], reduction="sum"))
        self.n_correct += int((flat_logits[keep].argmax(-1) == flat_targets[keep]).sum())
        self.n_tokens += int(keep.sum())

    def merge(self, other: TokenScores) -> None:
        self.nll += other.nll
        self.n_correct += other.n_correct
        self.n_tokens += other.n_tokens

    @property
    def mean_nll(self) -> float:
        return self.nll / max(self.n_tokens, 1)

    @property
    def perplexity(self) -> float:
        import math

        return math.exp(self.mean_nll) if self.n_tokens else float("nan")

    @property
    def accuracy(self) -> float:
        return self.n_correct / self.n_tokens if self.n_tokens else float("nan")


def shifted_targets(ids: torch.Tensor, ignore_ids: Iterable[int] = ()) -> torch.Tensor:
    """targets[t] = ids[t + 1] for a 1-D stream, -100 at the end and where the next token is in ignore_ids."""
    targets = torch.full_like(ids, -100)
    targets[:-1] = ids[1:]
    for tok in ignore_ids:
        targets[targets == tok] = -100
    return targets


def frame_documents(docs: Iterable[list[int]], bos_id: int | None, eos_id: int | None) -> list[torch.Tensor]:
    """Each document as `<bos> doc <eos>` (as the training packer frames them), a LongTensor each."""
    framed = []
    for doc in docs:
        ids = ([bos_id] if bos_id is not None else []) + list(doc) + ([eos_id] if eos_id is not None else [])
        framed.append(torch.tensor(ids, dtype=torch.long))
    return framed


def progress(items: Iterable, *, enabled: bool, description: str, total: int | None = None) -> Iterator:
    """Iterate with a tqdm progress bar on stderr when enabled (redrawn every 0.1 s on a terminal; written as a
    new line at most every 5 s otherwise, e.g. in a log file or from a Ray worker)."""
    if not enabled:
        yield from items
        return
    import sys

    from tqdm.auto import tqdm

    interval = 0.1 if sys.stderr.isatty() else 5.0
    yield from tqdm(items, desc=description, total=total, leave=False, mininterval=interval)
