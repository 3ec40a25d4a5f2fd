"""LLaMA building blocks and the FoT memory-layer attention, ordered bottom-up: norm -> RoPE -> MLP -> attention
-> decoder block.

Design choices:
- Weight names follow HF LLaMA exactly (q_proj/k_proj/v_proj/o_proj, gate_proj/up_proj/down_proj,
  input_layernorm/post_attention_layernorm) so LLaMA / LongLLaMA checkpoints load without renaming.
- RoPE tables are computed on the fly from positions (no persistent buffers: nothing to initialise on load).
- Every attention layer returns its *raw* (unrotated) keys and values: the caller keeps them as the local cache and,
  for memory layers, sends them to memory. Cached keys are rotated again at use (positions restart per window).
- `FoTMemoryAttention` is identical to `FoTAttention` except: one fp32 softmax over local + memory keys
  (`memory_attention`), memory keys unrotated, and with `mem_positionals=False` no RoPE at all.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from fotlab.model.configuration import FoTConfig

if TYPE_CHECKING:
    from fotlab.model.crossbatch import CrossBatch


class FoTRMSNorm(nn.Module):
    """RMSNorm computed in fp32 (as LLaMA)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin tables (B, S, Dh) for integer positions (B, S), HF "rotate_half" layout."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)  # (Dh/2,)
    freqs = positions[..., None].float() * inv_freq  # (B, S, Dh/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, S, Dh)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, S, Dh) with tables (B, S, Dh)."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


class FoTMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: FoTConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x)
        if torch.is_grad_enabled() and (x.requires_grad or gate.requires_grad):
            return self.down_proj(F.silu(gate) * self.up_proj(x))
        # Inference: activate and multiply in place (two fewer (tokens x intermediate) temporaries on long prompts).
        return self.down_proj(F.silu(gate, inplace=True).mul_(self.up_proj(x)))


@dataclass
class MemoryMassProbe:
    """Asks the memory layers for their attention mass per memory source (the distraction ratio r_d, FOT_SPEC §3).

    segment_ids: (M,) or (B, M) long, the source (context, document) of every slot of the memory passed in.
    n_segments: number of sources. After `model(..., memory_mass=probe)`, `probe.mass[layer_idx]` is
    (B, H, T, 1 + n_segments) float32 for every memory layer that had memory: column 0 = mass on the local keys,
    column 1 + j = mass on source j (rows sum to 1), from the same weights the layer's output uses
    (`memory_attention_mass`). Only the final (local) segment of the call is measured.
    """

    segment_ids: torch.Tensor
    n_segments: int
    mass: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class SegmentContext:
    """What every layer needs to process one segment of T new tokens after S - T cached local tokens.

    cos, sin: (B, S, Dh) RoPE tables for the S local keys (queries use the last T rows).
    local_mask: (B, 1, T, S) bool, True = visible (causal + key padding; a query always sees itself).
    key_valid: (B, S) bool padding mask of the local keys.
    crossbatch: optional `CrossBatch` (training-time crossbatch attention in memory layers).
    memory_mass: optional `MemoryMassProbe` the memory layers fill (evaluation only; outputs unchanged).
    """

    cos: torch.Tensor
    sin: torch.Tensor
    local_mask: torch.Tensor
    key_valid: torch.Tensor
    crossbatch: CrossBatch | None = None
    memory_mass: MemoryMassProbe | None = None

    @functools.cached_property
    def causal_only(self) -> bool:
        """True when local_mask is exactly the causal mask (no cached keys, no padding): SDPA can then use
        `is_causal=True`, whose kernels skip the masked half instead of reading a boolean mask."""
        return self.local_mask.shape[-2] == self.local_mask.shape[-1] and bool(self.key_valid.all())


