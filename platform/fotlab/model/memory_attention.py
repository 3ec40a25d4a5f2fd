"""Memory attention of FoT memory layers (FOT_SPEC §1): identical to LLaMA eager attention except that each
query attends, in ONE softmax, over its visible local keys AND the valid memory keys.

Design choices:
- Scores are q·kᵀ in the activation dtype (as HF LLaMA eager attention), then scaled, masked (masked = -1e6, so a
  fully masked row is uniform, not NaN) and normalised in float32 (float64 stays float64); the weights are cast
  back to the activation dtype before they multiply the values (the fp32 share of each part, below, scales the
  product).
- The local and memory parts are never concatenated (that would copy the whole memory per call): each part gets
  its own score block and softmax, and the two are merged exactly by their log-sum-exp (flash-attention style), so
  the result is the single softmax over concat(local, memory). Memory K/V are cast to q's dtype one kv-head chunk
  at a time.
- Fast path (CPU inference, fp32, dense; `memory_attention_fused`): when nothing needs a gradient, the local part
  and blocks of memory go through torch's fused flash-attention CPU kernel, merged exactly by log-sum-exp: no
  score tensor is materialised and memory is cast to fp32 one block at a time (speed: docs/performance.md).
- Fast path (CUDA, dense, all memory valid, causal local mask; also under autograd): one fused SDPA call over keys
  [memory; local] with a causal mask aligned to the last key (`memory_attention_fused.sdpa_lower_right`).
  Everything else (CPU training, top-k, FAISS, padded memory, fp64) takes the chunked path below.
- Memory-efficient: the work is split into chunks of (query heads, queries) so that one chunk's score tensor stays
  near `SCORE_BUDGET_BYTES` (M = 64k keys, T = 1024, H = 8 runs in well under a GiB). Chunking is exact: each
  chunk holds whole softmax rows.
- GQA: query head h uses kv head h // (H / Hkv); a chunk folds its query heads into the query axis of their kv head,
  so keys are never repeated.
- Retrieval "topk": per query and head, exactly the k best memory keys by inner product (invalid slots rank last)
  join the local keys in the same softmax; memory is scanned in blocks with a running top-k merge, so the score
  tensor stays bounded for millions of slots. k >= M is dense attention. "faiss": the same top-k found by FAISS
  exact inner-product search (IndexFlatIP, one index per batch row and kv head); the selected scores are then
  recomputed in torch, so both paths produce identical attention when they select the same keys.

Dimension letters: B batch, H query heads, Hkv kv heads, G = H / Hkv, T queries, S local keys, M memory slots,
K top-k, Dh head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from fotlab.model.memory_attention_fused import can_fuse as _can_fuse
from fotlab.model.memory_attention_fused import can_fuse_cuda as _can_fuse_cuda
from fotlab.model.memory_attention_fused import fold as _fold
from fotlab.model.memory_attention_fused import fused_dense as _fused_dense
from fotlab.model.memory_attention_fused import sdpa_lower_right as _sdpa_lower_right

MASKED_SCORE = -1e6
SCORE_BUDGET_BYTES = 256 * 2**20  # target size of one chunk's score tensors
TOPK_MEMORY_BLOCK = 32768  # memory slots scored at once by top-k retrieval
FAISS_MIN_ROWS, FAISS_MIN_SLOTS = 1024, 16384  # from here "topk" searches with FAISS on CPU (see _faiss_wins)
RETRIEVALS = ("dense", "topk", "faiss")


@dataclass(frozen=True)
class _Chunking:
    n_heads: int  # query heads per chunk: a divisor or a multiple of G
    n_queries: int  # queries per chunk
    mem_block: int  # memory slots scored at once (top-k only; dense scores all M at once)


def _plan_chunks(q, n_kv_heads, n_local, n_mem, grouping, topk) -> _Chunking:
    """Pick (heads, queries) per chunk: `grouping` if given, else the largest that fits SCORE_BUDGET_BYTES."""
    B, H, T, head_dim = q.shape
    group = H // n_kv_heads
    mem_cols = n_mem if topk is None else min(n_mem, TOPK_MEMORY_BLOCK) + 2 * topk
    row_bytes = B * ((n_local + mem_cols) * 4 * 3 + (0 if topk is None else topk * head_dim * q.element_size()))
    if grouping is not None:
        n_heads, n_queries = int(grouping[0]), int(grouping[1])
        if n_heads < 1 or n_queries < 1:
            raise ValueError(f"grouping must be two positive ints (heads, queries), got {grouping}")
    else:
        n_rows = max(1, SCORE_BUDGET_BYTES // row_bytes)  # (head, query) rows per chunk
        if n_rows >= group * T:
            n_heads, n_queries = n_rows // T, T
        else:
            n_heads, n_queries = min(group, n_rows), max(1, n_rows // group)
    n_heads = min(n_heads, H)
    if n_heads >= group:
        n_heads -= n_heads % group
    else:
        n_heads = max(d for d in range(1, n_heads + 1) if group % d == 0)
    mem_block = n_mem if topk is None else min(n_mem, TOPK_MEMORY_BLOCK)
    return _Chunking(n_heads, min(n_queries, T), max(mem_block, 1))


def _scores(qf, keys, scale, work_dtype) -> torch.Tensor:
    """(B, n, R, Dh) x (B, n, N, Dh) -> (B, n, R, N) scaled scores in `work_dtype` (matmul in activation dtype)."""
    return torch.matmul(qf, keys.transpose(-1, -2)).to(work_dtype).mul_(scale)


def _part_softmax(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax over the last axis with its log-normaliser lse = top + log_rest: -> weights, top, log_rest.

    log_rest = -log(weight of the largest score) (in [0, log N]) is read off the softmax, saving a second exp pass
    over the scores; it is kept apart from top so that masked rows (top = -1e6) lose no precision. Autograd
    through max, softmax and gather gives the exact lse gradient.
    """
    top, where = scores.max(-1, keepdim=True)
    weights = torch.softmax(scores, -1)
    return weights, top, -torch.log(weights.gather(-1, where))


