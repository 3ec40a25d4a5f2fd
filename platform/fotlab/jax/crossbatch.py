"""Attention kernels of the JAX FoT model: local + memory attention and crossbatch attention (FOT_SPEC §1, §2).

Design choices:
- `attend` is one softmax in float32 over the visible local keys and the valid memory keys; masked scores are
  -1e6 (a fully masked row is uniform, never NaN); scores are computed in the activation dtype, weights cast back
  to it before they multiply the values (as fotlab.model.memory_attention).
- `crossbatch_attention` mirrors fotlab.model.crossbatch: slot 0 is the entry's own causal context (rotated keys),
  slot c >= 1 is entry b - c's raw keys (fully visible), slots c >= allowed[b] are masked, key padding follows
  the source entry; rows that see no key give 0. The slot table and `allowed` are static (numpy) for a given
  batch size and crossbatch setting, so one jit trace per setting; only min(n, B) slots are materialised.
- GQA: query head h uses kv head h // (H / Hkv) (keys repeated along the head axis).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

MASKED_SCORE = -1e6


@dataclasses.dataclass(frozen=True)
class JaxCrossBatch:
    """range (extra contexts), packing k, stepping: as `fotlab.model.crossbatch.CrossBatch` (hashable, static).

    group: rows per independent crossbatch group (None = the whole batch). A data-parallel global batch is the
    concatenation of per-rank batches; group = per-rank batch size gives each rank's rows exactly the contexts a
    PyTorch DDP rank gives them (no context crosses a rank boundary)."""

    range: int
    packing: int = 1
    stepping: bool = False
    group: int | None = None

    @classmethod
    def from_torch(cls, cb, group: int | None = None) -> JaxCrossBatch:
        """From a fotlab.model.crossbatch.CrossBatch (the backend choice has no JAX meaning)."""
        return cls(range=int(cb.range), packing=int(cb.packing), stepping=bool(cb.stepping), group=group)


def allowed_contexts(batch_size: int, n_contexts: int, packing: int = 1, stepping: bool = False) -> np.ndarray:
    """Contexts entry b may see (slots 0 .. allowed[b]-1), (B,) int: FOT_SPEC §2 (never wraps the batch)."""
    rows = np.arange(batch_size)
    if stepping and packing > 1:
        step = math.ceil(n_contexts / max(packing - 1, 1))
        allowed = np.minimum((rows % packing) * step + 1, n_contexts)
    else:
        allowed = np.full(batch_size, n_contexts)
    return np.minimum(allowed, rows + 1)


def _repeat_kv(x: jax.Array, n_heads: int) -> jax.Array:
    """(B, Hkv, S, Dh) -> (B, H, S, Dh)."""
    group = n_heads // x.shape[1]
    return x if group == 1 else jnp.repeat(x, group, axis=1)


def attend(q, k, v, mask, memory=None):
    """q (B, H, T, Dh), local k/v (B, Hkv, S, Dh), mask (B, T, S) bool; memory (keys, values, valid) with keys
    (B, Hkv, M, Dh) in any storage dtype, valid (B, M). One float32 softmax over local + memory keys."""
    H, Dh = q.shape[1], q.shape[-1]
    scale = 1.0 / math.sqrt(Dh)
    k, v = _repeat_kv(k, H), _repeat_kv(v, H)
    scores = jnp.einsum("bhtd,bhsd->bhts", q, k).astype(jnp.float32) * scale
    scores = jnp.where(mask[:, None], scores, MASKED_SCORE)
    if memory is not None:
        mem_k, mem_v, mem_valid = memory
        mem_k, mem_v = _repeat_kv(mem_k.astype(q.dtype), H), _repeat_kv(mem_v.astype(v.dtype), H)
        mem_scores = jnp.einsum("bhtd,bhmd->bhtm", q, mem_k).astype(jnp.float32) * scale
        mem_scores = jnp.where(mem_valid[:, None, None, :], mem_scores, MASKED_SCORE)
        scores = jnp.concatenate([scores, mem_scores], axis=-1)
        v = jnp.concatenate([v, mem_v], axis=2)
    weights = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum("bhts,bhsd->bhtd", weights, v)


def slot_table(batch_size: int, crossbatch: JaxCrossBatch) -> tuple[np.ndarray, np.ndarray]:
    """(sources (B, n): entry filling slot c of entry b, allowed (B,)) with n = min(1 + range, group size);
    slots never leave the entry's group."""
    group = crossbatch.group or batch_size
    if batch_size % group:
        raise ValueError(f"crossbatch group {group} does not divide the batch size {batch_size}")
    n_slots = min(crossbatch.range + 1, group)
    rows = np.arange(batch_size)
    local = rows % group
    sources = (rows - local)[:, None] + np.clip(local[:, None] - np.arange(n_slots)[None, :], 0, None)
    allowed = allowed_contexts(group, crossbatch.range + 1, crossbatch.packing, crossbatch.stepping)[local]
    return sources, allowed


def crossbatch_attention(q, k_rot, k_raw, v, crossbatch: JaxCrossBatch, key_valid=None):
    """Each entry over its own causal context (k_rot) plus the raw-key contexts (k_raw) of the entries before it.

    q (B, H, T, Dh); k_rot, k_raw, v (B, Hkv, T, Dh); key_valid (B, T) bool or None. Returns (B, H, T, Dh)."""
    B, H, T, Dh = q.shape
    Hkv = k_rot.shape[1]
    sources, allowed = slot_table(B, crossbatch)
    n = sources.shape[1]
    keys = k_raw[sources]  # (B, n, Hkv, T, Dh)
    keys = keys.at[:, 0].set(k_rot)
    values = v[sources]  # (B, n, Hkv, T, Dh)
    keys = keys.transpose(0, 2, 1, 3, 4).reshape(B, Hkv, n * T, Dh)
    values = values.transpose(0, 2, 1, 3, 4).reshape(B, Hkv, n * T, Dh)
    causal = np.tril(np.ones((T, T), dtype=bool))
    block = np.concatenate([causal, np.ones((T, (n - 1) * T), dtype=bool)], axis=1)  # (T, n*T)
    slot_ok = np.repeat(np.arange(n), T)[None, :] < allowed[:, None]  # (B, n*T)
    mask = jnp.asarray(block[None] & slot_ok[:, None, :])  # (B, T, n*T)
    if key_valid is not None:
        mask = mask & key_valid.astype(bool)[sources].reshape(B, 1, n * T)
    has_key = jnp.any(mask, axis=-1)  # (B, T)
    out = attend(q, keys, values, mask)
    return jnp.where(has_key[:, None, :, None], out, jnp.zeros((), out.dtype))
