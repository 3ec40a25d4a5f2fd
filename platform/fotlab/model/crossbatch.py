"""Crossbatch attention: FoT's contrastive training signal (FOT_SPEC §2).

During training a memory layer lets batch entry b attend, in one softmax, to its own causal local context and to
the (key, value) pairs of up to n - 1 other entries of the same forward pass (n = 1 + range). With doc-aware
K-packing the nearest of those entries hold earlier chunks of the same document (positives) and the others hold
other documents (negatives). The loss is the ordinary next-token loss; gradients flow into every context.

Design choices:
- Slot c of entry b (c = 1 .. n-1) is entry b - c of the batch; slot 0 is the entry itself. Slots c >= allowed[b]
  are masked (`allowed_contexts`), so no entry ever wraps around to the end of the batch.
- Extra contexts use the raw (unrotated) keys `k_mem`: they sit "at position 0", exactly like memory keys at
  inference time, so training matches what the memory layer sees later.
- One attention call per layer: the n contexts are gathered into a flat key/value prefix (B, H, n*T, Dh) by index
  arithmetic on the batch dimension (no loop over entries) and a boolean block mask (B, 1, T, n*T) carries the
  causal slot 0, the allowed slots and the key padding. Softmax is computed by torch SDPA; its fused kernels
  accumulate the softmax in fp32, and on CPU we upcast low-precision inputs so the softmax is fp32 everywhere.
- The number of materialised slots is min(n, B): slots >= B are masked for every entry anyway, so capping them
  changes nothing but memory. On CUDA, Dh is zero-padded to a multiple of 8 (inside the gather) so SDPA keeps its
  fused kernels (LongLLaMA-3B's Dh 100 otherwise falls back to materialising every score).
- `CrossBatch.backend = "flex"` computes the same function with FlexAttention over the flattened batch: no
  gathered prefix, a block-sparse mask built in closed form, so memory does not grow with range and masked blocks
  cost nothing. One compiled graph per (B, T, H, Hkv, Dh, dtype); changing range between steps does not recompile.
  H100, bf16, forward + backward of one layer's attention (SDPA path / flex): B 8, T 2048, H 32, Dh 128, range 3,
  packing 4, stepping: 34 ms / 16 ms (plain causal 4 ms); B 64, T 512, H 8, range 63: 123 ms, 18 GiB / 13 ms, 1 GiB.
- A query that sees no key at all (only possible for a padded query with every visible key padded) gets a zero
  output and no gradient instead of NaN.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["CrossBatch", "allowed_contexts", "crossbatch_attention"]

FLEX_BLOCK = 128  # FlexAttention block size (queries and keys); the flex backend needs T % FLEX_BLOCK == 0


@dataclass(frozen=True)
class CrossBatch:
    """How a training forward pass mixes contexts across the batch.

    range: number of extra contexts an entry may see (n = 1 + range contexts in total; 0 = plain causal attention).
    packing: k, the number of consecutive batch rows that hold consecutive chunks of one document stream.
    stepping: if True, entry b may only see (b mod k) * ceil(n / (k-1)) + 1 contexts, giving the paper's mixture
        of entries with few and many contexts (LongLLaMA: packing 4, range 3 -> 1, 3, 4, 4 contexts).
    backend: "sdpa" (default; one torch SDPA call over a gathered (B, H, n*T, Dh) prefix and a dense block mask)
        or "flex" (FlexAttention over the flattened batch with a block-sparse mask: memory independent of range,
        masked blocks skipped; compiled on CUDA, for GPU training with large ranges; needs T % 128 == 0, and off
        CUDA runs only without autograd (torch has no CPU flex backward); falls back to "sdpa" otherwise).
        Both compute the same function.
    """

    range: int
    packing: int = 1
    stepping: bool = False
    backend: str = "sdpa"

    def __post_init__(self) -> None:
        for name in ("range", "packing"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"CrossBatch.{name} must be an int, got {type(value).__name__}")
        if self.range < 0:
            raise ValueError(f"CrossBatch.range must be >= 0, got {self.range}")
        if self.packing < 1:
            raise ValueError(f"CrossBatch.packing must be >= 1, got {self.packing}")
        if not isinstance(self.stepping, bool):
            raise TypeError(f"CrossBatch.stepping must be a bool, got {type(self.stepping).__name__}")
        if self.backend not in ("sdpa", "flex"):
            raise ValueError(f"CrossBatch.backend must be 'sdpa' or 'flex', got {self.backend!r}")

    @property
    def n_contexts(self) -> int:
        """n = 1 + range: the entry's own context plus the extra ones."""
        return 1 + self.range