def _joint_shares(tops: list[torch.Tensor], log_rests: list[torch.Tensor]) -> list[torch.Tensor]:
    """Share of the joint softmax held by each part: exp(lse_p - logsumexp_q lse_q), computed shift-relative."""
    shift = torch.stack(tops).detach().amax(0)
    lses = [top - shift + rest for top, rest in zip(tops, log_rests)]
    total = torch.logsumexp(torch.stack(lses), dim=0)
    return [torch.exp(lse - total) for lse in lses]


def _faiss_wins(qf: torch.Tensor, n_mem: int) -> bool:
    """FAISS exact search beats the torch scan on CPU from ~1k query rows per kv head and 16k slots (measured on
    one AVX-512 core, k 128: 2048 rows x 64k slots, Dh 64: torch 0.90 s, FAISS 0.32 s; 256 rows: 0.12 / 0.09;
    64 rows: torch faster). Needs faiss-cpu installed."""
    if qf.device.type != "cpu" or qf.shape[2] < FAISS_MIN_ROWS or n_mem < FAISS_MIN_SLOTS:
        return False
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _faiss_scan(qf, mem_k, mem_valid, topk, scale, work_dtype):
    """Top-k memory scores found by FAISS: -> scores, slots (B, n, R, K). With autograd recording the selected
    scores are recomputed in torch (differentiable); otherwise FAISS's own fp32 inner products are used."""
    n, R = qf.shape[1], qf.shape[2]
    slots, faiss_scores = _faiss_slots(qf, mem_k, mem_valid, topk, with_scores=True)
    found = slots >= 0
    slots = slots.clamp(min=0)
    if torch.is_grad_enabled() and (qf.requires_grad or mem_k.requires_grad) or qf.dtype == torch.float64:
        s_mem = torch.einsum("bnrd,bnrkd->bnrk", qf, _gather_rows(mem_k, slots)).to(work_dtype) * scale
    else:
        s_mem = faiss_scores.to(work_dtype) * scale
    if mem_valid is not None:
        found = found & mem_valid[:, None, None, :].expand(-1, n, R, -1).gather(-1, slots)
    return s_mem.masked_fill(~found, MASKED_SCORE), slots


