"""Fused paths of memory attention (dense retrieval), taken by `fotlab.model.memory_attention.memory_attention`
when their conditions hold; each computes the same single softmax over local + memory keys (FOT_SPEC §1).

- CPU (fp32, inference; `can_fuse` / `fused_dense`): torch's flash-attention CPU kernel
  (`_scaled_dot_product_flash_attention_for_cpu`, which also returns the log-sum-exp) over the local part and over
  blocks of memory, merged exactly by log-sum-exp, so no score tensor is materialised and memory is cast to fp32
  one block at a time.
- CUDA (`can_fuse_cuda` / `sdpa_lower_right`): with every memory slot valid and the usual causal local mask,
  "all memory visible, local keys causal" is ONE causal pattern over the keys [memory; local], aligned to the last
  key (`causal_lower_right`), which torch's fused CUDA kernels (flash, memory-efficient) run without a mask tensor
  or a score matrix, forward and backward. Costs one copy of memory into the key tensor per call (memory-bound,
  small beside the attention itself).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

FUSED_MEMORY_BLOCK = 16384  # memory slots per fused-kernel call (bounds the fp32 copy of memory keys/values)
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)  # -> (out, lse)


def fold(x: torch.Tensor, n_kv: int) -> torch.Tensor:
    """(B, h, t, Dh) query heads of `n_kv` consecutive kv heads -> (B, n_kv, h / n_kv * t, Dh)."""
    B, h, t, head_dim = x.shape
    return x.reshape(B, n_kv, (h // n_kv) * t, head_dim)


def can_fuse(q, k, v, local_mask, mem_k, mem_v, retrieval: str) -> bool:
    """The fused CPU path applies: dense retrieval on fp32 CPU tensors outside autocast, no autograd (the fused
    kernel returns a log-sum-exp without gradient) and every query sees at least one local key (no row is fully
    masked)."""
    if retrieval != "dense" or q.device.type != "cpu" or _FLASH_CPU is None:
        return False
    if any(t.dtype != torch.float32 for t in (q, k, v)) or torch.is_autocast_enabled("cpu"):
        return False  # the kernel wants one dtype; under autocast the caller's tensors may be mixed
    tensors = (q, k, v) if mem_k is None else (q, k, v, mem_k, mem_v)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return bool(local_mask.any(-1).all())


def _merge_parts(out, lse, out_part, lse_part):
    """Exact merge of two softmax parts by their log-sum-exps: out (..., R, Dh), lse (..., R)."""
    total = torch.logaddexp(lse, lse_part)
    return out * torch.exp(lse - total)[..., None] + out_part * torch.exp(lse_part - total)[..., None], total


def fused_dense(q, k, v, local_mask, mem_k, mem_v, mem_valid, scale) -> torch.Tensor:
    """Dense memory attention with torch's fused (flash) CPU kernel: no score tensor is materialised.

    The local part (GQA heads repeated, causal or the given mask) and each block of `FUSED_MEMORY_BLOCK` memory
    slots (queries folded per kv head, memory cast to fp32 one block at a time) are separate kernel calls whose
    outputs are merged exactly by their log-sum-exps. Masks become -inf biases; a memory block with no valid slot
    for a batch row contributes nothing to that row.
    """
    flash = _FLASH_CPU
    if flash is None:  # can_fuse returns False without it
        raise RuntimeError("this torch build has no _scaled_dot_product_flash_attention_for_cpu kernel")
    B, H, T, head_dim = q.shape
    n_kv, S = k.shape[1], k.shape[2]
    group = H // n_kv
    k_loc, v_loc = (k, v) if group == 1 else (k.repeat_interleave(group, 1), v.repeat_interleave(group, 1))
    causal = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)  # (T, S)
    if S == T and bool((local_mask == causal).all()):
        out, lse = flash(q, k_loc, v_loc, 0.0, True, scale=scale)  # (B, H, T, Dh), (B, H, T)
    else:
        bias = torch.zeros(local_mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~local_mask, -math.inf)
        out, lse = flash(q, k_loc, v_loc, 0.0, False, attn_mask=bias, scale=scale)
    if mem_k is None or mem_k.shape[2] == 0:
        return out
    out, lse = fold(out, n_kv), lse.reshape(B, n_kv, group * T)  # (B, Hkv, G*T, Dh), (B, Hkv, G*T)
    qf = fold(q, n_kv)  # (B, Hkv, G*T, Dh)
    for m0 in range(0, mem_k.shape[2], FUSED_MEMORY_BLOCK):
        m1 = min(m0 + FUSED_MEMORY_BLOCK, mem_k.shape[2])
        mk = mem_k[:, :, m0:m1].to(q.dtype).contiguous()  # (B, Hkv, m, Dh)
        mv = mem_v[:, :, m0:m1].to(q.dtype).contiguous()
        valid = None if mem_valid is None else mem_valid[:, m0:m1]  # (B, m)
        if valid is None or bool(valid.all()):
            part, part_lse = flash(qf, mk, mv, 0.0, False, scale=scale)
        else:
            bias = torch.zeros(B, 1, 1, m1 - m0, dtype=q.dtype, device=q.device)
            bias.masked_fill_(~valid[:, None, None, :], -math.inf)
            part, part_lse = flash(qf, mk, mv, 0.0, False, attn_mask=bias, scale=scale)
            part_lse = part_lse.masked_fill(~valid.any(-1)[:, None, None], -math.inf)  # rows with no valid slot
        out, lse = _merge_parts(out, lse, part, part_lse)
    return out.reshape(B, H, T, head_dim)


def _is_lower_right_causal(local_mask: torch.Tensor) -> bool:
    """local_mask (B, 1|H, T, S) is the causal pattern aligned to the last key (query t sees keys <= S - T + t)."""
    T, S = local_mask.shape[-2:]
    causal = torch.ones(T, S, dtype=torch.bool, device=local_mask.device).tril(S - T)
    return S >= T and bool((local_mask == causal).all())


def can_fuse_cuda(q, local_mask, mem_valid, retrieval: str) -> bool:
    """The fused CUDA path applies: dense retrieval on CUDA, no invalid memory slot, and the local mask is the
    causal pattern aligned to the last key (prefill segments, cached decoding)."""
    if retrieval != "dense" or q.device.type != "cuda":
        return False
    if mem_valid is not None and not bool(mem_valid.all()):
        return False
    return _is_lower_right_causal(local_mask)


def sdpa_lower_right(q, k, v, mem_k, mem_v, scale) -> torch.Tensor:
    """Dense memory attention as one fused SDPA call over keys [memory; local] with a lower-right causal mask.

    q (B, H, T, Dh); k, v (B, Hkv, S, Dh) local (rotated keys); mem_k, mem_v (B, Hkv, M, Dh) or None. Every memory
    slot must be valid and the local mask causal aligned to the last key (`can_fuse_cuda`). Runs on any device
    (the tests check it on CPU); worth it on CUDA, where the pattern needs no mask tensor.
    """
    if mem_k is not None and mem_k.shape[2] > 0:
        k = torch.cat([mem_k.to(q.dtype), k], dim=2)
        v = torch.cat([mem_v.to(q.dtype), v], dim=2)
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(q.shape[2], k.shape[2]), scale=scale)