class FoTAttention(nn.Module):
    """LLaMA attention (torch SDPA) over the local keys only; returns raw keys/values for the cache."""

    def __init__(self, config: FoTConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)
        if config.qk_norm:  # per-head temperature of the cosine logits (FOT_SPEC §1.3)
            self.qk_temperature = nn.Parameter(torch.full((self.n_heads, 1, 1), config.qk_norm_temperature))

    def project(self, x: torch.Tensor, past_kv):
        """q (B, H, T, Dh), new raw k/v (B, Hkv, T, Dh), and raw k/v over all S local keys (past + new).

        With qk_norm, q and k are unit vectors per head and q carries temperature * sqrt(Dh), so every attention
        path keeps its default 1/sqrt(Dh) scale and computes logits = temperature * cos(q, k)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, Dh)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, Dh)
        if self.config.qk_norm:
            q = F.normalize(q, dim=-1) * (self.qk_temperature * self.head_dim**0.5).to(q.dtype)
            k = F.normalize(k, dim=-1)
        if past_kv is None:
            return q, k, v, k, v
        k_all = torch.cat([past_kv[0].to(k.dtype), k], dim=2)  # (B, Hkv, S, Dh)
        v_all = torch.cat([past_kv[1].to(v.dtype), v], dim=2)  # (B, Hkv, S, Dh)
        return q, k, v, k_all, v_all

    def merge(self, out: torch.Tensor) -> torch.Tensor:
        B, _, T, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))  # (B, T, D)

    def forward(self, x, ctx: SegmentContext, past_kv=None, memory=None):
        q, k, v, k_all, v_all = self.project(x, past_kv)
        T = q.shape[2]
        q = apply_rope(q, ctx.cos[:, -T:], ctx.sin[:, -T:])
        k_rot = apply_rope(k_all, ctx.cos, ctx.sin)
        mask = None if ctx.causal_only else ctx.local_mask
        out = F.scaled_dot_product_attention(
            q, k_rot, v_all, attn_mask=mask, is_causal=mask is None, enable_gqa=self.n_heads != self.n_kv_heads
        )  # (B, H, T, Dh)
        return self.merge(out), k, v


class FoTMemoryAttention(FoTAttention):
    """Identical to `FoTAttention` except: each query attends in ONE fp32 softmax over its local keys and the memory
    keys (raw k_proj outputs, no rotation, cast back from mem_dtype); with `mem_positionals=False` no RoPE at all;
    with a `crossbatch` in the context (training), the extra keys come from other batch rows instead of memory."""

    def forward(self, x, ctx: SegmentContext, past_kv=None, memory=None):
        from fotlab.model.memory_attention import memory_attention

        q, k, v, k_all, v_all = self.project(x, past_kv)
        T = q.shape[2]
        k_raw = k_all
        if self.config.mem_positionals:
            q = apply_rope(q, ctx.cos[:, -T:], ctx.sin[:, -T:])
            k_all = apply_rope(k_all, ctx.cos, ctx.sin)
        cb = ctx.crossbatch
        if cb is not None and cb.range > 0:
            from fotlab.model.crossbatch import crossbatch_attention

            out = crossbatch_attention(q, k_all, k_raw, v_all, cb, key_valid=ctx.key_valid)
            return self.merge(out), k, v
        if memory is None:
            mem_k = k_all.new_zeros(k.shape[0], self.n_kv_heads, 0, self.head_dim)  # (B, Hkv, 0, Dh)
            mem_v, mem_valid = mem_k, ctx.key_valid.new_zeros(k.shape[0], 0)
        else:
            mem_k, mem_v, mem_valid = memory
        cfg = self.config
        out = memory_attention(
            q,
            k_all,
            v_all,
            ctx.local_mask,
            mem_k,
            mem_v,
            mem_valid,
            retrieval=cfg.mem_retrieval,
            topk=cfg.mem_topk,
            grouping=cfg.mem_attention_grouping,
            scale=None,
        )  # (B, H, T, Dh)
        if ctx.memory_mass is not None and memory is not None:
            self._record_mass(ctx.memory_mass, ctx, q, k_all, mem_k, mem_valid)
        return self.merge(out), k, v

    def _record_mass(self, probe: MemoryMassProbe, ctx: SegmentContext, q, k_all, mem_k, mem_valid) -> None:
        """Attention mass per memory source of these (already rotated) queries and keys, into `probe`
        (ctx.memory_mass)."""
        from fotlab.model.memory_attention import memory_attention_mass

        cfg = self.config
        probe.mass[self.layer_idx] = memory_attention_mass(
            q,
            k_all,
            ctx.local_mask,
            mem_k,
            mem_valid,
            probe.segment_ids,
            probe.n_segments,
            retrieval=cfg.mem_retrieval,
            topk=cfg.mem_topk,
            grouping=cfg.mem_attention_grouping,
        )


class FoTDecoderLayer(nn.Module):
    """Pre-norm LLaMA block; `is_memory_layer` picks the attention variant."""

    def __init__(self, config: FoTConfig, layer_idx: int):
        super().__init__()
        self.is_memory_layer = layer_idx in config.mem_layers
        attn_cls = FoTMemoryAttention if self.is_memory_layer else FoTAttention
        self.self_attn = attn_cls(config, layer_idx)
        self.mlp = FoTMLP(config)
        self.input_layernorm = FoTRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = FoTRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, ctx: SegmentContext, past_kv=None, memory=None):
        """x (B, T, D) -> (B, T, D), plus this segment's raw keys and values (B, Hkv, T, Dh)."""
        attn_out, k, v = self.self_attn(self.input_layernorm(x), ctx, past_kv, memory)
        x = x + attn_out
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, k, v