def allowed_contexts(
    batch_size: int, n_contexts: int, packing: int = 1, stepping: bool = False, device: torch.device | str | None = None
) -> torch.Tensor:
    """Number of contexts entry b may attend to (slots 0 .. allowed[b]-1), as a LongTensor (B,).

    With stepping and packing k: step = ceil(n / max(k-1, 1)), allowed[b] = min((b mod k) * step + 1, n);
    without stepping (or k = 1) allowed[b] = n. Always allowed[b] <= b + 1 (never wrap around the batch).
    """
    if batch_size < 1 or n_contexts < 1 or packing < 1:
        raise ValueError(f"need batch_size, n_contexts, packing >= 1, got {batch_size}, {n_contexts}, {packing}")
    rows = torch.arange(batch_size, device=device)  # (B,)
    if stepping and packing > 1:
        step = math.ceil(n_contexts / max(packing - 1, 1))
        allowed = torch.clamp((rows % packing) * step + 1, max=n_contexts)
    else:
        allowed = torch.full_like(rows, n_contexts)
    return torch.minimum(allowed, rows + 1)


def _check_shapes(
    q: torch.Tensor, k_rot: torch.Tensor, k_mem: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None
) -> None:
    if q.dim() != 4 or k_rot.shape != k_mem.shape or k_rot.shape != v.shape:
        raise ValueError(
            f"expected q (B,H,T,Dh) and k_rot, k_mem, v (B,Hkv,T,Dh) of one shape, got "
            f"{tuple(q.shape)}, {tuple(k_rot.shape)}, {tuple(k_mem.shape)}, {tuple(v.shape)}"
        )
    B, H, T, Dh = q.shape
    Bk, Hkv, Tk, Dhk = k_rot.shape
    if (Bk, Tk, Dhk) != (B, T, Dh) or H % Hkv != 0:
        raise ValueError(f"q {tuple(q.shape)} and keys {tuple(k_rot.shape)} disagree (H must be a multiple of Hkv)")
    if key_valid is not None and tuple(key_valid.shape) != (B, T):
        raise ValueError(f"key_valid must be (B, T) = {(B, T)}, got {tuple(key_valid.shape)}")