def _topk_dense_scan(qf, mem_k, mem_valid, topk, scale, work_dtype, block):
    """Exact top-k memory scores per query row, scanning memory in blocks: -> scores, slots (B, n, R, K).

    Uses FAISS for the search instead where it is faster (`_faiss_wins`); the selected scores are the same."""
    if _faiss_wins(qf, mem_k.shape[2]):
        return _faiss_scan(qf, mem_k, mem_valid, topk, scale, work_dtype)
    best_scores, best_slots = None, None
    for m0 in range(0, mem_k.shape[2], block):
        scores = _scores(qf, mem_k[:, :, m0 : m0 + block], scale, work_dtype)  # (B, n, R, m)
        if mem_valid is not None:
            scores.masked_fill_(~mem_valid[:, None, None, m0 : m0 + block], MASKED_SCORE)
        k_here = min(topk, scores.shape[-1])
        vals, slots = scores.topk(k_here, dim=-1, sorted=False)
        slots = slots + m0
        if best_scores is not None:
            vals, slots = torch.cat([best_scores, vals], -1), torch.cat([best_slots, slots], -1)
            vals, pick = vals.topk(min(topk, vals.shape[-1]), dim=-1, sorted=False)
            slots = slots.gather(-1, pick)
        best_scores, best_slots = vals, slots
    return best_scores, best_slots


