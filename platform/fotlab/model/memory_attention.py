"""Memory attention for FoT memory layers (FOT_SPEC §1): one fp32 softmax over local + memory keys.

Simple dense reference version; a chunked/top-k version follows.
"""

from __future__ import annotations

import math

import torch

MASKED_SCORE = -1e6


def _expand_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, Hkv, S, Dh) -> (B, H, S, Dh) by repeating each kv head H // Hkv times (GQA)."""
    n_kv_heads = x.shape[1]
    if n_kv_heads == n_heads:
        return x
    return x.repeat_interleave(n_heads // n_kv_heads, dim=1)


def memory_attention(q, k, v, local_mask, mem_k, mem_v, mem_valid, *, retrieval="dense", topk=None,
                     grouping=None, scale=None) -> torch.Tensor:
    """Attend each query over its visible local keys and the valid memory keys in one fp32 softmax.

    q (B, H, T, Dh); k, v (B, Hkv, S, Dh); local_mask (B, 1|H, T, S) True = visible;
    mem_k, mem_v (B, Hkv, M, Dh) in memory dtype; mem_valid (B, M) bool. Returns (B, H, T, Dh).
    """
    if retrieval != "dense":
        raise NotImplementedError(f"retrieval={retrieval!r} not implemented yet")
    n_heads, head_dim = q.shape[1], q.shape[-1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    k_all = torch.cat([_expand_kv(k, n_heads), _expand_kv(mem_k.to(q.dtype), n_heads)], dim=2)  # (B, H, S+M, Dh)
    v_all = torch.cat([_expand_kv(v, n_heads), _expand_kv(mem_v.to(q.dtype), n_heads)], dim=2)  # (B, H, S+M, Dh)
    T = q.shape[2]
    mem_mask = mem_valid[:, None, None, :].expand(-1, local_mask.shape[1], T, -1)  # (B, 1|H, T, M)
    mask = torch.cat([local_mask.expand(-1, -1, T, -1), mem_mask], dim=-1)  # (B, 1|H, T, S+M)
    scores = torch.matmul(q.float(), k_all.float().transpose(-1, -2)) * scale  # (B, H, T, S+M)
    scores = scores.masked_fill(~mask, MASKED_SCORE)
    weights = torch.softmax(scores, dim=-1).to(q.dtype)
    return torch.matmul(weights, v_all)  # (B, H, T, Dh)