def _expand_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, Hkv, L, Dh) -> (B, H, L, Dh) by repeating each kv head H/Hkv times (GQA); no copy when H == Hkv."""
    B, Hkv, L, Dh = x.shape
    if Hkv == n_heads:
        return x
    group = n_heads // Hkv
    return x[:, :, None].expand(B, Hkv, group, L, Dh).reshape(B, n_heads, L, Dh)


def _sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, scale: float
) -> torch.Tensor:
    """SDPA with an fp32 softmax: fused GPU kernels accumulate in fp32; elsewhere low precision is upcast."""
    dtype = q.dtype
    if q.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)
    return out.to(dtype)


def _slot_sources(batch_size: int, n_slots: int, device: torch.device) -> torch.Tensor:
    """Entry whose context fills slot c of entry b: b - c, clamped at 0, as a LongTensor (B, n).

    Clamped slots (b - c < 0) are always masked (allowed[b] <= b + 1), so what they hold never matters.
    """
    rows = torch.arange(batch_size, device=device)
    return (rows[:, None] - torch.arange(n_slots, device=device)[None, :]).clamp(min=0)


def _gather_contexts(
    x_own: torch.Tensor,
    x_extra: torch.Tensor,
    n_slots: int,
    n_heads: int,
    head_pad: int = 0,
    entries: torch.Tensor | None = None,
) -> torch.Tensor:
    """Flat prefix of n_slots contexts per entry: slot 0 = x_own[b], slot c = x_extra[b - c].

    x_own, x_extra: (B, Hkv, T, Dh) -> (B, H, n_slots*T, Dh), a strided view of one (B, n, T, H, Dh) buffer made
    by a single gather: the GQA head repeat is an expand (no copy) of the source, materialised by the gather itself,
    and the (T, H) layout lets n and T merge into one key axis without a second copy. head_pad zero-pads Dh
    (also inside the gather); the result then has Dh + head_pad features. entries (E,) long: gather only for
    these batch entries (result (E, H, n_slots*T, Dh')); None = all B.
    """
    B, Hkv, T, Dh = x_own.shape
    group = n_heads // Hkv
    sources = _slot_sources(B, n_slots, x_own.device)  # (B, n)
    if entries is not None:
        sources = sources.index_select(0, entries)  # (E, n)
    if x_extra is x_own:
        table = x_own  # (B, Hkv, T, Dh)
    else:  # rows 0..B-1 own contexts, rows B..2B-1 extra contexts
        table = torch.cat([x_own, x_extra], dim=0)  # (2B, Hkv, T, Dh)
        sources = torch.cat([sources[:, :1], sources[:, 1:] + B], dim=1)  # (B, n)
    if head_pad:
        table = F.pad(table, (0, head_pad))  # (B', Hkv, T, Dh'): small, before the gather
    head_dim = Dh + head_pad
    table = table.transpose(1, 2)[:, :, :, None].expand(-1, T, Hkv, group, head_dim)  # (B', T, Hkv, g, Dh') view
    gathered = table.index_select(0, sources.flatten())  # (B*n, T, Hkv, g, Dh') contiguous: the one copy
    return gathered.view(sources.shape[0], n_slots * T, n_heads, head_dim).transpose(1, 2)  # (B|E, H, n*T, Dh')


def _block_mask(allowed: torch.Tensor, n_slots: int, seq_len: int, key_valid: torch.Tensor | None) -> torch.Tensor:
    """Boolean mask (B, 1, T, n_slots*T): True = query may attend to key.

    Slot 0 is causal, slots 1.. are fully visible, slots >= allowed[b] are hidden, key_valid hides padded keys of
    every slot (slot c uses the padding of entry b - c).
    """
    B, T, device = allowed.shape[0], seq_len, allowed.device
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()  # (T, T)
    block = torch.cat([causal, causal.new_ones(T, (n_slots - 1) * T)], dim=1)  # (T, n*T)
    slot_of_key = torch.arange(n_slots, device=device).repeat_interleave(T)  # (n*T,)
    key_ok = slot_of_key[None, :] < allowed[:, None]  # (B, n*T)
    if key_valid is not None:
        sources = _slot_sources(B, n_slots, device)  # (B, n)
        key_ok = key_ok & key_valid.to(torch.bool)[sources].reshape(B, n_slots * T)  # (B, n*T)
    return (block[None] & key_ok[:, None, :])[:, None]  # (B, 1, T, n*T)


def crossbatch_attention(
    q: torch.Tensor,
    k_rot: torch.Tensor,
    k_mem: torch.Tensor,
    v: torch.Tensor,
    crossbatch: CrossBatch,
    key_valid: torch.Tensor | None = None,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of each entry over its own causal context plus the contexts of the entries before it.

    q: (B, H, T, Dh) queries rotated at local positions; k_rot: (B, Hkv, T, Dh) local keys rotated at local
    positions (slot 0); k_mem: (B, Hkv, T, Dh) raw keys used when another entry sees this one (slots >= 1);
    v: (B, Hkv, T, Dh) values (used by every slot); key_valid: (B, T) bool, False = padded key (every slot).
    scale defaults to 1/sqrt(Dh). Returns (B, H, T, Dh) in q's dtype. range 0 is plain causal attention.
    """
    _check_shapes(q, k_rot, k_mem, v, key_valid)
    B, H, T, Dh = q.shape
    scale = 1.0 / math.sqrt(Dh) if scale is None else scale
    if key_valid is not None and bool(key_valid.all()):
        key_valid = None  # no padding: the cheaper paths below apply
    if crossbatch.range == 0 and key_valid is None:
        return _causal_sdpa(q, k_rot, v, scale)
    if crossbatch.backend == "flex" and crossbatch.range > 0 and _flex_usable(q, k_rot, k_mem, v):
        return crossbatch_attention_flex(q, k_rot, k_mem, v, crossbatch, key_valid, scale=scale)
    if key_valid is None:
        return crossbatch_attention_grouped(q, k_rot, k_mem, v, crossbatch, scale=scale)
    return crossbatch_attention_sdpa(q, k_rot, k_mem, v, crossbatch, key_valid, scale=scale)


def crossbatch_attention_grouped(
    q: torch.Tensor,
    k_rot: torch.Tensor,
    k_mem: torch.Tensor,
    v: torch.Tensor,
    crossbatch: CrossBatch,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """crossbatch_attention for batches without padding, one SDPA call per distinct number of allowed contexts.

    Entries that may see a contexts gather exactly a (no slot that the mask would hide is computed); entries that
    see only themselves (a = 1: the first row of each packing group with stepping, and entry 0) run plain causal
    attention, whose kernel skips the masked half. Measured (busy 2-core CPU, one thread, 8-layer D 512 model,
    B 4, T 512, range 3, packing 4, stepping): see docs/performance.md.
    """
    B, H, T, Dh = q.shape
    scale = 1.0 / math.sqrt(Dh) if scale is None else scale
    allowed = allowed_contexts(B, crossbatch.n_contexts, crossbatch.packing, crossbatch.stepping, q.device)  # (B,)
    head_pad = _head_pad(q)
    out = q.new_zeros(B, H, T, Dh)
    for n_slots in sorted(set(allowed.tolist())):
        entries = (allowed == n_slots).nonzero().squeeze(-1)  # (E,)
        q_e = q.index_select(0, entries)  # (E, H, T, Dh)
        if n_slots == 1:
            o = _causal_sdpa(q_e, k_rot.index_select(0, entries), v.index_select(0, entries), scale)
        else:
            keys = _gather_contexts(k_rot, k_mem, n_slots, H, head_pad, entries)  # (E, H, n*T, Dh')
            values = _gather_contexts(v, v, n_slots, H, head_pad, entries)
            causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()  # (T, T)
            mask = torch.cat([causal, causal.new_ones(T, (n_slots - 1) * T)], dim=1)  # (T, n*T): slot 0 causal
            q_e = F.pad(q_e, (0, head_pad)) if head_pad else q_e
            o = _sdpa(q_e, keys, values, mask, False, scale)[..., :Dh]  # (E, H, T, Dh)
        out = out.index_copy(0, entries, o)
    return out


def _flex_usable(q: torch.Tensor, *others: torch.Tensor) -> bool:
    """Flex needs T % FLEX_BLOCK == 0; off CUDA torch has no flex backward, so there only without autograd."""
    if q.shape[2] % FLEX_BLOCK != 0:
        return False
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, *others))
    return q.is_cuda or not needs_grad


def _head_pad(q: torch.Tensor) -> int:
    """Zero features to add to Dh on CUDA: fused SDPA kernels need Dh % 8 == 0 (LongLLaMA-3B has Dh 100), else
    SDPA falls back to a kernel that materialises every score. Zero features change no score."""
    return (-q.shape[-1]) % 8 if q.is_cuda else 0


def _causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain causal attention (range 0 without padding): (B, H, T, Dh) from k, v (B, Hkv, T, Dh)."""
    H, Dh, pad = q.shape[1], q.shape[-1], _head_pad(q)
    if pad:
        q, k, v = (F.pad(x, (0, pad)) for x in (q, k, v))
    return _sdpa(q, _expand_heads(k, H), _expand_heads(v, H), None, True, scale)[..., :Dh]


def crossbatch_attention_sdpa(
    q: torch.Tensor,
    k_rot: torch.Tensor,
    k_mem: torch.Tensor,
    v: torch.Tensor,
    crossbatch: CrossBatch,
    key_valid: torch.Tensor | None = None,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """crossbatch_attention as one SDPA call over a gathered key/value prefix (same arguments)."""
    B, H, T, Dh = q.shape
    scale = 1.0 / math.sqrt(Dh) if scale is None else scale  # of Dh, not of the padded head dim SDPA sees
    allowed = allowed_contexts(B, crossbatch.n_contexts, crossbatch.packing, crossbatch.stepping, q.device)  # (B,)
    n_slots = min(crossbatch.n_contexts, B)  # slots >= B are masked for every entry (allowed[b] <= b + 1 <= B)
    head_pad = _head_pad(q)
    q = F.pad(q, (0, head_pad)) if head_pad else q
    keys = _gather_contexts(k_rot, k_mem, n_slots, H, head_pad)  # (B, H, n*T, Dh')
    values = _gather_contexts(v, v, n_slots, H, head_pad)  # (B, H, n*T, Dh')
    mask = _block_mask(allowed, n_slots, T, key_valid)  # (B, 1, T, n*T)
    has_key = mask.any(dim=-1, keepdim=True)  # (B, 1, T, 1)
    # A row with no visible key would be NaN in SDPA; let it see its own key, then zero its output.
    diag = torch.arange(T, device=q.device)
    mask[:, :, diag, diag] |= ~has_key[..., 0]  # slot 0 key t for query t
    out = _sdpa(q, keys, values, mask, False, scale)[..., :Dh]  # (B, H, T, Dh)
    return torch.where(has_key, out, out.new_zeros(()))


# ---- FlexAttention backend --------------------------------------------------------------------------------------
# The whole batch becomes one sequence: queries (1, H, B*T, Dh); keys [k_rot of every entry ; k_mem of every entry]
# (1, Hkv, 2*B*T, Dh) and values [v ; v]. Entry b's queries see its own causal k_rot block and the k_mem blocks of
# entries b-1 .. b-allowed[b]+1. The block structure is known in closed form, so the BlockMask is built from
# block indices (no mask evaluation over all B*T x 2*B*T pairs); only diagonal blocks (and, with padding, every
# visited block) apply the element mask. Rows that see no key give 0, like the SDPA path.


@functools.cache
def _flex_kernel(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False) if compiled else flex_attention


def _ordered_blocks(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense block visibility (Qb, Kb) bool -> (counts (1, 1, Qb) int32, indices (1, 1, Qb, Kb) int32), True first."""
    counts = dense.sum(dim=-1, dtype=torch.int32)  # (Qb,)
    order = torch.argsort((~dense).to(torch.int8), dim=-1, stable=True).to(torch.int32)  # (Qb, Kb)
    return counts[None, None], order[None, None]


def _flex_block_mask(allowed: torch.Tensor, seq_len: int, key_valid: torch.Tensor | None):
    """BlockMask over (B*T queries, 2*B*T keys) for the flattened crossbatch layout."""
    from torch.nn.attention.flex_attention import BlockMask

    B, T, device = allowed.shape[0], seq_len, allowed.device
    n_blocks = T // FLEX_BLOCK  # blocks per entry
    q_block = torch.arange(B * n_blocks, device=device)
    k_block = torch.arange(2 * B * n_blocks, device=device)
    q_entry, q_pos = (q_block // n_blocks)[:, None], (q_block % n_blocks)[:, None]  # (Qb, 1)
    is_own = (k_block < B * n_blocks)[None, :]  # (1, Kb): k_rot half
    k_entry, k_pos = ((k_block % (B * n_blocks)) // n_blocks)[None, :], (k_block % n_blocks)[None, :]
    slot = q_entry - k_entry  # (Qb, Kb)
    diagonal = is_own & (slot == 0) & (k_pos == q_pos)
    full = (is_own & (slot == 0) & (k_pos < q_pos)) | (~is_own & (slot >= 1) & (slot < allowed[q_entry]))
    if key_valid is not None:  # key blocks holding padding apply the element mask; all-valid blocks stay full
        block_valid = key_valid.to(torch.bool).view(B * n_blocks, FLEX_BLOCK).all(dim=-1).repeat(2)  # (Kb,)
        diagonal = diagonal | (full & ~block_valid[None, :])
        full = full & block_valid[None, :]
    valid = None if key_valid is None else key_valid.to(torch.bool).reshape(B * T)

    def mask_mod(batch, head, q_idx, kv_idx):
        own = kv_idx < B * T
        key = torch.where(own, kv_idx, kv_idx - B * T)
        q_entry_, k_entry_ = q_idx // T, key // T
        causal_own = own & (q_entry_ == k_entry_) & (key % T <= q_idx % T)
        extra = ~own & (q_entry_ - k_entry_ >= 1) & (q_entry_ - k_entry_ < allowed[q_entry_])
        visible = causal_own | extra
        return visible if valid is None else visible & valid[key]

    counts, indices = _ordered_blocks(diagonal)
    full_counts, full_indices = _ordered_blocks(full)
    return BlockMask.from_kv_blocks(
        counts,
        indices,
        full_counts,
        full_indices,
        BLOCK_SIZE=FLEX_BLOCK,
        mask_mod=mask_mod,
        seq_lengths=(B * T, 2 * B * T),
    )


def crossbatch_attention_flex(
    q: torch.Tensor,
    k_rot: torch.Tensor,
    k_mem: torch.Tensor,
    v: torch.Tensor,
    crossbatch: CrossBatch,
    key_valid: torch.Tensor | None = None,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """crossbatch_attention with FlexAttention (same arguments; T % 128 == 0).

    Compiled on CUDA; eager elsewhere (eager flex materialises all B*T x 2*B*T scores: tests only).
    """
    B, H, T, Dh = q.shape
    Hkv = k_rot.shape[1]
    allowed = allowed_contexts(B, crossbatch.n_contexts, crossbatch.packing, crossbatch.stepping, q.device)  # (B,)
    q_flat = q.transpose(0, 1).reshape(1, H, B * T, Dh)  # (1, H, B*T, Dh)
    k_flat = torch.cat([k_rot, k_mem], dim=0).transpose(0, 1).reshape(1, Hkv, 2 * B * T, Dh)  # (1, Hkv, 2BT, Dh)
    v_flat = torch.cat([v, v], dim=0).transpose(0, 1).reshape(1, Hkv, 2 * B * T, Dh)  # (1, Hkv, 2BT, Dh)
    block_mask = _flex_block_mask(allowed, T, key_valid)
    with warnings.catch_warnings():  # eager flex warns that it is not compiled: intended off CUDA
        warnings.simplefilter("ignore", UserWarning)
        out = _flex_kernel(q.is_cuda)(
            q_flat, k_flat, v_flat, block_mask=block_mask, scale=scale, enable_gqa=Hkv != H
        )  # (1, H, B*T, Dh)
    return out.reshape(H, B, T, Dh).transpose(0, 1)  # (B, H, T, Dh)
