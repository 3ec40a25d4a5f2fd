"""A straightforward implementation of FoT memory attention: the speed reference for the prefill benchmark.

Same semantics as `fotlab.model.memory_attention.memory_attention` (one fp32 softmax over local + memory keys,
masked = -1e6) written the obvious way: memory is concatenated onto the memory at every append (each read copies
everything stored so far), keys are concatenated with the local keys, GQA heads are repeated, and the full
(B, H, T, S + M) score tensor is built in fp32 at once. `install()` swaps it into fotlab in this process only
(the benchmark child), so the same model code and weights run on both implementations.
"""

from __future__ import annotations

import math

import torch

from fotlab.model import memory as memory_module
from fotlab.model import memory_attention as attention_module

MASKED_SCORE = -1e6


def naive_memory_attention(
    q, k, v, local_mask, mem_k, mem_v, mem_valid, *, retrieval="dense", topk=None, grouping=None, scale=None
) -> torch.Tensor:
    """Dense memory attention, whole score matrix at once: (B, H, T, Dh)."""
    B, H, T, head_dim = q.shape
    group = H // k.shape[1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    if mem_k is None or mem_k.shape[2] == 0:
        keys, values, mask = k, v, local_mask.expand(B, 1, T, -1)
    else:
        keys = torch.cat([k, mem_k.to(k.dtype)], dim=2)  # (B, Hkv, S + M, Dh)
        values = torch.cat([v, mem_v.to(v.dtype)], dim=2)
        mem_mask = torch.ones(B, mem_k.shape[2], dtype=torch.bool) if mem_valid is None else mem_valid
        mask = torch.cat(
            [local_mask.expand(B, -1, T, -1), mem_mask[:, None, None, :].expand(B, local_mask.shape[1], T, -1)], dim=-1
        )
    keys = keys.repeat_interleave(group, dim=1)  # (B, H, S + M, Dh)
    values = values.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, keys.transpose(-1, -2)).float() * scale  # (B, H, T, S + M)
    scores = scores.masked_fill(~mask, MASKED_SCORE)
    weights = torch.softmax(scores, dim=-1).to(q.dtype)
    return torch.matmul(weights, values)  # (B, H, T, Dh)


def _concat_append(self, k, v, valid=None):
    """LayerMemory.append that always keeps a segment list (every read concatenates all segments)."""
    if valid is None:
        valid = torch.ones(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device)
    k, v, valid = k.to(self.dtype), v.to(self.dtype), valid.to(torch.bool)
    old = self._segments if self._segments else (() if self.n_tokens == 0 else ((self.keys, self.values, self.valid),))
    merged = (
        (k, v, valid)
        if not old
        else tuple(torch.cat([old[0][i], x], dim=-1 if i == 2 else 2) for i, x in enumerate((k, v, valid)))
    )
    return memory_module.LayerMemory(dtype=self.dtype, capacity=self.capacity, _segments=(merged,))


def install() -> None:
    """Route fotlab's memory attention and memory appends through the naive versions (this process only)."""
    attention_module.memory_attention = naive_memory_attention
    memory_module.LayerMemory.append = _concat_append