def _gather_rows(x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """x (B, n, M, Dh), slots (B, n, R, K) -> (B, n, R, K, Dh)."""
    B, n, R, K = slots.shape
    flat = slots.reshape(B, n, R * K, 1).expand(-1, -1, -1, x.shape[-1])
    return x.gather(2, flat).view(B, n, R, K, x.shape[-1])


def _faiss_slots(qf, mem_k, mem_valid, topk, with_scores: bool = False):
    """Top-k memory slots per query row by FAISS exact inner-product search: -> (B, n, R, K) long, -1 = none
    (and, with_scores, FAISS's fp32 inner products (B, n, R, K) as a second result).

    mem_valid (B, M) bool or None (all valid): only valid slots enter the per-(row, kv head) index."""
    try:
        import faiss
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("retrieval='faiss' needs faiss-cpu: pip install 'fotlab[faiss]'") from err
    B, n, R, _ = qf.shape
    slots = torch.full((B, n, R, topk), -1, dtype=torch.long)
    scores = torch.full((B, n, R, topk), MASKED_SCORE, dtype=torch.float32)
    for b in range(B):
        valid = mem_k.new_ones(mem_k.shape[2], dtype=torch.bool) if mem_valid is None else mem_valid[b]
        valid_slots = valid.nonzero().squeeze(-1).cpu()  # (M_valid,)
        if valid_slots.numel() == 0:
            continue
        for h in range(n):
            all_valid = valid_slots.numel() == mem_k.shape[2]  # then no copy of the valid keys is needed
            keys = mem_k[b, h] if all_valid else mem_k[b, h].index_select(0, valid_slots.to(mem_k.device))
            index = faiss.IndexFlatIP(keys.shape[-1])
            index.add(keys.detach().float().cpu().contiguous().numpy())
            dist, found = index.search(qf[b, h].detach().float().cpu().contiguous().numpy(), topk)
            found = torch.from_numpy(found)
            slots[b, h] = torch.where(found >= 0, valid_slots[found.clamp(min=0)], -1)
            scores[b, h] = torch.from_numpy(dist)
    return (slots.to(qf.device), scores.to(qf.device)) if with_scores else slots.to(qf.device)


class _ChunkWeights(NamedTuple):
    """Softmax of one chunk as parts: joint weights = w_loc * share_loc (local) and w_mem * share_mem (memory).

    w_loc (B, n, R, S) and w_mem (B, n, R, M or K) are softmaxes within their part (work dtype), share_* (B, n, R, 1);
    slots (B, n, R, K) are the memory slots behind w_mem's columns (top-k / faiss) or None (dense: all M)."""

    w_loc: torch.Tensor
    share_loc: torch.Tensor
    w_mem: torch.Tensor | None = None
    share_mem: torch.Tensor | None = None
    slots: torch.Tensor | None = None


def _memory_scores(qf, mem_k, mem_valid, retrieval, topk, scale, work_dtype, block):
    """Scores of the memory part: -> s_mem (B, n, R, M) for dense or (B, n, R, K) with slots (B, n, R, K)."""
    if retrieval == "dense":
        s_mem = _scores(qf, mem_k, scale, work_dtype)
        if mem_valid is not None:
            s_mem.masked_fill_(~mem_valid[:, None, None, :], MASKED_SCORE)
        return s_mem, None
    if retrieval == "topk":
        return _topk_dense_scan(qf, mem_k, mem_valid, topk, scale, work_dtype, block)
    return _faiss_scan(qf, mem_k, mem_valid, topk, scale, work_dtype)


def _chunk_weights(qf, k_loc, mask5, mem_k, mem_valid, retrieval, topk, scale, block) -> _ChunkWeights:
    """Softmax weights of one chunk (float32, or float64 for float64 inputs).

    qf (B, n, R = G'·t, Dh) folded queries; k_loc (B, n, S, Dh); mask5 broadcastable to (B, n, G', t, S);
    mem_k (B, n, M, Dh) in q's dtype or None; mem_valid (B, M) bool or None (= all valid).
    """
    work_dtype = torch.promote_types(qf.dtype, torch.float32)
    s_loc = _scores(qf, k_loc, scale, work_dtype)  # (B, n, R, S)
    B, n, R, S = s_loc.shape
    s_loc.view(B, n, R // mask5.shape[3], -1, S).masked_fill_(~mask5, MASKED_SCORE)  # (B, n, G', t, S)
    w_loc, top_loc, rest_loc = _part_softmax(s_loc)
    if mem_k is None:
        return _ChunkWeights(w_loc, torch.ones_like(top_loc))
    s_mem, slots = _memory_scores(qf, mem_k, mem_valid, retrieval, topk, scale, work_dtype, block)
    w_mem, top_mem, rest_mem = _part_softmax(s_mem)
    share_loc, share_mem = _joint_shares([top_loc, top_mem], [rest_loc, rest_mem])
    return _ChunkWeights(w_loc, share_loc, w_mem, share_mem, slots)


def _check(q, k, v, local_mask, mem_k, mem_v, mem_valid, retrieval, topk):
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"q must be (B, H, T, Dh), k and v (B, Hkv, S, Dh); got {q.shape}, {k.shape}, {v.shape}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} must be a multiple of kv heads {k.shape[1]}")
    if local_mask.dim() != 4 or local_mask.shape[1] not in (1, q.shape[1]) or local_mask.shape[-1] != k.shape[2]:
        raise ValueError(f"local_mask must be (B, 1|H, T, S), got {tuple(local_mask.shape)}")
    if retrieval not in RETRIEVALS:
        raise ValueError(f"retrieval must be one of {RETRIEVALS}, got {retrieval!r}")
    if retrieval != "dense" and (topk is None or topk < 1):
        raise ValueError(f"retrieval={retrieval!r} needs topk >= 1, got {topk}")
    if mem_k is not None:
        B, n_kv, M, head_dim = mem_k.shape
        if mem_v.shape != mem_k.shape or (B, n_kv, head_dim) != (k.shape[0], k.shape[1], k.shape[3]):
            raise ValueError(
                f"mem_k/mem_v must be (B, Hkv, M, Dh) matching k {tuple(k.shape)}; got "
                f"{tuple(mem_k.shape)}, {tuple(mem_v.shape)}"
            )
        if mem_valid is not None and mem_valid.shape != (B, M):
            raise ValueError(f"mem_valid must be (B, M) = {(B, M)}, got {tuple(mem_valid.shape)}")


def _head_chunks(n_heads: int, group: int, chunk_heads: int):
    """Yield (h0, h1, kv0, kv1): query-head ranges and the kv heads they use."""
    for h0 in range(0, n_heads, chunk_heads):
        h1 = min(h0 + chunk_heads, n_heads)
        yield h0, h1, h0 // group, (h1 - 1) // group + 1


def _iter_chunks(q, k, v, local_mask, mem_k, mem_v, mem_valid, retrieval, topk, grouping, scale):
    """Shared driver: yield (h0, h1, t0, t1, _ChunkWeights, v chunk, memory v chunk) per chunk."""
    B, H, T, head_dim = q.shape
    n_kv = k.shape[1]
    if mem_k is not None and mem_k.shape[2] == 0:
        mem_k = mem_v = mem_valid = None
    n_mem = 0 if mem_k is None else mem_k.shape[2]
    if retrieval != "dense" and topk >= n_mem:
        retrieval, topk = "dense", None  # k >= M selects every slot: dense attention
    if mem_valid is not None and bool(mem_valid.all()):
        mem_valid = None  # nothing to mask: skip a pass over the scores
    plan = _plan_chunks(q, n_kv, k.shape[2], n_mem, grouping, topk if retrieval != "dense" else None)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    local_mask = local_mask.expand(B, -1, T, -1)
    group = H // n_kv
    for h0, h1, kv0, kv1 in _head_chunks(H, group, plan.n_heads):
        n = kv1 - kv0
        mk = None if mem_k is None else mem_k[:, kv0:kv1].to(q.dtype)  # (B, n, M, Dh)
        mv = None if mem_v is None else mem_v[:, kv0:kv1].to(q.dtype)
        for t0 in range(0, T, plan.n_queries):
            t1 = min(t0 + plan.n_queries, T)
            qf = _fold(q[:, h0:h1, t0:t1], n)  # (B, n, (h1-h0)/n * t, Dh)
            mask = local_mask[:, h0:h1, t0:t1] if local_mask.shape[1] > 1 else local_mask[:, :, t0:t1]
            mask5 = mask.reshape(B, n if mask.shape[1] > 1 else 1, -1, t1 - t0, mask.shape[-1])
            weights = _chunk_weights(qf, k[:, kv0:kv1], mask5, mk, mem_valid, retrieval, topk, scale, plan.mem_block)
            yield h0, h1, t0, t1, weights, v[:, kv0:kv1], mv


def memory_attention(
    q, k, v, local_mask, mem_k, mem_v, mem_valid, *, retrieval="dense", topk=None, grouping=None, scale=None
) -> torch.Tensor:
    """Attend each query over its visible local keys and the valid memory keys in one fp32 softmax.

    q (B, H, T, Dh) queries (rotated by the caller); k, v (B, Hkv, S, Dh) local keys (rotated) and values;
    local_mask (B, 1|H, T, S) bool, True = visible; mem_k, mem_v (B, Hkv, M, Dh) raw memory keys / values in the
    memory dtype (cast to q's dtype here) or None for no memory; mem_valid (B, M) bool (None = all valid).
    retrieval: "dense" | "topk" | "faiss" (the two last need `topk`); grouping: (query heads, queries) per
    chunk, None = automatic; scale: default 1/sqrt(Dh). Returns (B, H, T, Dh) in q's dtype.

    Speed (CPU, one thread, fp32 queries, bf16 memory, B 1, H 2, Dh 64, k 128; CPU seconds):
    M 64k, T 256: dense 0.38, torch top-k 0.30, FAISS 0.34;  M 64k, T 8: 0.06 / 0.05 / 0.09;
    M 256k, T 64: 0.52 / 0.39 / 0.82 (measured before the fused dense path). With few queries the torch scan wins
    (FAISS rebuilds one flat index per (row, kv head) per call and copies to numpy); from ~1k query rows per kv
    head FAISS's blocked search is 2-3x faster, so "topk" then searches with FAISS itself (`_faiss_wins`).
    Use "faiss" for parity with the paper's setup, "topk" otherwise. On a GPU (H100, M 64k, T 1024, H 8,
    Dh 128) dense and top-k both take ~20 ms with 0.7 GB peak memory; FAISS always searches on the CPU.
    """
    _check(q, k, v, local_mask, mem_k, mem_v, mem_valid, retrieval, topk)
    n_mem = 0 if mem_k is None else mem_k.shape[2]
    effective = "dense" if n_mem == 0 or topk is None or topk >= n_mem else retrieval
    if _can_fuse(q, k, v, local_mask, mem_k, mem_v, effective):
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        return _fused_dense(q, k, v, local_mask, mem_k, mem_v, mem_valid, scale)
    if _can_fuse_cuda(q, local_mask, mem_valid, effective):
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        return _sdpa_lower_right(q, k, v, mem_k, mem_v, scale)
    B, H, T, head_dim = q.shape
    out = q.new_empty(B, H, T, head_dim)
    for h0, h1, t0, t1, cw, v_loc, mv in _iter_chunks(
        q, k, v, local_mask, mem_k, mem_v, mem_valid, retrieval, topk, grouping, scale
    ):
        o = torch.matmul(cw.w_loc.to(q.dtype), v_loc) * cw.share_loc  # (B, n, R, Dh) in the work dtype
        if cw.w_mem is not None and cw.slots is None:
            o = o + torch.matmul(cw.w_mem.to(q.dtype), mv) * cw.share_mem
        elif cw.w_mem is not None:
            o = o + torch.einsum("bnrk,bnrkd->bnrd", cw.w_mem.to(q.dtype), _gather_rows(mv, cw.slots)) * cw.share_mem
        out[:, h0:h1, t0:t1] = o.reshape(B, h1 - h0, t1 - t0, head_dim)  # autograd-safe (CopySlices)
    return out


def memory_attention_mass(
    q,
    k,
    local_mask,
    mem_k,
    mem_valid,
    segment_ids,
    n_segments=None,
    *,
    retrieval="dense",
    topk=None,
    grouping=None,
    scale=None,
) -> torch.Tensor:
    """Attention mass per key group, for the distraction ratio r_d (FOT_SPEC §3). Same weights as memory_attention.

    segment_ids (M,) or (B, M) long: the segment (e.g. source context / document) of every memory slot.
    Returns (B, H, T, 1 + n_segments) float32: column 0 = mass on local keys, column 1 + j = mass on memory
    slots of segment j (rows sum to 1). r_d for a relevant segment j: `mass[..., 1 + j] / mass.sum(-1)`
    (or divide by `mass[..., 1:].sum(-1)` to measure among memory contexts only), averaged over queries.
    """
    v_dummy = k.new_zeros(k.shape[0], k.shape[1], k.shape[2], 1)
    _check(q, k, k, local_mask, mem_k, mem_k, mem_valid, retrieval, topk)
    B, H, T, _ = q.shape
    segment_ids = torch.as_tensor(segment_ids, device=q.device).long().expand(B, -1)  # (B, M)
    n_segments = int(segment_ids.max()) + 1 if n_segments is None else n_segments
    mass = torch.zeros(B, H, T, 1 + n_segments, dtype=torch.float32, device=q.device)
    with torch.no_grad():
        for h0, h1, t0, t1, cw, _, _ in _iter_chunks(
            q, k, v_dummy, local_mask, mem_k, mem_k, mem_valid, retrieval, topk, grouping, scale
        ):
            n, R = cw.w_loc.shape[1], cw.w_loc.shape[2]
            m = torch.zeros(B, n, R, 1 + n_segments, dtype=torch.float32, device=q.device)
            m[..., 0] = (cw.w_loc.sum(-1, keepdim=True) * cw.share_loc).squeeze(-1).float()
            if cw.w_mem is not None:
                seg = segment_ids[:, None, None, :].expand(-1, n, R, -1)  # (B, n, R, M)
                seg = seg if cw.slots is None else seg.gather(-1, cw.slots)
                m[..., 1:].scatter_add_(-1, seg, (cw.w_mem * cw.share_mem).float())
            mass[:, h0:h1, t0:t1] = m.reshape(B, h1 - h0, t1 - t0, -1)
    return mass
